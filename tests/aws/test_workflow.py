"""The OTA workflow of the AWS docs (ota-cli-workflow), end to end with the unmodified
`aws` CLI (v1) against the real server: S3 bucket + firmware, things and thing groups,
streams, jobs (inline document and documentSource), OTA updates with custom code
signing over MQTT and HTTP, executions, cancel/delete semantics.

Every command runs with `--output json` and its JSON is checked, not just its exit code.
"""

from __future__ import annotations

import base64
import json
import re

import pytest

from conftest import (
    ROLE_ARN,
    check_counters,
    firmware_bytes,
    unique,
    wait_for,
)

STREAM_NAME_RE = re.compile(r"^AFR_OTA-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fw(server, tmp_path_factory):
    """A versioned bucket holding a firmware image, uploaded with `aws s3`."""
    bucket = unique("fw")
    out = server.aws("s3", "mb", f"s3://{bucket}")
    assert f"make_bucket: {bucket}" in out.get("_text", ""), out
    server.aws(
        "s3api", "put-bucket-versioning", "--bucket", bucket, "--versioning-configuration", "Status=Enabled"
    )
    vers = server.aws("s3api", "get-bucket-versioning", "--bucket", bucket)
    assert vers.get("Status") == "Enabled", vers

    data = firmware_bytes(70_001)
    d = tmp_path_factory.mktemp("fw")
    path = d / "firmware.bin"
    path.write_bytes(data)
    key = "images/firmware-1.0.bin"
    server.aws("s3", "cp", str(path), f"s3://{bucket}/{key}")
    head = server.aws("s3api", "head-object", "--bucket", bucket, "--key", key)
    assert head["ContentLength"] == len(data), head
    version = head.get("VersionId")
    assert version and version != "null", f"versioned bucket gave no VersionId: {head}"
    return {"bucket": bucket, "key": key, "data": data, "version": version, "dir": d, "path": path}


@pytest.fixture(scope="module")
def fleet(server):
    """Things t0..t3; group `parent` holds t0, t1; its child group `child` holds t2; t3 is alone."""
    things = [unique("thing") for _ in range(4)]
    for i, t in enumerate(things):
        out = server.aws(
            "iot", "create-thing", "--thing-name", t, "--attribute-payload", json.dumps({"attributes": {"idx": str(i)}})
        )
        assert out["thingName"] == t
        assert out["thingArn"].endswith(f":thing/{t}")
        assert out["thingId"]
    parent = unique("grp")
    child = unique("grp")
    g = server.aws("iot", "create-thing-group", "--thing-group-name", parent)
    assert g["thingGroupName"] == parent and g["thingGroupArn"].endswith(f":thinggroup/{parent}")
    c = server.aws("iot", "create-thing-group", "--thing-group-name", child, "--parent-group-name", parent)
    assert c["thingGroupName"] == child
    for t in things[:2]:
        server.aws("iot", "add-thing-to-thing-group", "--thing-group-name", parent, "--thing-name", t)
    server.aws("iot", "add-thing-to-thing-group", "--thing-group-name", child, "--thing-name", things[2])
    arn = server.aws("iot", "describe-thing", "--thing-name", things[0])["thingArn"]
    prefix = arn.rsplit(":", 1)[0]  # arn:aws:iot:REGION:ACCOUNT
    return {
        "things": things,
        "parent": parent,
        "child": child,
        "thing_arn": lambda t: f"{prefix}:thing/{t}",
        "group_arn": lambda gname: f"{prefix}:thinggroup/{gname}",
        "arn_prefix": prefix,
    }


def _wait_job_gone(server, job_id):
    def gone():
        p = server.aws_run("iot", "describe-job", "--job-id", job_id)
        if p.returncode == 0:
            return False
        assert "ResourceNotFoundException" in p.stderr, p.stderr
        return True

    wait_for(gone, timeout=30, what=f"job {job_id} to be deleted")


def _exec_status(server, job_id, thing):
    return server.aws("iot", "describe-job-execution", "--job-id", job_id, "--thing-name", thing)["execution"]["status"]


def _create_simple_job(server, fleet, things, selection="SNAPSHOT", job_id=None, doc=None):
    job_id = job_id or unique("job")
    out = server.aws(
        "iot",
        "create-job",
        "--job-id",
        job_id,
        "--targets",
        *[fleet["thing_arn"](t) for t in things],
        "--document",
        json.dumps(doc or {"operation": "noop", "job": job_id}),
        "--target-selection",
        selection,
    )
    assert out["jobId"] == job_id
    return job_id


# ------------------------------------------------------------------------------ S3


def test_s3_bucket_versioning_and_firmware(server, fw):
    listing = server.aws("s3api", "list-objects-v2", "--bucket", fw["bucket"])
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert fw["key"] in keys
    size = {o["Key"]: o["Size"] for o in listing["Contents"]}[fw["key"]]
    assert size == len(fw["data"])
    dest = fw["dir"] / "downloaded.bin"
    server.aws("s3", "cp", f"s3://{fw['bucket']}/{fw['key']}", str(dest))
    assert dest.read_bytes() == fw["data"]
    buckets = server.aws("s3api", "list-buckets")
    assert fw["bucket"] in [b["Name"] for b in buckets["Buckets"]]


# ------------------------------------------------------------------ things & groups


def test_things_and_groups(server, fleet):
    things = fleet["things"]
    listed = server.aws("iot", "list-things")
    names = {t["thingName"] for t in listed["things"]}
    assert set(things) <= names
    d = server.aws("iot", "describe-thing", "--thing-name", things[1])
    assert d["thingName"] == things[1]
    assert d["attributes"] == {"idx": "1"}
    assert d["version"] == 1

    direct = server.aws("iot", "list-things-in-thing-group", "--thing-group-name", fleet["parent"])
    assert sorted(direct["things"]) == sorted(things[:2])
    rec = server.aws("iot", "list-things-in-thing-group", "--thing-group-name", fleet["parent"], "--recursive")
    assert sorted(rec["things"]) == sorted(things[:3])
    child = server.aws("iot", "list-things-in-thing-group", "--thing-group-name", fleet["child"])
    assert child["things"] == [things[2]]

    cg = server.aws("iot", "describe-thing-group", "--thing-group-name", fleet["child"])
    assert cg["thingGroupName"] == fleet["child"]
    assert cg["thingGroupMetadata"]["parentGroupName"] == fleet["parent"]
    roots = [g["groupName"] for g in cg["thingGroupMetadata"].get("rootToParentThingGroups", [])]
    assert roots == [fleet["parent"]]
    assert cg["version"] == 1


# --------------------------------------------------------------------------- streams


def test_create_describe_update_stream(server, fw):
    sid = unique("stream")
    files = [{"fileId": 0, "s3Location": {"bucket": fw["bucket"], "key": fw["key"]}}]
    out = server.aws(
        "iot", "create-stream", "--stream-id", sid, "--description", "firmware 1.0",
        "--files", json.dumps(files), "--role-arn", ROLE_ARN,
    )
    assert out["streamId"] == sid
    assert out["streamVersion"] == 1
    assert out["streamArn"].endswith(f":stream/{sid}")
    assert out.get("description") == "firmware 1.0"

    info = server.aws("iot", "describe-stream", "--stream-id", sid)["streamInfo"]
    assert info["streamId"] == sid
    assert info["streamVersion"] == 1
    assert info["roleArn"] == ROLE_ARN
    assert info["description"] == "firmware 1.0"
    assert len(info["files"]) == 1
    assert info["files"][0]["fileId"] == 0
    assert info["files"][0]["s3Location"]["bucket"] == fw["bucket"]
    assert info["files"][0]["s3Location"]["key"] == fw["key"]
    assert isinstance(info["createdAt"], (int, float)) or isinstance(info["createdAt"], str)

    up = server.aws("iot", "update-stream", "--stream-id", sid, "--description", "firmware 1.0 (b)")
    assert up["streamVersion"] == 2
    files2 = files + [
        {"fileId": 7, "s3Location": {"bucket": fw["bucket"], "key": fw["key"], "version": fw["version"]}}
    ]
    up = server.aws("iot", "update-stream", "--stream-id", sid, "--files", json.dumps(files2))
    assert up["streamVersion"] == 3
    info = server.aws("iot", "describe-stream", "--stream-id", sid)["streamInfo"]
    assert info["streamVersion"] == 3
    assert info["description"] == "firmware 1.0 (b)"
    assert sorted(f["fileId"] for f in info["files"]) == [0, 7]
    f7 = next(f for f in info["files"] if f["fileId"] == 7)
    assert f7["s3Location"]["version"] == fw["version"]

    listed = server.aws("iot", "list-streams")
    mine = [s for s in listed["streams"] if s["streamId"] == sid]
    assert len(mine) == 1 and mine[0]["streamVersion"] == 3

    server.aws("iot", "delete-stream", "--stream-id", sid)
    code, _ = server.aws_fail("iot", "describe-stream", "--stream-id", sid)
    assert code == "ResourceNotFoundException"


# ------------------------------------------------------------------------------ jobs


def test_create_job_inline_document_with_configs_and_group_targets(server, fleet):
    things = fleet["things"]
    job_id = unique("job")
    doc = {"operation": "firmware-update", "version": "1.2.3", "files": [{"name": "fw.bin"}]}
    rollout = {
        "maximumPerMinute": 50,
        "exponentialRate": {
            "baseRatePerMinute": 10,
            "incrementFactor": 2.5,
            "rateIncreaseCriteria": {"numberOfNotifiedThings": 5},
        },
    }
    abort = {
        "criteriaList": [
            {"failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 25.5, "minNumberOfExecutedThings": 3}
        ]
    }
    timeout = {"inProgressTimeoutInMinutes": 120}
    presigned = {"roleArn": ROLE_ARN, "expiresInSec": 900}
    targets = [fleet["thing_arn"](things[3]), fleet["group_arn"](fleet["parent"])]
    out = server.aws(
        "iot", "create-job", "--job-id", job_id, "--targets", *targets,
        "--document", json.dumps(doc), "--description", "roll out 1.2.3",
        "--target-selection", "SNAPSHOT",
        "--job-executions-rollout-config", json.dumps(rollout),
        "--abort-config", json.dumps(abort),
        "--timeout-config", json.dumps(timeout),
        "--presigned-url-config", json.dumps(presigned),
    )
    assert out["jobId"] == job_id
    assert out["jobArn"] == f"{fleet['arn_prefix']}:job/{job_id}"
    assert out.get("description") == "roll out 1.2.3"

    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["jobId"] == job_id
    assert job["jobArn"] == out["jobArn"]
    assert job["status"] == "IN_PROGRESS"
    assert job["targetSelection"] == "SNAPSHOT"
    assert sorted(job["targets"]) == sorted(targets)
    assert job["description"] == "roll out 1.2.3"
    assert job["jobExecutionsRolloutConfig"] == rollout
    assert job["abortConfig"] == abort
    assert job["timeoutConfig"] == timeout
    assert job["presignedUrlConfig"] == presigned
    assert "createdAt" in job and "lastUpdatedAt" in job
    # t3 directly, t0/t1 in the group, t2 in its child group.
    check_counters(job["jobProcessDetails"], Queued=4)

    ex = server.aws("iot", "list-job-executions-for-job", "--job-id", job_id)["executionSummaries"]
    arns = sorted(e["thingArn"] for e in ex)
    assert arns == sorted(fleet["thing_arn"](t) for t in things), "group members were not expanded to one execution each"
    for e in ex:
        assert e["jobExecutionSummary"]["status"] == "QUEUED"
        assert e["jobExecutionSummary"]["executionNumber"] == 1

    got = server.aws("iot", "get-job-document", "--job-id", job_id)
    assert json.loads(got["document"]) == doc


def test_create_job_from_document_source(server, fw, fleet):
    job_id = unique("job")
    doc = {"operation": "fota", "fileId": 3, "url": "${aws:iot:s3-presigned-url:https://s3.amazonaws.com/%s/%s}" % (fw["bucket"], fw["key"])}
    path = fw["dir"] / f"{job_id}.json"
    path.write_text(json.dumps(doc))
    key = f"jobs/{job_id}.json"
    server.aws("s3", "cp", str(path), f"s3://{fw['bucket']}/{key}")
    source = f"https://s3.amazonaws.com/{fw['bucket']}/{key}"
    t = fleet["things"][3]
    out = server.aws(
        "iot", "create-job", "--job-id", job_id, "--targets", fleet["thing_arn"](t),
        "--document-source", source,
        "--presigned-url-config", json.dumps({"roleArn": ROLE_ARN, "expiresInSec": 3600}),
    )
    assert out["jobId"] == job_id
    d = server.aws("iot", "describe-job", "--job-id", job_id)
    assert d.get("documentSource") == source
    assert d["job"]["status"] == "IN_PROGRESS"
    check_counters(d["job"]["jobProcessDetails"], Queued=1)
    got = server.aws("iot", "get-job-document", "--job-id", job_id)
    assert json.loads(got["document"]) == doc


def test_list_jobs_filters(server, fleet):
    things = fleet["things"]
    group = unique("grp")
    server.aws("iot", "create-thing-group", "--thing-group-name", group)
    server.aws("iot", "add-thing-to-thing-group", "--thing-group-name", group, "--thing-name", things[0])
    a = unique("job")  # SNAPSHOT, targets the group, stays IN_PROGRESS
    server.aws(
        "iot", "create-job", "--job-id", a, "--targets", fleet["group_arn"](group),
        "--document", '{"op":"a"}', "--target-selection", "SNAPSHOT",
    )
    b = _create_simple_job(server, fleet, [things[3]], selection="CONTINUOUS")
    c = _create_simple_job(server, fleet, [things[1]], selection="SNAPSHOT")
    server.aws("iot", "cancel-job", "--job-id", c)
    mine = {a, b, c}

    def ids(*args):
        jobs = server.aws("iot", "list-jobs", *args)["jobs"]
        for j in jobs:
            assert {"jobArn", "jobId", "status", "targetSelection", "createdAt"} <= set(j), j
        return {j["jobId"] for j in jobs} & mine

    assert ids() == mine
    assert ids("--status", "CANCELED") == {c}
    assert ids("--status", "IN_PROGRESS") == {a, b}
    assert ids("--target-selection", "CONTINUOUS") == {b}
    assert ids("--target-selection", "SNAPSHOT") == {a, c}
    assert ids("--thing-group-name", group) == {a}
    assert ids("--status", "IN_PROGRESS", "--target-selection", "CONTINUOUS") == {b}
    summ = {j["jobId"]: j for j in server.aws("iot", "list-jobs")["jobs"]}
    assert summ[c]["status"] == "CANCELED" and summ[b]["targetSelection"] == "CONTINUOUS"


# ----------------------------------------------------------------------- OTA updates


def _ota_files(fw, signer, *, file_name, version=True, cert_name="/certs/ota_signer.pem"):
    loc = {"bucket": fw["bucket"], "key": fw["key"]}
    if version:
        loc["version"] = fw["version"]
    return [
        {
            "fileName": file_name,
            "fileType": 0,
            "fileVersion": "1",
            "fileLocation": {"s3Location": loc},
            "codeSigning": {
                "customCodeSigning": {
                    # CLI v1 passes the text as is; the blob is the base64 signature text.
                    "signature": {"inlineDocument": signer.sign_b64(fw["data"])},
                    "certificateChain": {"certificateName": cert_name, "inlineDocument": signer.cert_pem},
                    "hashAlgorithm": "SHA256",
                    "signatureAlgorithm": "ECDSA",
                }
            },
        }
    ]


def _wait_ota_complete(server, ota_id):
    def done():
        info = server.aws("iot", "get-ota-update", "--ota-update-id", ota_id)["otaUpdateInfo"]
        st = info["otaUpdateStatus"]
        assert st != "CREATE_FAILED", f"OTA update {ota_id} failed: {info.get('errorInfo')}"
        return info if st == "CREATE_COMPLETE" else None

    return wait_for(done, timeout=30, interval=0.3, what=f"OTA update {ota_id} CREATE_COMPLETE")


def _verify_sig(signer, fw, f):
    sig = f.get("sig-sha256-ecdsa")
    assert sig, f"no sig-sha256-ecdsa in {f}"
    signer.verify(fw["data"], base64.b64decode(sig))  # raises InvalidSignature


def test_ota_update_mqtt_custom_signing(server, fw, fleet, signer):
    things = fleet["things"]
    ota_id = unique("ota")
    files_path = fw["dir"] / f"{ota_id}-files.json"
    files_path.write_text(json.dumps(_ota_files(fw, signer, file_name="/device/firmware.bin")))
    abort = {
        "abortCriteriaList": [
            {"failureType": "ALL", "action": "CANCEL", "thresholdPercentage": 50, "minNumberOfExecutedThings": 2}
        ]
    }
    targets = [fleet["thing_arn"](things[3]), fleet["group_arn"](fleet["child"])]
    out = server.aws(
        "iot", "create-ota-update", "--ota-update-id", ota_id, "--description", "MQTT update",
        "--targets", *targets, "--protocols", "MQTT", "--target-selection", "SNAPSHOT",
        "--files", f"file://{files_path}", "--role-arn", ROLE_ARN,
        "--aws-job-executions-rollout-config", json.dumps({"maximumPerMinute": 20}),
        "--aws-job-presigned-url-config", json.dumps({"expiresInSec": 1200}),
        "--aws-job-abort-config", json.dumps(abort),
        "--aws-job-timeout-config", json.dumps({"inProgressTimeoutInMinutes": 60}),
        "--additional-parameters", json.dumps({"note": "from the test suite"}),
    )
    assert out["otaUpdateId"] == ota_id
    assert out["otaUpdateArn"] == f"{fleet['arn_prefix']}:otaupdate/{ota_id}"
    assert out["otaUpdateStatus"] in ("CREATE_PENDING", "CREATE_IN_PROGRESS", "CREATE_COMPLETE")

    info = _wait_ota_complete(server, ota_id)
    job_id = f"AFR_OTA-{ota_id}"
    assert info["awsIotJobId"] == job_id
    assert info["awsIotJobArn"] == f"{fleet['arn_prefix']}:job/{job_id}"
    assert info["otaUpdateArn"] == out["otaUpdateArn"]
    assert sorted(info["targets"]) == sorted(targets)
    assert info["protocols"] == ["MQTT"]
    assert info["targetSelection"] == "SNAPSHOT"
    assert info["description"] == "MQTT update"
    assert info["awsJobPresignedUrlConfig"] == {"expiresInSec": 1200}
    assert info["awsJobExecutionsRolloutConfig"] == {"maximumPerMinute": 20}
    assert info["additionalParameters"] == {"note": "from the test suite"}
    assert info["otaUpdateFiles"][0]["fileName"] == "/device/firmware.bin"
    assert "creationDate" in info and "lastModifiedDate" in info

    doc = json.loads(server.aws("iot", "get-job-document", "--job-id", job_id)["document"])
    ota = doc["afr_ota"]
    assert ota["protocols"] == ["MQTT"]
    stream = ota["streamname"]
    assert STREAM_NAME_RE.match(stream) and len(stream) <= 44, stream
    assert len(ota["files"]) == 1
    f = ota["files"][0]
    assert f["filepath"] == "/device/firmware.bin"
    assert f["filesize"] == len(fw["data"])
    assert isinstance(f["fileid"], int)
    assert f["certfile"] == "/certs/ota_signer.pem"
    _verify_sig(signer, fw, f)

    s = server.aws("iot", "describe-stream", "--stream-id", stream)["streamInfo"]
    assert s["streamId"] == stream
    assert len(s["files"]) == 1
    assert s["files"][0]["fileId"] == f["fileid"]
    assert s["files"][0]["s3Location"]["bucket"] == fw["bucket"]
    assert s["files"][0]["s3Location"]["key"] == fw["key"]

    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["status"] == "IN_PROGRESS"
    assert job["targetSelection"] == "SNAPSHOT"
    assert job["abortConfig"] == {"criteriaList": abort["abortCriteriaList"]}
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 60}
    assert job["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 20}
    check_counters(job["jobProcessDetails"], Queued=2)  # things[3] + things[2] (child group)
    ex = server.aws("iot", "list-job-executions-for-job", "--job-id", job_id)["executionSummaries"]
    assert sorted(e["thingArn"] for e in ex) == sorted(fleet["thing_arn"](t) for t in (things[2], things[3]))

    listed = server.aws("iot", "list-ota-updates")["otaUpdates"]
    mine = [o for o in listed if o["otaUpdateId"] == ota_id]
    assert len(mine) == 1
    assert mine[0]["otaUpdateArn"] == out["otaUpdateArn"]
    assert "creationDate" in mine[0]
    complete = server.aws("iot", "list-ota-updates", "--ota-update-status", "CREATE_COMPLETE")["otaUpdates"]
    assert ota_id in [o["otaUpdateId"] for o in complete]
    failed = server.aws("iot", "list-ota-updates", "--ota-update-status", "CREATE_FAILED")["otaUpdates"]
    assert ota_id not in [o["otaUpdateId"] for o in failed]

    # Delete everything it made.
    server.aws("iot", "delete-ota-update", "--ota-update-id", ota_id, "--delete-stream", "--force-delete-aws-job")
    code, _ = server.aws_fail("iot", "get-ota-update", "--ota-update-id", ota_id)
    assert code == "ResourceNotFoundException"
    _wait_job_gone(server, job_id)
    code, _ = server.aws_fail("iot", "describe-stream", "--stream-id", stream)
    assert code == "ResourceNotFoundException"
    listed = server.aws("iot", "list-ota-updates")["otaUpdates"]
    assert ota_id not in [o["otaUpdateId"] for o in listed]


def test_ota_update_http_custom_signing(server, fw, fleet, signer):
    things = fleet["things"]
    ota_id = unique("ota")
    files_path = fw["dir"] / f"{ota_id}-files.json"
    files_path.write_text(json.dumps(_ota_files(fw, signer, file_name="firmware.bin", version=False)))
    before = {s["streamId"] for s in server.aws("iot", "list-streams")["streams"]}
    out = server.aws(
        "iot", "create-ota-update", "--ota-update-id", ota_id,
        "--targets", fleet["thing_arn"](things[0]), "--protocols", "HTTP",
        "--files", f"file://{files_path}", "--role-arn", ROLE_ARN,
        "--aws-job-presigned-url-config", json.dumps({"expiresInSec": 300}),
    )
    assert out["otaUpdateId"] == ota_id
    info = _wait_ota_complete(server, ota_id)
    job_id = f"AFR_OTA-{ota_id}"
    assert info["awsIotJobId"] == job_id
    assert info["protocols"] == ["HTTP"]
    assert info["targetSelection"] == "SNAPSHOT"  # the default

    doc = json.loads(server.aws("iot", "get-job-document", "--job-id", job_id)["document"])
    ota = doc["afr_ota"]
    assert ota["protocols"] == ["HTTP"]
    assert not ota.get("streamname"), "an HTTP-only update has no stream"
    f = ota["files"][0]
    assert f["filepath"] == "firmware.bin"
    assert f["filesize"] == len(fw["data"])
    assert f["certfile"] == "/certs/ota_signer.pem"
    url = f["update_data_url"]
    assert url.startswith("${aws:iot:s3-presigned-url:https://") and url.endswith("}"), url
    assert url[len("${aws:iot:s3-presigned-url:"):-1].endswith(f"/{fw['bucket']}/{fw['key']}"), url
    assert f["auth_scheme"] == "aws.s3.presigned"
    _verify_sig(signer, fw, f)

    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["presignedUrlConfig"].get("expiresInSec") == 300
    check_counters(job["jobProcessDetails"], Queued=1)
    after = {s["streamId"] for s in server.aws("iot", "list-streams")["streams"]}
    assert not {s for s in after - before if s.startswith("AFR_OTA-")}, "HTTP-only update created a stream"

    # Without --force-delete-aws-job the job stays.
    server.aws("iot", "delete-ota-update", "--ota-update-id", ota_id)
    code, _ = server.aws_fail("iot", "get-ota-update", "--ota-update-id", ota_id)
    assert code == "ResourceNotFoundException"
    assert server.aws("iot", "describe-job", "--job-id", job_id)["job"]["jobId"] == job_id
    server.aws("iot", "delete-job", "--job-id", job_id, "--force")
    _wait_job_gone(server, job_id)


# ------------------------------------------------------------------- job executions


def test_job_executions_describe_list_cancel_delete(server, fleet):
    things = fleet["things"][:3]
    job_id = _create_simple_job(server, fleet, things)
    t0, t1, t2 = things

    e = server.aws("iot", "describe-job-execution", "--job-id", job_id, "--thing-name", t0)["execution"]
    assert e["jobId"] == job_id
    assert e["status"] == "QUEUED"
    assert e["thingArn"] == fleet["thing_arn"](t0)
    assert e["executionNumber"] == 1
    assert e["versionNumber"] == 1
    assert "queuedAt" in e and "lastUpdatedAt" in e
    e1 = server.aws(
        "iot", "describe-job-execution", "--job-id", job_id, "--thing-name", t0, "--execution-number", "1"
    )["execution"]
    assert e1["executionNumber"] == 1 and e1["status"] == "QUEUED"

    for_thing = server.aws("iot", "list-job-executions-for-thing", "--thing-name", t0)["executionSummaries"]
    mine = [x for x in for_thing if x["jobId"] == job_id]
    assert len(mine) == 1 and mine[0]["jobExecutionSummary"]["status"] == "QUEUED"
    queued = server.aws("iot", "list-job-executions-for-thing", "--thing-name", t0, "--status", "QUEUED")
    assert job_id in [x["jobId"] for x in queued["executionSummaries"]]

    # Cancel a QUEUED execution.
    server.aws("iot", "cancel-job-execution", "--job-id", job_id, "--thing-name", t0)
    e = server.aws("iot", "describe-job-execution", "--job-id", job_id, "--thing-name", t0)["execution"]
    assert e["status"] == "CANCELED"
    assert e["versionNumber"] == 2
    canceled = server.aws("iot", "list-job-executions-for-thing", "--thing-name", t0, "--status", "CANCELED")
    assert job_id in [x["jobId"] for x in canceled["executionSummaries"]]
    queued = server.aws("iot", "list-job-executions-for-thing", "--thing-name", t0, "--status", "QUEUED")
    assert job_id not in [x["jobId"] for x in queued["executionSummaries"]]
    by_status = server.aws("iot", "list-job-executions-for-job", "--job-id", job_id, "--status", "CANCELED")
    assert [x["thingArn"] for x in by_status["executionSummaries"]] == [fleet["thing_arn"](t0)]
    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    check_counters(job["jobProcessDetails"], Canceled=1, Queued=2)
    assert job["status"] == "IN_PROGRESS"

    # Delete: non-terminal without force is refused and changes nothing.
    code, err = server.aws_fail(
        "iot", "delete-job-execution", "--job-id", job_id, "--thing-name", t1, "--execution-number", "1"
    )
    assert code == "InvalidStateTransitionException", err
    assert _exec_status(server, job_id, t1) == "QUEUED"
    # Terminal without force is fine.
    server.aws("iot", "delete-job-execution", "--job-id", job_id, "--thing-name", t0, "--execution-number", "1")
    code, _ = server.aws_fail("iot", "describe-job-execution", "--job-id", job_id, "--thing-name", t0)
    assert code == "ResourceNotFoundException"
    # Non-terminal with --force is fine.
    server.aws(
        "iot", "delete-job-execution", "--job-id", job_id, "--thing-name", t1, "--execution-number", "1", "--force"
    )
    code, _ = server.aws_fail("iot", "describe-job-execution", "--job-id", job_id, "--thing-name", t1)
    assert code == "ResourceNotFoundException"
    left = server.aws("iot", "list-job-executions-for-job", "--job-id", job_id)["executionSummaries"]
    assert [x["thingArn"] for x in left] == [fleet["thing_arn"](t2)]
    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    check_counters(job["jobProcessDetails"], Queued=1)


def test_cancel_job_with_comment_and_reason(server, fleet):
    things = fleet["things"][:3]
    job_id = _create_simple_job(server, fleet, things)
    out = server.aws(
        "iot", "cancel-job", "--job-id", job_id, "--comment", "bad build, rolling back", "--reason-code", "BAD_BUILD_42"
    )
    assert out["jobId"] == job_id
    assert out["jobArn"].endswith(f":job/{job_id}")
    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["status"] == "CANCELED"
    assert job["comment"] == "bad build, rolling back"
    assert job["reasonCode"] == "BAD_BUILD_42"
    assert job.get("forceCanceled") in (False, None)
    check_counters(job["jobProcessDetails"], Canceled=3)
    for t in things:
        assert _exec_status(server, job_id, t) == "CANCELED"
    # A canceled job can be deleted without force.
    server.aws("iot", "delete-job", "--job-id", job_id)
    _wait_job_gone(server, job_id)


def test_delete_job_needs_force_when_in_progress_and_id_is_reusable(server, fleet):
    things = fleet["things"][:2]
    job_id = _create_simple_job(server, fleet, things, doc={"v": 1})
    code, err = server.aws_fail("iot", "delete-job", "--job-id", job_id)
    assert code == "InvalidStateTransitionException", err
    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["status"] == "IN_PROGRESS"
    check_counters(job["jobProcessDetails"], Queued=2)

    server.aws("iot", "delete-job", "--job-id", job_id, "--force")
    _wait_job_gone(server, job_id)
    code, _ = server.aws_fail("iot", "describe-job-execution", "--job-id", job_id, "--thing-name", things[0])
    assert code == "ResourceNotFoundException"
    assert job_id not in [j["jobId"] for j in server.aws("iot", "list-jobs")["jobs"]]

    # The id can be used again once deletion has finished.
    _create_simple_job(server, fleet, things[:1], job_id=job_id, doc={"v": 2})
    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["status"] == "IN_PROGRESS"
    check_counters(job["jobProcessDetails"], Queued=1)
    assert json.loads(server.aws("iot", "get-job-document", "--job-id", job_id)["document"]) == {"v": 2}


def test_snapshot_job_completes_when_every_execution_is_terminal(server, fleet):
    things = fleet["things"][:2]
    job_id = _create_simple_job(server, fleet, things)
    server.aws("iot", "cancel-job-execution", "--job-id", job_id, "--thing-name", things[0])
    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["status"] == "IN_PROGRESS"
    check_counters(job["jobProcessDetails"], Canceled=1, Queued=1)
    server.aws("iot", "cancel-job-execution", "--job-id", job_id, "--thing-name", things[1])
    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["status"] == "COMPLETED"
    assert "completedAt" in job
    check_counters(job["jobProcessDetails"], Canceled=2)
    completed = server.aws("iot", "list-jobs", "--status", "COMPLETED")["jobs"]
    assert job_id in [j["jobId"] for j in completed]
    # Completed jobs are terminal: delete without force works.
    server.aws("iot", "delete-job", "--job-id", job_id)
    _wait_job_gone(server, job_id)


def test_continuous_job_follows_group_membership(server, fleet):
    """CONTINUOUS jobs also run on things added to a target group later, and executions of
    things removed from it become REMOVED; SNAPSHOT jobs keep their original targets
    (ota-cli-workflow: "an update will run on a thing when the thing is added to a target
    group, even after the update was completed by all things originally in the group")."""
    group = unique("grp")
    garn = server.aws("iot", "create-thing-group", "--thing-group-name", group)["thingGroupArn"]
    first, later = unique("thing"), unique("thing")
    for t in (first, later):
        server.aws("iot", "create-thing", "--thing-name", t)
    server.aws("iot", "add-thing-to-thing-group", "--thing-group-name", group, "--thing-name", first)
    cont = unique("job")
    server.aws("iot", "create-job", "--job-id", cont, "--targets", garn, "--document", "{}",
               "--target-selection", "CONTINUOUS")
    snap = unique("job")
    server.aws("iot", "create-job", "--job-id", snap, "--targets", garn, "--document", "{}",
               "--target-selection", "SNAPSHOT")

    server.aws("iot", "add-thing-to-thing-group", "--thing-group-name", group, "--thing-name", later)

    def executions(job):
        ex = server.aws("iot", "list-job-executions-for-job", "--job-id", job)["executionSummaries"]
        return {e["thingArn"].rsplit("/", 1)[1]: e["jobExecutionSummary"]["status"] for e in ex}

    wait_for(lambda: later in executions(cont), timeout=5,
             what="a CONTINUOUS job to queue an execution for a thing added to its target group")
    assert executions(cont) == {first: "QUEUED", later: "QUEUED"}
    assert executions(snap) == {first: "QUEUED"}, "a SNAPSHOT job must not pick up new group members"

    server.aws("iot", "remove-thing-from-thing-group", "--thing-group-name", group, "--thing-name", first)
    wait_for(lambda: executions(cont).get(first) == "REMOVED", timeout=5,
             what="the execution of a thing removed from a CONTINUOUS job's group to become REMOVED")
    job = server.aws("iot", "describe-job", "--job-id", cont)["job"]
    assert job["status"] == "IN_PROGRESS"
    check_counters(job["jobProcessDetails"], Queued=1, Removed=1)
    assert executions(snap) == {first: "QUEUED"}


def test_cli_auto_pagination_and_max_items(server, fleet):
    """The CLI pages through results with --page-size; --max-items/--starting-token resume."""
    full = [t["thingName"] for t in server.aws("iot", "list-things")["things"]]
    assert set(fleet["things"]) <= set(full)
    paged = [t["thingName"] for t in server.aws("iot", "list-things", "--page-size", "2")["things"]]
    assert sorted(paged) == sorted(full) and len(paged) == len(set(paged))

    first = server.aws("iot", "list-things", "--max-items", "3", "--page-size", "2")
    assert len(first["things"]) == 3
    token = first.get("NextToken")
    assert token, "the CLI gave no NextToken although more things exist"
    rest = server.aws("iot", "list-things", "--starting-token", token, "--page-size", "2")
    names = [t["thingName"] for t in first["things"] + rest["things"]]
    assert sorted(names) == sorted(full)

    jobs = {j["jobId"] for j in server.aws("iot", "list-jobs")["jobs"]}
    jobs_paged = [j["jobId"] for j in server.aws("iot", "list-jobs", "--page-size", "1")["jobs"]]
    assert set(jobs_paged) == jobs and len(jobs_paged) == len(jobs)


def test_large_multipart_firmware_and_object_versions(server, fw, fleet, signer, tmp_path):
    """`aws s3 cp` of a firmware image above the CLI's 8 MiB multipart threshold, a second
    version of the same key, and an OTA update pinned to the first version."""
    bucket = fw["bucket"]
    key = f"images/{unique('big')}.bin"
    big = firmware_bytes(9 * 1024 * 1024 + 123)
    big_path = tmp_path / "big.bin"
    big_path.write_bytes(big)
    server.aws("s3", "cp", str(big_path), f"s3://{bucket}/{key}")
    head = server.aws("s3api", "head-object", "--bucket", bucket, "--key", key)
    assert head["ContentLength"] == len(big)
    v1 = head["VersionId"]

    small = firmware_bytes(1000)
    small_path = tmp_path / "small.bin"
    small_path.write_bytes(small)
    server.aws("s3", "cp", str(small_path), f"s3://{bucket}/{key}")
    head = server.aws("s3api", "head-object", "--bucket", bucket, "--key", key)
    assert head["ContentLength"] == len(small)
    assert head["VersionId"] != v1

    out = tmp_path / "v1.bin"
    got = server.aws("s3api", "get-object", "--bucket", bucket, "--key", key, "--version-id", v1, str(out))
    assert got["ContentLength"] == len(big)
    assert out.read_bytes() == big

    ota_id = unique("ota")
    files = [{
        "fileName": "big.bin",
        "fileLocation": {"s3Location": {"bucket": bucket, "key": key, "version": v1}},
        "codeSigning": {"customCodeSigning": {
            "signature": {"inlineDocument": signer.sign_b64(big)},
            "certificateChain": {"certificateName": "/certs/ota_signer.pem"},
            "hashAlgorithm": "SHA256", "signatureAlgorithm": "ECDSA",
        }},
    }]
    files_path = tmp_path / "files.json"
    files_path.write_text(json.dumps(files))
    server.aws("iot", "create-ota-update", "--ota-update-id", ota_id,
               "--targets", fleet["thing_arn"](fleet["things"][0]), "--protocols", "MQTT", "HTTP",
               "--files", f"file://{files_path}", "--role-arn", ROLE_ARN)
    _wait_ota_complete(server, ota_id)
    doc = json.loads(server.aws("iot", "get-job-document", "--job-id", f"AFR_OTA-{ota_id}")["document"])["afr_ota"]
    f = doc["files"][0]
    assert f["filesize"] == len(big), "filesize must be the size of the pinned version, not the latest"
    signer.verify(big, base64.b64decode(f["sig-sha256-ecdsa"]))
    s = server.aws("iot", "describe-stream", "--stream-id", doc["streamname"])["streamInfo"]
    assert s["files"][0]["s3Location"].get("version") == v1
    server.aws("iot", "delete-ota-update", "--ota-update-id", ota_id, "--delete-stream", "--force-delete-aws-job")


def _device_update(server, thing, job_id, status):
    """A device reporting progress through the jobs data plane (`aws iot-jobs-data`)."""
    return server.aws("iot-jobs-data", "update-job-execution", "--thing-name", thing, "--job-id", job_id,
                      "--status", status)


def test_cancel_semantics_with_device_progress(server, fleet):
    """Control-plane cancel/delete rules for executions a device has started
    (IN_PROGRESS needs force) and finished (SUCCEEDED counts)."""
    t0, t1, t2 = fleet["things"][:3]
    job_id = _create_simple_job(server, fleet, [t0, t1, t2])
    _device_update(server, t0, job_id, "IN_PROGRESS")
    e = server.aws("iot", "describe-job-execution", "--job-id", job_id, "--thing-name", t0)["execution"]
    assert e["status"] == "IN_PROGRESS"
    assert "startedAt" in e
    assert e["versionNumber"] == 2
    check_counters(server.aws("iot", "describe-job", "--job-id", job_id)["job"]["jobProcessDetails"],
                   InProgress=1, Queued=2)

    code, err = server.aws_fail("iot", "cancel-job-execution", "--job-id", job_id, "--thing-name", t0)
    assert code == "InvalidStateTransitionException", err
    code, err = server.aws_fail("iot", "delete-job-execution", "--job-id", job_id, "--thing-name", t0,
                                "--execution-number", "1")
    assert code == "InvalidStateTransitionException", err
    assert _exec_status(server, job_id, t0) == "IN_PROGRESS"

    _device_update(server, t1, job_id, "IN_PROGRESS")
    _device_update(server, t1, job_id, "SUCCEEDED")
    check_counters(server.aws("iot", "describe-job", "--job-id", job_id)["job"]["jobProcessDetails"],
                   InProgress=1, Succeeded=1, Queued=1)

    # cancel-job without force cancels QUEUED executions only.
    server.aws("iot", "cancel-job", "--job-id", job_id)
    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["status"] == "CANCELED"
    assert job.get("forceCanceled") in (False, None)
    check_counters(job["jobProcessDetails"], InProgress=1, Succeeded=1, Canceled=1)
    assert _exec_status(server, job_id, t0) == "IN_PROGRESS"
    assert _exec_status(server, job_id, t2) == "CANCELED"

    # ... and with force also the IN_PROGRESS one.
    server.aws("iot", "cancel-job", "--job-id", job_id, "--force")
    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["status"] == "CANCELED"
    assert job["forceCanceled"] is True
    check_counters(job["jobProcessDetails"], Succeeded=1, Canceled=2)
    e = server.aws("iot", "describe-job-execution", "--job-id", job_id, "--thing-name", t0)["execution"]
    assert e["status"] == "CANCELED" and e["forceCanceled"] is True
    assert _exec_status(server, job_id, t1) == "SUCCEEDED"


def test_force_cancel_execution_and_completion_by_success(server, fleet):
    t0, t1 = fleet["things"][:2]
    job_id = _create_simple_job(server, fleet, [t0, t1])
    _device_update(server, t0, job_id, "IN_PROGRESS")
    server.aws("iot", "cancel-job-execution", "--job-id", job_id, "--thing-name", t0, "--force")
    e = server.aws("iot", "describe-job-execution", "--job-id", job_id, "--thing-name", t0)["execution"]
    assert e["status"] == "CANCELED" and e["forceCanceled"] is True
    assert server.aws("iot", "describe-job", "--job-id", job_id)["job"]["status"] == "IN_PROGRESS"
    _device_update(server, t1, job_id, "IN_PROGRESS")
    _device_update(server, t1, job_id, "SUCCEEDED")
    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["status"] == "COMPLETED"
    check_counters(job["jobProcessDetails"], Succeeded=1, Canceled=1)
    # A terminal execution cannot be canceled again.
    code, err = server.aws_fail("iot", "cancel-job-execution", "--job-id", job_id, "--thing-name", t1)
    assert code == "InvalidStateTransitionException", err
