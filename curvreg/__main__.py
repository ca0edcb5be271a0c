"""``python -m curvreg`` (also what ``torchrun -m curvreg`` runs)."""
import sys

from curvreg.lab.cli import main

sys.exit(main())
