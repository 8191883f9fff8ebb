"""``python -m procval``: the command line of :mod:`procval.cli`."""

from __future__ import annotations

import sys

from procval.cli import main

if __name__ == "__main__":
    sys.exit(main())
