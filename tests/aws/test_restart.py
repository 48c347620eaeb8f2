"""State survives a restart on the same data directory (and database): things, groups,
streams, jobs and executions, OTA updates, S3 objects, and the credentials themselves."""

from __future__ import annotations

import base64
import json

import pytest

from conftest import ROLE_ARN, check_counters, firmware_bytes, unique, wait_for


@pytest.fixture(scope="module")
def world(server, signer):
    """Creates one of everything, with the aws CLI and boto3."""
    iot = server.client("iot")
    s3 = server.client("s3")
    w = {}
    w["bucket"] = bucket = unique("rs")
    s3.create_bucket(Bucket=bucket)
    w["data"] = data = firmware_bytes(12_345)
    s3.put_object(Bucket=bucket, Key="fw.bin", Body=data)

    w["things"] = things = [unique("thing") for _ in range(3)]
    w["arns"] = arns = {}
    for i, t in enumerate(things):
        arns[t] = server.aws("iot", "create-thing", "--thing-name", t,
                             "--attribute-payload", json.dumps({"attributes": {"n": str(i)}}))["thingArn"]
    w["group"] = group = unique("grp")
    w["child"] = child = unique("grp")
    w["group_arn"] = server.aws("iot", "create-thing-group", "--thing-group-name", group)["thingGroupArn"]
    server.aws("iot", "create-thing-group", "--thing-group-name", child, "--parent-group-name", group)
    server.aws("iot", "add-thing-to-thing-group", "--thing-group-name", group, "--thing-name", things[0])
    server.aws("iot", "add-thing-to-thing-group", "--thing-group-name", child, "--thing-name", things[1])

    w["stream"] = sid = unique("stream")
    server.aws("iot", "create-stream", "--stream-id", sid, "--description", "before restart",
               "--files", json.dumps([{"fileId": 3, "s3Location": {"bucket": bucket, "key": "fw.bin"}}]),
               "--role-arn", ROLE_ARN)
    server.aws("iot", "update-stream", "--stream-id", sid, "--description", "before restart v2")

    w["job"] = job = unique("job")
    w["doc"] = doc = {"operation": "update", "stream": sid}
    server.aws("iot", "create-job", "--job-id", job, "--targets", w["group_arn"], arns[things[2]],
               "--document", json.dumps(doc), "--timeout-config", "inProgressTimeoutInMinutes=45")
    server.aws("iot", "cancel-job-execution", "--job-id", job, "--thing-name", things[2])

    w["ota"] = ota = unique("ota")
    iot.create_ota_update(
        otaUpdateId=ota,
        targets=[arns[things[0]]],
        protocols=["MQTT"],
        files=[{
            "fileName": "fw.bin",
            "fileLocation": {"s3Location": {"bucket": bucket, "key": "fw.bin"}},
            "codeSigning": {"customCodeSigning": {
                "signature": {"inlineDocument": signer.sign_b64(data).encode()},
                "certificateChain": {"certificateName": "c.pem"},
                "hashAlgorithm": "SHA256", "signatureAlgorithm": "ECDSA",
            }},
        }],
        roleArn=ROLE_ARN,
    )

    def complete():
        i = iot.get_ota_update(otaUpdateId=ota)["otaUpdateInfo"]
        assert i["otaUpdateStatus"] != "CREATE_FAILED", i.get("errorInfo")
        return i if i["otaUpdateStatus"] == "CREATE_COMPLETE" else None

    info = wait_for(complete, timeout=30, what="OTA CREATE_COMPLETE")
    w["ota_doc"] = iot.get_job_document(jobId=info["awsIotJobId"])["document"]
    w["ota_stream"] = json.loads(w["ota_doc"])["afr_ota"]["streamname"]
    w["credentials_text"] = server.credentials_file.read_text()
    w["config_text"] = server.config_file.read_text()
    w["keys"] = server.credentials()
    w["account"] = arns[things[0]].split(":")[4]
    return w


def test_restart_keeps_everything(server, world, signer):
    old_endpoint = server.endpoint
    rc = server.restart()
    assert rc == 0, f"graceful SIGTERM shutdown exited {rc}:\n{server.log_tail()}"
    assert server.endpoint

    # Credentials unchanged: same files, same keys, still accepted.
    assert server.credentials_file.read_text() == world["credentials_text"]
    assert server.config_file.read_text() == world["config_text"]
    assert server.credentials() == world["keys"]
    assert oct(server.credentials_file.stat().st_mode & 0o777) == oct(0o600)

    iot = server.client("iot")
    things = world["things"]
    listed = {t["thingName"] for t in server.aws("iot", "list-things")["things"]}
    assert set(things) <= listed
    for i, t in enumerate(things):
        d = server.aws("iot", "describe-thing", "--thing-name", t)
        assert d["attributes"] == {"n": str(i)}
        assert d["thingArn"] == world["arns"][t]
        assert d["thingArn"].split(":")[4] == world["account"], "account id changed across restart"

    rec = server.aws("iot", "list-things-in-thing-group", "--thing-group-name", world["group"], "--recursive")
    assert sorted(rec["things"]) == sorted(things[:2])
    cg = server.aws("iot", "describe-thing-group", "--thing-group-name", world["child"])
    assert cg["thingGroupMetadata"]["parentGroupName"] == world["group"]

    s = server.aws("iot", "describe-stream", "--stream-id", world["stream"])["streamInfo"]
    assert s["streamVersion"] == 2 and s["description"] == "before restart v2"
    assert s["files"][0]["fileId"] == 3

    d = server.aws("iot", "describe-job", "--job-id", world["job"])["job"]
    assert d["status"] == "IN_PROGRESS"
    assert d["timeoutConfig"] == {"inProgressTimeoutInMinutes": 45}
    check_counters(d["jobProcessDetails"], Queued=2, Canceled=1)
    assert json.loads(server.aws("iot", "get-job-document", "--job-id", world["job"])["document"]) == world["doc"]
    e = server.aws("iot", "describe-job-execution", "--job-id", world["job"], "--thing-name", things[2])["execution"]
    assert e["status"] == "CANCELED" and e["versionNumber"] == 2

    info = server.aws("iot", "get-ota-update", "--ota-update-id", world["ota"])["otaUpdateInfo"]
    assert info["otaUpdateStatus"] == "CREATE_COMPLETE"
    assert info["awsIotJobId"] == f"AFR_OTA-{world['ota']}"
    assert server.aws("iot", "get-job-document", "--job-id", info["awsIotJobId"])["document"] == world["ota_doc"]
    f = json.loads(world["ota_doc"])["afr_ota"]["files"][0]
    signer.verify(world["data"], base64.b64decode(f["sig-sha256-ecdsa"]))
    assert server.aws("iot", "describe-stream", "--stream-id", world["ota_stream"])["streamInfo"]["streamId"]
    assert world["ota"] in [o["otaUpdateId"] for o in server.aws("iot", "list-ota-updates")["otaUpdates"]]

    s3 = server.client("s3")
    assert s3.get_object(Bucket=world["bucket"], Key="fw.bin")["Body"].read() == world["data"]

    # And it all still works.
    new_thing = unique("thing")
    server.aws("iot", "create-thing", "--thing-name", new_thing)
    server.aws("iot", "add-thing-to-thing-group", "--thing-group-name", world["child"], "--thing-name", new_thing)
    rec = server.aws("iot", "list-things-in-thing-group", "--thing-group-name", world["group"], "--recursive")
    assert sorted(rec["things"]) == sorted(things[:2] + [new_thing])
    up = server.aws("iot", "update-stream", "--stream-id", world["stream"], "--description", "after restart")
    assert up["streamVersion"] == 3
    server.aws("iot", "cancel-job", "--job-id", world["job"], "--comment", "after restart")
    d = server.aws("iot", "describe-job", "--job-id", world["job"])["job"]
    assert d["status"] == "CANCELED"
    check_counters(d["jobProcessDetails"], Canceled=3)
    again = unique("job")
    iot.create_job(jobId=again, targets=[world["arns"][things[0]]], document="{}")
    assert iot.describe_job(jobId=again)["job"]["status"] == "IN_PROGRESS"
    iot.delete_ota_update(otaUpdateId=world["ota"], deleteStream=True, forceDeleteAWSJob=True)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.get_ota_update(otaUpdateId=world["ota"])
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_stream(streamId=world["ota_stream"])
    assert old_endpoint  # (the port may or may not change; clients use the new endpoints.json)


def test_second_restart_keeps_changes_and_deletions(server):
    """Changes made just before a restart (creates and deletes) are durable."""
    keys = server.credentials()
    kept, gone = unique("thing"), unique("thing")
    server.aws("iot", "create-thing", "--thing-name", kept)
    server.aws("iot", "create-thing", "--thing-name", gone)
    server.aws("iot", "update-thing", "--thing-name", kept, "--attribute-payload", '{"attributes":{"k":"v"}}')
    server.aws("iot", "delete-thing", "--thing-name", gone)
    job = unique("job")
    arn = server.aws("iot", "describe-thing", "--thing-name", kept)["thingArn"]
    server.aws("iot", "create-job", "--job-id", job, "--targets", arn, "--document", "{}")
    server.aws("iot", "delete-job", "--job-id", job, "--force")
    rc = server.restart()
    assert rc == 0, server.log_tail()
    assert server.credentials() == keys
    d = server.aws("iot", "describe-thing", "--thing-name", kept)
    assert d["attributes"] == {"k": "v"} and d["version"] == 2
    code, _ = server.aws_fail("iot", "describe-thing", "--thing-name", gone)
    assert code == "ResourceNotFoundException"
    code, _ = server.aws_fail("iot", "describe-job", "--job-id", job)
    assert code == "ResourceNotFoundException"
    # The freed job id is reusable after the restart.
    server.aws("iot", "create-job", "--job-id", job, "--targets", arn, "--document", "{}")
    assert server.aws("iot", "describe-job", "--job-id", job)["job"]["status"] == "IN_PROGRESS"
