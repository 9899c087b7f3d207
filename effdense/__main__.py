"""``python -m effdense COMMAND ...``: the ``effdense`` console script, for an interpreter whose scripts folder
is not on ``PATH`` (or whose ``effdense`` script belongs to another Python)."""

import sys

from effdense.cli import main

if __name__ == "__main__":
    sys.exit(main())
