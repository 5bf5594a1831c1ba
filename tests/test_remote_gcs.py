"""gs:// for real: every job against fake-gcs-server (GCS's JSON API on loopback) through gcsfs.

The s3:// round trips of tests/test_remote_io.py, tests/test_remote_checkpoint.py and
tests/test_remote_overwrite.py are imported and run again here on gs:// (pytest resolves their
``bucket`` with the fixture of this module); the tests below cover what is GCS's own: the
exclusive create (``ifGenerationMatch=0``, never ``open("xb")``), the conditional replace
(``ifGenerationMatch=<generation>``), racing writers and the command line.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk
from tests.conftest import assert_state_equal
from tests.remote.server import Bucket
from tests.test_remote_checkpoint import (  # noqa: F401
    race_two_writers,
    sees_another_writers_commit,
    test_corrupt_latest_step_falls_back_and_changes_nothing,
    test_errors_name_the_step_url_not_the_private_copy,
    test_existing_step_is_refused,
    test_layout_data_under_a_save_id_and_the_manifest_beside_it,
    test_retention_removes_every_object_of_retired_steps,
    test_round_trip_resumes_exactly,
)
from tests.test_remote_io import (  # noqa: F401
    cli,
    data_prefix,
    flip,
    fs_of,
    test_bundle_round_trip_and_replace,
    test_checkpoint_folder_verify_and_weights,
    test_damaged_single_file_fails_like_the_local_one,
    test_diff_and_convert_between_url_and_local,
    test_flipped_byte_in_remote_bundle_weights_changes_nothing,
    test_hostile_pickle_object_is_refused_like_a_local_file,
    test_missing_object_names_the_url,
    test_save_model_never_replaces_a_checkpoint_step,
    test_tied_weights_stay_tied,
    test_weights_round_trip_is_bit_exact,
)
from tests.test_remote_overwrite import (  # noqa: F401
    lose_to_a_concurrent_replace,
    test_overwrite_replaces_the_step_and_its_data,
)
from torchkeep.models import Net
from torchkeep.storage import remote
from torchkeep.storage.store import ObjectStore


@pytest.fixture
def bucket(gcs_bucket: Bucket) -> Bucket:
    """The bucket every imported round trip runs on: a fresh one on fake-gcs-server."""
    return gcs_bucket


def test_every_imported_round_trip_runs_on_this_bucket() -> None:
    """An imported test that asked for another fixture (``s3_bucket``) would only repeat s3://."""
    imported = [
        value
        for name, value in globals().items()
        if name.startswith("test_") and value.__module__ != __name__
    ]
    assert len(imported) == 17
    assert all("bucket" in inspect.signature(test).parameters for test in imported)


def test_the_bucket_is_gcs_through_gcsfs(gcs_bucket: Bucket) -> None:
    """The imported round trips really ran on GCS's API, with the adapters of gcsfs."""
    store = ObjectStore(f"{gcs_bucket.url}/run", storage_options=gcs_bucket.storage_options)
    assert remote.class_name(store.fs) == "gcsfs.core.GCSFileSystem"
    assert store.replacer() is remote.REPLACE_IF["gcsfs.core.GCSFileSystem"]
    assert store.fs._location == gcs_bucket.storage_options["endpoint_url"]


# --------------------------------------------------------------------------------------------
# exclusive create and conditional replace on the emulator


def test_emulator_overwrites_with_open_xb(gcs_bucket: Bucket) -> None:
    """Why torchkeep never creates with gcsfs's ``open("xb")``: here it overwrote silently.

    If this starts failing, the emulator (or gcsfs) now refuses: the adapter may stay as it is.
    """
    fs, path = fs_of(gcs_bucket), f"{gcs_bucket.url}/taken.json"
    fs.pipe_file(path, b"first", mode="create")
    with fs.open(path, "xb") as f:
        f.write(b"second")
    assert fs.cat_file(path) == b"second"


def test_exclusive_create_refuses_a_taken_name_without_open(
    gcs_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gs:// commit is ``ifGenerationMatch=0`` on the upload, never ``open("xb")``."""
    import gcsfs.core

    def no_open(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"open{args[1:]} used for a commit")

    monkeypatch.setattr(gcsfs.core.GCSFileSystem, "open", no_open)
    store = ObjectStore(f"{gcs_bucket.url}/run", storage_options=gcs_bucket.storage_options)
    store.create_exclusive("step-00000001/manifest.json", b"first")
    with pytest.raises(FileExistsError):
        store.create_exclusive("step-00000001/manifest.json", b"second")
    assert store.read("step-00000001/manifest.json") == b"first"
    big = bytes(range(256)) * (12 << 12)  # 12 MiB: above gcsfs's single-request size
    store.create_exclusive("big.bin", big)
    with pytest.raises(FileExistsError):
        store.create_exclusive("big.bin", big[::-1])
    assert store.read("big.bin") == big


def test_replace_names_the_generation_it_read(gcs_bucket: Bucket) -> None:
    """A replace applies only at the generation read; a stale or deleted one is refused (412)."""
    store = ObjectStore(f"{gcs_bucket.url}/run", storage_options=gcs_bucket.storage_options)
    store.create_exclusive("manifest.json", b"one")
    first = store.version("manifest.json")
    assert first == str(
        store.fs.info(f"{store.fs._strip_protocol(gcs_bucket.url)}/run/manifest.json")["generation"]
    )
    store.replace_if("manifest.json", b"two", first)
    assert store.read("manifest.json") == b"two"
    second = store.version("manifest.json")
    assert second != first
    with pytest.raises(FileExistsError):  # another writer replaced it since `first`
        store.replace_if("manifest.json", b"three", first)
    assert store.read("manifest.json") == b"two"
    store.fs.rm_file(store.fs._strip_protocol(f"{gcs_bucket.url}/run/manifest.json"))
    with pytest.raises(FileExistsError):  # retired meanwhile: not recreated
        store.replace_if("manifest.json", b"four", second)
    assert not store.exists("manifest.json")


def test_racing_writers_exactly_one_commits(
    gcs_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    race_two_writers(gcs_bucket, monkeypatch)


def test_overwrite_loses_to_a_concurrent_replace(
    gcs_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    lose_to_a_concurrent_replace(gcs_bucket, monkeypatch)


def test_listing_sees_another_writers_commit_at_once(gcs_bucket: Bucket) -> None:
    sees_another_writers_commit(gcs_bucket)


def test_weights_larger_than_a_part_are_streamed_part_by_part(
    gcs_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object larger than one part goes through gcsfs's resumable writer one part at a
    time (never joined into one body in memory), and round-trips bit for bit."""
    from gcsfs.core import GCSFileSystem  # the class the fixture registers for gs://

    url, options = f"{gcs_bucket.url}/big.safetensors", gcs_bucket.storage_options
    part = 5 << 20
    bodies: list[int] = []
    writes: list[int] = []
    real_pipe, real_open = GCSFileSystem._pipe_file, GCSFileSystem.open

    async def pipe_file(self: Any, path: str, data: bytes, *args: Any, **kwargs: Any) -> Any:
        bodies.append(len(data))
        return await real_pipe(self, path, data, *args, **kwargs)

    def open_(self: Any, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        f = real_open(self, path, mode, *args, **kwargs)
        if "w" in mode:
            write = f.write
            f.write = lambda data: (writes.append(len(data)), write(data))[1]
        return f

    monkeypatch.setattr(GCSFileSystem, "_pipe_file", pipe_file)
    monkeypatch.setattr(GCSFileSystem, "open", open_)
    state = {"big": torch.arange(3 << 20, dtype=torch.float32)}  # 12 MiB
    tk.save_weights(state, url, storage_options=options, transfer=tk.Transfer(part_size=part))
    assert writes, bodies
    assert max(writes) <= part, writes  # streamed: three parts of at most 5 MiB
    assert sum(writes) > 12 << 20
    assert all(size <= part for size in bodies), bodies  # nothing sent as one large body
    assert_state_equal(tk.load_state_dict(url, storage_options=options), state)


def test_a_streamed_upload_that_fails_midway_leaves_no_object(gcs_bucket: Bucket) -> None:
    """gcsfs's writer completes the upload with what it has when it is closed: a failure after
    some parts were sent must not leave a truncated object at the URL."""
    import ctypes

    from torchkeep.storage.store import ObjectStore

    store = ObjectStore(
        gcs_bucket.url,
        storage_options=gcs_bucket.storage_options,
        transfer=tk.Transfer(part_size=5 << 20),
    )
    block = bytearray(os.urandom(4 << 20))
    address = ctypes.addressof(ctypes.c_char.from_buffer(block))

    def spans() -> Any:
        for _ in range(4):  # 16 MiB: three parts are sent before the failure
            yield address, len(block)
        raise OSError("the producer failed")

    with pytest.raises(OSError, match="the producer failed"):
        store.write_stream("half.safetensors", spans())
    store.fs.invalidate_cache()
    assert not store.fs.exists(f"{gcs_bucket.url}/half.safetensors")


# --------------------------------------------------------------------------------------------
# the command line


def test_cli_on_gs_urls(
    gcs_bucket: Bucket, tmp_path: Path, net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    options = gcs_bucket.storage_options
    flags = [
        *("--storage-option", f"endpoint_url={options['endpoint_url']}"),
        *("--storage-option", "token=anon", "--storage-option", f"project={options['project']}"),
    ]
    weights, run = f"{gcs_bucket.url}/net.safetensors", f"{gcs_bucket.url}/run"
    tk.save_weights(net, weights, storage_options=options)
    tk.CheckpointManager(run, storage_options=options, keep_last=1).save(2, model=net)
    code, out, _ = cli("inspect", weights, "--json", *flags, capsys=capsys)
    assert code == 0
    assert json.loads(out)["path"] == weights
    code, out, _ = cli("ls", run, "--json", *flags, capsys=capsys)
    assert code == 0
    assert [(s["step"], s["valid"]) for s in json.loads(out)["steps"]] == [(2, True)]
    code, out, _ = cli("verify", run, *flags, capsys=capsys)
    assert code == 0
    assert "all files match" in out
    step = "run/step-00000002"
    data = data_prefix(gcs_bucket, step)
    flip(gcs_bucket, f"{step}/{data}/model.safetensors", -1)
    code, out, _ = cli("verify", run, *flags, capsys=capsys)
    assert code == 1
    # the object's own URL, under the step's save id
    assert f"{run}/step-00000002/{data}/model.safetensors" in "".join(out.split())


def test_cli_without_gcsfs_names_the_gcs_extra() -> None:
    code = "import sys\nsys.modules['gcsfs'] = None\nfrom torchkeep.cli import main\n"
    code += "sys.exit(main(['inspect', 'gs://bucket/net.safetensors']))"
    source = Path(tk.__file__).resolve().parents[1]  # the torchkeep under test (a mutant's too)
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 2
    assert "optional package 'gcsfs'" in done.stderr
    assert "pip install 'torchkeep[gcs]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_gcsfs_errors_are_classified_by_their_http_status() -> None:
    """gcsfs raises a 403 as a plain OSError ("Forbidden: ...") and other HTTP errors as its
    own HttpError with a ``code``: a refusal must be final (not retried until the deadline)
    and a 5xx transient, each reported with its status."""
    from gcsfs.retry import validate_response

    from torchkeep.storage.transfer import is_transient, status_of

    raised: dict[int, BaseException] = {}
    for status in (403, 503, 429, 400):
        body = json.dumps({"error": {"code": status, "message": f"answer {status}"}}).encode()
        with pytest.raises(Exception) as caught:  # noqa: PT011 (whatever gcsfs raises)
            validate_response(status, body, "bucket/key")
        raised[status] = caught.value
    assert status_of(raised[403]) == "403"
    assert not is_transient(raised[403])
    assert (status_of(raised[503]), is_transient(raised[503])) == ("503", True)
    assert (status_of(raised[429]), is_transient(raised[429])) == ("429", True)
    assert (status_of(raised[400]), is_transient(raised[400])) == ("400", False)
