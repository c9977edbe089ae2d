"""``python -m bilevel``: the ``bilevel`` command, also under ``torchrun ... -m bilevel``."""

import sys

from bilevel.cli import main

if __name__ == "__main__":
    sys.exit(main())
