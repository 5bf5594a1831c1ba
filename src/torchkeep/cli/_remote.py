"""Locations on the command line: local paths or URLs, and the options that reach a URL.

A location that is a URL (``s3://bucket/net.safetensors``, any fsspec URL) stays text; anything
else is a local path, handled exactly as before. ``--storage-option KEY=VALUE`` (repeatable)
passes options to the URL's fsspec filesystem (``endpoint_url=http://127.0.0.1:9000``,
``anon=true``); a VALUE that reads as JSON (a number, ``true``/``false``/``null``, an object, a
list, a quoted string) is passed as that value, anything else as text. fsspec's environment
variables configure a filesystem as well (``FSSPEC_S3='{"anon": true}'``,
``FSSPEC_S3_ENDPOINT_URL=...``), and so do the back end's own (``AWS_ACCESS_KEY_ID``...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import StorageCapabilityError
from ..storage.remote import is_remote


def location(text: str) -> Path | str:
    """An argparse ``type``: a URL stays text, anything else becomes a local path."""
    return text if is_remote(text) else Path(text)


def _option(text: str) -> tuple[str, Any]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE (for example endpoint_url=http://127.0.0.1:9000)"
        )
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--storage-option KEY=VALUE`` (repeatable) to a command that takes URLs."""
    parser.add_argument(
        "--storage-option",
        dest="storage_option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="an option of the URL's fsspec filesystem, e.g. endpoint_url=http://host:9000 "
        "(repeatable; JSON values such as true or {...} are decoded)",
    )


def url_keywords(args: argparse.Namespace, *locations: Path | str) -> dict[str, Any]:
    """``{"storage_options": ...}`` for a library call when a location is a URL, else nothing
    (a local path is passed exactly as before)."""
    options = storage_options(args, *locations)
    return {} if options is None else {"storage_options": options}


def storage_options(args: argparse.Namespace, *locations: Path | str) -> dict[str, Any] | None:
    """The ``--storage-option`` values, or None when no location is a URL.

    Raises:
        StorageCapabilityError: options were given but every location is a local path.
    """
    options = dict(args.storage_option)
    if any(isinstance(place, str) for place in locations):
        return options
    if options:
        raise StorageCapabilityError(
            "--storage-option applies to URLs (s3://..., memory://...), and "
            f"{', '.join(str(p) for p in locations)} is a local path; drop the option"
        )
    return None
