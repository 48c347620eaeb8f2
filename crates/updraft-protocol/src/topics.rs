//! The reserved MQTT topics a device uses for Jobs and Streams (data-plane reference §1.1, §2.1).
//!
//! Jobs: `P = $aws/things/{thing}/jobs`; requests `P/get`, `P/start-next`,
//! `P/{jobId}/get`, `P/{jobId}/update`, replies on `request + /accepted|/rejected`,
//! notifications on `P/notify` and `P/notify-next`.
//!
//! Streams: `S = $aws/things/{thing}/streams/{streamId}`; requests
//! `S/get/{fmt}` and `S/describe/{fmt}`, responses `S/data/{fmt}`,
//! `S/description/{fmt}` and `S/rejected/{fmt}`, with `fmt` one of `json`, `cbor`.
//!
//! Parsing resolves the jobs topics by segment count, so a job literally named
//! `get` or `start-next` works. A topic under `…/jobs` or `…/streams/` that maps
//! to no API is [`TopicError::InvalidTopic`], which the server answers with a
//! rejected message carrying the code `InvalidTopic`.

use std::fmt;
use std::str::FromStr;
use thiserror::Error;

use crate::ids::{JOB_ID, STREAM_ID, THING_NAME};

/// The pseudo job id that selects the next pending execution (DescribeJobExecution only).
pub const NEXT_JOB: &str = "$next";

const THINGS_PREFIX: &str = "$aws/things/";

/// The payload encoding of a stream topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Json,
    Cbor,
}

impl Format {
    /// The topic suffix: `json` or `cbor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "json" => Ok(Format::Json),
            "cbor" => Ok(Format::Cbor),
            _ => Err(()),
        }
    }
}

/// The job a DescribeJobExecution topic names: `$next` or a job id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobRef<'a> {
    Next,
    Id(&'a str),
}

impl<'a> JobRef<'a> {
    /// The topic level: `$next` or the id.
    pub fn as_str(self) -> &'a str {
        match self {
            JobRef::Next => NEXT_JOB,
            JobRef::Id(id) => id,
        }
    }
}

/// One of the four Jobs request APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobsOp<'a> {
    /// GetPendingJobExecutions: `P/get`.
    GetPending,
    /// StartNextPendingJobExecution: `P/start-next`.
    StartNext,
    /// DescribeJobExecution: `P/{jobId}/get`, where the id may be `$next`.
    Describe { job_id: JobRef<'a> },
    /// UpdateJobExecution: `P/{jobId}/update`.
    Update { job_id: &'a str },
}

impl<'a> JobsOp<'a> {
    /// The job the operation names, if any.
    pub fn job_id(self) -> Option<JobRef<'a>> {
        match self {
            JobsOp::GetPending | JobsOp::StartNext => None,
            JobsOp::Describe { job_id } => Some(job_id),
            JobsOp::Update { job_id } => Some(JobRef::Id(job_id)),
        }
    }
}

/// Which of the two reply topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Accepted,
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Rejected => "rejected",
        }
    }
}

/// A topic under `$aws/things/{thing}/jobs/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobsTopic<'a> {
    /// A request the device publishes.
    Request(JobsOp<'a>),
    /// The service's answer to a request.
    Reply { op: JobsOp<'a>, outcome: Outcome },
    /// JobExecutionsChanged: `P/notify`.
    Notify,
    /// NextJobExecutionChanged: `P/notify-next`.
    NotifyNext,
}

/// The last-but-one level of a stream topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamOp {
    /// GetStream request (device → service).
    Get,
    /// DescribeStream request (device → service).
    Describe,
    /// One data block (service → device).
    Data,
    /// DescribeStream response (service → device).
    Description,
    /// Error for either request (service → device).
    Rejected,
}

impl StreamOp {
    pub const ALL: &'static [StreamOp] = &[
        StreamOp::Get,
        StreamOp::Describe,
        StreamOp::Data,
        StreamOp::Description,
        StreamOp::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StreamOp::Get => "get",
            StreamOp::Describe => "describe",
            StreamOp::Data => "data",
            StreamOp::Description => "description",
            StreamOp::Rejected => "rejected",
        }
    }

    /// Whether devices publish on this topic (as opposed to receiving on it).
    pub fn is_request(self) -> bool {
        matches!(self, StreamOp::Get | StreamOp::Describe)
    }

    fn parse(s: &str) -> Option<Self> {
        StreamOp::ALL.iter().copied().find(|op| op.as_str() == s)
    }
}

/// A reserved Jobs or Streams topic of one thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceTopic<'a> {
    Jobs {
        thing: &'a str,
        topic: JobsTopic<'a>,
    },
    Stream {
        thing: &'a str,
        stream_id: &'a str,
        op: StreamOp,
        format: Format,
    },
}

/// Which reserved namespace an invalid topic was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Namespace {
    Jobs,
    Streams,
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Namespace::Jobs => "jobs",
            Namespace::Streams => "streams",
        })
    }
}

/// Why a topic is not a [`DeviceTopic`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    /// Not under `$aws/things/{thing}/jobs` or `$aws/things/{thing}/streams/`: not ours to answer.
    #[error("not a jobs or streams topic")]
    NotReserved,
    /// Under the jobs or streams namespace but mapping to no API: answer `InvalidTopic`.
    #[error("invalid {namespace} topic: {reason}")]
    InvalidTopic {
        namespace: Namespace,
        reason: String,
    },
}

fn invalid(namespace: Namespace, reason: impl Into<String>) -> TopicError {
    TopicError::InvalidTopic {
        namespace,
        reason: reason.into(),
    }
}

fn check(
    namespace: Namespace,
    rule: &crate::ids::Rule,
    field: &'static str,
    value: &str,
) -> Result<(), TopicError> {
    rule.check(field, value)
        .map_err(|e| invalid(namespace, e.to_string()))
}

fn parse_outcome(s: &str) -> Option<Outcome> {
    match s {
        "accepted" => Some(Outcome::Accepted),
        "rejected" => Some(Outcome::Rejected),
        _ => None,
    }
}

fn parse_jobs<'a>(levels: &[&'a str]) -> Result<JobsTopic<'a>, TopicError> {
    let ns = Namespace::Jobs;
    let op_of = |levels: &[&'a str]| -> Result<JobsOp<'a>, TopicError> {
        match *levels {
            ["get"] => Ok(JobsOp::GetPending),
            ["start-next"] => Ok(JobsOp::StartNext),
            [NEXT_JOB, "get"] => Ok(JobsOp::Describe {
                job_id: JobRef::Next,
            }),
            [NEXT_JOB, "update"] => {
                Err(invalid(ns, "$next is only valid for DescribeJobExecution"))
            }
            [job, "get"] => {
                check(ns, &JOB_ID, "jobId", job)?;
                Ok(JobsOp::Describe {
                    job_id: JobRef::Id(job),
                })
            }
            [job, "update"] => {
                check(ns, &JOB_ID, "jobId", job)?;
                Ok(JobsOp::Update { job_id: job })
            }
            _ => Err(invalid(ns, "no jobs API at this topic")),
        }
    };
    match *levels {
        ["notify"] => Ok(JobsTopic::Notify),
        ["notify-next"] => Ok(JobsTopic::NotifyNext),
        [ref rest @ .., last] => match parse_outcome(last) {
            // `P/X/get/accepted` or `P/get/accepted`, never `P/accepted`.
            Some(outcome) if !rest.is_empty() => Ok(JobsTopic::Reply {
                op: op_of(rest)?,
                outcome,
            }),
            _ => op_of(levels).map(JobsTopic::Request),
        },
        [] => Err(invalid(ns, "no jobs API at this topic")),
    }
}

fn parse_stream<'a>(levels: &[&'a str]) -> Result<(&'a str, StreamOp, Format), TopicError> {
    let ns = Namespace::Streams;
    let [stream_id, op, format] = *levels else {
        return Err(invalid(
            ns,
            "expected streams/{streamId}/{operation}/{json|cbor}",
        ));
    };
    check(ns, &STREAM_ID, "streamId", stream_id)?;
    let op = StreamOp::parse(op).ok_or_else(|| invalid(ns, format!("unknown operation '{op}'")))?;
    let format = format
        .parse::<Format>()
        .map_err(|_| invalid(ns, format!("unknown format '{format}'")))?;
    Ok((stream_id, op, format))
}

impl<'a> DeviceTopic<'a> {
    /// Parses a topic name (not a filter).
    pub fn parse(topic: &'a str) -> Result<Self, TopicError> {
        let Some(rest) = topic.strip_prefix(THINGS_PREFIX) else {
            return Err(TopicError::NotReserved);
        };
        let levels: Vec<&'a str> = rest.split('/').collect();
        let &[thing, namespace, ref tail @ ..] = levels.as_slice() else {
            return Err(TopicError::NotReserved);
        };
        let ns = match namespace {
            "jobs" => Namespace::Jobs,
            // `…/streams` alone is not "under" the streams namespace.
            "streams" if !tail.is_empty() => Namespace::Streams,
            _ => return Err(TopicError::NotReserved),
        };
        check(ns, &THING_NAME, "thingName", thing)?;
        match ns {
            Namespace::Jobs => Ok(DeviceTopic::Jobs {
                thing,
                topic: parse_jobs(tail)?,
            }),
            Namespace::Streams => {
                let (stream_id, op, format) = parse_stream(tail)?;
                Ok(DeviceTopic::Stream {
                    thing,
                    stream_id,
                    op,
                    format,
                })
            }
        }
    }

    /// The thing the topic belongs to.
    pub fn thing(&self) -> &'a str {
        match *self {
            DeviceTopic::Jobs { thing, .. } | DeviceTopic::Stream { thing, .. } => thing,
        }
    }

    /// Whether devices publish on this topic (jobs requests, stream get/describe).
    pub fn is_request(&self) -> bool {
        match self {
            DeviceTopic::Jobs { topic, .. } => matches!(topic, JobsTopic::Request(_)),
            DeviceTopic::Stream { op, .. } => op.is_request(),
        }
    }

    /// Where a successful answer to this request goes: `…/accepted` for jobs,
    /// `…/data/{fmt}` for GetStream, `…/description/{fmt}` for DescribeStream.
    pub fn accepted(&self) -> Option<DeviceTopic<'a>> {
        self.answer(Outcome::Accepted)
    }

    /// Where an error answer to this request goes: `…/rejected` for jobs, `…/rejected/{fmt}` for streams.
    pub fn rejected(&self) -> Option<DeviceTopic<'a>> {
        self.answer(Outcome::Rejected)
    }

    fn answer(&self, outcome: Outcome) -> Option<DeviceTopic<'a>> {
        match *self {
            DeviceTopic::Jobs {
                thing,
                topic: JobsTopic::Request(op),
            } => Some(DeviceTopic::Jobs {
                thing,
                topic: JobsTopic::Reply { op, outcome },
            }),
            DeviceTopic::Stream {
                thing,
                stream_id,
                op,
                format,
            } if op.is_request() => {
                let op = match (outcome, op) {
                    (Outcome::Rejected, _) => StreamOp::Rejected,
                    (Outcome::Accepted, StreamOp::Get) => StreamOp::Data,
                    (Outcome::Accepted, _) => StreamOp::Description,
                };
                Some(DeviceTopic::Stream {
                    thing,
                    stream_id,
                    op,
                    format,
                })
            }
            _ => None,
        }
    }
}

fn write_op(f: &mut fmt::Formatter<'_>, op: &JobsOp<'_>) -> fmt::Result {
    match op {
        JobsOp::GetPending => f.write_str("get"),
        JobsOp::StartNext => f.write_str("start-next"),
        JobsOp::Describe { job_id } => write!(f, "{}/get", job_id.as_str()),
        JobsOp::Update { job_id } => write!(f, "{job_id}/update"),
    }
}

impl fmt::Display for DeviceTopic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceTopic::Jobs { thing, topic } => {
                write!(f, "{THINGS_PREFIX}{thing}/jobs/")?;
                match topic {
                    JobsTopic::Request(op) => write_op(f, op),
                    JobsTopic::Reply { op, outcome } => {
                        write_op(f, op)?;
                        write!(f, "/{}", outcome.as_str())
                    }
                    JobsTopic::Notify => f.write_str("notify"),
                    JobsTopic::NotifyNext => f.write_str("notify-next"),
                }
            }
            DeviceTopic::Stream {
                thing,
                stream_id,
                op,
                format,
            } => write!(
                f,
                "{THINGS_PREFIX}{thing}/streams/{stream_id}/{}/{format}",
                op.as_str()
            ),
        }
    }
}

/// Whether `topic` is a device's request — or passes for one: a malformed topic under the
/// jobs or streams namespace that is not itself an answer. What a server subscribed to the
/// whole namespaces (on an external broker) takes up, as opposed to its own answers and
/// notifications, which the same subscriptions match.
pub fn is_request_topic(topic: &str) -> bool {
    match DeviceTopic::parse(topic) {
        Ok(t) => t.is_request(),
        Err(TopicError::InvalidTopic {
            namespace: Namespace::Jobs,
            ..
        }) => !(topic.ends_with("/accepted") || topic.ends_with("/rejected")),
        Err(TopicError::InvalidTopic {
            namespace: Namespace::Streams,
            ..
        }) => !matches!(
            topic.rsplit('/').nth(1),
            Some("data" | "description" | "rejected")
        ),
        Err(TopicError::NotReserved) => false,
    }
}

/// A stream request (`get` or `describe`, `json` or `cbor`) whose stream id breaks the
/// id rules: it maps to no stream, and the device is answered `InvalidTopic` on the
/// topic's `rejected` twin — which the returned [`DeviceTopic`] names. `None` for anything
/// else: only requests are answered, so an answer, seen again through an external broker,
/// is never taken for a request.
pub fn malformed_stream_request(topic: &str) -> Option<(DeviceTopic<'_>, TopicError)> {
    let rest = topic.strip_prefix(THINGS_PREFIX)?;
    let &[thing, "streams", stream_id, op, format] = rest.split('/').collect::<Vec<_>>().as_slice()
    else {
        return None;
    };
    THING_NAME.check("thingName", thing).ok()?;
    if !StreamOp::parse(op)?.is_request() {
        return None;
    }
    let format = format.parse::<Format>().ok()?;
    let error = check(Namespace::Streams, &STREAM_ID, "streamId", stream_id).err()?;
    let rejected = DeviceTopic::Stream {
        thing,
        stream_id,
        op: StreamOp::Rejected,
        format,
    };
    Some((rejected, error))
}

/// The thing of a `$aws/things/{thing}/…` topic or filter.
///
/// `None` when the topic is not of that shape, when the thing level is empty,
/// or when it is (or contains) a wildcard.
pub fn thing_of_topic(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix(THINGS_PREFIX)?;
    let (thing, _) = rest.split_once('/')?;
    if thing.is_empty() || thing.contains(['+', '#']) {
        return None;
    }
    Some(thing)
}

/// Whether a topic name or filter lies entirely under `$aws/things/{thing}/`.
///
/// For ACL checks: a filter with a wildcard in the thing level
/// (`$aws/things/+/jobs/notify`), or one that starts with a wildcard (`#`),
/// can match other things' topics and is not under a single thing. Wildcards
/// below the thing level (`$aws/things/t/#`) stay within it.
pub fn is_under_thing(topic_or_filter: &str, thing: &str) -> bool {
    !thing.is_empty()
        && !thing.contains(['+', '#', '/'])
        && thing_of_topic(topic_or_filter) == Some(thing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<DeviceTopic<'_>, TopicError> {
        DeviceTopic::parse(t)
    }

    #[test]
    fn request_topics() {
        let r = is_request_topic;
        assert!(r("$aws/things/d/jobs/get"));
        assert!(r("$aws/things/d/jobs/start-next"));
        assert!(r("$aws/things/d/jobs/$next/get"));
        assert!(r("$aws/things/d/jobs/j1/update"));
        assert!(r("$aws/things/d/jobs/j1/bogus"), "answered InvalidTopic");
        assert!(r("$aws/things/d/streams/s/get/cbor"));
        assert!(
            r("$aws/things/d/streams/bad.id/get/cbor"),
            "answered InvalidTopic"
        );
        assert!(!r("$aws/things/d/jobs/get/accepted"));
        assert!(!r("$aws/things/d/jobs/notify-next"));
        assert!(!r("$aws/things/d/jobs/j1/update/rejected"));
        assert!(!r("$aws/things/d/jobs/j1/bogus/rejected"));
        assert!(!r("$aws/things/d/streams/s/data/cbor"));
        assert!(!r("$aws/things/d/streams/bad.id/rejected/cbor"));
        assert!(!r("$aws/things/d/shadow/update"));
    }

    #[test]
    fn malformed_stream_ids_are_answered_on_rejected() {
        let long = "s".repeat(129);
        for (topic, answer) in [
            (
                "$aws/things/t1/streams/bad.id/get/cbor".to_owned(),
                "$aws/things/t1/streams/bad.id/rejected/cbor".to_owned(),
            ),
            (
                format!("$aws/things/t1/streams/{long}/describe/json"),
                format!("$aws/things/t1/streams/{long}/rejected/json"),
            ),
        ] {
            assert!(matches!(
                parse(&topic),
                Err(TopicError::InvalidTopic { .. })
            ));
            let (rejected, error) = malformed_stream_request(&topic).expect(&topic);
            assert_eq!(rejected.to_string(), answer);
            assert!(matches!(
                error,
                TopicError::InvalidTopic {
                    namespace: Namespace::Streams,
                    ..
                }
            ));
        }
        // Only requests in a known format with a valid thing, and only bad stream ids.
        for topic in [
            "$aws/things/t1/streams/bad.id/rejected/cbor",
            "$aws/things/t1/streams/bad.id/data/json",
            "$aws/things/t1/streams/bad.id/get/xml",
            "$aws/things/t1/streams/bad.id/get",
            "$aws/things/t1/streams/bad.id/get/json/x",
            "$aws/things/bad thing!/streams/bad.id/get/json",
            "$aws/things/t1/streams/good-id/get/json",
            "$aws/things/t1/jobs/bad.id/get",
        ] {
            assert!(malformed_stream_request(topic).is_none(), "{topic}");
        }
    }

    fn jobs(thing: &str, topic: JobsTopic<'_>) -> String {
        DeviceTopic::Jobs { thing, topic }.to_string()
    }

    fn assert_round_trip(topic: &str, expected: DeviceTopic<'_>) {
        assert_eq!(parse(topic), Ok(expected), "{topic}");
        assert_eq!(expected.to_string(), topic);
    }

    fn is_invalid(r: Result<DeviceTopic<'_>, TopicError>, ns: Namespace) -> bool {
        matches!(r, Err(TopicError::InvalidTopic { namespace, .. }) if namespace == ns)
    }

    #[test]
    fn jobs_requests_round_trip() {
        let t = "dev:1";
        let cases = [
            ("$aws/things/dev:1/jobs/get", JobsOp::GetPending),
            ("$aws/things/dev:1/jobs/start-next", JobsOp::StartNext),
            (
                "$aws/things/dev:1/jobs/$next/get",
                JobsOp::Describe {
                    job_id: JobRef::Next,
                },
            ),
            (
                "$aws/things/dev:1/jobs/AFR_OTA-x1/get",
                JobsOp::Describe {
                    job_id: JobRef::Id("AFR_OTA-x1"),
                },
            ),
            (
                "$aws/things/dev:1/jobs/AFR_OTA-x1/update",
                JobsOp::Update {
                    job_id: "AFR_OTA-x1",
                },
            ),
        ];
        for (topic, op) in cases {
            assert_round_trip(
                topic,
                DeviceTopic::Jobs {
                    thing: t,
                    topic: JobsTopic::Request(op),
                },
            );
            for outcome in [Outcome::Accepted, Outcome::Rejected] {
                let reply = format!("{topic}/{}", outcome.as_str());
                assert_round_trip(
                    &reply,
                    DeviceTopic::Jobs {
                        thing: t,
                        topic: JobsTopic::Reply { op, outcome },
                    },
                );
            }
        }
    }

    #[test]
    fn jobs_named_like_operations_resolve_by_segment_count() {
        for name in [
            "get",
            "update",
            "start-next",
            "notify",
            "notify-next",
            "accepted",
            "rejected",
            "jobs",
        ] {
            let describe = format!("$aws/things/t/jobs/{name}/get");
            assert_round_trip(
                &describe,
                DeviceTopic::Jobs {
                    thing: "t",
                    topic: JobsTopic::Request(JobsOp::Describe {
                        job_id: JobRef::Id(name),
                    }),
                },
            );
            let update = format!("$aws/things/t/jobs/{name}/update/accepted");
            assert_round_trip(
                &update,
                DeviceTopic::Jobs {
                    thing: "t",
                    topic: JobsTopic::Reply {
                        op: JobsOp::Update { job_id: name },
                        outcome: Outcome::Accepted,
                    },
                },
            );
        }
        // `P/get/get/rejected` is Describe(get) rejected, `P/get/rejected` is GetPending rejected.
        assert_eq!(
            parse("$aws/things/t/jobs/get/get/rejected"),
            Ok(DeviceTopic::Jobs {
                thing: "t",
                topic: JobsTopic::Reply {
                    op: JobsOp::Describe {
                        job_id: JobRef::Id("get")
                    },
                    outcome: Outcome::Rejected
                }
            })
        );
        assert_eq!(
            parse("$aws/things/t/jobs/get/rejected"),
            Ok(DeviceTopic::Jobs {
                thing: "t",
                topic: JobsTopic::Reply {
                    op: JobsOp::GetPending,
                    outcome: Outcome::Rejected
                }
            })
        );
    }

    #[test]
    fn notifications_round_trip() {
        assert_round_trip(
            "$aws/things/t/jobs/notify",
            DeviceTopic::Jobs {
                thing: "t",
                topic: JobsTopic::Notify,
            },
        );
        assert_round_trip(
            "$aws/things/t/jobs/notify-next",
            DeviceTopic::Jobs {
                thing: "t",
                topic: JobsTopic::NotifyNext,
            },
        );
        assert_eq!(jobs("a", JobsTopic::Notify), "$aws/things/a/jobs/notify");
    }

    #[test]
    fn next_is_only_valid_for_describe() {
        assert!(is_invalid(
            parse("$aws/things/t/jobs/$next/update"),
            Namespace::Jobs
        ));
        assert!(is_invalid(
            parse("$aws/things/t/jobs/$next/update/accepted"),
            Namespace::Jobs
        ));
        assert!(is_invalid(
            parse("$aws/things/t/jobs/$next"),
            Namespace::Jobs
        ));
        assert!(is_invalid(
            parse("$aws/things/t/jobs/$prev/get"),
            Namespace::Jobs
        ));
    }

    #[test]
    fn unmapped_jobs_topics_are_invalid_topic() {
        for topic in [
            "$aws/things/t/jobs",
            "$aws/things/t/jobs/",
            "$aws/things/t/jobs/accepted",
            "$aws/things/t/jobs/get/",
            "$aws/things/t/jobs/start-next/get/x",
            "$aws/things/t/jobs/j1",
            "$aws/things/t/jobs/j1/delete",
            "$aws/things/t/jobs/j1/get/accepted/x",
            "$aws/things/t/jobs/j1/get/done",
            "$aws/things/t/jobs/notify/accepted",
            "$aws/things/t/jobs/j1/notify-namespace-ns/",
            "$aws/things/t/jobs/a:b/get",
            "$aws/things/t/jobs//get",
            "$aws/things/t/jobs/+/get",
        ] {
            assert!(is_invalid(parse(topic), Namespace::Jobs), "{topic}");
        }
        let long = format!("$aws/things/t/jobs/{}/get", "j".repeat(65));
        assert!(is_invalid(parse(&long), Namespace::Jobs));
        let max = format!("$aws/things/t/jobs/{}/get", "j".repeat(64));
        assert!(parse(&max).is_ok());
    }

    #[test]
    fn bad_thing_names_are_invalid_topic() {
        for topic in [
            "$aws/things//jobs/get",
            "$aws/things/a b/jobs/get",
            "$aws/things/+/jobs/get",
            "$aws/things/a.b/streams/s/get/json",
        ] {
            assert!(
                matches!(parse(topic), Err(TopicError::InvalidTopic { .. })),
                "{topic}"
            );
        }
        let long = format!("$aws/things/{}/jobs/get", "t".repeat(129));
        assert!(is_invalid(parse(&long), Namespace::Jobs));
        let max = format!("$aws/things/{}/jobs/get", "t".repeat(128));
        assert!(parse(&max).is_ok());
    }

    #[test]
    fn other_topics_are_not_reserved() {
        for topic in [
            "",
            "$aws",
            "$aws/things/t",
            "$aws/things/t/shadow/get",
            "$aws/things/t/streams",
            "$aws/thing/t/jobs/get",
            "aws/things/t/jobs/get",
            "$aws/things/t/Jobs/get",
            "devices/t/jobs/get",
        ] {
            assert_eq!(parse(topic), Err(TopicError::NotReserved), "{topic}");
        }
    }

    #[test]
    fn stream_topics_round_trip() {
        for op in StreamOp::ALL {
            for format in [Format::Json, Format::Cbor] {
                let topic = format!(
                    "$aws/things/dev-1/streams/AFR_OTA-0b8e1d2c-3f4a-4b5c-9d6e-7f8091a2b3c4/{}/{}",
                    op.as_str(),
                    format.as_str()
                );
                assert_round_trip(
                    &topic,
                    DeviceTopic::Stream {
                        thing: "dev-1",
                        stream_id: "AFR_OTA-0b8e1d2c-3f4a-4b5c-9d6e-7f8091a2b3c4",
                        op: *op,
                        format,
                    },
                );
            }
        }
    }

    #[test]
    fn unmapped_stream_topics_are_invalid_topic() {
        for topic in [
            "$aws/things/t/streams/",
            "$aws/things/t/streams/s",
            "$aws/things/t/streams/s/get",
            "$aws/things/t/streams/s/get/xml",
            "$aws/things/t/streams/s/get/JSON",
            "$aws/things/t/streams/s/put/json",
            "$aws/things/t/streams/s/get/json/x",
            "$aws/things/t/streams//get/json",
            "$aws/things/t/streams/a:b/get/json",
        ] {
            assert!(is_invalid(parse(topic), Namespace::Streams), "{topic}");
        }
        let long = format!("$aws/things/t/streams/{}/get/cbor", "s".repeat(129));
        assert!(is_invalid(parse(&long), Namespace::Streams));
    }

    #[test]
    fn answers_to_requests() {
        let req = parse("$aws/things/t/jobs/$next/get").expect("topic");
        assert!(req.is_request());
        assert_eq!(
            req.accepted().map(|t| t.to_string()).as_deref(),
            Some("$aws/things/t/jobs/$next/get/accepted")
        );
        assert_eq!(
            req.rejected().map(|t| t.to_string()).as_deref(),
            Some("$aws/things/t/jobs/$next/get/rejected")
        );
        let get = parse("$aws/things/t/streams/s1/get/cbor").expect("topic");
        assert!(get.is_request());
        assert_eq!(
            get.accepted().map(|t| t.to_string()).as_deref(),
            Some("$aws/things/t/streams/s1/data/cbor")
        );
        assert_eq!(
            get.rejected().map(|t| t.to_string()).as_deref(),
            Some("$aws/things/t/streams/s1/rejected/cbor")
        );
        let describe = parse("$aws/things/t/streams/s1/describe/json").expect("topic");
        assert_eq!(
            describe.accepted().map(|t| t.to_string()).as_deref(),
            Some("$aws/things/t/streams/s1/description/json")
        );
        for not_request in [
            "$aws/things/t/jobs/notify-next",
            "$aws/things/t/jobs/get/accepted",
            "$aws/things/t/streams/s1/data/json",
        ] {
            let topic = parse(not_request).expect("topic");
            assert!(!topic.is_request());
            assert_eq!(topic.accepted(), None);
            assert_eq!(topic.rejected(), None);
        }
        assert_eq!(req.thing(), "t");
        assert_eq!(get.thing(), "t");
    }

    #[test]
    fn thing_of_topic_and_acl_scope() {
        assert_eq!(thing_of_topic("$aws/things/dev:1/jobs/get"), Some("dev:1"));
        assert_eq!(thing_of_topic("$aws/things/dev/"), Some("dev"));
        assert_eq!(thing_of_topic("$aws/things/dev"), None);
        assert_eq!(thing_of_topic("$aws/things//jobs"), None);
        assert_eq!(thing_of_topic("$aws/things/+/jobs/notify"), None);
        assert_eq!(thing_of_topic("$aws/things/#"), None);
        assert_eq!(thing_of_topic("other/things/t/x"), None);

        assert!(is_under_thing("$aws/things/t/jobs/notify-next", "t"));
        assert!(is_under_thing("$aws/things/t/#", "t"));
        assert!(is_under_thing("$aws/things/t/streams/+/data/cbor", "t"));
        assert!(!is_under_thing("$aws/things/t2/jobs/notify", "t"));
        assert!(!is_under_thing("$aws/things/tt/jobs/notify", "t"));
        assert!(!is_under_thing("$aws/things/+/jobs/notify", "t"));
        assert!(!is_under_thing("$aws/things/+/jobs/notify", "+"));
        assert!(!is_under_thing("$aws/things/#", "t"));
        assert!(!is_under_thing("#", "t"));
        assert!(!is_under_thing("+/things/t/jobs/get", "t"));
        assert!(!is_under_thing("$aws/+/t/jobs/get", "t"));
        assert!(!is_under_thing("$aws/things/t", "t"));
        assert!(!is_under_thing("$aws/things/t/jobs/get", ""));
    }

    #[test]
    fn format_and_ops_parse() {
        assert_eq!("json".parse::<Format>(), Ok(Format::Json));
        assert_eq!("cbor".parse::<Format>(), Ok(Format::Cbor));
        assert_eq!("CBOR".parse::<Format>(), Err(()));
        assert_eq!(
            JobsOp::Update { job_id: "j" }.job_id(),
            Some(JobRef::Id("j"))
        );
        assert_eq!(JobsOp::GetPending.job_id(), None);
        assert_eq!(JobRef::Next.as_str(), "$next");
    }
}
