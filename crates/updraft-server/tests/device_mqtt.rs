//! A device that speaks only MQTT, against every Jobs and Streams topic of the data plane
//! and every rejected code a device can provoke (data-plane reference §1 and §2).
//!
//! One test body runs twice: behind Updraft's embedded broker, and behind a real Mosquitto
//! started here with the repository's ACL (`deploy/mosquitto/updraft.acl`), Updraft
//! connected to it over mutual TLS with `--broker-url` as `docs/mosquitto.md` describes.
//! Without mosquitto the second run is skipped with a printed reason, except under
//! `CI=true`, where that is a failure.

mod common;

use common::{
    Answer, Broker, Device, Env, create_job, create_stream, create_thing, executions_of,
    file_bytes, put_object,
};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use updraft_protocol::streams::{
    DataBlock, DescribeStreamRequest, DescribeStreamResponse, GetStreamRequest, Rejection,
};
use updraft_protocol::topics::Format;
use updraft_server::clock::now_ms;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_protocol_on_the_embedded_broker() {
    let env = Env::embedded("device-mqtt").await;
    device_protocol(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_protocol_on_mosquitto() {
    let Some(env) = Env::mosquitto("device-mqtt-mosquitto").await else {
        return;
    };
    device_protocol(&env).await;
}

async fn device_protocol(env: &Env) {
    jobs_api(env).await;
    throttling(env).await;
    isolation(env).await;
    streams_api(env).await;
    if env.broker == Broker::Embedded {
        implicit_delivery(env).await;
    }
}

// ---- helpers --------------------------------------------------------------------------------

/// Device-plane timestamps are integer epoch seconds (10 digits), not milliseconds.
fn assert_seconds(v: &Value, what: &str) {
    let n = v
        .as_i64()
        .unwrap_or_else(|| panic!("{what} is not an integer: {v}"));
    let now = now_ms() / 1000;
    assert!(
        (now - 3600..=now + 60).contains(&n),
        "{what} = {n} is not epoch seconds near {now}"
    );
}

#[track_caller]
fn accepted(a: &Answer) -> &Value {
    assert!(a.accepted, "expected accepted, got rejected {}", a.body);
    assert_seconds(&a.body["timestamp"], "timestamp");
    &a.body
}

#[track_caller]
fn rejected(a: &Answer, code: &str) -> Value {
    assert_eq!(a.code(), Some(code), "answer: {}", a.body);
    assert_seconds(&a.body["timestamp"], "timestamp");
    assert!(
        a.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "rejected without a message: {}",
        a.body
    );
    if !matches!(code, "InvalidStateTransition" | "VersionMismatch") {
        assert!(
            a.body.get("executionState").is_none(),
            "executionState only comes with InvalidStateTransition/VersionMismatch: {}",
            a.body
        );
    }
    a.body.clone()
}

fn job_ids(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["jobId"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The `notify` and `notify-next` messages received so far, in order.
async fn notifications(dev: &mut Device) -> (Vec<Value>, Vec<Value>) {
    let notify = dev.jobs_topic("notify");
    let next = dev.jobs_topic("notify-next");
    let (mut n, mut nn) = (Vec::new(), Vec::new());
    for (t, p) in dev.sync().await {
        let v: Value = serde_json::from_slice(&p).expect("notification JSON");
        if t == notify {
            n.push(v);
        } else if t == next {
            nn.push(v);
        }
    }
    (n, nn)
}

// ---- Jobs ------------------------------------------------------------------------------------

async fn jobs_api(env: &Env) {
    let state = &env.state;
    let thing = "dev-jobs";
    create_thing(state, thing).await;
    let mut dev = env.device(thing).await;
    let t0 = now_ms() - 60_000;
    create_job(state, "job-a", &[thing], r#"{"op":"a","n":1}"#, t0).await;
    create_job(state, "job-b", &[thing], r#"{"op":"b"}"#, t0 + 1000).await;

    // notify when jobs are queued, and notify-next for the new head.
    let (n, nn) = notifications(&mut dev).await;
    let last = n.last().expect("notify after CreateJob");
    assert_seconds(&last["timestamp"], "notify timestamp");
    assert_eq!(job_ids(&last["jobs"]["QUEUED"]), ["job-a", "job-b"]);
    assert!(last["jobs"].get("IN_PROGRESS").is_none(), "{last}");
    let summary = &last["jobs"]["QUEUED"][0];
    assert_eq!(summary["versionNumber"], 1);
    assert_eq!(summary["executionNumber"], 1);
    assert_seconds(&summary["queuedAt"], "queuedAt");
    let heads: Vec<_> = nn
        .iter()
        .map(|v| v["execution"]["jobId"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(heads, ["job-a"], "notify-next only when the head changes");
    assert_eq!(nn[0]["execution"]["jobDocument"], json!({"op":"a","n":1}));

    // GetPendingJobExecutions.
    let a = dev.jobs_json("get", json!({"clientToken": "t-get"})).await;
    let body = accepted(&a);
    assert_eq!(body["clientToken"], "t-get");
    assert_eq!(body["inProgressJobs"], json!([]));
    assert_eq!(job_ids(&body["queuedJobs"]), ["job-a", "job-b"]);
    // An empty payload is "no fields": no token to echo.
    let a = dev.jobs("get", "").await;
    assert!(accepted(&a).get("clientToken").is_none(), "{}", a.body);

    // DescribeJobExecution: $next, a job id, executionNumber, includeJobDocument.
    let a = dev
        .jobs_json("$next/get", json!({"clientToken": "n1"}))
        .await;
    let e = &accepted(&a)["execution"];
    assert_eq!(a.body["clientToken"], "n1");
    assert_eq!(e["jobId"], "job-a");
    assert_eq!(e["status"], "QUEUED");
    assert_eq!(e["versionNumber"], 1);
    assert_eq!(e["executionNumber"], 1);
    assert_eq!(
        e["jobDocument"],
        json!({"op":"a","n":1}),
        "an object over MQTT"
    );
    assert!(e.get("startedAt").is_none());
    assert_seconds(&e["queuedAt"], "queuedAt");
    assert_seconds(&e["lastUpdatedAt"], "lastUpdatedAt");
    let a = dev
        .jobs_json("$next/get", json!({"includeJobDocument": false}))
        .await;
    assert!(accepted(&a)["execution"].get("jobDocument").is_none());
    let a = dev
        .jobs_json("job-b/get", json!({"executionNumber": 1}))
        .await;
    assert_eq!(accepted(&a)["execution"]["jobDocument"], json!({"op":"b"}));
    let a = dev
        .jobs_json(
            "job-b/get",
            json!({"executionNumber": 2, "clientToken": "x"}),
        )
        .await;
    assert_eq!(rejected(&a, "ResourceNotFound")["clientToken"], "x");
    rejected(
        &dev.jobs_json("no-such-job/get", json!({})).await,
        "ResourceNotFound",
    );
    rejected(
        &dev.jobs_json("job-b/get", json!({"executionNumber": "one"}))
            .await,
        "InvalidRequest",
    );
    rejected(
        &dev.jobs_json("job-b/get", json!({"includeJobDocument": 3}))
            .await,
        "InvalidRequest",
    );

    // StartNextPendingJobExecution: QUEUED -> IN_PROGRESS once, with statusDetails.
    let a = dev
        .jobs_json(
            "start-next",
            json!({"statusDetails": {"step": "one"}, "stepTimeoutInMinutes": 5, "clientToken": "s1"}),
        )
        .await;
    let e = accepted(&a)["execution"].clone();
    assert_eq!(a.body["clientToken"], "s1");
    assert_eq!(e["jobId"], "job-a");
    assert_eq!(e["status"], "IN_PROGRESS");
    assert_eq!(e["statusDetails"], json!({"step": "one"}));
    assert_eq!(
        e["versionNumber"], 2,
        "start bumps the version exactly once"
    );
    assert_seconds(&e["startedAt"], "startedAt");
    assert_eq!(e["jobDocument"], json!({"op":"a","n":1}));
    // Again: the IN_PROGRESS execution comes first and keeps its details and version.
    let a = dev
        .jobs_json("start-next", json!({"statusDetails": {"step": "two"}}))
        .await;
    let e = &accepted(&a)["execution"];
    assert_eq!(
        (
            e["jobId"].as_str(),
            e["statusDetails"].clone(),
            e["versionNumber"].as_i64()
        ),
        (Some("job-a"), json!({"step": "one"}), Some(2))
    );
    rejected(
        &dev.jobs_json("start-next", json!({"stepTimeoutInMinutes": 0}))
            .await,
        "InvalidRequest",
    );
    rejected(
        &dev.jobs_json("start-next", json!({"statusDetails": {"k": 1}}))
            .await,
        "InvalidRequest",
    );
    // Starting the head changes neither the list's members nor its head: no notify-next.
    let (_, nn) = notifications(&mut dev).await;
    assert!(nn.is_empty(), "unexpected notify-next: {nn:?}");

    // UpdateJobExecution, every field.
    let a = dev
        .jobs_json(
            "job-a/update",
            json!({
                "status": "IN_PROGRESS",
                "expectedVersion": 2,
                "statusDetails": {"receive": "1/4"},
                "includeJobExecutionState": true,
                "stepTimeoutInMinutes": 10,
                "clientToken": "u1",
            }),
        )
        .await;
    let body = accepted(&a);
    assert_eq!(body["clientToken"], "u1");
    assert_eq!(
        body["executionState"],
        json!({"status": "IN_PROGRESS", "statusDetails": {"receive": "1/4"}, "versionNumber": 3})
    );
    assert!(body.get("jobDocument").is_none());
    // expectedVersion as a numeric string (AWS's Jobs library sends it so), jobDocument only.
    let a = dev
        .jobs_json(
            "job-a/update",
            json!({"status": "IN_PROGRESS", "expectedVersion": "3", "includeJobDocument": true,
                   "statusDetails": {"receive": "2/4"}}),
        )
        .await;
    let body = accepted(&a);
    assert_eq!(body["jobDocument"], json!({"op":"a","n":1}));
    assert!(body.get("executionState").is_none());
    // Without any include flag: just timestamp (and the token).
    let a = dev
        .jobs_json(
            "job-a/update",
            json!({"status": "IN_PROGRESS", "executionNumber": 1, "stepTimeoutInMinutes": -1}),
        )
        .await;
    let keys: BTreeSet<_> = accepted(&a)
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(keys, BTreeSet::from(["timestamp".to_owned()]));
    // statusDetails omitted: unchanged.
    let a = dev
        .jobs_json("job-a/get", json!({"includeJobDocument": false}))
        .await;
    let e = &accepted(&a)["execution"];
    assert_eq!(e["statusDetails"], json!({"receive": "2/4"}));
    assert_eq!(e["versionNumber"], 5);

    // VersionMismatch carries the current state and the token.
    let a = dev
        .jobs_json(
            "job-a/update",
            json!({"status": "IN_PROGRESS", "expectedVersion": 3, "clientToken": "vm"}),
        )
        .await;
    let body = rejected(&a, "VersionMismatch");
    assert_eq!(body["clientToken"], "vm");
    assert_eq!(
        body["executionState"],
        json!({"status": "IN_PROGRESS", "statusDetails": {"receive": "2/4"}, "versionNumber": 5})
    );
    rejected(
        &dev.jobs_json(
            "job-a/update",
            json!({"status": "IN_PROGRESS", "expectedVersion": "4"}),
        )
        .await,
        "VersionMismatch",
    );

    // InvalidRequest: each field's rules.
    let a = dev
        .jobs_json("job-a/update", json!({"clientToken": "ns"}))
        .await;
    let body = rejected(&a, "InvalidRequest");
    assert_eq!(body["clientToken"], "ns");
    assert!(
        body["message"].as_str().unwrap_or("").contains("status"),
        "{body}"
    );
    let long_value = "v".repeat(1025);
    let eleven: serde_json::Map<String, Value> =
        (0..11).map(|i| (format!("k{i}"), json!("v"))).collect();
    for bad in [
        json!({"status": "BOGUS"}),
        json!({"status": 3}),
        json!({"status": "IN_PROGRESS", "expectedVersion": "two"}),
        json!({"status": "IN_PROGRESS", "expectedVersion": 1.5}),
        json!({"status": "IN_PROGRESS", "executionNumber": true}),
        json!({"status": "IN_PROGRESS", "includeJobExecutionState": "yes"}),
        json!({"status": "IN_PROGRESS", "includeJobDocument": 1}),
        json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0}),
        json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 10081}),
        json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": "soon"}),
        json!({"status": "IN_PROGRESS", "statusDetails": "done"}),
        json!({"status": "IN_PROGRESS", "statusDetails": {"k": 1}}),
        json!({"status": "IN_PROGRESS", "statusDetails": {"bad key": "v"}}),
        json!({"status": "IN_PROGRESS", "statusDetails": {"k": ""}}),
        json!({"status": "IN_PROGRESS", "statusDetails": {"k": long_value}}),
        json!({"status": "IN_PROGRESS", "statusDetails": eleven}),
    ] {
        let a = dev.jobs_json("job-a/update", bad.clone()).await;
        assert_eq!(a.code(), Some("InvalidRequest"), "{bad} -> {}", a.body);
    }
    // InvalidJson: not JSON, or not an object; the token cannot be read, so none is echoed.
    for bad in [
        &b"{\"status\":"[..],
        b"[1,2]",
        b"\"IN_PROGRESS\"",
        b"\xff\xfe",
        b"null",
    ] {
        let a = dev.jobs("job-a/update", bad.to_vec()).await;
        let body = rejected(&a, "InvalidJson");
        assert!(body.get("clientToken").is_none(), "{body}");
    }
    rejected(&dev.jobs("get", "{nope").await, "InvalidJson");
    rejected(&dev.jobs("start-next", "[]").await, "InvalidJson");
    rejected(&dev.jobs("$next/get", "{").await, "InvalidJson");
    // ResourceNotFound: no such job, no such execution number.
    rejected(
        &dev.jobs_json("no-such-job/update", json!({"status": "SUCCEEDED"}))
            .await,
        "ResourceNotFound",
    );
    rejected(
        &dev.jobs_json(
            "job-a/update",
            json!({"status": "SUCCEEDED", "executionNumber": 7}),
        )
        .await,
        "ResourceNotFound",
    );
    // InvalidTopic: under jobs/, but no API; answered on <topic>/rejected.
    for topic in [
        "job-a/bogus",
        "$next/update",
        "a/b/get",
        "bad.id/get",
        "job-a/update/extra/levels",
        "",
    ] {
        let a = dev.jobs(topic, "{}").await;
        rejected(&a, "InvalidTopic");
    }
    let too_long = "j".repeat(65);
    rejected(
        &dev.jobs(&format!("{too_long}/get"), "{}").await,
        "InvalidTopic",
    );
    // Nothing above changed the execution.
    let a = dev.jobs_json("job-a/get", json!({})).await;
    assert_eq!(accepted(&a)["execution"]["versionNumber"], 5);

    // To a terminal state: notify drops the job, notify-next announces the new head.
    let a = dev
        .jobs_json(
            "job-a/update",
            json!({"status": "SUCCEEDED", "statusDetails": {"reason": "accepted  v1.2.3"},
                   "includeJobExecutionState": true}),
        )
        .await;
    assert_eq!(accepted(&a)["executionState"]["status"], "SUCCEEDED");
    let (n, nn) = notifications(&mut dev).await;
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(job_ids(&n[0]["jobs"]["QUEUED"]), ["job-b"]);
    assert!(n[0]["jobs"].get("IN_PROGRESS").is_none());
    assert_eq!(nn.len(), 1, "{nn:?}");
    assert_eq!(nn[0]["execution"]["jobId"], "job-b");
    assert_eq!(nn[0]["execution"]["status"], "QUEUED");
    assert_eq!(nn[0]["execution"]["jobDocument"], json!({"op":"b"}));
    assert_seconds(&nn[0]["timestamp"], "notify-next timestamp");

    // A terminal execution cannot move: InvalidStateTransition with its state.
    for status in ["IN_PROGRESS", "SUCCEEDED", "FAILED"] {
        let a = dev
            .jobs_json(
                "job-a/update",
                json!({"status": status, "clientToken": "term"}),
            )
            .await;
        let body = rejected(&a, "InvalidStateTransition");
        assert_eq!(body["clientToken"], "term");
        assert_eq!(body["executionState"]["status"], "SUCCEEDED");
        assert_eq!(
            body["executionState"]["statusDetails"],
            json!({"reason": "accepted  v1.2.3"})
        );
    }
    // Devices cannot queue, cancel or time out an execution.
    for status in ["QUEUED", "CANCELED", "TIMED_OUT", "REMOVED"] {
        let a = dev
            .jobs_json("job-b/update", json!({"status": status}))
            .await;
        rejected(&a, "InvalidStateTransition");
    }
    // Describe still answers for a terminal execution, with its details kept verbatim.
    let a = dev.jobs_json("job-a/get", json!({})).await;
    let e = &accepted(&a)["execution"];
    assert_eq!(e["status"], "SUCCEEDED");
    assert_eq!(e["statusDetails"], json!({"reason": "accepted  v1.2.3"}));

    // A job that joins behind the head: notify, but no notify-next.
    create_job(state, "job-c", &[thing], r#"{"op":"c"}"#, t0 + 2000).await;
    // A job literally named `get`: `jobs/get/get` is DescribeJobExecution, by segment count.
    create_job(state, "get", &[thing], r#"{"op":"get"}"#, t0 + 3000).await;
    let a = dev.jobs_json("get/get", json!({})).await;
    assert_eq!(accepted(&a)["execution"]["jobId"], "get");
    let (n, nn) = notifications(&mut dev).await;
    assert_eq!(
        job_ids(&n.last().expect("notify")["jobs"]["QUEUED"]),
        ["job-b", "job-c", "get"]
    );
    assert!(nn.is_empty(), "the head did not change: {nn:?}");

    // QUEUED -> REJECTED and QUEUED -> FAILED are the device's to make; IN_PROGRESS ->
    // REJECTED is not.
    accepted(
        &dev.jobs_json("get/update", json!({"status": "REJECTED"}))
            .await,
    );
    accepted(
        &dev.jobs_json("job-c/update", json!({"status": "FAILED"}))
            .await,
    );
    accepted(
        &dev.jobs_json("job-b/update", json!({"status": "IN_PROGRESS"}))
            .await,
    );
    rejected(
        &dev.jobs_json("job-b/update", json!({"status": "REJECTED"}))
            .await,
        "InvalidStateTransition",
    );
    let (_, nn) = notifications(&mut dev).await;
    assert!(nn.is_empty(), "job-b stayed the head: {nn:?}");
    // The last pending execution ends: notify with no jobs, notify-next with no execution.
    accepted(
        &dev.jobs_json("job-b/update", json!({"status": "SUCCEEDED"}))
            .await,
    );
    let (n, nn) = notifications(&mut dev).await;
    assert_eq!(n.last().expect("notify")["jobs"], json!({}));
    assert_eq!(nn.len(), 1, "{nn:?}");
    assert!(nn[0].get("execution").is_none(), "{}", nn[0]);
    assert_seconds(&nn[0]["timestamp"], "notify-next timestamp");
    // Nothing pending: $next and start-next answer without an execution.
    let a = dev
        .jobs_json("$next/get", json!({"clientToken": "empty"}))
        .await;
    let keys: BTreeSet<_> = accepted(&a)
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(
        keys,
        BTreeSet::from(["clientToken".to_owned(), "timestamp".to_owned()])
    );
    assert!(
        accepted(&dev.jobs("start-next", "").await)
            .get("execution")
            .is_none()
    );
    let a = dev.jobs("get", "{}").await;
    assert_eq!(
        (&accepted(&a)["inProgressJobs"], &a.body["queuedJobs"]),
        (&json!([]), &json!([]))
    );
    // The store agrees with what the device was told.
    let stored: Vec<_> = executions_of(state, thing)
        .await
        .into_iter()
        .map(|e| (e.job_id, e.status.as_str().to_owned(), e.version))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        stored,
        [
            ("get".to_owned(), "REJECTED".to_owned(), 2),
            ("job-a".to_owned(), "SUCCEEDED".to_owned(), 6),
            ("job-b".to_owned(), "SUCCEEDED".to_owned(), 3),
            ("job-c".to_owned(), "FAILED".to_owned(), 2),
        ]
    );
}

/// `RequestThrottled`: a device flooding the Jobs API beyond its rate is refused, alone.
async fn throttling(env: &Env) {
    let thing = "dev-flood";
    create_thing(&env.state, thing).await;
    let mut dev = env.device(thing).await;
    let topic = dev.jobs_topic("get");
    let rejected_topic = format!("{topic}/rejected");
    for _ in 0..1500 {
        dev.publish(&topic, "{}").await;
    }
    let mut throttled = false;
    while let Some((_, p)) = dev
        .next_matching(|t| t == rejected_topic, common::WAIT)
        .await
    {
        let v: Value = serde_json::from_slice(&p).expect("JSON");
        if v["code"] == "RequestThrottled" {
            throttled = true;
            break;
        }
    }
    assert!(throttled, "1500 requests at once were never throttled");
    // Another device is served as usual.
    create_thing(&env.state, "dev-quiet").await;
    let mut quiet = env.device("dev-quiet").await;
    accepted(&quiet.jobs("get", "{}").await);
}

/// A device cannot act on another thing's execution: the embedded broker refuses the topic,
/// Mosquitto's ACL drops it, and Updraft ignores it either way.
async fn isolation(env: &Env) {
    let state = &env.state;
    create_thing(state, "dev-victim").await;
    create_thing(state, "dev-mallory").await;
    create_job(state, "job-v", &["dev-victim"], r#"{"op":"v"}"#, now_ms()).await;
    let before = executions_of(state, "dev-victim").await;
    let mallory = env.device("dev-mallory").await;
    mallory
        .publish(
            "$aws/things/dev-victim/jobs/job-v/update",
            json!({"status": "FAILED"}).to_string(),
        )
        .await;
    // The embedded broker may close the connection of a device that oversteps; either way,
    // once the victim's own request is answered, the intrusion has been handled or dropped.
    let mut victim = env.device("dev-victim").await;
    let a = victim.jobs_json("job-v/get", json!({})).await;
    assert_eq!(accepted(&a)["execution"]["status"], "QUEUED");
    assert_eq!(executions_of(state, "dev-victim").await, before);
}

/// On the embedded broker, answers reach a device that subscribed to nothing (the FreeRTOS
/// agent depends on it).
async fn implicit_delivery(env: &Env) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let thing = "dev-bare";
    create_thing(&env.state, thing).await;
    create_job(
        &env.state,
        "job-bare",
        &[thing],
        r#"{"op":"bare"}"#,
        now_ms(),
    )
    .await;
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(thing, "127.0.0.1", env.device_port), 16);
    client
        .publish(
            format!("$aws/things/{thing}/jobs/$next/get"),
            QoS::AtLeastOnce,
            false,
            "",
        )
        .await
        .expect("publish");
    let answer = tokio::time::timeout(common::WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.expect("poll") {
                return p;
            }
        }
    })
    .await
    .expect("an answer without a subscription");
    assert_eq!(
        answer.topic,
        format!("$aws/things/{thing}/jobs/$next/get/accepted")
    );
    let v: Value = serde_json::from_slice(&answer.payload).expect("JSON");
    assert_eq!(v["execution"]["jobId"], "job-bare");
    // Empty request payload: no token in the answer.
    assert!(v.get("clientToken").is_none());
}

// ---- Streams ---------------------------------------------------------------------------------

const STREAM: &str = "fw-stream";
const FILE0: usize = 10_000;

/// What a stream request produced before the sync marker.
#[derive(Debug, Default)]
struct StreamAnswers {
    blocks: Vec<DataBlock>,
    descriptions: Vec<DescribeStreamResponse>,
    rejections: Vec<Rejection>,
}

impl StreamAnswers {
    #[track_caller]
    fn rejected(&self, code: &str) -> &Rejection {
        assert!(
            self.blocks.is_empty() && self.descriptions.is_empty() && self.rejections.len() == 1,
            "expected only {code}, got {self:?}"
        );
        let r = &self.rejections[0];
        assert_eq!(r.code, code, "{r:?}");
        assert!(!r.message.is_empty());
        r
    }
}

/// Publishes a stream request and collects every answer to it.
async fn stream_request(
    dev: &mut Device,
    stream: &str,
    op: &str,
    format: Format,
    payload: Vec<u8>,
) -> StreamAnswers {
    let fmt = format.as_str();
    dev.publish(&dev.stream_topic(stream, op, fmt), payload)
        .await;
    let mut out = StreamAnswers::default();
    for (t, p) in dev.sync().await {
        if t == dev.stream_topic(stream, "data", fmt) {
            out.blocks
                .push(DataBlock::decode(format, &p).expect("a well-formed block"));
        } else if t == dev.stream_topic(stream, "description", fmt) {
            out.descriptions.push(
                DescribeStreamResponse::decode(format, &p).expect("a well-formed description"),
            );
        } else if t == dev.stream_topic(stream, "rejected", fmt) {
            out.rejections
                .push(Rejection::decode(format, &p).expect("a well-formed rejection"));
        }
    }
    out
}

fn get(block_size: u64, offset: u64, n: Option<u64>, bitmap: Option<Vec<u8>>) -> GetStreamRequest {
    GetStreamRequest {
        client_token: Some("rdy".into()),
        stream_version: None,
        file_id: 0,
        block_size,
        offset,
        number_of_blocks: n,
        bitmap,
    }
}

async fn streams_api(env: &Env) {
    let state = &env.state;
    let data = file_bytes(FILE0, 7);
    put_object(state, "fw", "a.bin", &data).await;
    put_object(state, "fw", "b.bin", &file_bytes(300, 8)).await;
    create_stream(
        state,
        STREAM,
        "firmware",
        &[(0, "fw", "a.bin", FILE0 as u64), (1, "fw", "b.bin", 300)],
    )
    .await;
    // Broken on purpose: file 0's object was deleted, file 1 is recorded longer than it is.
    put_object(state, "fw", "gone.bin", b"soon gone").await;
    state
        .store
        .delete_object("fw", "gone.bin", None, now_ms())
        .await
        .expect("delete object");
    put_object(state, "fw", "short.bin", &[1; 100]).await;
    create_stream(
        state,
        "broken-stream",
        "",
        &[(0, "fw", "gone.bin", 9), (1, "fw", "short.bin", 1000)],
    )
    .await;

    let thing = "dev-streams";
    create_thing(state, thing).await;
    let mut dev = env.device(thing).await;
    for format in [Format::Json, Format::Cbor] {
        streams_in(&mut dev, format, &data).await;
    }
}

async fn streams_in(dev: &mut Device, format: Format, data: &[u8]) {
    // DescribeStream, with and without a token.
    let req = DescribeStreamRequest {
        client_token: Some("d1".into()),
    };
    let out = stream_request(dev, STREAM, "describe", format, req.encode(format)).await;
    assert_eq!(out.descriptions.len(), 1, "{out:?}");
    let d = &out.descriptions[0];
    assert_eq!(d.client_token.as_deref(), Some("d1"));
    assert_eq!((d.stream_version, d.description.as_str()), (1, "firmware"));
    let files: Vec<_> = d.files.iter().map(|f| (f.file_id, f.size)).collect();
    assert_eq!(files, [(0, FILE0 as u64), (1, 300)]);
    let out = stream_request(dev, STREAM, "describe", format, Vec::new()).await;
    assert_eq!(out.descriptions.len(), 1, "{out:?}");
    assert_eq!(out.descriptions[0].client_token, None);
    stream_request(dev, "no-such-stream", "describe", format, Vec::new())
        .await
        .rejected("ResourceNotFound");
    // A stream id outside the id rules names no stream: InvalidTopic, without a token.
    for op in ["describe", "get"] {
        let payload = get(256, 0, Some(1), None).encode(format);
        let r = stream_request(dev, "bad.id", op, format, payload).await;
        assert_eq!(r.rejected("InvalidTopic").client_token, None);
    }

    // GetStream: o + n.
    let check = |out: &StreamAnswers, l: usize, want: &[u64]| {
        assert!(out.rejections.is_empty(), "{out:?}");
        let got: Vec<u64> = out.blocks.iter().map(|b| b.block_id).collect();
        assert_eq!(got, want);
        for b in &out.blocks {
            let start = b.block_id as usize * l;
            let end = (start + l).min(data.len());
            assert_eq!(b.payload, data[start..end], "block {}", b.block_id);
            assert_eq!(b.file_id, 0);
            assert_eq!(b.client_token.as_deref(), Some("rdy"));
        }
    };
    let out = stream_request(
        dev,
        STREAM,
        "get",
        format,
        get(256, 0, Some(3), None).encode(format),
    )
    .await;
    check(&out, 256, &[0, 1, 2]);
    // The last block is the remainder; without n, as many as fit in 128 KiB.
    let out = stream_request(
        dev,
        STREAM,
        "get",
        format,
        get(4096, 1, None, None).encode(format),
    )
    .await;
    check(&out, 4096, &[1, 2]);
    assert_eq!(out.blocks[1].payload.len(), FILE0 - 8192);
    // A bitmap relative to o: bits 0, 2 and 15 -> blocks 4, 6, 19; n caps the count.
    let bitmap = vec![0b0000_0101, 0b1000_0000];
    let out = stream_request(
        dev,
        STREAM,
        "get",
        format,
        get(256, 4, None, Some(bitmap.clone())).encode(format),
    )
    .await;
    check(&out, 256, &[4, 6, 19]);
    let out = stream_request(
        dev,
        STREAM,
        "get",
        format,
        get(256, 4, Some(2), Some(bitmap)).encode(format),
    )
    .await;
    check(&out, 256, &[4, 6]);
    // The FreeRTOS agent's request: whole-file bitmap of missing blocks from o = 0.
    let out = stream_request(
        dev,
        STREAM,
        "get",
        format,
        get(1024, 0, Some(2), Some(vec![0b0000_0110, 0b0000_0010])).encode(format),
    )
    .await;
    check(&out, 1024, &[1, 2]);
    // The stream version, when given, must match.
    let versioned = |s| GetStreamRequest {
        stream_version: Some(s),
        ..get(4096, 0, Some(1), None)
    };
    check(
        &stream_request(dev, STREAM, "get", format, versioned(1).encode(format)).await,
        4096,
        &[0],
    );
    let r = stream_request(dev, STREAM, "get", format, versioned(2).encode(format))
        .await
        .rejected("VersionMismatch")
        .client_token
        .clone();
    assert_eq!(r.as_deref(), Some("rdy"));
    // Asking for nothing gets nothing.
    let out = stream_request(
        dev,
        STREAM,
        "get",
        format,
        get(256, 0, Some(0), None).encode(format),
    )
    .await;
    assert!(
        out.blocks.is_empty() && out.rejections.is_empty(),
        "{out:?}"
    );
    // File 1.
    let out = stream_request(
        dev,
        STREAM,
        "get",
        format,
        GetStreamRequest {
            file_id: 1,
            ..get(256, 0, None, None)
        }
        .encode(format),
    )
    .await;
    let sizes: Vec<_> = out
        .blocks
        .iter()
        .map(|b| (b.file_id, b.payload.len()))
        .collect();
    assert_eq!(sizes, [(1, 256), (1, 44)]);

    // Every rejected code a request can provoke.
    let cases: Vec<(&str, GetStreamRequest)> = vec![
        (
            "ResourceNotFound",
            GetStreamRequest {
                file_id: 9,
                ..get(256, 0, None, None)
            },
        ),
        (
            "InvalidRequest",
            GetStreamRequest {
                file_id: 256,
                ..get(256, 0, None, None)
            },
        ),
        ("BlockSizeOutOfBounds", get(255, 0, None, None)),
        ("BlockSizeOutOfBounds", get(131_073, 0, None, None)),
        ("OffsetOutOfBounds", get(256, 98_305, None, None)),
        ("OffsetOutOfBounds", get(256, 40, None, None)),
        ("BlockCountLimitExceeded", get(256, 0, Some(98_305), None)),
        (
            "BlockBitmapLimitExceeded",
            get(256, 0, None, Some(vec![0xFF; 12_288])),
        ),
        // Only blocks past the end of the file.
        (
            "ResourceNotFound",
            get(4096, 0, None, Some(vec![0b1000_0000])),
        ),
    ];
    for (code, req) in cases {
        let out = stream_request(dev, STREAM, "get", format, req.encode(format)).await;
        let r = out.rejected(code);
        assert_eq!(r.client_token.as_deref(), Some("rdy"), "{code}");
    }
    stream_request(
        dev,
        "no-such-stream",
        "get",
        format,
        get(256, 0, None, None).encode(format),
    )
    .await
    .rejected("ResourceNotFound");
    // An over-long token is refused and not echoed.
    let long = GetStreamRequest {
        client_token: Some("t".repeat(65)),
        ..get(256, 0, None, None)
    };
    let r = stream_request(dev, STREAM, "get", format, long.encode(format)).await;
    assert_eq!(r.rejected("InvalidRequest").client_token, None);
    // Required keys and types.
    let (missing_f, wrong_type, undecodable): (Vec<u8>, Vec<u8>, Vec<u8>) = match format {
        Format::Json => (
            br#"{"l":256}"#.to_vec(),
            br#"{"f":"0","l":256}"#.to_vec(),
            b"{\"f\":0,".to_vec(),
        ),
        Format::Cbor => (
            vec![0xA1, 0x61, b'l', 0x19, 0x01, 0x00],
            vec![0xA2, 0x61, b'f', 0x61, b'0', 0x61, b'l', 0x19, 0x01, 0x00],
            vec![0xA2, 0x61, b'f', 0x00],
        ),
    };
    stream_request(dev, STREAM, "get", format, missing_f)
        .await
        .rejected("InvalidRequest");
    stream_request(dev, STREAM, "get", format, wrong_type)
        .await
        .rejected("InvalidRequest");
    let undecodable_code = match format {
        Format::Json => "InvalidJson",
        Format::Cbor => "InvalidCbor",
    };
    stream_request(dev, STREAM, "get", format, undecodable.clone())
        .await
        .rejected(undecodable_code);
    stream_request(dev, STREAM, "describe", format, undecodable)
        .await
        .rejected(undecodable_code);
    // The object behind a file is gone; an object is not the size its stream recorded.
    stream_request(
        dev,
        "broken-stream",
        "get",
        format,
        get(256, 0, None, None).encode(format),
    )
    .await
    .rejected("ResourceNotFound");
    let short = GetStreamRequest {
        file_id: 1,
        ..get(256, 3, Some(1), None)
    };
    stream_request(dev, "broken-stream", "get", format, short.encode(format))
        .await
        .rejected("ETagMismatch");
}
