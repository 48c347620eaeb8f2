"""The device daemon end to end, driven the way an operator drives it: the `aws` CLI uploads
a firmware, imports a code-signing certificate, creates a signing profile and a signed
CreateOTAUpdate; the real `updraft-agent` binary, connected over mutual TLS with a
certificate from CreateKeysAndCertificate, downloads, verifies, installs into the other
slot, restarts, self-tests and commits — or refuses and keeps the running image.

Environment: UPDRAFT_AGENT_BIN (default <repo>/target/debug/updraft-agent, or under
CARGO_TARGET_DIR).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import REPO, ROLE_ARN, firmware_bytes, unique, wait_for
from test_signing import Identity, import_certificate, put_profile

CERTFILE = "/certs/updraft-daemon-signer.pem"
FACTORY = (1, 0, 0)


def agent_binary() -> str:
    if os.environ.get("UPDRAFT_AGENT_BIN"):
        return os.environ["UPDRAFT_AGENT_BIN"]
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    return str(target / "debug" / "updraft-agent")


def image(version: tuple[int, int, int], size: int = 50_000) -> bytes:
    """An image with the Updraft header the daemon reads its version from."""
    major, minor, build = version
    word = (major << 24) | (minor << 16) | build
    return b"UPDRAFT\x01" + struct.pack(">I", word) + firmware_bytes(size)


@pytest.fixture(scope="module")
def signing(server, tmp_path_factory):
    """A signing identity imported into ACM and a profile that names CERTFILE."""
    work = tmp_path_factory.mktemp("daemon-signing")
    ident = Identity(work, "daemon-signer")
    cert_arn = import_certificate(server, ident)
    profile = "daemon_" + unique("p").replace("-", "_")
    put_profile(server, profile, cert_arn, certname=CERTFILE)
    bucket = unique("fw")
    server.aws("s3", "mb", f"s3://{bucket}")
    server.aws("s3api", "put-bucket-versioning", "--bucket", bucket, "--versioning-configuration", "Status=Enabled")
    return {"ident": ident, "profile": profile, "bucket": bucket, "work": work}


class Daemon:
    """One device: a thing with an active certificate, an install directory, a config, and
    the `updraft-agent` process (restarting itself in place on activation)."""

    def __init__(self, server, signing, *, self_test: list[str] | None = None,
                 self_test_timeout: int = 30):
        self.server = server
        self.thing = unique("dev")
        # Short: the daemon's private socket lives under the install directory, and a unix
        # socket path has at most 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="ud-"))
        server.aws("iot", "create-thing", "--thing-name", self.thing)
        cert, key = self.dir / "device.pem", self.dir / "device.key"
        created = server.aws(
            "iot", "create-keys-and-certificate", "--set-as-active",
            "--certificate-pem-outfile", str(cert), "--private-key-outfile", str(key),
        )
        server.aws("iot", "attach-thing-principal", "--thing-name", self.thing,
                   "--principal", created["certificateArn"])
        port = server.endpoints["mqtts"].rsplit(":", 1)[1]
        self.install = self.dir / "install"
        # The factory image in slot a, as a device leaves the factory.
        self.factory = image(FACTORY, 20_000)
        (self.install / "slots" / "a").mkdir(parents=True)
        (self.install / "slots" / "a" / "image").write_bytes(self.factory)
        self.log = self.dir / "agent.log"
        command = self_test if self_test is not None else ["/bin/sh", "-c", "test -s \"$UPDRAFT_IMAGE\""]
        config = f"""
thing_name = "{self.thing}"
install_dir = "{self.install}"
log_file = "{self.log}"
log_level = "debug"

[broker]
host = "localhost"
port = {port}
ca = "{server.data_dir / 'ca.pem'}"
cert = "{cert}"
key = "{key}"

[signers]
"{CERTFILE}" = "{signing['ident'].cert_path}"

[self_test]
command = {json.dumps(command)}
timeout_secs = {self_test_timeout}

[download]
block_size = 4096
blocks_per_request = 8
request_wait_secs = 2

[version]
source = "header"
factory = "{'.'.join(map(str, FACTORY))}"
"""
        self.config = self.dir / "agent.toml"
        self.config.write_text(config)
        self.thing_arn = server.aws("iot", "describe-thing", "--thing-name", self.thing)["thingArn"]
        self.proc = subprocess.Popen(
            [agent_binary(), "run", "--config", str(self.config), "--stderr", "--restart", "exec"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "wb"),
        )

    def execution(self, job_id: str) -> dict:
        return self.server.aws("iot", "describe-job-execution", "--job-id", job_id,
                               "--thing-name", self.thing)["execution"]

    def wait_terminal(self, job_id: str, timeout: float = 120) -> dict:
        def done():
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.logs()}")
            ex = self.execution(job_id)
            return ex if ex["status"] not in ("QUEUED", "IN_PROGRESS") else None

        return wait_for(done, timeout=timeout, interval=0.5, what=f"{job_id} on {self.thing}")

    def running_image(self) -> bytes:
        return (self.install / "current" / "image").read_bytes()

    def active_slot(self) -> str:
        return os.readlink(self.install / "current")

    def logs(self) -> str:
        out = []
        for f in (self.log, self.dir / "stderr.log"):
            if f.exists():
                out.append(f.read_text(errors="replace")[-6000:])
        return "\n".join(out)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def daemon_factory(server, signing):
    made: list[Daemon] = []

    def make(**kw) -> Daemon:
        d = Daemon(server, signing, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


def upload(server, signing, data: bytes) -> dict:
    key = f"firmware/{unique('img')}.bin"
    path = signing["work"] / key.replace("/", "_")
    path.write_bytes(data)
    out = server.aws("s3api", "put-object", "--bucket", signing["bucket"], "--key", key, "--body", str(path))
    return {"bucket": signing["bucket"], "key": key, "version": out["VersionId"]}


def create_ota(server, signing, targets: list[str], location: dict, code_signing: dict,
               protocols=("MQTT",)) -> str:
    ota_id = unique("ota")
    files = [{
        "fileName": "/opt/app/firmware.bin", "fileVersion": "1",
        "fileLocation": {"s3Location": location},
        "codeSigning": code_signing,
    }]
    path = signing["work"] / f"{ota_id}.json"
    path.write_text(json.dumps(files))
    server.aws(
        "iot", "create-ota-update", "--ota-update-id", ota_id, "--targets", *targets,
        "--protocols", *protocols, "--files", f"file://{path}", "--role-arn", ROLE_ARN,
        "--aws-job-presigned-url-config", "expiresInSec=600",
    )

    def created():
        info = server.aws("iot", "get-ota-update", "--ota-update-id", ota_id)["otaUpdateInfo"]
        return info if info["otaUpdateStatus"] in ("CREATE_COMPLETE", "CREATE_FAILED") else None

    info = wait_for(created, timeout=60, what=f"OTA update {ota_id}")
    assert info["otaUpdateStatus"] == "CREATE_COMPLETE", info
    return f"AFR_OTA-{ota_id}"


def signed_by_profile(signing) -> dict:
    return {"startSigningJobParameter": {
        "signingProfileName": signing["profile"],
        "destination": {"s3Destination": {"bucket": signing["bucket"], "prefix": "signed/"}},
    }}


@pytest.mark.parametrize("protocols", [("MQTT",), ("HTTP",)], ids=["mqtt", "http"])
def test_signed_ota_update_installs_self_tests_and_commits(server, signing, daemon_factory, protocols):
    dev = daemon_factory()
    wait_for(lambda: (dev.install / "current").exists(), what="the daemon's install directory")
    factory_slot = dev.active_slot()
    new = image((1, 1, 0))
    job = create_ota(server, signing, [dev.thing_arn], upload(server, signing, new),
                     signed_by_profile(signing), protocols=protocols)
    ex = dev.wait_terminal(job)
    assert ex["status"] == "SUCCEEDED", (ex, dev.logs())
    details = ex.get("statusDetails", {}).get("detailsMap", {})
    assert details.get("self_test") == "accepted" or "accepted" in details.get("reason", ""), details
    # Installed into the other slot, which is now the running one, byte for byte.
    assert dev.active_slot() != factory_slot
    assert dev.running_image() == new
    state = json.loads((dev.install / "state.json").read_text())
    assert "Accepted" in json.dumps(state), state
    # The control plane sees the job through.
    desc = server.aws("iot", "describe-job", "--job-id", job)["job"]
    assert desc["status"] == "COMPLETED" and desc["jobProcessDetails"]["numberOfSucceededThings"] == 1


def test_failures_keep_the_running_image(server, signing, daemon_factory):
    """A bad signature, a downgrade and a failing self-test: each ends FAILED with the
    agent's reason, and the device keeps running what it ran before."""
    bad_sig = daemon_factory()
    downgrade = daemon_factory()
    failing_test = daemon_factory(self_test=["/bin/sh", "-c", "echo self-test says no; exit 4"])
    devices = (bad_sig, downgrade, failing_test)
    for d in devices:
        wait_for(lambda: (d.install / "current").exists(), what="the daemon's install directory")
    before = {d.thing: d.active_slot() for d in devices}

    # A signature over other bytes (customCodeSigning, as a user who signed by hand would).
    good = image((1, 2, 0))
    other = signing["ident"].key.sign(b"not the firmware", ec.ECDSA(hashes.SHA256()))
    custom = {"customCodeSigning": {
        "signature": {"inlineDocument": base64.b64encode(other).decode()},
        "certificateChain": {"certificateName": CERTFILE},
        "hashAlgorithm": "SHA256", "signatureAlgorithm": "ECDSA",
    }}
    jobs = {
        bad_sig.thing: create_ota(server, signing, [bad_sig.thing_arn], upload(server, signing, good), custom),
        downgrade.thing: create_ota(server, signing, [downgrade.thing_arn],
                                    upload(server, signing, image((0, 9, 0))), signed_by_profile(signing)),
        failing_test.thing: create_ota(server, signing, [failing_test.thing_arn],
                                       upload(server, signing, image((1, 3, 0))), signed_by_profile(signing)),
    }
    for d in devices:
        ex = d.wait_terminal(jobs[d.thing])
        assert ex["status"] == "FAILED", (d.thing, ex, d.logs())
        assert ex.get("statusDetails", {}).get("detailsMap", {}).get("reason"), ex
        # The factory image still runs, from the slot it ran from.
        wait_for(lambda: d.active_slot() == before[d.thing], what=f"{d.thing} back on its slot")
        assert d.running_image() == d.factory, d.logs()
    assert "self-test says no" in failing_test.logs()


def test_a_custom_job_is_rejected_and_does_not_block_the_ota_job_behind_it(server, signing, daemon_factory):
    dev = daemon_factory()
    wait_for(lambda: (dev.install / "current").exists(), what="the daemon's install directory")
    custom = unique("custom")
    server.aws("iot", "create-job", "--job-id", custom, "--targets", dev.thing_arn,
               "--document", json.dumps({"operation": "reboot"}))
    new = image((1, 4, 0))
    job = create_ota(server, signing, [dev.thing_arn], upload(server, signing, new), signed_by_profile(signing))
    ex = dev.wait_terminal(custom)
    assert ex["status"] == "REJECTED", (ex, dev.logs())
    assert "afr_ota" in ex["statusDetails"]["detailsMap"]["reason"]
    ex = dev.wait_terminal(job)
    assert ex["status"] == "SUCCEEDED", (ex, dev.logs())
    assert dev.running_image() == new
