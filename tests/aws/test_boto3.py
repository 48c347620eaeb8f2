"""The core OTA flow through boto3 (things, groups, stream, job, OTA update), pagination
with small page sizes, datetime timestamps and modeled exceptions."""

from __future__ import annotations

import base64
import datetime
import json

import pytest

from conftest import ROLE_ARN, check_counters, firmware_bytes, unique, wait_for


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _assert_recent(ts, slack=datetime.timedelta(minutes=10)):
    assert isinstance(ts, datetime.datetime), f"{ts!r} is not a datetime"
    assert ts.tzinfo is not None, f"{ts!r} is naive"
    assert abs(_now() - ts) < slack, f"{ts!r} is not close to now ({_now()})"


@pytest.fixture(scope="module")
def firmware(server, s3):
    bucket = unique("fw")
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    data = firmware_bytes(33_333)
    key = "boto3/firmware.bin"
    put = s3.put_object(Bucket=bucket, Key=key, Body=data)
    assert put.get("VersionId"), put
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    return {"bucket": bucket, "key": key, "data": data, "version": put["VersionId"]}


# ------------------------------------------------------------------------ core flow


def test_core_flow(server, iot, s3, firmware, signer):
    things = [unique("thing") for _ in range(3)]
    arns = {}
    for t in things:
        r = iot.create_thing(thingName=t, attributePayload={"attributes": {"model": "m1"}})
        assert r["thingName"] == t
        arns[t] = r["thingArn"]
    d = iot.describe_thing(thingName=things[0])
    assert d["attributes"] == {"model": "m1"} and d["version"] == 1

    group = unique("grp")
    child = unique("grp")
    g = iot.create_thing_group(thingGroupName=group, thingGroupProperties={"thingGroupDescription": "fleet"})
    iot.create_thing_group(thingGroupName=child, parentGroupName=group)
    iot.add_thing_to_thing_group(thingGroupName=group, thingName=things[0])
    # AddThingToThingGroup accepts ARNs too.
    iot.add_thing_to_thing_group(thingGroupArn=g["thingGroupArn"], thingArn=arns[things[1]])
    iot.add_thing_to_thing_group(thingGroupName=child, thingName=things[2])
    dg = iot.describe_thing_group(thingGroupName=group)
    assert dg["thingGroupProperties"]["thingGroupDescription"] == "fleet"
    _assert_recent(dg["thingGroupMetadata"]["creationDate"])
    assert sorted(iot.list_things_in_thing_group(thingGroupName=group)["things"]) == sorted(things[:2])
    assert sorted(iot.list_things_in_thing_group(thingGroupName=group, recursive=True)["things"]) == sorted(things)

    # Stream.
    sid = unique("stream")
    cs = iot.create_stream(
        streamId=sid,
        description="boto3 stream",
        files=[{"fileId": 1, "s3Location": {"bucket": firmware["bucket"], "key": firmware["key"]}}],
        roleArn=ROLE_ARN,
    )
    assert cs["streamVersion"] == 1 and cs["streamId"] == sid
    info = iot.describe_stream(streamId=sid)["streamInfo"]
    _assert_recent(info["createdAt"])
    _assert_recent(info["lastUpdatedAt"])
    assert info["files"][0]["fileId"] == 1
    us = iot.update_stream(streamId=sid, description="boto3 stream v2")
    assert us["streamVersion"] == 2

    # Job on the group + a thing.
    job_id = unique("job")
    doc = {"operation": "fota", "streamId": sid}
    cj = iot.create_job(
        jobId=job_id,
        targets=[g["thingGroupArn"], arns[things[2]]],
        document=json.dumps(doc),
        targetSelection="SNAPSHOT",
        timeoutConfig={"inProgressTimeoutInMinutes": 15},
        jobExecutionsRolloutConfig={"maximumPerMinute": 100},
    )
    assert cj["jobId"] == job_id
    job = iot.describe_job(jobId=job_id)["job"]
    assert job["status"] == "IN_PROGRESS"
    _assert_recent(job["createdAt"])
    _assert_recent(job["lastUpdatedAt"])
    check_counters(job["jobProcessDetails"], Queued=3)
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 15}
    assert job["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 100}
    assert json.loads(iot.get_job_document(jobId=job_id)["document"]) == doc
    ex = iot.describe_job_execution(jobId=job_id, thingName=things[0])["execution"]
    assert ex["status"] == "QUEUED"
    _assert_recent(ex["queuedAt"])
    assert isinstance(ex["executionNumber"], int)
    summaries = iot.list_job_executions_for_job(jobId=job_id)["executionSummaries"]
    assert sorted(s["thingArn"] for s in summaries) == sorted(arns.values())
    for s in summaries:
        _assert_recent(s["jobExecutionSummary"]["queuedAt"])
    jobs = {j["jobId"]: j for j in iot.list_jobs()["jobs"]}
    _assert_recent(jobs[job_id]["createdAt"])

    iot.cancel_job_execution(jobId=job_id, thingName=things[0])
    iot.cancel_job(jobId=job_id, comment="done with it", reasonCode="TEST")
    job = iot.describe_job(jobId=job_id)["job"]
    assert job["status"] == "CANCELED"
    check_counters(job["jobProcessDetails"], Canceled=3)

    # OTA update over MQTT, signature as base64 text (the CLI-v1 convention).
    ota_id = unique("ota")
    sig = signer.sign_b64(firmware["data"])
    r = iot.create_ota_update(
        otaUpdateId=ota_id,
        targets=[arns[things[0]], arns[things[1]]],
        protocols=["MQTT", "HTTP"],
        files=[
            {
                "fileName": "fw.bin",
                "fileLocation": {
                    "s3Location": {
                        "bucket": firmware["bucket"],
                        "key": firmware["key"],
                        "version": firmware["version"],
                    }
                },
                "codeSigning": {
                    "customCodeSigning": {
                        "signature": {"inlineDocument": sig.encode()},
                        "certificateChain": {"certificateName": "signer.crt"},
                        "hashAlgorithm": "SHA256",
                        "signatureAlgorithm": "ECDSA",
                    }
                },
            }
        ],
        roleArn=ROLE_ARN,
    )
    assert r["otaUpdateId"] == ota_id

    def complete():
        i = iot.get_ota_update(otaUpdateId=ota_id)["otaUpdateInfo"]
        assert i["otaUpdateStatus"] != "CREATE_FAILED", i.get("errorInfo")
        return i if i["otaUpdateStatus"] == "CREATE_COMPLETE" else None

    info = wait_for(complete, timeout=30, what="OTA CREATE_COMPLETE")
    _assert_recent(info["creationDate"])
    _assert_recent(info["lastModifiedDate"])
    assert info["awsIotJobId"] == f"AFR_OTA-{ota_id}"
    assert sorted(info["protocols"]) == ["HTTP", "MQTT"]
    odoc = json.loads(iot.get_job_document(jobId=info["awsIotJobId"])["document"])["afr_ota"]
    assert sorted(odoc["protocols"]) == ["HTTP", "MQTT"]
    assert odoc["streamname"].startswith("AFR_OTA-")
    f = odoc["files"][0]
    assert f["filesize"] == len(firmware["data"])
    assert f["certfile"] == "signer.crt"
    assert f["auth_scheme"] == "aws.s3.presigned"
    assert f["update_data_url"].startswith("${aws:iot:s3-presigned-url:")
    signer.verify(firmware["data"], base64.b64decode(f["sig-sha256-ecdsa"]))
    stream = iot.describe_stream(streamId=odoc["streamname"])["streamInfo"]
    assert stream["files"][0]["s3Location"]["key"] == firmware["key"]
    summaries = iot.list_ota_updates(otaUpdateStatus="CREATE_COMPLETE")["otaUpdates"]
    mine = [o for o in summaries if o["otaUpdateId"] == ota_id]
    assert len(mine) == 1
    _assert_recent(mine[0]["creationDate"])

    iot.delete_ota_update(otaUpdateId=ota_id, deleteStream=True, forceDeleteAWSJob=True)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.get_ota_update(otaUpdateId=ota_id)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_stream(streamId=odoc["streamname"])

    def job_gone():
        try:
            iot.describe_job(jobId=info["awsIotJobId"])
            return False
        except iot.exceptions.ResourceNotFoundException:
            return True

    wait_for(job_gone, timeout=30, what="OTA job deletion")


def test_ota_update_from_existing_stream(iot, firmware, signer):
    """fileLocation.stream: the update uses the given stream and fileId instead of making one."""
    sid = unique("stream")
    iot.create_stream(
        streamId=sid,
        files=[{"fileId": 9, "s3Location": {"bucket": firmware["bucket"], "key": firmware["key"]}}],
        roleArn=ROLE_ARN,
    )
    arn = iot.create_thing(thingName=unique("thing"))["thingArn"]
    ota_id = unique("ota")
    iot.create_ota_update(
        otaUpdateId=ota_id,
        targets=[arn],
        files=[{
            "fileName": "/ota/fw.bin",
            "fileType": 7,
            "fileLocation": {"stream": {"streamId": sid, "fileId": 9}},
            "codeSigning": {"customCodeSigning": {
                "signature": {"inlineDocument": signer.sign_b64(firmware["data"]).encode()},
                "certificateChain": {"certificateName": "signer.crt"},
                "hashAlgorithm": "SHA256", "signatureAlgorithm": "ECDSA",
            }},
        }],
        roleArn=ROLE_ARN,
    )

    def complete():
        i = iot.get_ota_update(otaUpdateId=ota_id)["otaUpdateInfo"]
        assert i["otaUpdateStatus"] != "CREATE_FAILED", i.get("errorInfo")
        return i if i["otaUpdateStatus"] == "CREATE_COMPLETE" else None

    info = wait_for(complete, timeout=30, what="OTA CREATE_COMPLETE")
    assert info["protocols"] == ["MQTT"]  # the default
    doc = json.loads(iot.get_job_document(jobId=info["awsIotJobId"])["document"])["afr_ota"]
    assert doc["streamname"] == sid
    f = doc["files"][0]
    assert f["fileid"] == 9 and f["filesize"] == len(firmware["data"]) and f["fileType"] == 7
    assert f["filepath"] == "/ota/fw.bin"
    signer.verify(firmware["data"], base64.b64decode(f["sig-sha256-ecdsa"]))
    # Without deleteStream the stream stays.
    iot.delete_ota_update(otaUpdateId=ota_id, forceDeleteAWSJob=True)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.get_ota_update(otaUpdateId=ota_id)
    assert iot.describe_stream(streamId=sid)["streamInfo"]["streamId"] == sid


# ----------------------------------------------------------------------- pagination


def _collect(call, result_key, page_size, **kw):
    """All pages of a list call with maxResults=page_size; checks tokens terminate and
    no item repeats."""
    items = []
    token = None
    pages = 0
    seen_tokens = set()
    while True:
        args = dict(kw, maxResults=page_size)
        if token:
            args["nextToken"] = token
        r = call(**args)
        page = r[result_key]
        assert len(page) <= page_size, f"page of {len(page)} > maxResults {page_size}"
        items.extend(page)
        pages += 1
        assert pages < 1000, "pagination does not terminate"
        token = r.get("nextToken")
        if not token:
            break
        assert token not in seen_tokens, f"nextToken {token!r} repeated"
        seen_tokens.add(token)
        assert page, "a non-final page was empty"
    return items, pages


def _key(result_key, item):
    if result_key == "things" and isinstance(item, str):
        return item
    if result_key == "things":
        return item["thingName"]
    if result_key == "jobs":
        return item["jobId"]
    if result_key == "streams":
        return item["streamId"]
    if result_key == "executionSummaries":
        return (item["thingArn"], item["jobExecutionSummary"]["executionNumber"])
    raise KeyError(result_key)


def _check_pagination(call, result_key, expected_subset, page_size=2, exact=False, **kw):
    items, pages = _collect(call, result_key, page_size, **kw)
    keys = [_key(result_key, i) for i in items]
    assert len(keys) == len(set(keys)), f"duplicates across pages: {keys}"
    assert set(expected_subset) <= set(keys), f"missing {set(expected_subset) - set(keys)}"
    if exact:
        assert set(keys) == set(expected_subset)
    # The same set as one big page.
    whole = call(**dict(kw, maxResults=250))
    if not whole.get("nextToken"):
        assert set(keys) == {_key(result_key, i) for i in whole[result_key]}
    assert pages >= (len(keys) + page_size - 1) // page_size
    return keys


def test_pagination_list_things(iot):
    names = [unique("pg") for _ in range(7)]
    for n in names:
        iot.create_thing(thingName=n)
    keys = _check_pagination(iot.list_things, "things", names, page_size=2)
    keys3 = _check_pagination(iot.list_things, "things", names, page_size=3)
    assert set(keys) == set(keys3)
    pag = iot.get_paginator("list_things")
    via = [t["thingName"] for p in pag.paginate(PaginationConfig={"PageSize": 2}) for t in p["things"]]
    assert set(names) <= set(via) and len(via) == len(set(via))


def test_pagination_list_jobs(iot):
    thing = unique("thing")
    arn = iot.create_thing(thingName=thing)["thingArn"]
    ids = [unique("pgjob") for _ in range(5)]
    for j in ids:
        iot.create_job(jobId=j, targets=[arn], document="{}")
    _check_pagination(iot.list_jobs, "jobs", ids, page_size=2)
    _check_pagination(iot.list_jobs, "jobs", ids, page_size=1, status="IN_PROGRESS")


def test_pagination_list_streams(iot, firmware):
    ids = [unique("pgstream") for _ in range(5)]
    for s in ids:
        iot.create_stream(
            streamId=s,
            files=[{"fileId": 0, "s3Location": {"bucket": firmware["bucket"], "key": firmware["key"]}}],
            roleArn=ROLE_ARN,
        )
    _check_pagination(iot.list_streams, "streams", ids, page_size=2)
    _check_pagination(iot.list_streams, "streams", ids, page_size=2, ascendingOrder=True)


def test_pagination_list_job_executions_for_job(iot):
    arns = [iot.create_thing(thingName=unique("pgex"))["thingArn"] for _ in range(5)]
    job = unique("job")
    iot.create_job(jobId=job, targets=arns, document="{}")
    keys = _check_pagination(iot.list_job_executions_for_job, "executionSummaries", [(a, 1) for a in arns],
                             page_size=2, exact=True, jobId=job)
    assert len(keys) == 5


def test_pagination_list_things_in_thing_group(iot):
    group = unique("grp")
    child = unique("grp")
    iot.create_thing_group(thingGroupName=group)
    iot.create_thing_group(thingGroupName=child, parentGroupName=group)
    names = [unique("pgg") for _ in range(5)]
    for n in names:
        iot.create_thing(thingName=n)
        iot.add_thing_to_thing_group(thingGroupName=group, thingName=n)
    extra = [unique("pgc") for _ in range(2)]
    for n in extra:
        iot.create_thing(thingName=n)
        iot.add_thing_to_thing_group(thingGroupName=child, thingName=n)
    _check_pagination(iot.list_things_in_thing_group, "things", names, page_size=2, exact=True, thingGroupName=group)
    _check_pagination(iot.list_things_in_thing_group, "things", names + extra, page_size=2, exact=True,
                      thingGroupName=group, recursive=True)


def test_pagination_list_job_executions_for_thing(iot):
    thing = unique("thing")
    arn = iot.create_thing(thingName=thing)["thingArn"]
    ids = [unique("pgjob") for _ in range(5)]
    for j in ids:
        iot.create_job(jobId=j, targets=[arn], document="{}")
    items, _ = _collect(iot.list_job_executions_for_thing, "executionSummaries", 2, thingName=thing)
    got = [i["jobId"] for i in items]
    assert sorted(got) == sorted(ids)


# -------------------------------------------------------------- document sources


@pytest.mark.parametrize("style", ["path", "virtual-hosted", "regional-path"])
def test_job_document_source_url_styles(iot, s3, firmware, style):
    """CreateJob resolves documentSource S3 URLs against Updraft's own object store, in the
    forms AWS accepts (the deployment tool uses https://BUCKET.s3.amazonaws.com/KEY)."""
    bucket = firmware["bucket"]
    key = f"jobs/{unique('doc')} v1.json"
    doc = {"operation": "fota", "style": style}
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(doc).encode())
    quoted = key.replace(" ", "%20")
    url = {
        "path": f"https://s3.amazonaws.com/{bucket}/{quoted}",
        "virtual-hosted": f"https://{bucket}.s3.amazonaws.com/{quoted}",
        "regional-path": f"https://s3.us-east-1.amazonaws.com/{bucket}/{quoted}",
    }[style]
    arn = iot.create_thing(thingName=unique("thing"))["thingArn"]
    job_id = unique("job")
    iot.create_job(jobId=job_id, targets=[arn], documentSource=url)
    assert iot.describe_job(jobId=job_id)["documentSource"] == url
    assert json.loads(iot.get_job_document(jobId=job_id)["document"]) == doc


# ----------------------------------------------------------------- modeled errors


def test_modeled_exceptions(iot):
    with pytest.raises(iot.exceptions.ResourceNotFoundException) as e:
        iot.describe_thing(thingName=unique("nothing"))
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert e.value.response["Error"]["Message"]
    assert e.value.response["ResponseMetadata"].get("RequestId")
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_job(jobId=unique("nojob"))
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.get_ota_update(otaUpdateId=unique("noota"))
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_stream(streamId=unique("nostream"))

    name = unique("thing")
    arn = iot.create_thing(thingName=name, attributePayload={"attributes": {"a": "1"}})["thingArn"]
    with pytest.raises(iot.exceptions.ResourceAlreadyExistsException) as e:
        iot.create_thing(thingName=name, attributePayload={"attributes": {"a": "2"}})
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    with pytest.raises(iot.exceptions.VersionConflictException):
        iot.update_thing(thingName=name, attributePayload={"attributes": {"b": "2"}}, expectedVersion=9)
    with pytest.raises(iot.exceptions.InvalidRequestException):
        iot.create_thing(thingName="bad name")

    job = unique("job")
    iot.create_job(jobId=job, targets=[arn], document="{}")
    with pytest.raises(iot.exceptions.ResourceAlreadyExistsException):
        iot.create_job(jobId=job, targets=[arn], document="{}")
    with pytest.raises(iot.exceptions.InvalidStateTransitionException):
        iot.delete_job(jobId=job)
