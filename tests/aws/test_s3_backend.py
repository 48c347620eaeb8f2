"""Artifacts in an S3-compatible object store (`--artifacts s3://...`) instead of the local
disk: the same S3 API, streams and downloads, with the bytes in an independent S3 server
(moto, from PyPI) that this test starts on a free loopback port.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import cbor2
import pytest

from conftest import ROLE_ARN, Server, firmware_bytes, unique, wait_for
from test_device_jobs import Device
from test_device_streams import json_or_raw


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    exe = Path(sys.executable).parent / "moto_server"
    assert exe.exists(), "moto_server is missing: pip install -r tests/aws/requirements.txt"
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    s3 = boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="moto", aws_secret_access_key="moto"
    )
    s3.create_bucket(Bucket="updraft-artifacts")
    yield url, s3
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory, moto):
    url, _ = moto
    root = tmp_path_factory.mktemp("updraft-s3")
    artifacts = (
        f"s3://updraft-artifacts?endpoint={url}&allow_http=true&region=us-east-1"
        "&access_key_id=moto&secret_access_key=moto"
    )
    srv = Server(root / "data", extra_args=["--artifacts", artifacts])
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


def test_objects_streams_and_downloads_with_s3_artifacts(s3_server, moto, tmp_path):
    server = s3_server
    _, backing = moto
    bucket = unique("fw")
    big = firmware_bytes(12 * 1024 * 1024 + 5)  # multipart, and more than one backing part
    path = tmp_path / "fw.bin"
    path.write_bytes(big)
    server.aws("s3", "mb", f"s3://{bucket}")
    server.aws("s3api", "put-bucket-versioning", "--bucket", bucket, "--versioning-configuration", "Status=Enabled")
    server.aws("s3", "cp", str(path), f"s3://{bucket}/fw.bin")
    out = tmp_path / "back.bin"
    server.aws("s3", "cp", f"s3://{bucket}/fw.bin", str(out))
    assert out.read_bytes() == big
    head = server.aws("s3api", "head-object", "--bucket", bucket, "--key", "fw.bin")
    assert head["ContentLength"] == len(big) and head["VersionId"] not in ("", "null")
    # The bytes are in the backing store, not on local disk.
    keys = [o["Key"] for o in backing.list_objects_v2(Bucket="updraft-artifacts").get("Contents", [])]
    assert any(k.startswith("blobs/") for k in keys), keys
    assert not (server.data_dir / "artifacts").exists() or not any((server.data_dir / "artifacts").rglob("*"))
    rng = server.client("s3").get_object(Bucket=bucket, Key="fw.bin", Range="bytes=100-199")["Body"].read()
    assert rng == big[100:200]

    # A device downloads stream blocks read from the backing store.
    thing = unique("dev")
    arn = server.aws("iot", "create-thing", "--thing-name", thing)["thingArn"]
    ota_id = unique("ota")
    server.aws(
        "iot", "create-ota-update", "--ota-update-id", ota_id, "--targets", arn, "--role-arn", ROLE_ARN,
        "--files", json.dumps([{"fileName": "fw.bin", "fileLocation": {"s3Location": {"bucket": bucket, "key": "fw.bin"}}}]),
    )
    wait_for(
        lambda: server.aws("iot", "get-ota-update", "--ota-update-id", ota_id)["otaUpdateInfo"]["otaUpdateStatus"]
        == "CREATE_COMPLETE",
        what="CREATE_COMPLETE",
    )
    dev = Device(server, thing)
    try:
        kind, body = dev.request("$next/get")
        doc = body["execution"]["jobDocument"]["afr_ota"]
        assert doc["files"][0]["filesize"] == len(big)
        base = f"$aws/things/{thing}/streams/{doc['streamname']}"
        last = (len(big) - 1) // 4096
        dev.publish(f"{base}/get/cbor", cbor2.dumps({"f": 0, "l": 4096, "o": last, "n": 1}))
        block = cbor2.loads(json_or_raw(dev, f"{base}/data/cbor"))
        assert block["i"] == last and block["p"] == big[last * 4096 :]
    finally:
        dev.close()

    # Deleting every version removes the blobs from the backing store too.
    versions = server.client("s3").list_object_versions(Bucket=bucket)["Versions"]
    for v in versions:
        server.client("s3").delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
    remaining = [o["Key"] for o in backing.list_objects_v2(Bucket="updraft-artifacts").get("Contents", [])]
    assert not [k for k in remaining if k.startswith("blobs/")], remaining
