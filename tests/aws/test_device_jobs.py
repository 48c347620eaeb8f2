"""The device data plane with independent clients: paho-mqtt speaking the AWS IoT Jobs
MQTT API to the embedded broker (plain and mutual TLS), and `aws iot-jobs-data` over HTTPS.

What a device written for AWS IoT relies on is checked here: responses delivered without a
subscription, `$next` describe, numeric-string expectedVersion, jobDocument as an object,
integer-second timestamps, the execution state machine, notifications, topic isolation,
and certificate-based identity.
"""

from __future__ import annotations

import json
import queue
import socket
import ssl
import time

import paho.mqtt.client as mqtt
import pytest

from conftest import unique, wait_for


class Device:
    """A paho-mqtt client that records every message it receives."""

    def __init__(self, server, thing: str, *, tls: bool = False, cert=None, key=None, subscribe=()):
        self.thing = thing
        self.messages: queue.Queue = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=thing)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        url = server.endpoints["mqtts" if tls else "mqtt"]
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        if tls:
            self.client.tls_set(ca_certs=str(server.data_dir / "ca.pem"), certfile=cert, keyfile=key)
        self.client.connect(host, int(port), keepalive=30)
        self.client.loop_start()
        self.rc = self.connack.get(timeout=10)
        for t in subscribe:
            self.client.subscribe(t, qos=1)
        if subscribe:
            time.sleep(0.2)

    @property
    def connected(self) -> bool:
        return self.rc == 0 and self.client.is_connected()

    def publish(self, topic: str, body, qos: int = 1):
        payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
        self.client.publish(topic, payload, qos=qos)

    def expect(self, topic: str, timeout: float = 10.0) -> dict:
        """The next message on `topic` (others are kept for later)."""
        deadline = time.monotonic() + timeout
        skipped = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no message on {topic}; got {[t for t, _ in skipped]}")
                t, p = self.messages.get(timeout=left)
                if t == topic:
                    return json.loads(p) if p else {}
                skipped.append((t, p))
        finally:
            for item in skipped:
                self.messages.put(item)

    def request(self, op: str, body=None, qos: int = 1) -> tuple[str, dict]:
        """Publishes on `$aws/things/{thing}/jobs/{op}` and waits for accepted or rejected."""
        base = f"$aws/things/{self.thing}/jobs/{op}"
        self.publish(base, {} if body is None else body, qos=qos)
        deadline = time.monotonic() + 10
        skipped = []
        try:
            while time.monotonic() < deadline:
                t, p = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
                if t in (base + "/accepted", base + "/rejected"):
                    return t.rsplit("/", 1)[1], json.loads(p)
                skipped.append((t, p))
        finally:
            # Notifications that arrived first stay for later expect() calls.
            for item in skipped:
                self.messages.put(item)
        raise AssertionError(f"no reply to {base}")

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def make_job(server, things: list[str], document: dict, job_id: str | None = None) -> str:
    job_id = job_id or unique("job")
    arns = [server.aws("iot", "describe-thing", "--thing-name", t)["thingArn"] for t in things]
    server.aws("iot", "create-job", "--job-id", job_id, "--targets", *arns, "--document", json.dumps(document))
    return job_id


@pytest.fixture()
def thing(server):
    name = unique("dev")
    server.aws("iot", "create-thing", "--thing-name", name)
    return name


def test_next_describe_is_answered_without_subscription(server, thing):
    job = make_job(server, [thing], {"afr_ota": {"protocols": ["MQTT"], "files": []}})
    dev = Device(server, thing, subscribe=[f"$aws/things/{thing}/jobs/notify-next"])
    try:
        kind, body = dev.request("$next/get", {"clientToken": "tok-1"}, qos=0)
        assert kind == "accepted"
        assert body["clientToken"] == "tok-1"
        assert isinstance(body["timestamp"], int) and body["timestamp"] < 10**11
        ex = body["execution"]
        assert ex["jobId"] == job and ex["status"] == "QUEUED" and ex["versionNumber"] == 1
        assert ex["executionNumber"] == 1
        # The document is an embedded JSON object over MQTT.
        assert ex["jobDocument"] == {"afr_ota": {"protocols": ["MQTT"], "files": []}}
        assert isinstance(ex["queuedAt"], int)
        # An empty payload is an empty request.
        kind, body = dev.request("get", b"")
        assert kind == "accepted" and [j["jobId"] for j in body["queuedJobs"]] == [job]
        assert body["inProgressJobs"] == []
    finally:
        dev.close()


def test_execution_state_machine_over_mqtt(server, thing):
    job = make_job(server, [thing], {"op": "install"})
    dev = Device(server, thing, subscribe=[f"$aws/things/{thing}/jobs/notify-next"])
    try:
        # The FreeRTOS agent: IN_PROGRESS at QoS 0, expectedVersion as a numeric string.
        kind, body = dev.request(
            f"{job}/update",
            {"status": "IN_PROGRESS", "expectedVersion": "1", "statusDetails": {"self_test": "ready", "updatedBy": "0x1000000"}},
            qos=0,
        )
        assert kind == "accepted", body
        # A stale version is rejected with the current state.
        kind, body = dev.request(f"{job}/update", {"status": "IN_PROGRESS", "expectedVersion": 1, "clientToken": "c"})
        assert kind == "rejected"
        assert body["code"] == "VersionMismatch" and body["clientToken"] == "c"
        assert body["executionState"]["versionNumber"] == 2
        assert body["executionState"]["statusDetails"] == {"self_test": "ready", "updatedBy": "0x1000000"}
        # The IN_PROGRESS execution and its details are what a rebooted device reads back.
        kind, body = dev.request(f"{job}/get", {"includeJobDocument": False})
        assert kind == "accepted"
        assert body["execution"]["status"] == "IN_PROGRESS"
        assert body["execution"]["statusDetails"]["self_test"] == "ready"
        assert "jobDocument" not in body["execution"]
        kind, body = dev.request(
            f"{job}/update",
            {"status": "SUCCEEDED", "includeJobExecutionState": True, "includeJobDocument": True},
        )
        assert kind == "accepted"
        assert body["executionState"]["status"] == "SUCCEEDED" and body["executionState"]["versionNumber"] == 3
        assert body["jobDocument"] == {"op": "install"}
        # notify-next tells the device its queue is empty.
        nn = dev.expect(f"$aws/things/{thing}/jobs/notify-next")
        assert "execution" not in nn and isinstance(nn["timestamp"], int)
        # Terminal states are final.
        kind, body = dev.request(f"{job}/update", {"status": "IN_PROGRESS"})
        assert kind == "rejected" and body["code"] == "InvalidStateTransition"
        assert body["executionState"]["status"] == "SUCCEEDED"
        # The control plane saw every change.
        desc = server.aws("iot", "describe-job", "--job-id", job)["job"]
        assert desc["status"] == "COMPLETED"
        assert desc["jobProcessDetails"]["numberOfSucceededThings"] == 1
        ex = server.aws("iot", "describe-job-execution", "--job-id", job, "--thing-name", thing)["execution"]
        assert ex["status"] == "SUCCEEDED" and ex["versionNumber"] == 3
    finally:
        dev.close()


def test_start_next_and_rejections(server, thing):
    first = make_job(server, [thing], {"n": 1})
    second = make_job(server, [thing], {"n": 2})
    dev = Device(server, thing)
    try:
        kind, body = dev.request("start-next", {"statusDetails": {"step": "download"}, "stepTimeoutInMinutes": 5})
        assert kind == "accepted"
        assert body["execution"]["jobId"] == first and body["execution"]["status"] == "IN_PROGRESS"
        assert body["execution"]["versionNumber"] == 2 and body["execution"]["statusDetails"] == {"step": "download"}
        # IN_PROGRESS first, then QUEUED.
        kind, body = dev.request("get")
        assert [j["jobId"] for j in body["inProgressJobs"]] == [first]
        assert [j["jobId"] for j in body["queuedJobs"]] == [second]
        # start-next again returns the same IN_PROGRESS execution, unchanged.
        kind, body = dev.request("start-next")
        assert body["execution"]["jobId"] == first and body["execution"]["versionNumber"] == 2
        for op, payload, code in [
            (f"{first}/update", {}, "InvalidRequest"),  # status is required
            (f"{first}/update", {"status": "DONE"}, "InvalidRequest"),
            (f"{first}/update", {"status": "REJECTED"}, "InvalidStateTransition"),  # after start
            (f"{first}/update", {"status": "TIMED_OUT"}, "InvalidStateTransition"),  # service-only
            (f"{first}/update", {"status": "IN_PROGRESS", "statusDetails": {"bad key": "v"}}, "InvalidRequest"),
            (f"{first}/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0}, "InvalidRequest"),
            ("no-such-job/update", {"status": "IN_PROGRESS"}, "ResourceNotFound"),
            ("$next/get", {"clientToken": "x" * 65}, "InvalidRequest"),
            ("get", {"clientToken": 12}, "InvalidRequest"),
            ("no-such-job/get", {}, "ResourceNotFound"),
            ("something/else", {}, "InvalidTopic"),
        ]:
            kind, body = dev.request(op, payload)
            assert (kind, body["code"]) == ("rejected", code), (op, payload, body)
        dev.publish(f"$aws/things/{thing}/jobs/get", b"{not json")
        assert dev.expect(f"$aws/things/{thing}/jobs/get/rejected")["code"] == "InvalidJson"
        # QUEUED -> REJECTED is the device's way to refuse a job it has not started.
        kind, body = dev.request(f"{second}/update", {"status": "REJECTED", "statusDetails": {"reason": "no"}})
        assert kind == "accepted"
    finally:
        dev.close()


def test_notifications_follow_the_queue(server, thing):
    dev = Device(
        server,
        thing,
        subscribe=[f"$aws/things/{thing}/jobs/notify-next", f"$aws/things/{thing}/jobs/notify"],
    )
    try:
        job = make_job(server, [thing], {"v": 1})
        nn = dev.expect(f"$aws/things/{thing}/jobs/notify-next")
        assert nn["execution"]["jobId"] == job and nn["execution"]["jobDocument"] == {"v": 1}
        n = dev.expect(f"$aws/things/{thing}/jobs/notify")
        assert [j["jobId"] for j in n["jobs"]["QUEUED"]] == [job]
        server.aws("iot", "cancel-job", "--job-id", job)
        nn = dev.expect(f"$aws/things/{thing}/jobs/notify-next")
        assert "execution" not in nn
        n = dev.expect(f"$aws/things/{thing}/jobs/notify")
        assert n["jobs"] == {}
    finally:
        dev.close()


def test_control_plane_changes_win_over_what_the_device_last_saw(server, thing):
    """A device's update is checked against the stored execution, not against what the
    server last told the device: a cancel, or a job deleted and created again under the same
    id, is seen by the very next update."""
    dev = Device(server, thing)
    try:
        job = make_job(server, [thing], {"v": 1})
        kind, body = dev.request("start-next")
        assert kind == "accepted" and body["execution"]["versionNumber"] == 2
        kind, body = dev.request(f"{job}/update", {"status": "IN_PROGRESS", "statusDetails": {"p": "1"}})
        assert kind == "accepted"
        server.aws("iot", "cancel-job", "--job-id", job, "--force")
        kind, body = dev.request(f"{job}/update", {"status": "SUCCEEDED", "expectedVersion": 3})
        assert (kind, body["code"]) == ("rejected", "VersionMismatch"), body
        assert body["executionState"]["status"] == "CANCELED"
        kind, body = dev.request(f"{job}/update", {"status": "SUCCEEDED"})
        assert (kind, body["code"]) == ("rejected", "InvalidStateTransition"), body
        assert body["executionState"]["status"] == "CANCELED"

        # The same job id, deleted and created again: a new execution, version 1.
        server.aws("iot", "delete-job", "--job-id", job, "--force")
        wait_for(
            lambda: server.aws_fail("iot", "describe-job", "--job-id", job)[0] == "ResourceNotFoundException",
            what="job deleted",
        )
        make_job(server, [thing], {"v": 2}, job_id=job)
        kind, body = dev.request("start-next")
        assert kind == "accepted", body
        assert body["execution"]["jobDocument"] == {"v": 2}
        assert body["execution"]["versionNumber"] == 2
        kind, body = dev.request(f"{job}/update", {"status": "SUCCEEDED"})
        assert kind == "accepted", body
        ex = server.aws("iot", "describe-job-execution", "--job-id", job, "--thing-name", thing)["execution"]
        assert ex["status"] == "SUCCEEDED" and ex["versionNumber"] == 3
        assert "p" not in ex.get("statusDetails", {}).get("detailsMap", {}), "nothing of the old execution"
    finally:
        dev.close()


def test_topic_isolation_and_unknown_clients(server, thing):
    other = unique("dev")
    server.aws("iot", "create-thing", "--thing-name", other)
    victim_job = make_job(server, [other], {"secret": "for-other-only"})
    dev = Device(server, thing)
    try:
        # Subscribing to another thing's topics is refused.
        result = []
        dev.client.on_subscribe = lambda c, u, mid, codes, p: result.append([c.value for c in codes])
        dev.client.subscribe(f"$aws/things/{other}/jobs/#", qos=1)
        dev.client.subscribe("$aws/things/+/jobs/notify-next", qos=1)
        wait_for(lambda: len(result) == 2, what="SUBACKs")
        assert all(codes[0] >= 0x80 for codes in result), result
        # Publishing as another thing disconnects the client, and nothing reaches that thing.
        dev.publish(f"$aws/things/{other}/jobs/{victim_job}/update", {"status": "FAILED"})
        wait_for(lambda: not dev.client.is_connected(), what="disconnect")
    finally:
        dev.close()
    ex = server.aws("iot", "describe-job-execution", "--job-id", victim_job, "--thing-name", other)["execution"]
    assert ex["status"] == "QUEUED"
    # A client id that is not a thing may not connect.
    stranger = Device(server, unique("nobody"))
    assert stranger.rc != 0
    stranger.close()


def test_broker_survives_hostile_clients_and_takes_over_client_ids(server, thing):
    host, port = server.endpoints["mqtt"].split("://", 1)[1].rsplit(":", 1)
    # Garbage, a truncated CONNECT, and a huge declared packet length: each connection is
    # dropped, and the broker keeps serving.
    for junk in [b"\x00\x01\x02garbage" * 10, b"\x10\x7f\x00\x04MQTT", b"\x10\xff\xff\xff\x7f" + b"x" * 100]:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(junk)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (TimeoutError, OSError):
            pass
        s.close()
    first = Device(server, thing)
    assert first.connected
    # A second connection with the same client id takes over; the first is disconnected.
    second = Device(server, thing)
    try:
        assert second.connected
        wait_for(lambda: not first.client.is_connected(), what="the old connection to close")
        kind, _ = second.request("get")
        assert kind == "accepted"
    finally:
        first.close()
        second.close()


def test_silent_clients_are_dropped_after_keep_alive(server, thing):
    """MQTT 3.1.1: a client silent for 1.5 keep-alive periods is disconnected."""
    host, port = server.endpoints["mqtt"].split("://", 1)[1].rsplit(":", 1)
    cid = thing.encode()
    rest = b"\x00\x04MQTT\x04\x02" + (1).to_bytes(2, "big") + len(cid).to_bytes(2, "big") + cid
    s = socket.create_connection((host, int(port)), timeout=10)
    try:
        s.sendall(b"\x10" + bytes([len(rest)]) + rest)
        assert s.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        # Then say nothing: the broker must close the connection (keep-alive 1 s → 1.5 s).
        assert s.recv(16) == b""
    finally:
        s.close()


def test_mutual_tls_identity(server, thing, tmp_path):
    other = unique("dev")
    server.aws("iot", "create-thing", "--thing-name", other)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    created = server.aws(
        "iot",
        "create-keys-and-certificate",
        "--set-as-active",
        "--certificate-pem-outfile",
        str(cert_file),
        "--private-key-outfile",
        str(key_file),
    )
    assert len(created["certificateId"]) == 64
    assert created["certificateArn"].endswith(":cert/" + created["certificateId"])
    desc = server.aws("iot", "describe-certificate", "--certificate-id", created["certificateId"])
    assert desc["certificateDescription"]["status"] == "ACTIVE"
    # Not yet attached: refused.
    d = Device(server, thing, tls=True, cert=str(cert_file), key=str(key_file))
    assert d.rc != 0
    d.close()
    server.aws("iot", "attach-thing-principal", "--thing-name", thing, "--principal", created["certificateArn"])
    assert server.aws("iot", "list-thing-principals", "--thing-name", thing)["principals"] == [created["certificateArn"]]
    # A raw TCP connection that never handshakes does not hold anyone up.
    host, port = server.endpoints["mqtts"].split("://", 1)[1].rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(20)]
    try:
        d = Device(server, thing, tls=True, cert=str(cert_file), key=str(key_file))
        assert d.connected
        job = make_job(server, [thing], {"tls": True})
        kind, body = d.request("$next/get")
        assert kind == "accepted" and body["execution"]["jobId"] == job
        d.close()
    finally:
        for s in idle:
            s.close()
    # The certificate names one thing: using it as another client id is refused.
    d = Device(server, other, tls=True, cert=str(cert_file), key=str(key_file))
    assert d.rc != 0
    d.close()
    # Without a client certificate the handshake fails.
    with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
        bare = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=thing)
        bare.tls_set(ca_certs=str(server.data_dir / "ca.pem"))
        bare.connect(host, int(port))
        for _ in range(20):
            bare.loop(timeout=0.1)
        raise ConnectionError("handshake did not complete")
    # INACTIVE certificates are refused.
    server.aws("iot", "update-certificate", "--certificate-id", created["certificateId"], "--new-status", "INACTIVE")
    d = Device(server, thing, tls=True, cert=str(cert_file), key=str(key_file))
    assert d.rc != 0
    d.close()
    server.aws("iot", "update-certificate", "--certificate-id", created["certificateId"], "--new-status", "REVOKED")
    code, _ = server.aws_fail(
        "iot", "update-certificate", "--certificate-id", created["certificateId"], "--new-status", "ACTIVE"
    )
    assert code == "CertificateStateException"
    server.aws("iot", "detach-thing-principal", "--thing-name", thing, "--principal", created["certificateArn"])
    assert server.aws("iot", "list-thing-principals", "--thing-name", thing)["principals"] == []
    ep = server.aws("iot", "describe-endpoint", "--endpoint-type", "iot:Data-ATS")
    assert ep["endpointAddress"]


def test_jobs_data_plane_over_https(server, thing):
    job = make_job(server, [thing], {"https": 1})
    pending = server.aws("iot-jobs-data", "get-pending-job-executions", "--thing-name", thing)
    assert [j["jobId"] for j in pending["queuedJobs"]] == [job] and pending["inProgressJobs"] == []
    assert isinstance(pending["queuedJobs"][0]["queuedAt"], int)
    nxt = server.aws("iot-jobs-data", "describe-job-execution", "--thing-name", thing, "--job-id", "$next")
    assert nxt["execution"]["jobId"] == job
    # Over HTTPS the document is a string.
    assert json.loads(nxt["execution"]["jobDocument"]) == {"https": 1}
    started = server.aws(
        "iot-jobs-data", "start-next-pending-job-execution", "--thing-name", thing, "--status-details", "step=one"
    )
    assert started["execution"]["status"] == "IN_PROGRESS" and started["execution"]["versionNumber"] == 2
    out = server.aws(
        "iot-jobs-data",
        "update-job-execution",
        "--thing-name",
        thing,
        "--job-id",
        job,
        "--status",
        "SUCCEEDED",
        "--expected-version",
        "2",
        "--include-job-execution-state",
        "--include-job-document",
    )
    assert out["executionState"]["status"] == "SUCCEEDED"
    assert json.loads(out["jobDocument"]) == {"https": 1}
    code, _ = server.aws_fail(
        "iot-jobs-data", "update-job-execution", "--thing-name", thing, "--job-id", job, "--status", "IN_PROGRESS"
    )
    assert code == "InvalidStateTransitionException"
    code, _ = server.aws_fail("iot-jobs-data", "describe-job-execution", "--thing-name", thing, "--job-id", "nope")
    assert code == "ResourceNotFoundException"
    assert server.aws("iot", "describe-job", "--job-id", job)["job"]["status"] == "COMPLETED"
    empty = server.aws("iot-jobs-data", "start-next-pending-job-execution", "--thing-name", thing)
    assert "execution" not in empty
