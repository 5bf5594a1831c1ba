"""The remote test infrastructure itself: moto answers, the proxy forwards, every fault fires.

A proxy that silently forwarded everything (or nothing) would let fault tests pass vacuously;
these tests pin each action to what a client sees and what reaches the server.
"""

from __future__ import annotations

import http.client
import socket
import threading
from typing import Any

import pytest

from tests.remote.fixtures import clear_memory_filesystem
from tests.remote.proxy import FaultProxy
from tests.remote.server import Bucket, create_bucket, s3_options

fsspec = pytest.importorskip("fsspec")
pytest.importorskip("s3fs")


def s3(options: dict[str, Any]) -> Any:
    return fsspec.filesystem("s3", skip_instance_cache=True, **options)


def raw(endpoint: str, method: str, path: str, body: bytes = b"", timeout: float = 30) -> Any:
    host, port = endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Length": str(len(body))})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_moto_bucket_is_fresh_and_round_trips(s3_bucket: Bucket, moto_endpoint: str) -> None:
    fs = s3(s3_bucket.storage_options)
    assert fs.ls(s3_bucket.url) == []
    fs.pipe_file(f"{s3_bucket.url}/a/b.bin", b"\x00\xffdata")
    assert fs.cat_file(f"{s3_bucket.url}/a/b.bin") == b"\x00\xffdata"
    assert create_bucket(moto_endpoint) != s3_bucket.url.removeprefix("s3://")


def test_proxy_forwards_and_logs(s3_proxy: tuple[FaultProxy, Bucket], moto_endpoint: str) -> None:
    proxy, bucket = s3_proxy
    via_proxy = s3(bucket.storage_options)
    via_proxy.pipe_file(f"{bucket.url}/k.bin", b"payload")
    direct = s3(s3_options(moto_endpoint))
    assert direct.cat_file(f"{bucket.url}/k.bin") == b"payload"
    assert via_proxy.cat_file(f"{bucket.url}/k.bin") == b"payload"
    name = bucket.url.removeprefix("s3://")
    puts = proxy.requests("PUT", path=f"^/{name}/k.bin$")
    assert [(r.action, r.status) for r in puts] == [("pass", 200)]
    assert proxy.requests("GET", path="k.bin")[-1].status == 200


def test_multipart_upload_parts_are_recognised(s3_proxy: tuple[FaultProxy, Bucket]) -> None:
    proxy, bucket = s3_proxy
    data = bytes(range(256)) * (11 << 12)  # 11 MiB: three 5 MiB parts
    s3(bucket.storage_options).pipe_file(f"{bucket.url}/big.bin", data, chunksize=5 << 20)
    parts = [r for r in proxy.log if r.is_upload_part]
    assert sorted(int(r.query["partNumber"]) for r in parts) == [1, 2, 3]
    assert proxy.requests("POST", path="big.bin")[0].query.keys() >= {"uploads"}
    assert proxy.parts_in_flight == 0
    assert proxy.max_parts_in_flight >= 1


def test_slowdown_every_nth_request(s3_proxy: tuple[FaultProxy, Bucket]) -> None:
    proxy, bucket = s3_proxy
    name = bucket.url.removeprefix("s3://")
    proxy.add("slowdown", method="GET", every=2)
    answers = [raw(proxy.endpoint, "GET", f"/{name}/missing") for _ in range(4)]
    assert [status for status, _ in answers] == [404, 503, 404, 503]
    assert b"<Code>SlowDown</Code>" in answers[1][1]
    proxy.clear()
    proxy.add("slowdown", every=3)
    fs = s3(bucket.storage_options)
    fs.pipe_file(f"{bucket.url}/x.bin", b"x" * 1000)
    assert fs.cat_file(f"{bucket.url}/x.bin") == b"x" * 1000  # s3fs/botocore retried
    assert any(r.action == "slowdown" and r.status == 503 for r in proxy.log)


def test_forbid_is_permanent_and_never_forwarded(
    s3_proxy: tuple[FaultProxy, Bucket], moto_endpoint: str
) -> None:
    proxy, bucket = s3_proxy
    proxy.add("forbid", method="PUT")
    with pytest.raises(PermissionError):
        s3(bucket.storage_options).pipe_file(f"{bucket.url}/denied.bin", b"no")
    assert not s3(s3_options(moto_endpoint)).exists(f"{bucket.url}/denied.bin")
    assert {(r.action, r.status) for r in proxy.requests("PUT")} == {("forbid", 403)}


@pytest.mark.parametrize("reply", [500, None])
def test_lost_response_after_the_upstream_did_the_work(
    s3_proxy: tuple[FaultProxy, Bucket], moto_endpoint: str, reply: int | None
) -> None:
    proxy, bucket = s3_proxy
    name = bucket.url.removeprefix("s3://")
    proxy.add("lose", method="PUT", times=1, reply=reply)
    if reply is None:
        with pytest.raises(http.client.RemoteDisconnected):
            raw(proxy.endpoint, "PUT", f"/{name}/lost.bin", b"written")
    else:
        status, body = raw(proxy.endpoint, "PUT", f"/{name}/lost.bin", b"written")
        assert status == 500
        assert b"InternalError" in body
    assert s3(s3_options(moto_endpoint)).cat_file(f"{bucket.url}/lost.bin") == b"written"
    assert raw(proxy.endpoint, "PUT", f"/{name}/again.bin", b"ok")[0] == 200  # times=1


def test_stall_holds_the_request(s3_proxy: tuple[FaultProxy, Bucket]) -> None:
    proxy, bucket = s3_proxy
    name = bucket.url.removeprefix("s3://")
    proxy.add("stall", method="GET", seconds=600, times=1)
    with pytest.raises(socket.timeout):
        raw(proxy.endpoint, "GET", f"/{name}/slow", timeout=0.5)
    assert proxy.log[-1].action == "stall"
    assert proxy.log[-1].status is None
    proxy.add("stall", method="HEAD", seconds=0.01)
    assert raw(proxy.endpoint, "HEAD", f"/{name}/slow")[0] == 404  # a short stall then forwards


def test_upload_parts_in_flight_are_counted(s3_proxy: tuple[FaultProxy, Bucket]) -> None:
    proxy, bucket = s3_proxy
    name = bucket.url.removeprefix("s3://")
    proxy.add("stall", query="partNumber", seconds=2)
    threads = [
        threading.Thread(
            target=raw, args=(proxy.endpoint, "PUT", f"/{name}/k?partNumber={i}&uploadId=u", b"p")
        )
        for i in range(1, 4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert proxy.max_parts_in_flight == 3
    assert proxy.parts_in_flight == 0


def test_memory_bucket_is_empty_and_cleared(memory_bucket: Bucket) -> None:
    fs = fsspec.filesystem("memory")
    assert fs.find("/") == []
    fs.pipe_file(f"{memory_bucket.url}/w.bin", b"w")
    assert fs.cat_file(f"{memory_bucket.url}/w.bin") == b"w"
    clear_memory_filesystem()
    assert not fs.exists(f"{memory_bucket.url}/w.bin")
