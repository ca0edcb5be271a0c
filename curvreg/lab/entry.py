"""The ``curvreg`` console script and ``python -m curvreg`` (what ``torchrun -m curvreg`` runs).

The library needs torch only; the command line needs the ``lab`` extras (numpy, PyYAML, tqdm,
matplotlib), so a missing one is a one-line message naming the install command, exit code 2.
Only the standard library is imported before that check.
"""
import sys

from .exitcodes import Exit


def main(argv=None) -> int:
    try:
        from .cli import main as cli_main
    except ModuleNotFoundError as e:
        print(f"curvreg: the command line needs the toolkit's extras ({e.name} is missing); "
              "install them with: pip install -e '.[lab]'", file=sys.stderr)
        return Exit.BAD_INPUT
    return cli_main(argv)
