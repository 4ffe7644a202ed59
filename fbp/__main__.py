"""``python -m fbp``: the command line (see :mod:`fbp.cli`, or ``python -m fbp --help``)."""

import sys

from fbp.cli import main

if __name__ == "__main__":
    sys.exit(main())
