"""Proof that a hostile payload is live: a plain loader, run in a child process, fires it.

A hostile-input test is only worth something if its payload would really run under the loader
torchkeep replaces. Every such test calls one of these helpers first: the plain loader
(``pickle.load``, ``torch.load(weights_only=False)``, ``torch.export.load``, an ``import`` with the
bundle's folder on ``sys.path`` ...) runs in a fresh interpreter and must create the canary; the
canary is then removed, torchkeep is run on the same file, and the test asserts the canary stays
absent. A dud payload therefore fails the test instead of passing it vacuously.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Plain loaders, each a snippet with ``{path}`` for the file (as a Python string literal).
PICKLE_LOAD = "import pickle\nwith open({path}, 'rb') as f:\n    pickle.load(f)"
TORCH_LOAD = "import torch\ntorch.load({path}, weights_only=False)"
EXPORT_LOAD = "import torch\ntorch.export.load({path}).module()"


def run_plain(code: str, *, cwd: Path | None = None, timeout: float = 120.0) -> None:
    """Run ``code`` in a fresh interpreter (errors after the payload fired are ignored)."""
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def prove_live(
    code: str, canary: Path, *, path: Path | None = None, cwd: Path | None = None
) -> None:
    """Assert that running ``code`` (a plain loader) creates ``canary``; then remove the canary.

    ``code`` may contain ``{path}``, replaced by ``repr(str(path))``.
    """
    canary.unlink(missing_ok=True)
    snippet = code.format(path=repr(str(path))) if path is not None else code
    run_plain(snippet, cwd=cwd)
    assert canary.exists(), f"dud payload: the plain loader did not fire it\n{snippet}"
    canary.unlink()
