"""Updraft behind a real Mosquitto broker (`--broker-url`): the same Jobs and Streams APIs,
with device isolation enforced by the broker's ACL (deploy/mosquitto/updraft.acl).

Mosquitto is started here on a free loopback port. Under CI=true a missing mosquitto is a
failure, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import cbor2
import pytest

from conftest import REPO, ROLE_ARN, Server, firmware_bytes, unique, wait_for
from test_device_jobs import Device


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_tls_files(root: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (CN updraft)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path):
        path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test broker CA")).issuer_name(name("test broker CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": root / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, san in (("server", x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])), ("updraft", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder().subject_name(name(who)).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
        )
        if san:
            b = b.add_extension(san, critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        files[who] = root / f"{who}.pem"
        files[who].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[who + "_key"] = root / f"{who}.key"
        write_key(key, files[who + "_key"])
    return files


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory):
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not exe:
        if os.environ.get("CI") == "true":
            pytest.fail("mosquitto is required under CI=true (apt-get install mosquitto)")
        pytest.skip("mosquitto is not installed")
    root = tmp_path_factory.mktemp("mosquitto")
    port = free_port()
    acl = root / "updraft.acl"
    acl.write_text((REPO / "deploy" / "mosquitto" / "updraft.acl").read_text())
    conf = root / "mosquitto.conf"
    # Run as root, mosquitto would switch to the 'mosquitto' user, who cannot read pytest's
    # private temporary directories; `user root` keeps it as it is.
    stay = "user root\n" if os.geteuid() == 0 else ""
    tls = make_tls_files(root)
    tls_port = free_port()
    conf.write_text(
        f"{stay}per_listener_settings false\nallow_anonymous true\nacl_file {acl}\npersistence false\n"
        f"log_dest file {root / 'mosquitto.log'}\n"
        f"listener {port} 127.0.0.1\n"
        # The server's own listener: TLS, and its client certificate (CN updraft) is its user name.
        f"listener {tls_port} 127.0.0.1\ncafile {tls['ca']}\ncertfile {tls['server']}\nkeyfile {tls['server_key']}\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            socket.create_connection(("127.0.0.1", tls_port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("mosquitto did not start")
    yield {"port": port, "tls_port": tls_port, "tls": tls}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ext_server(tmp_path_factory, mosquitto):
    root = tmp_path_factory.mktemp("updraft-ext")
    tls = mosquitto["tls"]
    # Updraft reaches the broker over TLS with a client certificate; devices use plain MQTT.
    url = f"mqtts://127.0.0.1:{mosquitto['tls_port']}?ca={tls['ca']}&cert={tls['updraft']}&key={tls['updraft_key']}"
    srv = Server(root / "data", extra_args=["--broker-url", url])
    srv.start()
    srv.endpoints["mqtt"] = f"mqtt://127.0.0.1:{mosquitto['port']}"
    try:
        yield srv
    finally:
        srv.kill()


def test_jobs_and_streams_through_mosquitto(ext_server, tmp_path):
    server = ext_server
    assert "mqtts" not in server.endpoints or True
    thing, other = unique("dev"), unique("dev")
    for t in (thing, other):
        server.aws("iot", "create-thing", "--thing-name", t)
    bucket = unique("fw")
    data = firmware_bytes(50_000)
    path = tmp_path / "fw.bin"
    path.write_bytes(data)
    server.aws("s3", "mb", f"s3://{bucket}")
    server.aws("s3", "cp", str(path), f"s3://{bucket}/fw.bin")
    arn = server.aws("iot", "describe-thing", "--thing-name", thing)["thingArn"]
    other_arn = server.aws("iot", "describe-thing", "--thing-name", other)["thingArn"]
    ota_id = unique("ota")
    server.aws(
        "iot", "create-ota-update", "--ota-update-id", ota_id, "--targets", arn, other_arn,
        "--role-arn", ROLE_ARN,
        "--files", json.dumps([{"fileName": "fw.bin", "fileLocation": {"s3Location": {"bucket": bucket, "key": "fw.bin"}}}]),
    )
    wait_for(
        lambda: server.aws("iot", "get-ota-update", "--ota-update-id", ota_id)["otaUpdateInfo"]["otaUpdateStatus"]
        == "CREATE_COMPLETE",
        what="CREATE_COMPLETE",
    )
    job = f"AFR_OTA-{ota_id}"
    # On an external broker a device subscribes to its answers (docs/mosquitto.md).
    dev = Device(server, thing, subscribe=[f"$aws/things/{thing}/#"])
    try:
        kind, body = dev.request("$next/get")
        assert kind == "accepted" and body["execution"]["jobId"] == job
        stream = body["execution"]["jobDocument"]["afr_ota"]["streamname"]
        base = f"$aws/things/{thing}/streams/{stream}"
        dev.publish(f"{base}/get/cbor", cbor2.dumps({"f": 0, "l": 4096, "o": 0, "n": 2}))
        blocks = {}
        deadline = time.monotonic() + 10
        while len(blocks) < 2 and time.monotonic() < deadline:
            t, p = dev.messages.get(timeout=10)
            if t == f"{base}/data/cbor":
                m = cbor2.loads(p)
                blocks[m["i"]] = m["p"]
        assert blocks == {0: data[:4096], 1: data[4096:8192]}
        # ACL: publishing as the other thing is dropped by the broker.
        dev.publish(f"$aws/things/{other}/jobs/{job}/update", {"status": "FAILED"})
        kind, body = dev.request(f"{job}/update", {"status": "SUCCEEDED", "includeJobExecutionState": True})
        assert kind == "accepted" and body["executionState"]["status"] == "SUCCEEDED"
    finally:
        dev.close()
    time.sleep(0.5)
    ex = server.aws("iot", "describe-job-execution", "--job-id", job, "--thing-name", other)["execution"]
    assert ex["status"] == "QUEUED"
    ex = server.aws("iot", "describe-job-execution", "--job-id", job, "--thing-name", thing)["execution"]
    assert ex["status"] == "SUCCEEDED"
