"""How object-store transfers are bounded: part size, parallelism, retries and a deadline.

Every remote operation runs through :func:`attempt`: it is retried on transient failures (a
connection reset, a timeout, a 5xx or SlowDown answer) with exponential backoff, at most
``Transfer.retries`` times, and never past the deadline of the save or load it belongs to. A
call that hangs (a stalled connection) is abandoned when the deadline passes. What finally
fails is a :class:`~torchkeep.errors.RemoteStorageError` naming the URL, the operation, the
attempts made and the last status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import RemoteStorageError, first_line

T = TypeVar("T")
MIN_PART_SIZE = 5 << 20  # S3 refuses smaller parts (all but the last)
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0


@dataclass(frozen=True)
class Transfer:
    """Settings of transfers to and from object storage.

    Attributes:
        part_size: bytes per multipart-upload part and per ranged read (at least 5 MiB).
        max_concurrency: parts (or ranges) in flight at once per object; memory held by one
            upload is at most ``part_size * max_concurrency``.
        retries: attempts per operation after the first one fails transiently.
        deadline_s: seconds one save (or one load) may take in total, retries included.
        single_writer: the caller promises that one process at a time writes under the URL;
            required on back ends without an exclusive create (torchkeep then warns).
        orphan_grace_s: an unreferenced upload (a crashed save's data, an incomplete multipart
            upload) is deleted by a later save only once it is older than this.

    Example:
        >>> tk.CheckpointManager("s3://bucket/run", transfer=tk.Transfer(max_concurrency=4))
    """

    part_size: int = 8 << 20
    max_concurrency: int = 8
    retries: int = 5
    deadline_s: float = 1800.0
    single_writer: bool = False
    orphan_grace_s: float = 3600.0

    def __post_init__(self) -> None:
        if isinstance(self.part_size, bool) or not isinstance(self.part_size, int):
            raise TypeError(f"Transfer.part_size must be an int, not {self.part_size!r}")
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(
                f"Transfer.part_size is {self.part_size} bytes; object stores need parts of at "
                f"least {MIN_PART_SIZE} bytes (5 MiB)"
            )
        for name in ("max_concurrency", "retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Transfer.{name} must be a non-negative int, not {value!r}")
        if self.max_concurrency < 1:
            raise ValueError("Transfer.max_concurrency must be at least 1")
        if not self.deadline_s > 0 or not self.orphan_grace_s >= 0:
            raise ValueError(
                "Transfer.deadline_s must be positive and Transfer.orphan_grace_s non-negative, "
                f"not {self.deadline_s!r} and {self.orphan_grace_s!r}"
            )


class Deadline:
    """An absolute point in time that bounds every operation of one save or load."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left (negative once passed)."""
        return self.ends - time.monotonic()


def status_of(exc: BaseException) -> str:
    """The HTTP status (``"403"``) or error name an exception from a back end carries."""
    code = getattr(exc, "code", None)  # gcsfs's HttpError
    if isinstance(code, int) and not isinstance(code, bool):
        return str(code)
    if type(exc) is OSError and str(exc).startswith("Forbidden: "):  # gcsfs's answer to a 403
        return "403"
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code is not None:
            return str(code)
    for cause in (exc, exc.__cause__, exc.__context__):
        inner = getattr(cause, "response", None)
        if isinstance(inner, dict) and inner.get("ResponseMetadata", {}).get("HTTPStatusCode"):
            return str(inner["ResponseMetadata"]["HTTPStatusCode"])
    return type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    """True for failures worth another attempt: lost connections, timeouts, 5xx, SlowDown.

    A refusal (403, 404, 412: ``PermissionError``, ``FileNotFoundError``,
    ``FileExistsError``) and a bad request are final.
    """
    if isinstance(exc, (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError)):
        return False
    status = status_of(exc)
    if status.isdigit():
        return int(status) >= 500 or status == "429"
    text = str(exc)
    if "SlowDown" in text or "reduce your request rate" in text:
        return True
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) or "Timeout" in status


def _run_bounded(call: Callable[[], T], seconds: float) -> T:
    """``call()`` on a daemon thread, abandoned (left to its own timeouts) after ``seconds``."""
    box: list[T] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append(call())
        except BaseException as exc:  # handed to the waiting thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="torchkeep-remote-call", daemon=True).start()
    if not done.wait(max(seconds, 0.0)):
        raise TimeoutError(f"no answer within {seconds:.1f} s")
    if failure:
        raise failure[0]
    return box[0]


def attempt(
    call: Callable[[], T],
    *,
    url: str,
    operation: str,
    transfer: Transfer,
    deadline: Deadline,
    final: tuple[type[BaseException], ...] = (),
) -> T:
    """Run ``call`` with retries and backoff, bounded by ``deadline``.

    Exceptions of the ``final`` types are raised as they are (a ``FileExistsError`` the caller
    handles, a missing object); everything else that still fails becomes a
    :class:`RemoteStorageError`.

    Raises:
        RemoteStorageError: refused, out of retries, or past the deadline.
    """
    tries = 0
    while True:
        tries += 1
        left = deadline.left()
        if left <= 0:
            raise _give_up(url, operation, tries - 1, None, deadline, "the deadline passed")
        try:
            return _run_bounded(call, left)
        except final:
            raise
        except Exception as exc:
            if not is_transient(exc) or tries > transfer.retries:
                reason = "it was refused" if not is_transient(exc) else "every retry failed"
                raise _give_up(url, operation, tries, exc, deadline, reason) from exc
            pause = min(_BACKOFF_FIRST_S * 2 ** (tries - 1), _BACKOFF_MAX_S)
            if deadline.left() <= pause:
                raise _give_up(url, operation, tries, exc, deadline, "the deadline passed") from exc
            time.sleep(pause)


def _give_up(
    url: str,
    operation: str,
    tries: int,
    exc: BaseException | None,
    deadline: Deadline,
    reason: str,
) -> RemoteStorageError:
    status = None if exc is None else status_of(exc)
    last = "" if exc is None else f"; last error: {status} {first_line(exc)}"
    return RemoteStorageError(
        f"{operation} of {url} failed after {tries} attempt(s) ({reason}; deadline "
        f"{deadline.seconds:g} s){last}. Check the URL, the credentials in storage_options and "
        "the network, or raise Transfer(retries=..., deadline_s=...)",
        url=url,
        operation=operation,
        attempts=tries,
        status=status,
    )
