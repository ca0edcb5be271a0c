"""Exit codes of every ``curvreg`` command and sweep worker (one list, used everywhere)."""
from enum import IntEnum


class Exit(IntEnum):
    OK = 0            # finished; for a sweep, every point is done or diverged
    FAILED = 1        # a run or a sweep point failed (see its log); an unexpected error
    BAD_INPUT = 2     # bad config, flag, spec, data or store: the message says which
    DIVERGED = 3      # the run's objective became non-finite; its summary says when
    LOCKED = 4        # another live process holds the run directory or the store
