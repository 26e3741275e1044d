"""`python -m surogate ...` is `python -m surogate.train ...`."""

import sys

from surogate.train import main

if __name__ == "__main__":
    sys.exit(main())
