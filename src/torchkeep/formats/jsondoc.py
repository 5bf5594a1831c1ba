"""Reading a JSON document from an untrusted file with bounded size and nesting.

``json.loads`` recurses once per nesting level (100k-deep input raises ``RecursionError``),
reads whatever size it is given and rejects integers of more than 4300 digits with a bare
``ValueError``. This reader checks the size before reading and the nesting depth before
parsing, and turns every failure into a :class:`CorruptFileError` naming the file.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError, TorchkeepFileNotFoundError

# A JSON string (escapes included); removed before brackets are counted.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def nesting_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in ``data`` (brackets inside strings ignored)."""
    brackets = _BRACKET.findall(_STRING.sub(b'""', data))
    return max(accumulate(_DEPTH_STEP[b[0]] for b in brackets), default=0)


def read_json_document(path: Path, *, max_bytes: int, max_depth: int, what: str) -> Any:
    """Parse the JSON file ``path`` after checking its size and nesting depth.

    Args:
        path: the file.
        max_bytes: refuse larger files.
        max_depth: refuse documents whose arrays/objects nest deeper.
        what: what the file is, for messages (e.g. ``"a bundle's config"``).

    Raises:
        TorchkeepFileNotFoundError: the file is missing.
        CorruptFileError: too large, too deep, not UTF-8 JSON, or an unparseable number.
    """
    try:
        if not path.is_file():
            raise CorruptFileError(f"{path} ({what}) is not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise CorruptFileError(
                f"{path} ({what}) has {size} bytes, more than the {max_bytes} allowed; it is "
                "damaged or hostile, re-create it"
            )
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # it may have grown since stat()
        if len(data) > max_bytes:
            raise CorruptFileError(f"{path} ({what}) grew past {max_bytes} bytes while read")
    except FileNotFoundError:
        raise TorchkeepFileNotFoundError(f"{path} ({what}) is missing") from None
    except OSError as exc:
        raise CorruptFileError(f"{path} ({what}) cannot be read ({exc})") from None
    depth = nesting_depth(data)
    if depth > max_depth:
        raise CorruptFileError(
            f"{path} ({what}) nests {depth} levels deep, more than the {max_depth} allowed; it "
            "is damaged or hostile, re-create it"
        )
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, digits
        raise CorruptFileError(f"{path} ({what}) is not valid JSON ({exc}); re-create it") from None
