"""File delivery to devices, checked with independent clients: Streams over MQTT in CBOR
(cbor2) and JSON (paho-mqtt), and pre-signed HTTP downloads with Range requests
(urllib), from OTA updates created with the aws CLI.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request

import cbor2
import pytest

from conftest import ROLE_ARN, firmware_bytes, unique, wait_for
from test_device_jobs import Device


@pytest.fixture(scope="module")
def firmware(server):
    bucket = unique("fw")
    data = firmware_bytes(300_001)
    path = server.data_dir.parent / f"{bucket}.bin"
    path.write_bytes(data)
    server.aws("s3", "mb", f"s3://{bucket}")
    server.aws("s3", "cp", str(path), f"s3://{bucket}/image.bin")
    return bucket, data


def ota_update(server, thing: str, bucket: str, protocols: list[str], presign_seconds: int | None = None) -> dict:
    ota_id = unique("ota")
    arn = server.aws("iot", "describe-thing", "--thing-name", thing)["thingArn"]
    args = [
        "iot",
        "create-ota-update",
        "--ota-update-id",
        ota_id,
        "--targets",
        arn,
        "--protocols",
        *protocols,
        "--role-arn",
        ROLE_ARN,
        "--files",
        json.dumps([{"fileName": "image.bin", "fileLocation": {"s3Location": {"bucket": bucket, "key": "image.bin"}}}]),
    ]
    if presign_seconds:
        args += ["--aws-job-presigned-url-config", json.dumps({"expiresInSec": presign_seconds})]
    server.aws(*args)
    wait_for(
        lambda: server.aws("iot", "get-ota-update", "--ota-update-id", ota_id)["otaUpdateInfo"]["otaUpdateStatus"]
        == "CREATE_COMPLETE",
        what="CREATE_COMPLETE",
    )
    return {"id": ota_id, "job": f"AFR_OTA-{ota_id}"}


@pytest.fixture()
def thing(server):
    name = unique("dev")
    server.aws("iot", "create-thing", "--thing-name", name)
    return name


def test_stream_blocks_over_mqtt_cbor_and_json(server, thing, firmware):
    bucket, data = firmware
    ota = ota_update(server, thing, bucket, ["MQTT"])
    dev = Device(server, thing)
    try:
        kind, body = dev.request("$next/get")
        doc = body["execution"]["jobDocument"]["afr_ota"]
        stream = doc["streamname"]
        f = doc["files"][0]
        assert f["filesize"] == len(data) and len(stream) <= 44
        base = f"$aws/things/{thing}/streams/{stream}"
        dev.client.subscribe(f"{base}/#", qos=0)
        time.sleep(0.2)

        # DescribeStream
        dev.publish(f"{base}/describe/cbor", cbor2.dumps({"c": "d1"}))
        desc = cbor2.loads(json_or_raw(dev, f"{base}/description/cbor"))
        assert desc["c"] == "d1" and desc["r"] == [{"f": f["fileid"], "z": len(data)}]

        # The whole file in 4 KiB blocks, 16 per request, reassembled and compared.
        block = 4096
        nblocks = (len(data) + block - 1) // block
        got: dict[int, bytes] = {}
        for offset in range(0, nblocks, 16):
            dev.publish(f"{base}/get/cbor", cbor2.dumps({"c": "t", "f": f["fileid"], "l": block, "o": offset, "n": 16}))
            for _ in range(min(16, nblocks - offset)):
                msg = cbor2.loads(json_or_raw(dev, f"{base}/data/cbor"))
                assert msg["f"] == f["fileid"] and msg["l"] == len(msg["p"]) and msg["c"] == "t"
                got[msg["i"]] = msg["p"]
        assert b"".join(got[i] for i in range(nblocks)) == data
        assert len(got[nblocks - 1]) == len(data) - (nblocks - 1) * block

        # A bitmap asks for blocks o + k where bit k is set (LSB first).
        bitmap = bytes([0b00000101, 0b10000000])  # blocks 10, 12, 25
        dev.publish(f"{base}/get/cbor", cbor2.dumps({"f": f["fileid"], "l": block, "o": 10, "n": 3, "b": bitmap}))
        ids = sorted(cbor2.loads(json_or_raw(dev, f"{base}/data/cbor"))["i"] for _ in range(3))
        assert ids == [10, 12, 25]

        # JSON: base64 payload.
        dev.publish(f"{base}/get/json", json.dumps({"f": f["fileid"], "l": 1024, "o": 2, "n": 1}))
        j = json.loads(json_or_raw(dev, f"{base}/data/json"))
        assert base64.b64decode(j["p"]) == data[2048:3072] and j["i"] == 2

        # Rejections, with the documented codes.
        for payload, code in [
            ({"f": f["fileid"], "l": 100, "o": 0, "n": 1}, "BlockSizeOutOfBounds"),
            ({"f": f["fileid"], "l": block, "o": 100000, "n": 1}, "OffsetOutOfBounds"),
            ({"f": 99, "l": block, "o": 0, "n": 1}, "ResourceNotFound"),
            ({"f": f["fileid"], "l": block, "o": 0, "n": 1, "s": 999}, "VersionMismatch"),
        ]:
            dev.publish(f"{base}/get/cbor", cbor2.dumps(payload))
            rej = cbor2.loads(json_or_raw(dev, f"{base}/rejected/cbor"))
            assert rej["o"] == code, (payload, rej)
        dev.publish(f"{base}/get/cbor", b"\xff\x00garbage")
        assert cbor2.loads(json_or_raw(dev, f"{base}/rejected/cbor"))["o"] == "InvalidCbor"
        dev.publish(f"{base}/get/json", b"{nope")
        assert json.loads(json_or_raw(dev, f"{base}/rejected/json"))["o"] == "InvalidJson"
        missing = f"$aws/things/{thing}/streams/no-such-stream"
        dev.publish(f"{missing}/get/cbor", cbor2.dumps({"f": 0, "l": block}))
        assert cbor2.loads(json_or_raw(dev, f"{missing}/rejected/cbor"))["o"] == "ResourceNotFound"
        # A stream id outside [a-zA-Z0-9_-]{1,128} names no stream: InvalidTopic.
        malformed = f"$aws/things/{thing}/streams/bad.id"
        dev.publish(f"{malformed}/get/json", json.dumps({"f": 0, "l": block, "c": "tok"}))
        rej = json.loads(json_or_raw(dev, f"{malformed}/rejected/json"))
        assert rej["o"] == "InvalidTopic" and "c" not in rej, rej
    finally:
        dev.close()
    server.aws("iot", "delete-ota-update", "--ota-update-id", ota["id"], "--delete-stream", "--force-delete-aws-job")


def test_an_overwritten_object_is_never_served_as_the_streams_file(server, thing):
    """In an unversioned bucket an overwrite keeps the version id; the stream must not hand
    devices the new bytes (a mix of two files) but answer ETagMismatch."""
    bucket = unique("ow")
    server.aws("s3", "mb", f"s3://{bucket}")
    first, second = b"\x01" * 1000, b"\x02" * 1000
    path = server.data_dir.parent / f"{bucket}.bin"
    path.write_bytes(first)
    server.aws("s3", "cp", str(path), f"s3://{bucket}/image.bin")
    ota = ota_update(server, thing, bucket, ["MQTT"])
    dev = Device(server, thing)
    try:
        _, body = dev.request("$next/get")
        doc = body["execution"]["jobDocument"]["afr_ota"]
        base = f"$aws/things/{thing}/streams/{doc['streamname']}"
        fid = doc["files"][0]["fileid"]
        dev.client.subscribe(f"{base}/#", qos=0)
        time.sleep(0.2)
        dev.publish(f"{base}/get/cbor", cbor2.dumps({"f": fid, "l": 256, "o": 0, "n": 1}))
        assert cbor2.loads(json_or_raw(dev, f"{base}/data/cbor"))["p"] == first[:256]
        # Same size, other content: only the ETag tells them apart.
        path.write_bytes(second)
        server.aws("s3", "cp", str(path), f"s3://{bucket}/image.bin")
        time.sleep(1.2)  # past the server's metadata cache lifetime
        dev.publish(f"{base}/get/cbor", cbor2.dumps({"f": fid, "l": 256, "o": 1, "n": 1}))
        rej = cbor2.loads(json_or_raw(dev, f"{base}/rejected/cbor"))
        assert rej["o"] == "ETagMismatch", rej
    finally:
        dev.close()
    server.aws("iot", "delete-ota-update", "--ota-update-id", ota["id"], "--delete-stream", "--force-delete-aws-job")


def json_or_raw(dev: Device, topic: str, timeout: float = 10.0) -> bytes:
    """The raw payload of the next message on `topic`."""
    deadline = time.monotonic() + timeout
    skipped = []
    try:
        while True:
            t, p = dev.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if t == topic:
                return p
            skipped.append((t, p))
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing on {topic}")
    finally:
        for item in skipped:
            dev.messages.put(item)


def http_get(url: str, range_header: str | None = None):
    req = urllib.request.Request(url)
    if range_header:
        req.add_header("Range", range_header)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def test_presigned_http_download(server, thing, firmware):
    bucket, data = firmware
    ota = ota_update(server, thing, bucket, ["HTTP"], presign_seconds=60)
    # The stored document keeps the placeholder; the device gets a URL.
    stored = json.loads(server.aws("iot", "get-job-document", "--job-id", ota["job"])["document"])
    assert stored["afr_ota"]["files"][0]["update_data_url"].startswith("${aws:iot:s3-presigned-url:")
    dev = Device(server, thing)
    try:
        kind, body = dev.request("$next/get")
    finally:
        dev.close()
    f = body["execution"]["jobDocument"]["afr_ota"]["files"][0]
    url = f["update_data_url"]
    assert f["auth_scheme"] == "aws.s3.presigned" and url.startswith(server.endpoint)
    status, content, _ = http_get(url)
    assert status == 200 and content == data
    status, content, headers = http_get(url, "bytes=4096-8191")
    assert status == 206 and content == data[4096:8192]
    assert headers["content-range"] == f"bytes 4096-8191/{len(data)}"
    # Tampering with the URL breaks the signature.
    status, _, _ = http_get(url.replace("image.bin", "other.bin"))
    assert status == 403
    status, _, _ = http_get(url.replace("X-Amz-Expires=60", "X-Amz-Expires=3600"))
    assert status == 403
    # The same URL over iot-jobs-data.
    ex = server.aws("iot-jobs-data", "describe-job-execution", "--thing-name", thing, "--job-id", ota["job"])
    doc = json.loads(ex["execution"]["jobDocument"])
    assert doc["afr_ota"]["files"][0]["update_data_url"].startswith(server.endpoint)
    # What a pre-signed URL names is read afresh after any S3 write to the server: an
    # overwrite, then a delete, are seen by the very next download.
    bucket = firmware[0]
    path = server.data_dir.parent / f"{bucket}-v2.bin"
    path.write_bytes(b"second image")
    server.aws("s3", "cp", str(path), f"s3://{bucket}/image.bin")
    status, content, _ = http_get(url)
    assert status == 200 and content == b"second image"
    server.aws("s3", "rm", f"s3://{bucket}/image.bin")
    status, _, _ = http_get(url)
    assert status == 404
    path.write_bytes(data)
    server.aws("s3", "cp", str(path), f"s3://{bucket}/image.bin")
