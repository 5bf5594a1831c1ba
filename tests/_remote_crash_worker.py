"""Saves checkpoint steps to S3 in forked children and SIGKILLs them at given moments.

    python tests/_remote_crash_worker.py URL ENDPOINT

Reads ``STEP DELAY`` lines from stdin: forks a child that saves ``STEP`` (a multi-object step:
model, optimizer, state, random generators) with ``keep_last=2``, kills it with SIGKILL after
``DELAY`` seconds unless it finished, and answers ``STEP killed|committed SECONDS``.
Torch and torchkeep are imported once here; each child makes its own S3 client after the fork.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
from torch import nn

import torchkeep as tk
from tests.remote.server import s3_options


def _save(url: str, endpoint: str, step: int) -> None:
    torch.manual_seed(step)
    model = nn.Linear(1024, 768)  # 3 MiB of weights: one PUT
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()  # 6 MiB of Adam state: a multipart upload of 2 parts
    mgr = tk.CheckpointManager(
        url,
        keep_last=2,
        storage_options=s3_options(endpoint),
        transfer=tk.Transfer(part_size=5 << 20, max_concurrency=2),
    )
    mgr.save(step, model=model, optimizer=optimizer, marker=step)


def main() -> None:
    url, endpoint = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    _save(url + "-warm-up", endpoint, 0)  # imports and first-client costs paid before forking
    for line in sys.stdin:
        step_text, delay_text = line.split()
        step, delay = int(step_text), float(delay_text)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                _save(url, endpoint, step)
            finally:
                os._exit(0)
        deadline = started + delay
        outcome = "committed"
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                outcome = "killed"
                break
            time.sleep(0.005)
        print(step, outcome, f"{time.monotonic() - started:.3f}", flush=True)


if __name__ == "__main__":
    main()
