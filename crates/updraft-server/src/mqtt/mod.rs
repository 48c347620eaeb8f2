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
