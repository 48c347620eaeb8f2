//! The agent's MQTT side, designed to share the application's connection.
//!
//! Outbound, the agent needs three non-blocking operations — publish, subscribe,
//! unsubscribe — given to it as a [`MqttClient`] (implemented for rumqttc's [`AsyncClient`],
//! or wrap any function with [`FnClient`]). Inbound, the application hands every publish it
//! receives to [`crate::AgentHandle::incoming`], which takes the agent's messages ([`classify`])
//! and leaves the rest to the application. [`run_event_loop`] does that for an rumqttc
//! event loop the agent does not share.
//!
//! The agent subscribes to exactly what it uses (also needed behind generic brokers,
//! which do not deliver answers implicitly the way AWS IoT and Updraft's broker do):
//! `jobs/notify-next`, `jobs/$next/get/accepted|rejected`, and while downloading
//! `streams/{s}/data/{fmt}` and `streams/{s}/rejected/{fmt}`.

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS};
use std::time::Duration;

use updraft_protocol::topics::{DeviceTopic, Format, JobRef, JobsOp, JobsTopic, Outcome, StreamOp};

use crate::error::{Error, MqttError};

/// MQTT delivery guarantee of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

/// What the agent needs from an MQTT connection. Calls must not block: queue the request
/// and return (rumqttc's `try_*`); a full queue is an error the agent retries later.
pub trait MqttClient: Send {
    fn publish(&mut self, topic: &str, payload: Vec<u8>, qos: Qos) -> Result<(), Error>;
    fn subscribe(&mut self, filter: &str, qos: Qos) -> Result<(), Error>;
    fn unsubscribe(&mut self, filter: &str) -> Result<(), Error>;
}

fn rumqttc_qos(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
    }
}

impl MqttClient for AsyncClient {
    fn publish(&mut self, topic: &str, payload: Vec<u8>, qos: Qos) -> Result<(), Error> {
        self.try_publish(topic, rumqttc_qos(qos), false, payload)
            .map_err(|e| Error::mqtt(MqttError::PublishFailed, format!("{topic}: {e}")))
    }

    fn subscribe(&mut self, filter: &str, qos: Qos) -> Result<(), Error> {
        self.try_subscribe(filter, rumqttc_qos(qos))
            .map_err(|e| Error::mqtt(MqttError::SubscribeFailed, format!("{filter}: {e}")))
    }

    fn unsubscribe(&mut self, filter: &str) -> Result<(), Error> {
        self.try_unsubscribe(filter)
            .map_err(|e| Error::mqtt(MqttError::UnsubscribeFailed, format!("{filter}: {e}")))
    }
}

/// One outbound operation, for [`FnClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Publish {
        topic: &'a str,
        payload: Vec<u8>,
        qos: Qos,
    },
    Subscribe {
        filter: &'a str,
        qos: Qos,
    },
    Unsubscribe {
        filter: &'a str,
    },
}

/// Any function as the agent's MQTT client: the application's own connection, a test
/// recorder, ...
pub struct FnClient<F>(pub F);

impl<F> MqttClient for FnClient<F>
where
    F: FnMut(Request<'_>) -> Result<(), String> + Send,
{
    fn publish(&mut self, topic: &str, payload: Vec<u8>, qos: Qos) -> Result<(), Error> {
        (self.0)(Request::Publish {
            topic,
            payload,
            qos,
        })
        .map_err(|e| Error::mqtt(MqttError::PublishFailed, e))
    }

    fn subscribe(&mut self, filter: &str, qos: Qos) -> Result<(), Error> {
        (self.0)(Request::Subscribe { filter, qos })
            .map_err(|e| Error::mqtt(MqttError::SubscribeFailed, e))
    }

    fn unsubscribe(&mut self, filter: &str) -> Result<(), Error> {
        (self.0)(Request::Unsubscribe { filter })
            .map_err(|e| Error::mqtt(MqttError::UnsubscribeFailed, e))
    }
}

/// An inbound message the agent cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// `$next/get/accepted` or `notify-next`.
    JobDocument,
    /// `$next/get/rejected`: logged (the C agent ignores it too).
    JobRejected,
    /// A block on `streams/{s}/data/{fmt}`.
    FileBlock { stream: String, format: Format },
    /// An error on `streams/{s}/rejected/{fmt}`.
    StreamRejected { stream: String, format: Format },
    /// Another jobs topic of this thing (update answers, `notify`): not for the agent.
    OtherJobs,
}

/// What an inbound topic means to the agent of `thing`; `None` for topics that are not
/// this thing's jobs or streams topics.
pub fn classify(thing: &str, topic: &str) -> Option<Inbound> {
    let parsed = DeviceTopic::parse(topic).ok()?;
    if parsed.thing() != thing {
        return None;
    }
    Some(match parsed {
        DeviceTopic::Jobs {
            topic: JobsTopic::NotifyNext,
            ..
        } => Inbound::JobDocument,
        DeviceTopic::Jobs {
            topic:
                JobsTopic::Reply {
                    op: JobsOp::Describe { job_id },
                    outcome,
                },
            ..
        } => match (job_id, outcome) {
            // Only the answer to the agent's own request: an application sharing the
            // connection may describe its own jobs.
            (JobRef::Next, Outcome::Accepted) => Inbound::JobDocument,
            (JobRef::Next, Outcome::Rejected) => Inbound::JobRejected,
            (JobRef::Id(_), _) => Inbound::OtherJobs,
        },
        DeviceTopic::Jobs { .. } => Inbound::OtherJobs,
        DeviceTopic::Stream {
            stream_id,
            op: StreamOp::Data,
            format,
            ..
        } => Inbound::FileBlock {
            stream: stream_id.to_owned(),
            format,
        },
        DeviceTopic::Stream {
            stream_id,
            op: StreamOp::Rejected,
            format,
            ..
        } => Inbound::StreamRejected {
            stream: stream_id.to_owned(),
            format,
        },
        DeviceTopic::Stream { .. } => return None,
    })
}

/// Drives an rumqttc event loop for the agent: every publish goes to
/// [`crate::AgentHandle::incoming`] and, if the agent does not take it, to `other`. A lost
/// connection suspends the agent; the next CONNACK resumes it (which re-subscribes, asks
/// for the job again and continues the transfer where it stopped). Returns when the agent
/// has stopped.
pub async fn run_event_loop(
    mut eventloop: EventLoop,
    handle: crate::AgentHandle,
    mut other: impl FnMut(&Publish) + Send,
) {
    let mut connected_once = false;
    let mut suspended = false;
    // Reconnection backoff: 1 s, doubling to a minute, back to 1 s once connected. It also
    // paces the warnings, so a long outage does not fill a small log partition.
    let mut backoff = RECONNECT_MIN;
    loop {
        let event = tokio::select! {
            () = handle.stopped() => return,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if !handle.incoming_bytes(&p.topic, p.payload.clone()) {
                    other(&p);
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if connected_once && suspended {
                    let _ = handle.resume();
                }
                connected_once = true;
                suspended = false;
                backoff = RECONNECT_MIN;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("MQTT connection: {e} (retrying in {} s)", backoff.as_secs());
                if connected_once && !suspended {
                    let _ = handle.suspend();
                    suspended = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
        }
    }
}

const RECONNECT_MIN: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(60);

/// The topics the agent uses.
pub(crate) mod topic {
    use super::Format;

    pub fn notify_next(thing: &str) -> String {
        format!("$aws/things/{thing}/jobs/notify-next")
    }
    pub fn next_get(thing: &str) -> String {
        format!("$aws/things/{thing}/jobs/$next/get")
    }
    pub fn next_get_accepted(thing: &str) -> String {
        format!("$aws/things/{thing}/jobs/$next/get/accepted")
    }
    pub fn next_get_rejected(thing: &str) -> String {
        format!("$aws/things/{thing}/jobs/$next/get/rejected")
    }
    pub fn update(thing: &str, job: &str) -> String {
        format!("$aws/things/{thing}/jobs/{job}/update")
    }
    pub fn stream(thing: &str, stream: &str, op: &str, format: Format) -> String {
        format!("$aws/things/{thing}/streams/{stream}/{op}/{format}")
    }
}

/// A cheap owned payload.
pub type Payload = Bytes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_topics() {
        let t = "dev-1";
        assert_eq!(
            classify(t, "$aws/things/dev-1/jobs/notify-next"),
            Some(Inbound::JobDocument)
        );
        assert_eq!(
            classify(t, "$aws/things/dev-1/jobs/$next/get/accepted"),
            Some(Inbound::JobDocument)
        );
        assert_eq!(
            classify(t, "$aws/things/dev-1/jobs/AFR_OTA-x/get/accepted"),
            Some(Inbound::OtherJobs)
        );
        assert_eq!(
            classify(t, "$aws/things/dev-1/jobs/$next/get/rejected"),
            Some(Inbound::JobRejected)
        );
        assert_eq!(
            classify(t, "$aws/things/dev-1/jobs/AFR_OTA-x/update/accepted"),
            Some(Inbound::OtherJobs)
        );
        assert_eq!(
            classify(t, "$aws/things/dev-1/jobs/notify"),
            Some(Inbound::OtherJobs)
        );
        assert_eq!(
            classify(t, "$aws/things/dev-1/streams/AFR_OTA-s/data/cbor"),
            Some(Inbound::FileBlock {
                stream: "AFR_OTA-s".into(),
                format: Format::Cbor
            })
        );
        assert_eq!(
            classify(t, "$aws/things/dev-1/streams/AFR_OTA-s/rejected/json"),
            Some(Inbound::StreamRejected {
                stream: "AFR_OTA-s".into(),
                format: Format::Json
            })
        );
        assert_eq!(
            classify(t, "$aws/things/dev-1/streams/AFR_OTA-s/description/cbor"),
            None
        );
        assert_eq!(classify(t, "$aws/things/dev-2/jobs/notify-next"), None);
        assert_eq!(classify(t, "app/telemetry"), None);
        assert_eq!(classify(t, "$aws/things/dev-1/shadow/update"), None);
    }

    #[test]
    fn fn_client_maps_errors() {
        let mut log = Vec::new();
        {
            let mut c = FnClient(|r: Request<'_>| {
                log.push(format!("{r:?}"));
                if matches!(r, Request::Unsubscribe { .. }) {
                    Err("no".into())
                } else {
                    Ok(())
                }
            });
            assert!(c.publish("a", vec![1], Qos::AtMostOnce).is_ok());
            assert!(c.subscribe("b", Qos::AtLeastOnce).is_ok());
            let e = c.unsubscribe("c").expect_err("unsubscribe");
            assert!(matches!(
                e,
                Error::Mqtt {
                    code: MqttError::UnsubscribeFailed,
                    ..
                }
            ));
        }
        assert_eq!(log.len(), 3);
    }
}
