"""A module whose import waits until a file exists (``tests/test_preload.py``).

The file is named by ``PROCVAL_TEST_RELEASE``; a fork server preloading this module stays
"starting" until the test creates it (60 s at most).
"""

from __future__ import annotations

import os
import time

_path = os.environ.get("PROCVAL_TEST_RELEASE", "")
_deadline = time.monotonic() + 60
while _path and not os.path.exists(_path) and time.monotonic() < _deadline:
    time.sleep(0.02)
