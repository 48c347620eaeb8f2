"""Invalid input gets the AWS error code and HTTP status, and changes nothing.

botocore validates only required members, types and `min` constraints on the client
side; everything else (max, pattern, enum, ranges) must be rejected by the server with
InvalidRequestException 400. Cases below a model `min` use a client with
parameter_validation=False so that the request actually reaches the server.
"""

from __future__ import annotations

import datetime
import json

import boto3
import botocore.auth
import pytest
import requests
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from conftest import ROLE_ARN, firmware_bytes, unique


def expect_error(fn, code, status):
    with pytest.raises(ClientError) as ei:
        fn()
    resp = ei.value.response
    got = (resp["Error"].get("Code"), resp["ResponseMetadata"]["HTTPStatusCode"])
    assert got == (code, status), f"expected {code} {status}, got {got}: {resp['Error'].get('Message')}"
    return ei.value


def all_items(client, op, key, **kw):
    out = []
    for page in client.get_paginator(op).paginate(**kw):
        out.extend(page[key])
    return out


def thing_names(iot):
    return {t["thingName"] for t in all_items(iot, "list_things", "things")}


def job_ids(iot):
    return {j["jobId"] for j in all_items(iot, "list_jobs", "jobs")}


def stream_ids(iot):
    return {s["streamId"] for s in all_items(iot, "list_streams", "streams")}


def ota_ids(iot):
    return {o["otaUpdateId"] for o in all_items(iot, "list_ota_updates", "otaUpdates")}


def group_names(iot):
    return {g["groupName"] for g in all_items(iot, "list_thing_groups", "thingGroups")}


@pytest.fixture(scope="module")
def raw(server):
    """An iot client that skips botocore's own parameter validation."""
    return server.client("iot", parameter_validation=False)


@pytest.fixture(scope="module")
def target(iot):
    name = unique("thing")
    return {"name": name, "arn": iot.create_thing(thingName=name)["thingArn"]}


@pytest.fixture(scope="module")
def obj(server, s3):
    """An S3 object to build streams and OTA updates from."""
    bucket = unique("neg")
    s3.create_bucket(Bucket=bucket)
    data = firmware_bytes(4096)
    s3.put_object(Bucket=bucket, Key="fw.bin", Body=data)
    return {"bucket": bucket, "key": "fw.bin", "data": data}


def _job(iot_client, target, job_id=None, **kw):
    args = dict(jobId=job_id or unique("job"), targets=[target["arn"]], document='{"a":1}')
    args.update(kw)
    return iot_client.create_job(**args)


def _no_job(iot, job_id):
    expect_error(lambda: iot.describe_job(jobId=job_id), "ResourceNotFoundException", 404)


def _no_stream(iot, sid):
    expect_error(lambda: iot.describe_stream(streamId=sid), "ResourceNotFoundException", 404)


# ----------------------------------------------------------- ids: length and pattern


def test_job_id_65_chars(iot, target):
    job_id = "j" * 65
    expect_error(lambda: _job(iot, target, job_id), "InvalidRequestException", 400)
    assert job_id not in job_ids(iot)


def test_thing_name_129_chars(iot):
    name = "t" * 129
    expect_error(lambda: iot.create_thing(thingName=name), "InvalidRequestException", 400)
    assert name not in thing_names(iot)


def test_thing_name_with_spaces(iot):
    expect_error(lambda: iot.create_thing(thingName="thing name with space"), "InvalidRequestException", 400)
    assert "thing name with space" not in thing_names(iot)


def test_thing_group_name_with_spaces(iot):
    expect_error(lambda: iot.create_thing_group(thingGroupName="group name x"), "InvalidRequestException", 400)
    assert "group name x" not in group_names(iot)


def test_job_id_with_colon(iot, target):
    job_id = unique("job") + ":x"
    expect_error(lambda: _job(iot, target, job_id), "InvalidRequestException", 400)
    assert job_id not in job_ids(iot)


def test_stream_and_ota_ids_with_bad_characters(iot, target, obj):
    sid = unique("s") + ".v1"
    expect_error(
        lambda: iot.create_stream(
            streamId=sid, files=[{"fileId": 0, "s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}],
            roleArn=ROLE_ARN,
        ),
        "InvalidRequestException",
        400,
    )
    assert sid not in stream_ids(iot)
    oid = unique("o") + ":1"
    expect_error(
        lambda: iot.create_ota_update(
            otaUpdateId=oid, targets=[target["arn"]], roleArn=ROLE_ARN,
            files=[{"fileName": "f", "fileLocation": {"s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}}],
        ),
        "InvalidRequestException",
        400,
    )
    assert oid not in ota_ids(iot)


# --------------------------------------------------------------------------- enums


def test_bad_target_selection(iot, target):
    job_id = unique("job")
    expect_error(lambda: _job(iot, target, job_id, targetSelection="SOMETIMES"), "InvalidRequestException", 400)
    _no_job(iot, job_id)


def test_bad_status_filters(iot, target):
    expect_error(lambda: iot.list_jobs(status="RUNNING"), "InvalidRequestException", 400)
    expect_error(lambda: iot.list_jobs(targetSelection="ALWAYS"), "InvalidRequestException", 400)
    job_id = _job(iot, target)["jobId"]
    expect_error(
        lambda: iot.list_job_executions_for_job(jobId=job_id, status="WAITING"), "InvalidRequestException", 400
    )
    expect_error(
        lambda: iot.list_job_executions_for_thing(thingName=target["name"], status="WAITING"),
        "InvalidRequestException",
        400,
    )
    expect_error(lambda: iot.list_ota_updates(otaUpdateStatus="DONE"), "InvalidRequestException", 400)


def test_bad_ota_protocol(iot, target, obj):
    oid = unique("ota")
    expect_error(
        lambda: iot.create_ota_update(
            otaUpdateId=oid, targets=[target["arn"]], roleArn=ROLE_ARN, protocols=["FTP"],
            files=[{"fileName": "f", "fileLocation": {"s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}}],
        ),
        "InvalidRequestException",
        400,
    )
    assert oid not in ota_ids(iot)
    expect_error(lambda: iot.get_ota_update(otaUpdateId=oid), "ResourceNotFoundException", 404)


# ------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("n", [0, 251])
def test_max_results_out_of_range(raw, n):
    expect_error(lambda: raw.list_things(maxResults=n), "InvalidRequestException", 400)
    expect_error(lambda: raw.list_jobs(maxResults=n), "InvalidRequestException", 400)
    expect_error(lambda: raw.list_streams(maxResults=n), "InvalidRequestException", 400)
    expect_error(lambda: raw.list_ota_updates(maxResults=n), "InvalidRequestException", 400)


@pytest.mark.parametrize("seconds", [59, 3601])
def test_presigned_expires_in_sec_out_of_range(raw, iot, target, seconds):
    job_id = unique("job")
    expect_error(
        lambda: _job(raw, target, job_id, presignedUrlConfig={"roleArn": ROLE_ARN, "expiresInSec": seconds}),
        "InvalidRequestException",
        400,
    )
    _no_job(iot, job_id)


def test_in_progress_timeout_too_long(iot, target):
    job_id = unique("job")
    expect_error(
        lambda: _job(iot, target, job_id, timeoutConfig={"inProgressTimeoutInMinutes": 10081}),
        "InvalidRequestException",
        400,
    )
    _no_job(iot, job_id)
    # The boundary is accepted.
    ok = unique("job")
    _job(iot, target, ok, timeoutConfig={"inProgressTimeoutInMinutes": 10080})
    assert iot.describe_job(jobId=ok)["job"]["timeoutConfig"] == {"inProgressTimeoutInMinutes": 10080}


def test_increment_factor_too_large(iot, target):
    job_id = unique("job")
    rollout = {
        "exponentialRate": {
            "baseRatePerMinute": 10,
            "incrementFactor": 5.5,
            "rateIncreaseCriteria": {"numberOfNotifiedThings": 10},
        }
    }
    expect_error(
        lambda: _job(iot, target, job_id, jobExecutionsRolloutConfig=rollout), "InvalidRequestException", 400
    )
    _no_job(iot, job_id)


def test_stream_file_id_256(iot, obj):
    sid = unique("stream")
    expect_error(
        lambda: iot.create_stream(
            streamId=sid, files=[{"fileId": 256, "s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}],
            roleArn=ROLE_ARN,
        ),
        "InvalidRequestException",
        400,
    )
    _no_stream(iot, sid)


def test_stream_with_51_files(iot, obj):
    sid = unique("stream")
    files = [{"fileId": i, "s3Location": {"bucket": obj["bucket"], "key": obj["key"]}} for i in range(51)]
    expect_error(lambda: iot.create_stream(streamId=sid, files=files, roleArn=ROLE_ARN), "InvalidRequestException", 400)
    _no_stream(iot, sid)
    # 50 is the limit, and fine.
    iot.create_stream(streamId=sid, files=files[:50], roleArn=ROLE_ARN)
    assert len(iot.describe_stream(streamId=sid)["streamInfo"]["files"]) == 50


def test_update_stream_invalid_keeps_stream(iot, obj):
    sid = unique("stream")
    files = [{"fileId": 0, "s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}]
    iot.create_stream(streamId=sid, files=files, roleArn=ROLE_ARN, description="orig")
    expect_error(
        lambda: iot.update_stream(
            streamId=sid, files=[{"fileId": 300, "s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}]
        ),
        "InvalidRequestException",
        400,
    )
    expect_error(
        lambda: iot.update_stream(
            streamId=sid, files=[{"fileId": 0, "s3Location": {"bucket": obj["bucket"], "key": "missing.bin"}}]
        ),
        "ResourceNotFoundException",
        404,
    )
    info = iot.describe_stream(streamId=sid)["streamInfo"]
    assert info["streamVersion"] == 1 and info["description"] == "orig"
    assert info["files"] == [{"fileId": 0, "s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}]


# --------------------------------------------------------------- missing S3 objects


def test_create_stream_missing_object(iot, obj):
    sid = unique("stream")
    expect_error(
        lambda: iot.create_stream(
            streamId=sid, files=[{"fileId": 0, "s3Location": {"bucket": obj["bucket"], "key": "no/such/key.bin"}}],
            roleArn=ROLE_ARN,
        ),
        "ResourceNotFoundException",
        404,
    )
    _no_stream(iot, sid)


def test_create_stream_missing_bucket(iot):
    sid = unique("stream")
    expect_error(
        lambda: iot.create_stream(
            streamId=sid, files=[{"fileId": 0, "s3Location": {"bucket": unique("nobucket"), "key": "k.bin"}}],
            roleArn=ROLE_ARN,
        ),
        "ResourceNotFoundException",
        404,
    )
    _no_stream(iot, sid)


# ------------------------------------------------------------------------ duplicates


def test_duplicate_stream(iot, obj):
    sid = unique("stream")
    files = [{"fileId": 0, "s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}]
    iot.create_stream(streamId=sid, files=files, roleArn=ROLE_ARN, description="first")
    e = expect_error(
        lambda: iot.create_stream(streamId=sid, files=files, roleArn=ROLE_ARN, description="second"),
        "ResourceAlreadyExistsException",
        409,
    )
    assert isinstance(e, iot.exceptions.ResourceAlreadyExistsException)
    info = iot.describe_stream(streamId=sid)["streamInfo"]
    assert info["description"] == "first" and info["streamVersion"] == 1


def test_duplicate_job(iot, target):
    job_id = _job(iot, target, document='{"v":"first"}')["jobId"]
    e = expect_error(
        lambda: _job(iot, target, job_id, document='{"v":"second"}', description="again"),
        "ResourceAlreadyExistsException",
        409,
    )
    # The error shape's modeled members.
    assert e.response.get("resourceId") == job_id
    assert e.response.get("resourceArn", "").endswith(f":job/{job_id}")
    assert json.loads(iot.get_job_document(jobId=job_id)["document"]) == {"v": "first"}
    assert "description" not in iot.describe_job(jobId=job_id)["job"]


def test_duplicate_ota_update(iot, target, obj):
    oid = unique("ota")
    files = [{"fileName": "f.bin", "fileLocation": {"s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}}]
    iot.create_ota_update(otaUpdateId=oid, targets=[target["arn"]], roleArn=ROLE_ARN, files=files,
                          description="first", protocols=["HTTP"])
    expect_error(
        lambda: iot.create_ota_update(otaUpdateId=oid, targets=[target["arn"]], roleArn=ROLE_ARN, files=files,
                                      description="second", protocols=["HTTP"]),
        "ResourceAlreadyExistsException",
        409,
    )
    info = iot.get_ota_update(otaUpdateId=oid)["otaUpdateInfo"]
    assert info["description"] == "first"
    assert sorted(ota_ids(iot)).count(oid) == 1


def test_create_thing_idempotent_and_conflict(iot):
    name = unique("thing")
    first = iot.create_thing(thingName=name, attributePayload={"attributes": {"color": "red"}})
    same = iot.create_thing(thingName=name, attributePayload={"attributes": {"color": "red"}})
    assert same["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert same["thingName"] == name and same["thingArn"] == first["thingArn"]
    assert same["thingId"] == first["thingId"]
    e = expect_error(
        lambda: iot.create_thing(thingName=name, attributePayload={"attributes": {"color": "blue"}}),
        "ResourceAlreadyExistsException",
        409,
    )
    assert e.response.get("resourceId") == name
    d = iot.describe_thing(thingName=name)
    assert d["attributes"] == {"color": "red"} and d["version"] == 1


def test_create_thing_group_idempotent_and_conflict(iot):
    name = unique("grp")
    first = iot.create_thing_group(thingGroupName=name, thingGroupProperties={"thingGroupDescription": "a"})
    same = iot.create_thing_group(thingGroupName=name, thingGroupProperties={"thingGroupDescription": "a"})
    assert same["thingGroupArn"] == first["thingGroupArn"] and same["thingGroupId"] == first["thingGroupId"]
    expect_error(
        lambda: iot.create_thing_group(thingGroupName=name, thingGroupProperties={"thingGroupDescription": "b"}),
        "ResourceAlreadyExistsException",
        409,
    )
    d = iot.describe_thing_group(thingGroupName=name)
    assert d["thingGroupProperties"]["thingGroupDescription"] == "a" and d["version"] == 1


# ---------------------------------------------------------------- expected versions


def test_update_thing_wrong_expected_version(iot):
    name = unique("thing")
    iot.create_thing(thingName=name, attributePayload={"attributes": {"a": "1"}})
    expect_error(
        lambda: iot.update_thing(thingName=name, attributePayload={"attributes": {"a": "2"}}, expectedVersion=5),
        "VersionConflictException",
        409,
    )
    d = iot.describe_thing(thingName=name)
    assert d["attributes"] == {"a": "1"} and d["version"] == 1
    iot.update_thing(thingName=name, attributePayload={"attributes": {"a": "2"}}, expectedVersion=1)
    d = iot.describe_thing(thingName=name)
    assert d["attributes"] == {"a": "2"} and d["version"] == 2


def test_delete_thing_wrong_expected_version(iot):
    name = unique("thing")
    iot.create_thing(thingName=name)
    expect_error(lambda: iot.delete_thing(thingName=name, expectedVersion=7), "VersionConflictException", 409)
    assert iot.describe_thing(thingName=name)["thingName"] == name
    iot.delete_thing(thingName=name, expectedVersion=1)
    expect_error(lambda: iot.describe_thing(thingName=name), "ResourceNotFoundException", 404)


# ---------------------------------------------------------------- unknown resources


def test_unknown_resources_404(iot, target):
    nt, nj, ns, no, ng = unique("nothing"), unique("nojob"), unique("nostream"), unique("noota"), unique("nogroup")
    nf = "ResourceNotFoundException"
    expect_error(lambda: iot.describe_thing(thingName=nt), nf, 404)
    # DeleteThing / DeleteThingGroup of something that does not exist succeed on AWS
    # ("Returns successfully with no error if ... you specify a thing that doesn't exist").
    assert iot.delete_thing(thingName=nt)["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert iot.delete_thing_group(thingGroupName=ng)["ResponseMetadata"]["HTTPStatusCode"] == 200
    expect_error(lambda: iot.describe_thing(thingName=nt), nf, 404)
    expect_error(lambda: iot.update_thing(thingName=nt, attributePayload={"attributes": {"a": "b"}}), nf, 404)
    expect_error(lambda: iot.describe_thing_group(thingGroupName=ng), nf, 404)
    expect_error(lambda: iot.list_things_in_thing_group(thingGroupName=ng), nf, 404)
    expect_error(lambda: iot.add_thing_to_thing_group(thingGroupName=ng, thingName=target["name"]), nf, 404)
    expect_error(lambda: iot.describe_job(jobId=nj), nf, 404)
    expect_error(lambda: iot.get_job_document(jobId=nj), nf, 404)
    expect_error(lambda: iot.cancel_job(jobId=nj), nf, 404)
    expect_error(lambda: iot.delete_job(jobId=nj), nf, 404)
    expect_error(lambda: iot.list_job_executions_for_job(jobId=nj), nf, 404)
    expect_error(lambda: iot.describe_job_execution(jobId=nj, thingName=target["name"]), nf, 404)
    expect_error(lambda: iot.cancel_job_execution(jobId=nj, thingName=target["name"]), nf, 404)
    expect_error(lambda: iot.delete_job_execution(jobId=nj, thingName=target["name"], executionNumber=1), nf, 404)
    expect_error(lambda: iot.describe_stream(streamId=ns), nf, 404)
    expect_error(lambda: iot.update_stream(streamId=ns, description="x"), nf, 404)
    expect_error(lambda: iot.delete_stream(streamId=ns), nf, 404)
    expect_error(lambda: iot.get_ota_update(otaUpdateId=no), nf, 404)
    expect_error(lambda: iot.delete_ota_update(otaUpdateId=no), nf, 404)
    # A job on a thing that is not among its targets.
    job_id = _job(iot, target)["jobId"]
    other = unique("thing")
    iot.create_thing(thingName=other)
    expect_error(lambda: iot.describe_job_execution(jobId=job_id, thingName=other), nf, 404)
    # An OTA update whose file is a stream that does not exist.
    oid = unique("ota")
    expect_error(
        lambda: iot.create_ota_update(
            otaUpdateId=oid, targets=[target["arn"]], roleArn=ROLE_ARN,
            files=[{"fileName": "f", "fileLocation": {"stream": {"streamId": ns, "fileId": 0}}}],
        ),
        nf,
        404,
    )
    assert oid not in ota_ids(iot)


# ------------------------------------------------------------- more model constraints


def test_path_labels_are_validated_on_reads(iot):
    expect_error(lambda: iot.describe_job(jobId="j" * 65), "InvalidRequestException", 400)
    expect_error(lambda: iot.describe_thing(thingName="a b"), "InvalidRequestException", 400)
    expect_error(lambda: iot.describe_stream(streamId="s:1"), "InvalidRequestException", 400)
    expect_error(lambda: iot.get_ota_update(otaUpdateId="o" * 129), "InvalidRequestException", 400)


def test_attribute_value_pattern(iot):
    name = unique("thing")
    expect_error(
        lambda: iot.create_thing(thingName=name, attributePayload={"attributes": {"k": "has space"}}),
        "InvalidRequestException",
        400,
    )
    expect_error(lambda: iot.describe_thing(thingName=name), "ResourceNotFoundException", 404)


def test_description_with_control_characters(iot, target):
    job_id = unique("job")
    expect_error(lambda: _job(iot, target, job_id, description="bad\x07description"), "InvalidRequestException", 400)
    _no_job(iot, job_id)


def test_cancel_job_reason_code_pattern(iot, target):
    job_id = _job(iot, target)["jobId"]
    expect_error(lambda: iot.cancel_job(jobId=job_id, reasonCode="lower_case"), "InvalidRequestException", 400)
    job = iot.describe_job(jobId=job_id)["job"]
    assert job["status"] == "IN_PROGRESS" and "reasonCode" not in job
    assert iot.describe_job_execution(jobId=job_id, thingName=target["name"])["execution"]["status"] == "QUEUED"


def test_below_model_minimums(raw, iot, target, obj):
    """Values under a model `min` (botocore would refuse them; sent anyway)."""
    sid = unique("stream")
    files = [{"fileId": 0, "s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}]
    expect_error(lambda: raw.create_stream(streamId=sid, files=files, roleArn="arn:aws:iam::1:r"),
                 "InvalidRequestException", 400)
    expect_error(lambda: raw.create_stream(streamId=sid, files=[], roleArn=ROLE_ARN), "InvalidRequestException", 400)
    _no_stream(iot, sid)
    job_id = unique("job")
    expect_error(lambda: raw.create_job(jobId=job_id, targets=[], document="{}"), "InvalidRequestException", 400)
    _no_job(iot, job_id)


def test_duplicate_stream_file_ids(iot, obj):
    sid = unique("stream")
    f = {"fileId": 4, "s3Location": {"bucket": obj["bucket"], "key": obj["key"]}}
    expect_error(lambda: iot.create_stream(streamId=sid, files=[f, f], roleArn=ROLE_ARN), "InvalidRequestException", 400)
    _no_stream(iot, sid)


def test_invalid_target_arn(iot):
    job_id = unique("job")
    expect_error(lambda: iot.create_job(jobId=job_id, targets=["not-an-arn"], document="{}"),
                 "InvalidRequestException", 400)
    _no_job(iot, job_id)


def test_job_document_too_large(iot, target):
    job_id = unique("job")
    doc = json.dumps({"pad": "x" * 33_000})
    expect_error(lambda: _job(iot, target, job_id, document=doc), "InvalidRequestException", 400)
    _no_job(iot, job_id)


def test_invalid_next_token(iot):
    expect_error(lambda: iot.list_things(nextToken="not a token!!"), "InvalidRequestException", 400)
    expect_error(lambda: iot.list_jobs(nextToken="%%%"), "InvalidRequestException", 400)


# ------------------------------------------------------------------- job documents


@pytest.mark.parametrize("document", ["not json at all", '{"unterminated": ', "[1, 2, 3]"])
def test_job_document_not_json_object(iot, target, document):
    job_id = unique("job")
    expect_error(lambda: _job(iot, target, job_id, document=document), "InvalidRequestException", 400)
    _no_job(iot, job_id)


def test_job_document_source_missing_object(iot, target, obj):
    job_id = unique("job")
    src = f"https://s3.amazonaws.com/{obj['bucket']}/no-such-doc.json"
    with pytest.raises(ClientError) as ei:
        iot.create_job(jobId=job_id, targets=[target["arn"]], documentSource=src)
    status = ei.value.response["ResponseMetadata"]["HTTPStatusCode"]
    assert 400 <= status < 500, ei.value.response
    _no_job(iot, job_id)


def test_job_with_both_document_and_source(iot, target):
    job_id = unique("job")
    expect_error(
        lambda: iot.create_job(
            jobId=job_id, targets=[target["arn"]], document="{}",
            documentSource="https://s3.amazonaws.com/some-bucket/job.json",
        ),
        "InvalidRequestException",
        400,
    )
    _no_job(iot, job_id)


# -------------------------------------------------------------------- authentication


def _explicit_client(server, access_key, secret, **cfg):
    session = boto3.session.Session(
        aws_access_key_id=access_key, aws_secret_access_key=secret, region_name=server.region
    )
    return session.client(
        "iot", endpoint_url=server.endpoint, config=Config(retries={"total_max_attempts": 1}, **cfg)
    )


def test_no_signature_cli(server, iot):
    name = unique("unsigned")
    code, err = server.aws_fail("--no-sign-request", "iot", "create-thing", "--thing-name", name)
    assert code == "MissingAuthenticationTokenException", err
    code, err = server.aws_fail("--no-sign-request", "iot", "list-things")
    assert code == "MissingAuthenticationTokenException", err
    expect_error(lambda: iot.describe_thing(thingName=name), "ResourceNotFoundException", 404)


def test_no_signature_boto3(server, iot):
    name = unique("unsigned")
    unsigned = server.session().client(
        "iot", endpoint_url=server.endpoint,
        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}),
    )
    expect_error(lambda: unsigned.create_thing(thingName=name), "MissingAuthenticationTokenException", 403)
    expect_error(lambda: iot.describe_thing(thingName=name), "ResourceNotFoundException", 404)


def test_unknown_access_key(server, iot):
    _, secret = server.credentials()
    bad = _explicit_client(server, "AKIAUNKNOWNKEY000000", secret)
    name = unique("badkey")
    expect_error(lambda: bad.create_thing(thingName=name), "UnrecognizedClientException", 403)
    expect_error(lambda: bad.list_things(), "UnrecognizedClientException", 403)
    expect_error(lambda: iot.describe_thing(thingName=name), "ResourceNotFoundException", 404)


def test_wrong_secret(server, iot):
    ak, secret = server.credentials()
    wrong = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
    bad = _explicit_client(server, ak, wrong)
    name = unique("badsecret")
    expect_error(lambda: bad.create_thing(thingName=name), "InvalidSignatureException", 403)
    job_id = unique("job")
    expect_error(lambda: bad.create_job(jobId=job_id, targets=["arn:aws:iot:us-east-1:1:thing/x"], document="{}"),
                 "InvalidSignatureException", 403)
    expect_error(lambda: iot.describe_thing(thingName=name), "ResourceNotFoundException", 404)
    _no_job(iot, job_id)


def _signed_post(server, path, body, when=None, monkeypatch=None):
    ak, sk = server.credentials()
    req = AWSRequest(
        method="POST", url=server.endpoint + path, data=body, headers={"Content-Type": "application/json"}
    )
    if when is not None:
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: when)
    try:
        SigV4Auth(Credentials(ak, sk), "iot", server.region).add_auth(req)
    finally:
        if when is not None:
            monkeypatch.undo()
    prepared = req.prepare()
    return requests.post(prepared.url, headers=dict(prepared.headers), data=prepared.body, timeout=30)


def test_stale_x_amz_date(server, iot, monkeypatch):
    # Control: the same hand-signed request with a current date succeeds.
    ok = unique("fresh")
    r = _signed_post(server, f"/things/{ok}", b"{}")
    assert r.status_code == 200, r.text
    assert r.json()["thingName"] == ok

    name = unique("stale")
    old = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(minutes=20)
    r = _signed_post(server, f"/things/{name}", b"{}", when=old, monkeypatch=monkeypatch)
    assert r.status_code == 403, (r.status_code, r.text)
    code = r.headers.get("x-amzn-ErrorType", "").split(":")[0]
    assert code == "InvalidSignatureException", (r.headers, r.text)
    assert r.json().get("message"), r.text
    expect_error(lambda: iot.describe_thing(thingName=name), "ResourceNotFoundException", 404)

    future = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) + datetime.timedelta(minutes=20)
    name2 = unique("future")
    r = _signed_post(server, f"/things/{name2}", b"{}", when=future, monkeypatch=monkeypatch)
    assert r.status_code == 403, (r.status_code, r.text)
    expect_error(lambda: iot.describe_thing(thingName=name2), "ResourceNotFoundException", 404)


def test_tampered_body_after_signing(server, iot):
    """A body changed after signing no longer matches the signature."""
    ak, sk = server.credentials()
    name = unique("tamper")
    req = AWSRequest(method="POST", url=server.endpoint + f"/things/{name}", data=b"{}",
                     headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(ak, sk), "iot", server.region).add_auth(req)
    prepared = req.prepare()
    body = b'{"attributePayload":{"attributes":{"x":"y"}}}'
    headers = dict(prepared.headers)
    headers["Content-Length"] = str(len(body))
    r = requests.post(prepared.url, headers=headers, data=body, timeout=30)
    assert r.status_code == 403, (r.status_code, r.text)
    expect_error(lambda: iot.describe_thing(thingName=name), "ResourceNotFoundException", 404)
