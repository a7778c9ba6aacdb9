"""``python -m deto``: the same as the ``deto`` command."""

import sys

from deto.cli import main

if __name__ == "__main__":
    sys.exit(main())
