"""A moto S3 server in a subprocess on a free 127.0.0.1 port, and fresh buckets on it.

moto's server does not check signatures, so the dummy credentials in :func:`s3_options` are
only there to keep botocore from looking for real ones (environment, files, instance metadata).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

REGION = "us-east-1"
# botocore must never look past loopback for credentials or a region (instance metadata).
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}


class Bucket(NamedTuple):
    """A fresh bucket: ``url`` is ``s3://<name>``; ``storage_options`` reach it through fsspec."""

    url: str
    storage_options: dict[str, Any]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def s3_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    """fsspec ``storage_options`` for s3fs against ``endpoint`` with dummy credentials."""
    return {
        "key": DUMMY_ENV["AWS_ACCESS_KEY_ID"],
        "secret": DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
        **extra,
    }


def request(endpoint: str, method: str, path: str, body: bytes = b"", timeout: float = 10.0) -> int:
    """Send one plain HTTP request to a loopback test server; return its status."""
    host, port = endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def create_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket on moto directly (an unsigned PUT: moto does not check auth); return it."""
    name = name or f"tk-{uuid.uuid4().hex[:12]}"
    status = request(endpoint, "PUT", f"/{name}")
    if status != 200:
        raise RuntimeError(f"moto refused to create bucket {name!r}: HTTP {status}")
    return name


def _wait_ready(
    endpoint: str, ready_path: str, proc: subprocess.Popen[bytes], what: str, deadline_s: float
) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if request(endpoint, "GET", ready_path, timeout=2.0) == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before serving")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready at {endpoint} after {deadline_s:.0f} s")
        time.sleep(0.05)


@contextmanager
def serve(
    command: list[str],
    endpoint: str,
    *,
    ready_path: str,
    what: str,
    deadline_s: float,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run a test server's ``command``; yield ``endpoint`` once a GET of ``ready_path`` answers
    200. The server's process group is terminated (then killed, if it lingers) on exit."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        _wait_ready(endpoint, ready_path, proc, what, deadline_s)
        yield endpoint
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def moto_server(*, deadline_s: float = 60.0) -> Iterator[str]:
    """Run ``python -m moto.server`` on a free loopback port; yield its endpoint URL.

    The server is ready (answers ListBuckets) when this yields, and is terminated (then killed,
    if it lingers) when the context exits.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, **DUMMY_ENV}
    with serve(
        command, endpoint, ready_path="/", what="moto server", deadline_s=deadline_s, env=env
    ):  # "/" is ListBuckets
        yield endpoint
