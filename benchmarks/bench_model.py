"""Peak extra memory of saving and loading a VGG-16-sized bundle (~528 MiB of float32).

Each phase runs in a fresh process and reads the kernel's peak resident set size
(``ru_maxrss``): "extra" is the peak minus what the process held before the call, minus the
model itself when loading (its weights must exist somewhere). Run::

    PYTHONPATH=src python benchmarks/bench_model.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import common_parser

_MIB = 1 << 20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _phase(phase: str, bundle: str, quick: bool) -> dict[str, float]:
    """Run inside the child process: one save or one load, with memory figures."""
    import torch

    import torchkeep as tk
    from torchkeep.models import small_vgg, vgg16

    if phase == "save":
        torch.manual_seed(0)
        model = small_vgg() if quick else vgg16()
        before = _rss()
        start = time.perf_counter()
        tk.save_model(model, bundle)
        seconds = time.perf_counter() - start
        extra = _peak_rss() - before
    else:
        before = _rss()
        start = time.perf_counter()
        model = tk.load_model(bundle)
        seconds = time.perf_counter() - start
        extra = _peak_rss() - before - sum(p.numel() * p.element_size() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model_bytes": size, "extra_bytes": max(extra, 0), "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    """Save and load a VGG-16 bundle in separate processes and print the figures."""
    args = common_parser(__doc__.splitlines()[0]).parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bundle = str(Path(tmp) / "vgg16.bundle")
        for phase in ("save", "load"):
            command = [sys.executable, __file__, phase, bundle, "quick" if args.quick else "full"]
            out = subprocess.run(command, check=True, capture_output=True).stdout
            result = json.loads(out.decode().strip().splitlines()[-1])
            share = result["extra_bytes"] / result["model_bytes"]
            print(
                f"{phase}: model {result['model_bytes'] / _MIB:.0f} MiB, peak extra "
                f"{result['extra_bytes'] / _MIB:.1f} MiB ({share:.1%}), {result['seconds']:.2f} s"
            )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("save", "load"):
        print(json.dumps(_phase(sys.argv[1], sys.argv[2], sys.argv[3] == "quick")))
    else:
        main()
