//! Hostile devices: seeded random malformed, truncated, oversized, type-confused and
//! mutated-valid payloads on every request topic (Jobs get / start-next / describe /
//! update, Streams describe / get in JSON and CBOR), through the embedded broker.
//!
//! Every case is answered (or, where the API defines no answer, ignored) exactly as the
//! reference documents, and after each batch the server still serves a valid request and
//! the store is unchanged: the fixtures are chosen so that no hostile request can be a
//! legitimate state change (updates go to a terminal execution, to a job that does not
//! exist, or carry an invalid status; StartNext finds an execution already IN_PROGRESS).
//!
//! The seed is printed at the start (shown when the test fails); rerun a failure with
//! `UPDRAFT_HOSTILE_SEED=<seed>`.

mod common;

use bytes::Bytes;
use common::{Device, Env, create_job, create_stream, create_thing, executions_of, put_object};
use serde_json::{Value, json};
use updraft_protocol::cbor::Writer;
use updraft_protocol::streams::{
    DataBlock, DescribeStreamRequest, DescribeStreamResponse, GetStreamRequest, Rejection,
    StreamError, block_range, select_blocks,
};
use updraft_protocol::topics::Format;
use updraft_server::clock::now_ms;

/// Devices probing in parallel. Each sends about 2 x CASES_PER_DEVICE requests (the case
/// and a sync marker), which stays within the per-device burst allowance (400), so no
/// answer is `RequestThrottled`.
const DEVICES: usize = 16;
const CASES_PER_DEVICE: usize = 190;
const BATCH: usize = 19;

const STREAM: &str = "hs";

fn file0() -> Vec<u8> {
    common::file_bytes(5000, 11)
}

fn file1() -> Vec<u8> {
    common::file_bytes(700, 12)
}

// ---- the generator ---------------------------------------------------------------------------

/// xorshift64*: small, seedable, good enough to pick mutations.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// 1 to 3 byte-level edits: flip, insert, delete, duplicate a slice, truncate.
fn mutate(rng: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(3) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        let i = rng.below(b.len());
        match rng.below(6) {
            0 => b[i] = rng.next() as u8,
            1 => b[i] ^= 1 << rng.below(8),
            2 => b.insert(i, rng.next() as u8),
            3 => {
                b.remove(i);
            }
            4 => {
                let j = i + rng.below(b.len() - i);
                let slice = b[i..j].to_vec();
                b.splice(j..j, slice);
            }
            _ => b.truncate(i),
        }
    }
    b
}

/// A JSON value of any shape, for type confusion.
fn any_value(rng: &mut Rng) -> Value {
    let eleven: serde_json::Map<String, Value> =
        (0..11).map(|i| (format!("k{i}"), json!("v"))).collect();
    let choices = [
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(1),
        json!(2),
        json!(10080),
        json!(10081),
        json!(1.5),
        json!(1e300),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(""),
        json!("1"),
        json!(" 2 "),
        json!("-1"),
        json!("abc"),
        json!("IN_PROGRESS"),
        json!("x".repeat(65)),
        json!("é".repeat(40)),
        json!("a\u{0}b"),
        json!([]),
        json!([1, "a"]),
        json!({}),
        json!({"k": "v"}),
        json!({"bad key": "v"}),
        json!({"k": 1}),
        json!({"k": ""}),
        json!({"k": "v".repeat(1025)}),
        Value::Object(eleven),
    ];
    rng.pick(&choices).clone()
}

/// One hostile request and what the server must do with it.
#[derive(Debug)]
struct Case {
    topic: String,
    payload: Vec<u8>,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobsTarget {
    GetPending,
    StartNext,
    /// Describe an execution that exists (`$next` included).
    DescribeExisting,
    DescribeMissing,
    /// Update the SUCCEEDED execution: never accepted.
    UpdateTerminal,
    UpdateMissing,
    /// Update the IN_PROGRESS execution with an invalid status: always InvalidRequest.
    UpdateBadStatus,
    /// A topic under jobs/ that names no API.
    InvalidTopic,
}

impl JobsTarget {
    const ALL: &[JobsTarget] = &[
        JobsTarget::GetPending,
        JobsTarget::StartNext,
        JobsTarget::DescribeExisting,
        JobsTarget::DescribeMissing,
        JobsTarget::UpdateTerminal,
        JobsTarget::UpdateMissing,
        JobsTarget::UpdateBadStatus,
        JobsTarget::InvalidTopic,
    ];
}

#[derive(Debug, Clone)]
enum Kind {
    Jobs(JobsTarget),
    StreamGet {
        stream_exists: bool,
        format: Format,
    },
    StreamDescribe {
        stream_exists: bool,
        format: Format,
    },
    /// A stream request whose stream id breaks the id rules: `InvalidTopic` on the
    /// topic's `rejected` twin.
    StreamInvalidTopic {
        format: Format,
        rejected: String,
    },
    /// A stream topic that names nowhere to answer (unknown format or operation).
    StreamIgnored,
}

fn jobs_template(target: JobsTarget) -> Value {
    match target {
        JobsTarget::GetPending => json!({"clientToken": "tok-get"}),
        JobsTarget::StartNext => {
            json!({"statusDetails": {"step": "x"}, "stepTimeoutInMinutes": 5, "clientToken": "s"})
        }
        JobsTarget::DescribeExisting | JobsTarget::DescribeMissing => {
            json!({"executionNumber": 1, "includeJobDocument": true, "clientToken": "d"})
        }
        JobsTarget::UpdateTerminal | JobsTarget::UpdateMissing | JobsTarget::InvalidTopic => {
            json!({
                "status": "IN_PROGRESS", "statusDetails": {"receive": "1/2"},
                "expectedVersion": 3, "executionNumber": 1, "includeJobExecutionState": true,
                "includeJobDocument": true, "stepTimeoutInMinutes": 10, "clientToken": "u",
            })
        }
        JobsTarget::UpdateBadStatus => json!({"status": "NOT_A_STATUS", "clientToken": "b"}),
    }
}

const JOB_FIELDS: &[&str] = &[
    "status",
    "statusDetails",
    "expectedVersion",
    "executionNumber",
    "includeJobExecutionState",
    "includeJobDocument",
    "stepTimeoutInMinutes",
    "clientToken",
];

fn jobs_case(rng: &mut Rng, thing: &str) -> Case {
    use JobsTarget::*;
    let target = *rng.pick(JobsTarget::ALL);
    let missing = format!("nope-{}", rng.below(1000));
    let suffix = match target {
        GetPending => "get".to_owned(),
        StartNext => "start-next".to_owned(),
        DescribeExisting => format!(
            "{}/get",
            rng.pick(&["$next", "h-active", "h-done", "h-queued"])
        ),
        DescribeMissing => format!("{missing}/get"),
        UpdateTerminal => "h-done/update".to_owned(),
        UpdateMissing => format!("{missing}/update"),
        UpdateBadStatus => "h-active/update".to_owned(),
        InvalidTopic => rng
            .pick(&[
                "h-active/bogus",
                "$next/update",
                "h-active/update/more",
                "a/b/get",
                "bad.id/get",
                "",
                "get/x",
                "start-next/get/x",
                "h-active",
                "notify/x",
            ])
            .to_string(),
    };
    let mut template = jobs_template(target);
    if rng.chance(2)
        && let Some(m) = template.as_object_mut()
    {
        // Without it, an update of the terminal execution meets the state machine.
        m.remove("expectedVersion");
    }
    let payload = if target == UpdateBadStatus {
        // Structured only: the invalid status must survive, whatever else is added.
        let bad_status = rng
            .pick(&[
                json!("NOT_A_STATUS"),
                json!(""),
                json!(7),
                json!(null),
                json!("in_progress"),
                json!("QUEUED "),
            ])
            .clone();
        for _ in 0..rng.below(4) {
            let field = *rng.pick(JOB_FIELDS);
            template[field] = any_value(rng);
        }
        if bad_status.is_null() {
            template.as_object_mut().map(|m| m.remove("status"));
        } else {
            template["status"] = bad_status;
        }
        template.to_string().into_bytes()
    } else {
        match rng.below(6) {
            // Random bytes.
            0 => {
                let n = rng.below(200);
                rng.bytes(n)
            }
            // A truncated valid request.
            1 => {
                let b = template.to_string().into_bytes();
                let n = rng.below(b.len());
                b[..n].to_vec()
            }
            // A valid request with byte-level mutations.
            2 => mutate(rng, template.to_string().into_bytes()),
            // Type confusion: fields with values of any shape.
            3 => {
                for _ in 0..1 + rng.below(3) {
                    let field = *rng.pick(JOB_FIELDS);
                    template[field] = any_value(rng);
                }
                template.to_string().into_bytes()
            }
            // Oversized, within the broker's packet limit: huge strings, deep nesting, padding.
            4 => match rng.below(4) {
                0 => {
                    template["clientToken"] = json!("t".repeat(100_000));
                    template.to_string().into_bytes()
                }
                1 => {
                    template["statusDetails"] = json!({"k": "v".repeat(150_000)});
                    template.to_string().into_bytes()
                }
                2 => {
                    let depth = 1 + rng.below(20_000);
                    format!("{{\"x\":{}{}}}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
                }
                _ => {
                    let mut b = vec![b' '; 200_000];
                    b.extend(template.to_string().into_bytes());
                    b
                }
            },
            // Valid JSON that is not an object.
            _ => rng
                .pick(&["[]", "null", "1", "\"x\"", "true", "[{}]"])
                .as_bytes()
                .to_vec(),
        }
    };
    Case {
        topic: format!("$aws/things/{thing}/jobs/{suffix}"),
        payload,
        kind: Kind::Jobs(target),
    }
}

fn stream_template(rng: &mut Rng) -> GetStreamRequest {
    let l = *rng.pick(&[256u64, 300, 1024, 4096, 131_072, 255, 131_073, 0]);
    GetStreamRequest {
        client_token: rng.chance(2).then(|| "c".repeat(1 + rng.below(64))),
        stream_version: rng.chance(3).then(|| rng.below(3) as u64),
        file_id: rng.below(3) as u64,
        block_size: l,
        offset: rng.below(25) as u64,
        number_of_blocks: rng.chance(2).then(|| rng.below(40) as u64),
        bitmap: rng.chance(2).then(|| {
            let n = rng.below(8);
            rng.bytes(n)
        }),
    }
}

/// A CBOR map of stream request keys with values of any CBOR type.
fn cbor_type_confusion(rng: &mut Rng) -> Vec<u8> {
    let keys = ["c", "s", "f", "l", "o", "n", "b", "x"];
    let pairs = 1 + rng.below(6);
    let mut w = Writer::new();
    w.map(pairs as u64);
    for _ in 0..pairs {
        let key = *rng.pick(&keys[..]);
        w.text(key);
        match rng.below(8) {
            0 => w.uint(rng.next()),
            1 => w.int(-(rng.below(1000) as i64) - 1),
            2 => w.uint(rng.below(300) as u64),
            3 => w.text("0"),
            4 => {
                let n = rng.below(100);
                w.bytes(&rng.bytes(n))
            }
            5 => w.map(0),
            6 => w.array(1).uint(1),
            _ => w.text(&"é".repeat(rng.below(40))),
        };
    }
    w.into_bytes()
}

fn stream_case(rng: &mut Rng, thing: &str) -> Case {
    let format = *rng.pick(&[Format::Json, Format::Cbor]);
    let fmt = format.as_str();
    let stream_exists = !rng.chance(8);
    let stream = if stream_exists {
        STREAM
    } else {
        "no-such-stream"
    };
    if rng.chance(50) {
        let bad_id = rng
            .pick(&["bad.id".to_owned(), "s".repeat(129), "a b".to_owned()])
            .clone();
        let op = *rng.pick(&["get", "describe"]);
        return Case {
            topic: format!("$aws/things/{thing}/streams/{bad_id}/{op}/{fmt}"),
            payload: stream_template(rng).encode(format),
            kind: Kind::StreamInvalidTopic {
                format,
                rejected: format!("$aws/things/{thing}/streams/{bad_id}/rejected/{fmt}"),
            },
        };
    }
    if rng.chance(25) {
        let topic = rng
            .pick(&[
                format!("$aws/things/{thing}/streams/{STREAM}/get/xml"),
                format!("$aws/things/{thing}/streams/{STREAM}/fetch/{fmt}"),
                format!("$aws/things/{thing}/streams/{STREAM}/get"),
                format!("$aws/things/{thing}/streams/{STREAM}/get/{fmt}/x"),
            ])
            .clone();
        return Case {
            topic,
            payload: stream_template(rng).encode(format),
            kind: Kind::StreamIgnored,
        };
    }
    if rng.chance(5) {
        let valid = DescribeStreamRequest {
            client_token: rng.chance(2).then(|| "d".repeat(1 + rng.below(70))),
        }
        .encode(format);
        let payload = match rng.below(3) {
            0 => valid,
            1 => mutate(rng, valid),
            _ => {
                let n = rng.below(64);
                rng.bytes(n)
            }
        };
        return Case {
            topic: format!("$aws/things/{thing}/streams/{stream}/describe/{fmt}"),
            payload,
            kind: Kind::StreamDescribe {
                stream_exists,
                format,
            },
        };
    }
    let valid = stream_template(rng).encode(format);
    let payload = match rng.below(6) {
        0 => valid,
        1 => {
            let n = rng.below(valid.len());
            valid[..n].to_vec()
        }
        2 => mutate(rng, valid),
        3 => {
            let n = rng.below(200);
            rng.bytes(n)
        }
        4 => match format {
            Format::Cbor => cbor_type_confusion(rng),
            Format::Json => {
                let mut v: Value = serde_json::from_slice(&valid).unwrap_or(json!({}));
                for _ in 0..1 + rng.below(3) {
                    let key = *rng.pick(&["c", "s", "f", "l", "o", "n", "b"]);
                    v[key] = any_value(rng);
                }
                v.to_string().into_bytes()
            }
        },
        // Oversized: a bitmap over the limit, or a huge token.
        _ => {
            let mut req = stream_template(rng);
            if rng.chance(2) {
                req.bitmap = Some(vec![0xFF; 12_288 + rng.below(100_000)]);
            } else {
                req.client_token = Some("t".repeat(65 + rng.below(100_000)));
            }
            req.encode(format)
        }
    };
    Case {
        topic: format!("$aws/things/{thing}/streams/{stream}/get/{fmt}"),
        payload,
        kind: Kind::StreamGet {
            stream_exists,
            format,
        },
    }
}

fn make_case(rng: &mut Rng, thing: &str) -> Case {
    if rng.chance(2) {
        jobs_case(rng, thing)
    } else {
        stream_case(rng, thing)
    }
}

// ---- the oracle ------------------------------------------------------------------------------

/// What the server answered to one case (everything up to the sync marker).
type Answers = Vec<(String, Bytes)>;

/// The request as a JSON object, as the Jobs API reads it: whitespace is `{}`, anything else
/// that is not a JSON object is `InvalidJson`.
fn as_jobs_request(payload: &[u8]) -> Option<serde_json::Map<String, Value>> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Some(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fn check_jobs(case: &Case, target: JobsTarget, answers: &Answers) -> Result<(), String> {
    use JobsTarget::*;
    let accepted_topic = format!("{}/accepted", case.topic);
    let rejected_topic = format!("{}/rejected", case.topic);
    let [(topic, body)] = answers.as_slice() else {
        return Err(format!("expected one answer, got {}", answers.len()));
    };
    let body: Value =
        serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    if body["timestamp"].as_i64().is_none() {
        return Err(format!("no integer timestamp: {body}"));
    }
    let accepted = if *topic == accepted_topic {
        true
    } else if *topic == rejected_topic {
        false
    } else {
        return Err(format!("answer on {topic}"));
    };
    let code = body["code"].as_str().unwrap_or("");
    if target == InvalidTopic {
        return (code == "InvalidTopic" && !accepted)
            .then_some(())
            .ok_or_else(|| format!("expected InvalidTopic: {body}"));
    }
    let Some(request) = as_jobs_request(&case.payload) else {
        return (code == "InvalidJson" && !accepted && body.get("clientToken").is_none())
            .then_some(())
            .ok_or_else(|| format!("expected InvalidJson without a token: {body}"));
    };
    // A token is a string of 1 to 64 characters, echoed verbatim; anything else is refused
    // (InvalidRequest) and not echoed.
    match request.get("clientToken") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if (1..=64).contains(&t.chars().count()) => {
            if body["clientToken"] != t.as_str() {
                return Err(format!("token not echoed: {body}"));
            }
        }
        Some(_) => {
            return (code == "InvalidRequest" && !accepted && body.get("clientToken").is_none())
                .then_some(())
                .ok_or_else(|| format!("expected InvalidRequest for the token: {body}"));
        }
    }
    let allowed: &[&str] = match target {
        GetPending => &[],
        StartNext | DescribeExisting => &["InvalidRequest", "ResourceNotFound"],
        DescribeMissing | UpdateMissing => &["InvalidRequest", "ResourceNotFound"],
        UpdateTerminal => &[
            "InvalidRequest",
            "InvalidStateTransition",
            "VersionMismatch",
            "ResourceNotFound",
        ],
        UpdateBadStatus => &["InvalidRequest"],
        InvalidTopic => unreachable!(),
    };
    let may_accept = matches!(target, GetPending | StartNext | DescribeExisting);
    if accepted {
        if !may_accept {
            return Err(format!("accepted: {body}"));
        }
        if target == StartNext && body["execution"]["jobId"] != "h-active" {
            return Err(format!(
                "StartNext must return the IN_PROGRESS execution: {body}"
            ));
        }
        return Ok(());
    }
    if !allowed.contains(&code) {
        return Err(format!("code {code:?} not among {allowed:?}: {body}"));
    }
    let has_state = body.get("executionState").is_some();
    if has_state != matches!(code, "InvalidStateTransition" | "VersionMismatch") {
        return Err(format!("executionState with {code}: {body}"));
    }
    if code == "InvalidStateTransition" && body["executionState"]["status"] != "SUCCEEDED" {
        return Err(format!("wrong execution state: {body}"));
    }
    Ok(())
}

/// The stream answers the reference prescribes for a request: blocks, a description or
/// one rejection.
enum StreamExpect {
    Blocks(u64, Vec<u64>, u64),
    Description,
    Rejected(StreamError),
    Nothing,
}

fn expected_stream(case: &Case) -> StreamExpect {
    let files = [(0u64, 5000u64), (1, 700)];
    match case.kind {
        Kind::StreamDescribe {
            stream_exists,
            format,
        } => match DescribeStreamRequest::decode(format, &case.payload) {
            Err(e) => StreamExpect::Rejected(e),
            Ok(req) if !stream_exists => StreamExpect::Rejected(
                StreamError::new(updraft_protocol::streams::RejectCode::ResourceNotFound, "")
                    .with_client_token(req.client_token.as_deref()),
            ),
            Ok(_) => StreamExpect::Description,
        },
        Kind::StreamGet {
            stream_exists,
            format,
        } => {
            let req = match GetStreamRequest::decode(format, &case.payload) {
                Err(e) => return StreamExpect::Rejected(e),
                Ok(r) => r,
            };
            let not_found = || {
                StreamExpect::Rejected(
                    StreamError::new(updraft_protocol::streams::RejectCode::ResourceNotFound, "")
                        .with_client_token(req.client_token.as_deref()),
                )
            };
            if !stream_exists {
                return not_found();
            }
            if let Err(e) = req.check_version(1) {
                return StreamExpect::Rejected(e);
            }
            let Some(&(_, size)) = files.iter().find(|(f, _)| *f == req.file_id) else {
                return not_found();
            };
            match select_blocks(size, &req) {
                Err(e) => StreamExpect::Rejected(e),
                Ok(b) if b.is_empty() => StreamExpect::Nothing,
                Ok(b) => StreamExpect::Blocks(req.file_id, b, req.block_size),
            }
        }
        _ => StreamExpect::Nothing,
    }
}

fn check_stream(case: &Case, answers: &Answers) -> Result<(), String> {
    if let Kind::StreamInvalidTopic { format, rejected } = &case.kind {
        let [(t, p)] = answers.as_slice() else {
            return Err(format!("expected InvalidTopic, got {answers:?}"));
        };
        if t != rejected {
            return Err(format!("expected InvalidTopic on {rejected}, got {t}"));
        }
        let r = Rejection::decode(*format, p).map_err(|e| format!("bad rejection: {e}"))?;
        return (r.code == "InvalidTopic" && r.client_token.is_none())
            .then_some(())
            .ok_or_else(|| format!("expected InvalidTopic without a token, got {r:?}"));
    }
    let format = match case.kind {
        Kind::StreamGet { format, .. } | Kind::StreamDescribe { format, .. } => format,
        _ => {
            return answers
                .is_empty()
                .then_some(())
                .ok_or_else(|| format!("an ignored topic was answered: {answers:?}"));
        }
    };
    let base = case
        .topic
        .rsplitn(3, '/')
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    let fmt = format.as_str();
    let topic_of = |op: &str| format!("{base}/{op}/{fmt}");
    match expected_stream(case) {
        StreamExpect::Nothing => answers
            .is_empty()
            .then_some(())
            .ok_or_else(|| format!("expected no answer, got {answers:?}")),
        StreamExpect::Rejected(e) => {
            let [(t, p)] = answers.as_slice() else {
                return Err(format!(
                    "expected {}, got {} messages",
                    e.code,
                    answers.len()
                ));
            };
            if *t != topic_of("rejected") {
                return Err(format!("expected {} on rejected, got {t}", e.code));
            }
            let r = Rejection::decode(format, p).map_err(|e| format!("bad rejection: {e}"))?;
            if r.code != e.code.as_str() {
                return Err(format!("expected {}, got {r:?}", e.code));
            }
            if r.client_token != e.client_token {
                return Err(format!(
                    "token {:?} echoed as {:?}",
                    e.client_token, r.client_token
                ));
            }
            Ok(())
        }
        StreamExpect::Description => {
            let [(t, p)] = answers.as_slice() else {
                return Err(format!("expected a description, got {answers:?}"));
            };
            if *t != topic_of("description") {
                return Err(format!("expected a description, got {t}"));
            }
            let d = DescribeStreamResponse::decode(format, p)
                .map_err(|e| format!("bad description: {e}"))?;
            (d.stream_version == 1 && d.files.len() == 2)
                .then_some(())
                .ok_or_else(|| format!("wrong description {d:?}"))
        }
        StreamExpect::Blocks(file_id, blocks, l) => {
            let data = if file_id == 0 { file0() } else { file1() };
            if answers.len() != blocks.len() {
                return Err(format!(
                    "expected blocks {blocks:?}, got {} messages",
                    answers.len()
                ));
            }
            for ((t, p), want) in answers.iter().zip(&blocks) {
                if *t != topic_of("data") {
                    return Err(format!("expected block {want}, got {t}"));
                }
                let b = DataBlock::decode(format, p).map_err(|e| format!("bad block: {e}"))?;
                let range = block_range(data.len() as u64, l, *want).ok_or("no such block")?;
                if b.block_id != *want
                    || b.file_id != file_id
                    || b.payload != data[range.start as usize..range.end as usize]
                {
                    return Err(format!(
                        "block {want} wrong: id {} file {}",
                        b.block_id, b.file_id
                    ));
                }
            }
            Ok(())
        }
    }
}

/// A label for what the server did, to show the generator reaches every path.
fn outcome(answers: &Answers) -> String {
    let Some((topic, payload)) = answers.first() else {
        return "no answer".into();
    };
    let format = if topic.ends_with("/cbor") {
        Format::Cbor
    } else {
        Format::Json
    };
    if topic.ends_with("/accepted") {
        "accepted".into()
    } else if topic.ends_with("/rejected") {
        serde_json::from_slice::<Value>(payload)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    } else if topic.contains("/rejected/") {
        Rejection::decode(format, payload)
            .map(|r| r.code)
            .unwrap_or_default()
    } else if topic.contains("/data/") {
        "blocks".into()
    } else {
        "description".into()
    }
}

fn describe_payload(p: &[u8]) -> String {
    if p.len() > 160 {
        format!(
            "{} bytes starting {:?}",
            p.len(),
            String::from_utf8_lossy(&p[..160])
        )
    } else {
        format!("{:?}", String::from_utf8_lossy(p))
    }
}

// ---- the test --------------------------------------------------------------------------------

/// What must not change: this thing's executions, and the stream.
async fn snapshot(env: &Env, thing: &str) -> String {
    let executions = executions_of(&env.state, thing).await;
    let stream = env.state.store.get_stream(STREAM).await.expect("stream");
    format!("{executions:?}\n{stream:?}")
}

/// Three jobs for every hostile thing, queued in this order.
async fn create_jobs(env: &Env, things: &[&str]) {
    for t in things {
        create_thing(&env.state, t).await;
    }
    let t0 = now_ms() - 10_000;
    for (i, id) in ["h-done", "h-active", "h-queued"].into_iter().enumerate() {
        let doc = format!(r#"{{"op":"{id}"}}"#);
        create_job(&env.state, id, things, &doc, t0 + i as i64).await;
    }
}

/// Connects `thing` and brings its executions to: h-done SUCCEEDED, h-active IN_PROGRESS
/// (version 2), h-queued QUEUED.
async fn fixtures(env: &Env, thing: &str) -> Device {
    let mut dev = env.device(thing).await;
    let a = dev
        .jobs_json("h-done/update", json!({"status": "SUCCEEDED"}))
        .await;
    assert!(a.accepted, "{}", a.body);
    let a = dev
        .jobs_json("start-next", json!({"statusDetails": {"step": "1"}}))
        .await;
    assert_eq!(a.body["execution"]["jobId"], "h-active", "{}", a.body);
    // The notifications these caused; from now on nothing may notify.
    dev.sync().await;
    dev
}

/// A valid request is still served as before.
async fn still_served(dev: &mut Device) {
    let a = dev
        .jobs_json("h-active/get", json!({"clientToken": "alive"}))
        .await;
    assert!(a.accepted, "{}", a.body);
    assert_eq!(a.body["execution"]["status"], "IN_PROGRESS");
    assert_eq!(a.body["execution"]["versionNumber"], 2);
    assert_eq!(a.body["clientToken"], "alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_devices_change_nothing() {
    hostile_devices(Env::embedded("hostile").await).await;
}

/// The same behind a real Mosquitto (the shipped ACL; Updraft as a client over TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_devices_change_nothing_on_mosquitto() {
    let Some(env) = Env::mosquitto("hostile-mosquitto").await else {
        return;
    };
    hostile_devices(env).await;
}

async fn hostile_devices(env: Env) {
    let seed = std::env::var("UPDRAFT_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| now_ms() as u64);
    eprintln!("hostile_input seed: {seed} (rerun with UPDRAFT_HOSTILE_SEED={seed})");
    let env = std::sync::Arc::new(env);
    put_object(&env.state, "hfw", "a.bin", &file0()).await;
    put_object(&env.state, "hfw", "b.bin", &file1()).await;
    create_stream(
        &env.state,
        STREAM,
        "hostile",
        &[(0, "hfw", "a.bin", 5000), (1, "hfw", "b.bin", 700)],
    )
    .await;

    let things: Vec<String> = (0..DEVICES).map(|d| format!("hostile-{d}")).collect();
    create_jobs(&env, &things.iter().map(String::as_str).collect::<Vec<_>>()).await;

    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        let env = env.clone();
        let mut rng = Rng::new(seed ^ (d as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        tasks.push(tokio::spawn(async move {
            let thing = format!("hostile-{d}");
            let mut dev = fixtures(&env, &thing).await;
            let before = snapshot(&env, &thing).await;
            let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
            for batch in 0..CASES_PER_DEVICE / BATCH {
                for i in 0..BATCH {
                    let case = make_case(&mut rng, &thing);
                    dev.publish(&case.topic, case.payload.clone()).await;
                    let answers = dev.sync().await;
                    let verdict = match case.kind {
                        Kind::Jobs(target) => check_jobs(&case, target, &answers),
                        _ => check_stream(&case, &answers),
                    };
                    if let Err(why) = verdict {
                        panic!(
                            "seed {seed}, device {d}, batch {batch}, case {i}: {why}\n  topic {}\n  payload {}\n  kind {:?}",
                            case.topic,
                            describe_payload(&case.payload),
                            case.kind
                        );
                    }
                    *outcomes.entry(outcome(&answers)).or_default() += 1;
                }
                still_served(&mut dev).await;
                assert_eq!(
                    snapshot(&env, &thing).await,
                    before,
                    "seed {seed}, device {d}: the store changed in batch {batch}"
                );
            }
            // Over the broker's packet limit: the connection goes, the server stays.
            let big = vec![b' '; 300 * 1024];
            dev.publish(&dev.jobs_topic("get"), big).await;
            let mut dev = env.device(&thing).await;
            still_served(&mut dev).await;
            assert_eq!(snapshot(&env, &thing).await, before);
            outcomes
        }));
    }
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        for (k, n) in t.await.expect("device task") {
            *outcomes.entry(k).or_default() += n;
        }
    }
    let total: usize = outcomes.values().sum();
    eprintln!("hostile_input: {total} cases, seed {seed}: {outcomes:?}");
    assert_eq!(total, DEVICES * CASES_PER_DEVICE);
    // The generator reaches the paths that matter (each is common, whatever the seed).
    for path in [
        "accepted",
        "blocks",
        "description",
        "no answer",
        "InvalidJson",
        "InvalidCbor",
        "InvalidRequest",
        "InvalidTopic",
        "InvalidStateTransition",
        "ResourceNotFound",
        "BlockSizeOutOfBounds",
        "BlockBitmapLimitExceeded",
    ] {
        assert!(
            outcomes.contains_key(path),
            "seed {seed}: no case ended in {path}: {outcomes:?}"
        );
    }
}
