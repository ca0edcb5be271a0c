"""``python -m curvreg`` (also what ``torchrun -m curvreg`` runs): the toolkit's command line.

The library itself needs torch only; the command line needs the ``lab`` extras, so a missing
one gets a clear message instead of a traceback."""
import sys


def _main() -> int:
    try:
        from curvreg.lab.cli import main
    except ImportError as e:
        print(f"curvreg: the command line needs the toolkit's extras ({e.name} is missing); "
              "install them with: pip install -e '.[lab]'", file=sys.stderr)
        return 2
    return main()


if __name__ == "__main__":
    sys.exit(_main())
