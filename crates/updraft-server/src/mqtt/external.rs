//! [`MessageBus`] over an external MQTT broker (Mosquitto, EMQX, ...).
//!
//! Updraft connects as one client and subscribes to every device's reserved request topics.
//! With several Updraft replicas on one broker, set a shared-subscription group
//! (`UPDRAFT_BROKER_SHARED_GROUP`) so each request is handled once: the filters then become
//! `$share/<group>/...`. Mosquitto 2.0 does not match shared subscriptions against topics that
//! start with `$` (verified with 2.0.11), so on Mosquitto run one replica, or use a broker
//! whose shared subscriptions cover `$aws/...` (EMQX). Topic isolation between devices is the
//! broker's job: `docs/mosquitto.md` has the ACL that gives each device only its own
//! `$aws/things/{id}/`.

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::time::Duration;
use tokio::sync::mpsc;

use super::{Inbound, MessageBus};

/// The request topics the server consumes.
pub const REQUEST_FILTERS: [&str; 2] = ["$aws/things/+/jobs/#", "$aws/things/+/streams/#"];

#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("broker URL '{0}': use mqtt://HOST:PORT")]
    Url(String),
}

/// A client of an external broker.
#[derive(Clone)]
pub struct ExternalBus {
    client: AsyncClient,
}

impl ExternalBus {
    /// Connects to `mqtt://host:port` and forwards device requests to `inbound`.
    /// `username`/`password` are the server's credentials on that broker.
    pub fn connect(
        url: &str,
        username: Option<String>,
        password: Option<String>,
        shared_group: Option<String>,
        inbound: mpsc::Sender<Inbound>,
    ) -> Result<Self, ExternalError> {
        let rest = url
            .strip_prefix("mqtt://")
            .ok_or_else(|| ExternalError::Url(url.to_owned()))?;
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_owned(), p)))
            .ok_or_else(|| ExternalError::Url(url.to_owned()))?;
        let mut opts = MqttOptions::new(
            format!("updraft-{}", uuid::Uuid::new_v4().simple()),
            host,
            port,
        );
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(256 * 1024, 256 * 1024);
        opts.set_clean_session(true);
        if let Some(u) = username {
            opts.set_credentials(u, password.unwrap_or_default());
        }
        let (client, eventloop) = AsyncClient::new(opts, 4096);
        tokio::spawn(run(client.clone(), eventloop, shared_group, inbound));
        Ok(ExternalBus { client })
    }
}

/// Drives the connection: (re)subscribes after every CONNACK and forwards requests.
async fn run(
    client: AsyncClient,
    mut eventloop: EventLoop,
    shared_group: Option<String>,
    inbound: mpsc::Sender<Inbound>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("connected to the external MQTT broker");
                for f in REQUEST_FILTERS {
                    let filter = match &shared_group {
                        Some(g) => format!("$share/{g}/{f}"),
                        None => f.to_owned(),
                    };
                    if let Err(e) = client.subscribe(filter, QoS::AtLeastOnce).await {
                        tracing::error!(error = %e, "cannot subscribe on the external broker");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some(thing) = p
                    .topic
                    .strip_prefix("$aws/things/")
                    .and_then(|r| r.split('/').next())
                    .map(str::to_owned)
                else {
                    continue;
                };
                if !is_request_topic(&p.topic) {
                    continue;
                }
                let msg = Inbound {
                    client_id: thing,
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                };
                if inbound.send(msg).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "external MQTT broker connection lost; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Device requests (jobs get/start-next/describe/update, stream get/describe); the
/// server's own replies and notifications, which the shared subscription also matches,
/// are not.
pub fn is_request_topic(topic: &str) -> bool {
    use updraft_protocol::topics::{DeviceTopic, Namespace, TopicError};
    match DeviceTopic::parse(topic) {
        Ok(t) => t.is_request(),
        // Answered with InvalidTopic, unless it is itself an answer.
        Err(TopicError::InvalidTopic {
            namespace: Namespace::Jobs,
            ..
        }) => !(topic.ends_with("/accepted") || topic.ends_with("/rejected")),
        Err(_) => false,
    }
}

impl MessageBus for ExternalBus {
    fn send_to(&self, _client_id: &str, topic: String, payload: Bytes) {
        if self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, payload)
            .is_err()
        {
            tracing::warn!("external MQTT publish queue is full; a response was dropped");
        }
    }

    fn publish(&self, topic: String, payload: Bytes) {
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .is_err()
        {
            tracing::warn!("external MQTT publish queue is full; a notification was dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_topics() {
        use super::is_request_topic as r;
        assert!(r("$aws/things/d/jobs/get"));
        assert!(r("$aws/things/d/jobs/start-next"));
        assert!(r("$aws/things/d/jobs/$next/get"));
        assert!(r("$aws/things/d/jobs/j1/update"));
        assert!(r("$aws/things/d/streams/s/get/cbor"));
        assert!(!r("$aws/things/d/jobs/get/accepted"));
        assert!(!r("$aws/things/d/jobs/notify-next"));
        assert!(!r("$aws/things/d/jobs/j1/update/rejected"));
        assert!(!r("$aws/things/d/streams/s/data/cbor"));
    }
}
