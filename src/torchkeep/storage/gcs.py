"""Google Cloud Storage (gcsfs): the conditional replace that ``overwrite=True`` commits with.

GCS gives every write of an object a new *generation* number; an upload sent with
``ifGenerationMatch=<generation>`` is applied only if the object is still at that generation,
else the server answers 412 (gcsfs raises ``FileExistsError``). gcsfs exposes the precondition
only as ``ifGenerationMatch=0`` (``pipe_file(mode="create")``), so the replace is one JSON-API
multipart upload (metadata and bytes in one request) sent through gcsfs's own authenticated,
retrying ``call``. Only the multipart upload is used: fake-gcs-server was seen to ignore the
precondition on ``uploadType=media`` and resumable uploads, and on copies and rewrites.
"""

from __future__ import annotations

import json
import secrets
from typing import Any
from urllib.parse import quote

# Fully qualified class names of gcsfs's filesystems (the extended one is gcsfs's default when
# its zonal/HNS support is on).
GCS_FILESYSTEMS = ("gcsfs.core.GCSFileSystem", "gcsfs.extended_gcsfs.ExtendedGcsFileSystem")


def _multipart_body(key: str, data: bytes) -> tuple[str, bytes]:
    """``(content type, body)`` of a multipart/related upload of ``data`` as object ``key``."""
    boundary = f"torchkeep-{secrets.token_hex(16)}"
    while boundary.encode() in data:  # a boundary must not occur in the payload
        boundary = f"torchkeep-{secrets.token_hex(16)}"
    metadata = json.dumps({"name": key}).encode()
    body = b"".join(
        [
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
            metadata,
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    return f'multipart/related; boundary="{boundary}"', body


def gcs_replace_if(fs: Any, path: str, data: bytes, version: str) -> None:
    """Write ``path`` only if its generation is still ``version`` (else ``FileExistsError``).

    ``version`` is the object's ``generation`` (from ``fs.info``); an object deleted or
    rewritten since then fails the precondition (412) on the server, atomically.
    """
    bucket, key, _ = fs.split_path(path)
    content_type, body = _multipart_body(key, data)
    try:
        fs.call(
            "POST",
            f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
            uploadType="multipart",
            ifGenerationMatch=version,
            headers={"Content-Type": content_type},
            data=body,
            json_out=True,
        )
    except FileExistsError as exc:
        raise FileExistsError(f"{path} changed since generation {version}") from exc
    finally:
        fs.invalidate_cache(path)
