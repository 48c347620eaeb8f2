//! Device messaging: the MQTT side of Updraft.
//!
//! [`MessageBus`] is how the server talks to devices; it has two implementations:
//! the embedded [`broker::Broker`] (zero setup, the default) and [`external::ExternalBus`],
//! a client of an external broker such as Mosquitto. Device requests reach the server as
//! [`Inbound`] messages either way.

pub mod broker;
pub mod external;

use bytes::Bytes;

/// A device's publish on one of its reserved jobs/streams topics.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The MQTT client id, which is the thing name.
    pub client_id: String,
    pub topic: String,
    pub payload: Bytes,
}

/// Where device requests go: one of several queues, chosen by client id, so that one
/// device's requests are handled in order and different devices' in parallel. The broker
/// (or the external broker's client) hands each request straight to its device's queue;
/// a full queue slows only the devices whose requests go there.
#[derive(Clone)]
pub struct Lanes(std::sync::Arc<[tokio::sync::mpsc::Sender<Inbound>]>);

/// The server no longer takes device requests.
#[derive(Debug)]
pub struct LanesClosed;

impl Lanes {
    /// `count` lanes (at least one) of `capacity` requests each, and their receiving ends.
    pub fn new(
        count: usize,
        capacity: usize,
    ) -> (Lanes, Vec<tokio::sync::mpsc::Receiver<Inbound>>) {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..count.max(1))
            .map(|_| tokio::sync::mpsc::channel(capacity))
            .unzip();
        (Lanes(senders.into()), receivers)
    }

    /// Hands `msg` to its device's lane, waiting while that lane is full.
    pub async fn send(&self, msg: Inbound) -> Result<(), LanesClosed> {
        use std::hash::{Hash, Hasher};
        let lane = if self.0.len() == 1 {
            0
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            msg.client_id.hash(&mut h);
            usize::try_from(h.finish() % self.0.len() as u64).unwrap_or(0)
        };
        match self.0.get(lane) {
            Some(tx) => tx.send(msg).await.map_err(|_| LanesClosed),
            None => Err(LanesClosed),
        }
    }

    /// Whether every lane's receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.0.iter().all(|tx| tx.is_closed())
    }
}

/// One lane: every request goes to `tx`.
impl From<tokio::sync::mpsc::Sender<Inbound>> for Lanes {
    fn from(tx: tokio::sync::mpsc::Sender<Inbound>) -> Self {
        Lanes(std::sync::Arc::from([tx]))
    }
}

/// Sends messages to devices.
pub trait MessageBus: Send + Sync + 'static {
    /// Delivers a response to the client that asked, whether or not it subscribed (AWS IoT
    /// delivers `.../accepted` and `.../rejected` this way). On an external broker this is an
    /// ordinary publish: the device must subscribe to its responses.
    fn send_to(&self, client_id: &str, topic: String, payload: Bytes);
    /// Publishes to whoever subscribed (notifications).
    fn publish(&self, topic: String, payload: Bytes);
    /// Whether a [`MessageBus::publish`] on `topic` could reach anyone, so a notification
    /// nobody listens for need not be built. An external broker cannot tell: always true.
    fn has_subscribers(&self, _topic: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod lane_tests {
    use super::*;

    fn request(client: &str, n: u8) -> Inbound {
        Inbound {
            client_id: client.to_owned(),
            topic: format!("$aws/things/{client}/jobs/get"),
            payload: Bytes::from(vec![n]),
        }
    }

    #[tokio::test]
    async fn a_devices_requests_keep_their_lane_and_order_and_devices_spread() {
        let (lanes, mut receivers) = Lanes::new(8, 64);
        assert_eq!(receivers.len(), 8);
        let clients: Vec<String> = (0..32).map(|i| format!("thing-{i}")).collect();
        for n in 0..3 {
            for c in &clients {
                lanes.send(request(c, n)).await.expect("open");
            }
        }
        let mut lane_of = std::collections::HashMap::new();
        for (i, rx) in receivers.iter_mut().enumerate() {
            let mut next = std::collections::HashMap::<String, u8>::new();
            while let Ok(m) = rx.try_recv() {
                assert_eq!(*lane_of.entry(m.client_id.clone()).or_insert(i), i);
                let expected = next.entry(m.client_id.clone()).or_insert(0);
                assert_eq!(
                    m.payload.as_ref(),
                    [*expected],
                    "{} out of order",
                    m.client_id
                );
                *expected += 1;
            }
        }
        assert_eq!(lane_of.len(), clients.len(), "every request arrived");
        let used: std::collections::HashSet<_> = lane_of.values().collect();
        assert!(used.len() > 1, "32 devices all in one lane");
        assert!(!lanes.is_closed());
        drop(receivers);
        assert!(lanes.is_closed());
        assert!(lanes.send(request("thing-0", 9)).await.is_err());
    }

    #[tokio::test]
    async fn a_channel_is_one_lane() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let lanes = Lanes::from(tx);
        lanes.send(request("a", 1)).await.expect("open");
        lanes.send(request("b", 2)).await.expect("open");
        let got: Vec<String> = [rx.recv().await, rx.recv().await]
            .into_iter()
            .flatten()
            .map(|m| m.client_id)
            .collect();
        assert_eq!(got, ["a", "b"]);
    }
}
