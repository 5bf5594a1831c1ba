"""Where the torchkeep under test lives, for tests that start worker processes.

Workers must import the same torchkeep as the test (under ``make mutants`` that is a mutated
copy of ``src/``, not the checkout's), so they put this folder first on ``PYTHONPATH``.
"""

from __future__ import annotations

from pathlib import Path

import torchkeep

SRC = Path(torchkeep.__file__).resolve().parents[1]
