"""Saving in the background: a snapshot in reused host memory, written by one thread.

``save()`` copies every tensor into host buffers kept from the previous save (same entry, name,
shape and dtype: a plain memcpy into memory that is already mapped, pinned when CUDA is
available), then hands writing, hashing and the commit to a background thread. At most one save
is in flight, so host memory is bounded to one snapshot. An error in the background is raised by
the next ``save()``/``wait()``; the interpreter waits for an in-flight save before it exits.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .entries import Entry


class SnapshotBuffers:
    """Host copies of the tensors of one save, reused by the next save where they fit."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    def _buffer_for(self, key: tuple[str, str], tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype:
            return buffer
        pin = tensor.device.type == "cuda"
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)

    def snapshot(self, entries: Sequence[Entry]) -> list[Entry]:
        """Copy the tensors of ``entries`` into the buffers; return entries that use them.

        Buffers the new snapshot does not use are released, so memory stays bounded to one
        snapshot. The caller may change the original tensors as soon as this returns.
        """
        used: dict[tuple[str, str], torch.Tensor] = {}
        copied_from_cuda = False
        result = []
        for entry in entries:
            tensors = {}
            for name, tensor in entry.tensors.items():
                buffer = self._buffer_for((entry.name, name), tensor)
                buffer.copy_(tensor, non_blocking=tensor.device.type == "cuda")
                copied_from_cuda |= tensor.device.type == "cuda"
                used[(entry.name, name)] = tensors[name] = buffer
            result.append(replace(entry, tensors=tensors))
        if copied_from_cuda:
            torch.cuda.synchronize()
        self._buffers = used
        return result


class BackgroundWriter:
    """Runs one job at a time on a non-daemon thread and keeps its error for the caller."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._label = ""
        atexit.register(_report_at_exit, weakref.ref(self))

    @property
    def busy(self) -> bool:
        """True while a job runs."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None], *, label: str) -> None:
        """Wait for the previous job (raising its error), then start ``job``."""
        self.wait()
        self._label = label
        self._thread = threading.Thread(
            target=self._run, args=(job,), name=f"torchkeep {label}", daemon=False
        )
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # handed to the caller by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the current job ends; raise the error of a job that failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def pending_error(self) -> BaseException | None:
        """The error of a finished job nobody has collected yet."""
        return self._error if not self.busy else None


def _report_at_exit(ref: weakref.ref[BackgroundWriter]) -> None:
    """At interpreter exit (after the thread was joined), print an error nobody collected."""
    writer = ref()
    error = writer.pending_error() if writer is not None else None
    if writer is not None and error is not None:
        sys.stderr.write(
            f"torchkeep: the background {writer._label} failed and nothing was committed: "
            f"{type(error).__name__}: {error}\n"
        )


class Remover:
    """Deletes retired step directories on a non-daemon thread, one batch at a time.

    The directories were already renamed out of sight (retention's decision is visible at
    once); only the slow part, freeing their blocks, runs here. A process killed meanwhile
    leaves hidden temporaries that the next save removes.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._errors: list[str] = []

    def remove(self, paths: Sequence[Path]) -> None:
        """Start deleting ``paths`` (after the previous batch is done)."""
        self._thread_join()
        self._thread = threading.Thread(
            target=self._run, args=(list(paths),), name="torchkeep retention", daemon=False
        )
        self._thread.start()

    def _run(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                if path.is_symlink():  # a step linked in from elsewhere: only the link goes
                    path.unlink()
                else:
                    shutil.rmtree(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._errors.append(f"{path}: {exc}")

    def _thread_join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> list[str]:
        """Block until the current batch is deleted; return (and forget) what failed."""
        self._thread_join()
        errors, self._errors = self._errors, []
        return errors
