"""Weights, bundles, verify, describe, convert and diff on URLs: s3:// (moto) and memory://.

Every round trip is compared bit for bit with the local result; damaged and hostile objects
must be refused by the same checks (and error types) as local files, before anything changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk
from tests._live import TORCH_LOAD, prove_live
from tests._source import SRC
from tests.conftest import TiedLM, assert_state_equal
from tests.remote.proxy import FaultProxy
from tests.remote.server import Bucket
from tests.test_hostile_files import WritesFile, _torch_zip
from torchkeep.cli import main
from torchkeep.compare import diff_files
from torchkeep.convert import convert
from torchkeep.describe import describe
from torchkeep.models import Net

fsspec = pytest.importorskip("fsspec")

FAST = tk.Transfer(retries=2, deadline_s=60)


@pytest.fixture(params=["s3", "memory"])
def bucket(request: pytest.FixtureRequest) -> Bucket:
    """A fresh bucket on moto's S3 server, or a fresh memory:// prefix."""
    fixture = "s3_bucket" if request.param == "s3" else "memory_bucket"
    found: Bucket = request.getfixturevalue(fixture)
    return found


def fs_of(bucket: Bucket) -> Any:
    protocol = bucket.url.split("://", 1)[0]
    return fsspec.filesystem(protocol, skip_instance_cache=True, **bucket.storage_options)


def keys(bucket: Bucket, prefix: str) -> list[str]:
    fs = fs_of(bucket)
    fs.invalidate_cache()
    root = fs._strip_protocol(f"{bucket.url}/{prefix}")
    return sorted(k[len(root) :] for k in fs.find(root))


def flip(bucket: Bucket, key: str, offset: int) -> None:
    """Flip every bit of one byte of object ``key`` (a negative offset counts from the end)."""
    fs = fs_of(bucket)
    data = bytearray(fs.cat_file(f"{bucket.url}/{key}"))
    data[offset] ^= 0xFF
    fs.pipe_file(f"{bucket.url}/{key}", bytes(data))


def data_prefix(bucket: Bucket, folder: str) -> str:
    manifest = json.loads(fs_of(bucket).cat_file(f"{bucket.url}/{folder}/manifest.json"))
    data: str = manifest["data"]
    return data


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("name", ["net.safetensors", "net.pt"])
def test_weights_round_trip_is_bit_exact(
    bucket: Bucket, tmp_path: Path, net: Net, name: str
) -> None:
    url = f"{bucket.url}/w/{name}"
    assert tk.save_weights(net, url, storage_options=bucket.storage_options) == url
    local = tk.save_weights(net, tmp_path / name)
    loaded = tk.load_state_dict(url, storage_options=bucket.storage_options)
    assert_state_equal(loaded, net.state_dict())
    assert_state_equal(loaded, tk.load_state_dict(local))
    if name.endswith(".safetensors"):  # the very bytes a local save writes
        assert fs_of(bucket).cat_file(url) == Path(local).read_bytes()
    fresh = Net()
    report = tk.load_weights(fresh, url, storage_options=bucket.storage_options)
    assert report.ok
    assert report.path == url
    assert_state_equal(fresh.state_dict(), net.state_dict())


def test_tied_weights_stay_tied(bucket: Bucket, tied: TiedLM) -> None:
    url = f"{bucket.url}/tied.safetensors"
    tk.save_weights(tied, url, storage_options=bucket.storage_options)
    loaded = tk.load_state_dict(url, storage_options=bucket.storage_options)
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert_state_equal(loaded, tied.state_dict())


def test_bundle_round_trip_and_replace(bucket: Bucket, net: Net) -> None:
    url, options = f"{bucket.url}/net.bundle", bucket.storage_options
    assert tk.save_model(net, url, storage_options=options) == url
    first = data_prefix(bucket, "net.bundle")
    assert keys(bucket, "net.bundle") == sorted(
        ["/manifest.json", f"/{first}/config.json", f"/{first}/model.safetensors"]
    )
    loaded = tk.load_model(url, storage_options=options)
    assert type(loaded) is Net
    assert_state_equal(loaded.state_dict(), net.state_dict())
    report = tk.verify(url, storage_options=options)
    assert report.ok
    assert report.path == url
    assert list(report.checked) == [url]
    assert describe(url, storage_options=options).path == url
    torch.manual_seed(1)
    other = Net()
    tk.save_model(other, url, storage_options=options)  # replaces, as a local save does
    second = data_prefix(bucket, "net.bundle")
    assert second != first
    assert not [k for k in keys(bucket, "net.bundle") if first in k]  # old data retired
    assert_state_equal(tk.load_model(url, storage_options=options).state_dict(), other.state_dict())


def test_save_model_never_replaces_a_checkpoint_step(bucket: Bucket, net: Net) -> None:
    manager = tk.CheckpointManager(f"{bucket.url}/run", storage_options=bucket.storage_options)
    manager.save(1, model=net)
    step = f"{bucket.url}/run/step-00000001"
    with pytest.raises(tk.DestinationExistsError, match=r"not a torchkeep\.bundle"):
        tk.save_model(net, step, storage_options=bucket.storage_options)
    assert tk.verify(step, storage_options=bucket.storage_options).ok


def test_checkpoint_folder_verify_and_weights(bucket: Bucket, net: Net) -> None:
    url, options = f"{bucket.url}/run", bucket.storage_options
    manager = tk.CheckpointManager(url, storage_options=options)
    manager.save(1, model=net)
    manager.save(2, model=net)
    report = tk.verify(url, storage_options=options)
    assert report.ok
    assert sorted(report.checked) == [f"{url}/step-00000001", f"{url}/step-00000002"]
    assert_state_equal(tk.load_state_dict(url, storage_options=options), net.state_dict())


def test_diff_and_convert_between_url_and_local(bucket: Bucket, tmp_path: Path, net: Net) -> None:
    options = bucket.storage_options
    url = f"{bucket.url}/net.safetensors"
    tk.save_weights(net, url, storage_options=options)
    local_pt = tk.save_weights(net, tmp_path / "net.pt")
    assert diff_files(url, local_pt, storage_options=options).equal
    done = convert(url, f"{bucket.url}/net.pt", storage_options=options)
    assert done.destination == f"{bucket.url}/net.pt"
    assert done.source == url
    assert_state_equal(
        tk.load_state_dict(f"{bucket.url}/net.pt", storage_options=options), net.state_dict()
    )
    with pytest.raises(tk.DestinationExistsError):
        convert(url, f"{bucket.url}/net.pt", storage_options=options)


def test_convert_to_a_remote_checkpoint_folder_restores(
    memory_bucket: Bucket, tmp_path: Path, net: Net
) -> None:
    """A tutorial checkpoint dict becomes a step the remote CheckpointManager restores."""
    torch.save({"epoch": 5, "model_state_dict": net.state_dict()}, tmp_path / "old.pt")
    run = f"{memory_bucket.url}/run"
    done = convert(tmp_path / "old.pt", run)
    assert done.destination == f"{run}/step-00000005"
    manager = tk.CheckpointManager(run)
    assert manager.steps == [5]
    fresh = Net()
    assert manager.restore(model=fresh).extra["epoch"] == 5
    assert_state_equal(fresh.state_dict(), net.state_dict())
    with pytest.raises(tk.DestinationExistsError):  # a committed step is never replaced
        convert(tmp_path / "old.pt", run)


# --------------------------------------------------------------------------------------------
# damaged, missing and hostile objects


def test_flipped_byte_in_remote_bundle_weights_changes_nothing(bucket: Bucket, net: Net) -> None:
    url, options = f"{bucket.url}/net.bundle", bucket.storage_options
    tk.save_model(net, url, storage_options=options)
    flip(bucket, f"net.bundle/{data_prefix(bucket, 'net.bundle')}/model.safetensors", -1)
    with pytest.raises(tk.ChecksumMismatchError, match=r"net\.bundle") as info:
        tk.load_model(url, storage_options=options)
    assert url in str(info.value)
    assert "torchkeep-fetch" not in str(info.value)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tk.ChecksumMismatchError):
        tk.load_weights(model, url, storage_options=options)
    assert_state_equal(model.state_dict(), before)
    assert not tk.verify(url, storage_options=options).ok


def test_damaged_single_file_fails_like_the_local_one(
    bucket: Bucket, tmp_path: Path, net: Net
) -> None:
    local = Path(tk.save_weights(net, tmp_path / "net.safetensors"))
    damaged = bytearray(local.read_bytes())
    damaged[3] ^= 0xFF  # the header length: the header no longer fits the file
    local.write_bytes(bytes(damaged))
    with pytest.raises(tk.TorchkeepError) as on_disk:
        tk.load_state_dict(local)
    url = f"{bucket.url}/net.safetensors"
    fs_of(bucket).pipe_file(url, bytes(damaged))
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(type(on_disk.value)) as remote:
        tk.load_weights(model, url, storage_options=bucket.storage_options)
    assert url in str(remote.value)
    assert_state_equal(model.state_dict(), before)


def test_missing_object_names_the_url(bucket: Bucket) -> None:
    url = f"{bucket.url}/nothing/here.safetensors"
    with pytest.raises(tk.TorchkeepFileNotFoundError, match="does not exist") as info:
        tk.load_state_dict(url, storage_options=bucket.storage_options)
    assert url in str(info.value)
    with pytest.raises(tk.TorchkeepFileNotFoundError):
        tk.verify(url, storage_options=bucket.storage_options)


def test_hostile_pickle_object_is_refused_like_a_local_file(bucket: Bucket, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pt"
    _torch_zip(evil, WritesFile(canary))
    prove_live(TORCH_LOAD, canary, path=evil)
    url = f"{bucket.url}/evil.pt"
    fs_of(bucket).pipe_file(url, evil.read_bytes())
    with pytest.raises(tk.UnsafeCheckpointError, match="could run") as info:
        tk.load_state_dict(url, storage_options=bucket.storage_options)
    assert url in str(info.value)
    assert not canary.exists()


def test_object_a_bundle_manifest_does_not_list_is_refused(
    bucket: Bucket, tmp_path: Path, net: Net
) -> None:
    """A module shipped in the bundle's data prefix, its class named by config.json."""
    canary = tmp_path / "canary"
    local = tmp_path / "net.bundle"
    tk.save_model(net, local)
    (local / "evil.py").write_text(f"open({str(canary)!r}, 'w').write('ran')\nclass Net: ...\n")
    prove_live(f"import sys\nsys.path.insert(0, {str(local)!r})\nimport evil", canary)
    url = f"{bucket.url}/net.bundle"
    tk.save_model(net, url, storage_options=bucket.storage_options)
    data = data_prefix(bucket, "net.bundle")
    fs_of(bucket).pipe_file(f"{url}/{data}/evil.py", (local / "evil.py").read_bytes())
    config = json.loads(fs_of(bucket).cat_file(f"{url}/{data}/config.json"))
    assert config["class"] == "torchkeep.models.Net"
    with pytest.raises(tk.UnsafeBundleError, match=r"evil\.py") as info:
        tk.load_model(url, storage_options=bucket.storage_options)
    assert url in str(info.value)
    assert not canary.exists()


def test_object_key_escaping_the_folder_is_refused(memory_bucket: Bucket) -> None:
    fs = fs_of(memory_bucket)
    fs.pipe_file(f"{memory_bucket.url}/hf/config.json", b"{}")
    fs.pipe_file(f"{memory_bucket.url}/hf/a/../../x", b"x")
    with pytest.raises(tk.CorruptFileError, match="cannot be a file name"):
        tk.load_state_dict(f"{memory_bucket.url}/hf")


def test_options_for_a_local_path_are_refused(tmp_path: Path, net: Net) -> None:
    with pytest.raises(tk.StorageCapabilityError, match="apply to URLs"):
        tk.save_weights(net, tmp_path / "w.safetensors", storage_options={"anon": True})
    assert not (tmp_path / "w.safetensors").exists()


def test_onnx_export_refuses_a_url(net: Net) -> None:
    with pytest.raises(tk.StorageCapabilityError, match="local files only"):
        tk.export_onnx(net, torch.randn(1, 3, 32, 32), "s3://bucket/net.onnx")


# --------------------------------------------------------------------------------------------
# faults on the wire (moto behind the proxy)


def test_lost_answer_to_the_bundle_commit_is_success(
    s3_proxy: tuple[FaultProxy, Bucket], net: Net
) -> None:
    proxy, bucket = s3_proxy
    proxy.add("lose", method="PUT", path=r"net\.bundle/manifest\.json$", times=1)
    url = f"{bucket.url}/net.bundle"
    tk.save_model(net, url, storage_options=bucket.storage_options, transfer=FAST)
    assert next(r.action for r in proxy.requests("PUT", path="manifest.json")) == "lose"
    assert_state_equal(
        tk.load_model(url, storage_options=bucket.storage_options).state_dict(), net.state_dict()
    )


def test_refused_upload_leaves_no_bundle(s3_proxy: tuple[FaultProxy, Bucket], net: Net) -> None:
    proxy, bucket = s3_proxy
    proxy.add("forbid", method="PUT", path=r"model\.safetensors$")
    url = f"{bucket.url}/net.bundle"
    with pytest.raises(tk.RemoteStorageError) as info:
        tk.save_model(net, url, storage_options=bucket.storage_options, transfer=FAST)
    assert "model.safetensors" in info.value.url
    assert keys(bucket, "net.bundle") == []  # no manifest, and the config uploaded is gone
    assert not proxy.requests("PUT", path="manifest.json")


def test_single_file_is_one_multipart_upload_whole_or_not_at_all(
    s3_proxy: tuple[FaultProxy, Bucket],
) -> None:
    proxy, bucket = s3_proxy
    state = {"big": torch.arange(3 << 20, dtype=torch.float32)}  # 12 MiB: three 5 MiB parts
    url = f"{bucket.url}/big.safetensors"
    transfer = tk.Transfer(part_size=5 << 20, max_concurrency=2, retries=1, deadline_s=60)
    tk.save_weights(state, url, storage_options=bucket.storage_options, transfer=transfer)
    assert len([r for r in proxy.log if r.is_upload_part]) == 3
    proxy.add("forbid", query="partNumber", every=2)
    with pytest.raises(tk.RemoteStorageError):
        tk.save_weights({"big": -state["big"]}, url, storage_options=bucket.storage_options,
                        transfer=transfer)  # fmt: skip
    assert proxy.requests("DELETE", path="big.safetensors")  # the upload was aborted
    assert_state_equal(tk.load_state_dict(url, storage_options=bucket.storage_options), state)


# --------------------------------------------------------------------------------------------
# the command line


def cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def options_flags(bucket: Bucket) -> list[str]:
    endpoint = bucket.storage_options["client_kwargs"]["endpoint_url"]
    return [
        *("--storage-option", f"endpoint_url={endpoint}"),
        *("--storage-option", "key=testing", "--storage-option", "secret=testing"),
    ]


def test_cli_commands_on_s3_urls(
    s3_bucket: Bucket, tmp_path: Path, net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    options, flags = s3_bucket.storage_options, options_flags(s3_bucket)
    weights, run = f"{s3_bucket.url}/net.safetensors", f"{s3_bucket.url}/run"
    tk.save_weights(net, weights, storage_options=options)
    tk.CheckpointManager(run, storage_options=options).save(3, model=net)
    code, out, _ = cli("inspect", weights, "--json", *flags, capsys=capsys)
    assert code == 0
    assert json.loads(out)["path"] == weights
    assert json.loads(out)["parameter_count"] == 62_006
    code, out, _ = cli("ls", run, "--json", *flags, capsys=capsys)
    listed = json.loads(out)
    assert code == 0
    assert listed["directory"] == run
    assert [(s["step"], s["valid"]) for s in listed["steps"]] == [(3, True)]
    code, out, _ = cli("verify", run, *flags, capsys=capsys)
    assert code == 0
    assert "all files match" in out
    code, out, _ = cli("convert", weights, str(tmp_path / "net.pt"), *flags, capsys=capsys)
    assert code == 0
    code, out, _ = cli("diff", str(tmp_path / "net.pt"), weights, *flags, capsys=capsys)
    assert code == 0
    assert out.startswith("equal")
    data = data_prefix(s3_bucket, "run/step-00000003")
    flip(s3_bucket, f"run/step-00000003/{data}/model.safetensors", -1)
    code, out, _ = cli("verify", run, *flags, capsys=capsys)
    assert code == 1
    # the object's own URL, under the step's save id
    assert f"{run}/step-00000003/{data}/model.safetensors" in "".join(out.split())


def test_cli_errors_on_urls_have_no_traceback(
    s3_bucket: Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"{s3_bucket.url}/missing.safetensors"
    code, out, err = cli("inspect", missing, *options_flags(s3_bucket), capsys=capsys)
    assert code == 2
    assert missing in err
    assert "Traceback" not in err + out
    code, _, err = cli("verify", str(tmp_path), "--storage-option", "anon=true", capsys=capsys)
    assert code == 2
    assert "applies to URLs" in err
    with pytest.raises(SystemExit):
        main(["inspect", missing, "--storage-option", "no-equals-sign"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_cli_without_s3fs_says_how_to_install(tmp_path: Path) -> None:
    code = "import sys\nsys.modules['s3fs'] = None\nfrom torchkeep.cli import main\n"
    code += "sys.exit(main(['inspect', 's3://bucket/net.safetensors']))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 2
    assert "pip install 'torchkeep[remote]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_refused_read_is_one_line_naming_the_url(
    s3_proxy: tuple[FaultProxy, Bucket], net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy, bucket = s3_proxy
    url = f"{bucket.url}/net.safetensors"
    tk.save_weights(net, url, storage_options=bucket.storage_options)
    proxy.add("forbid", method="GET")
    code, out, err = cli("inspect", url, *options_flags(bucket), capsys=capsys)
    assert code == 2
    assert err.startswith("error: ")
    assert url in err
    assert "refused" in err
    assert "Traceback" not in err + out
