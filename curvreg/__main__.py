"""``python -m curvreg``: the toolkit's command line (``curvreg.lab.entry``)."""
import sys

from curvreg.lab.entry import main

if __name__ == "__main__":
    sys.exit(main())
