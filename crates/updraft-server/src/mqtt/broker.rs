//! The embedded MQTT 3.1.1 broker: zero-setup device connectivity inside `updraft serve`.
//!
//! It is built for AWS IoT's device model rather than as a general broker:
//! - a client id is a thing name, and connecting needs the [`Authorizer`]'s consent;
//! - a device may publish and subscribe only under `$aws/things/{its client id}/`
//!   (anything else is refused: SUBACK failure, or disconnection for a publish), so a
//!   message for a thing can only match that thing's own subscriptions — routing is a
//!   map lookup, not a scan of every subscription;
//! - publishes on the reserved jobs/streams topics go to the server ([`Inbound`]), and the
//!   server's answers are delivered to the requesting client whether or not it subscribed,
//!   as AWS IoT does (the FreeRTOS OTA agent relies on it);
//! - QoS 0 and 1 (AWS IoT has no QoS 2), clean sessions, a bounded queue per client.
//!
//! The wire codec is rumqttc's `mqttbytes`, the same one Updraft's clients use.

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, Protocol, QoS};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::{Inbound, MessageBus};

/// Decides whether a client may connect. Gets the client id, the peer address and, on TLS
/// listeners, the verified identity of the client certificate.
pub type Authorizer = Arc<dyn Fn(ConnectRequest) -> BoxFuture<'static, bool> + Send + Sync>;

/// What a connecting client presents.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub client_id: String,
    pub peer: SocketAddr,
    /// SHA-256 (hex) of the client certificate's DER, when the listener verified one.
    pub certificate_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Largest packet accepted or sent (AWS IoT's limit is 128 KiB of payload).
    pub max_packet: usize,
    /// Messages queued for one client before further ones are dropped.
    pub client_queue: usize,
    /// How long a new connection may take to send CONNECT.
    pub connect_timeout: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_packet: 256 * 1024,
            client_queue: 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

enum Outgoing {
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
    },
    /// Another connection took over this client id.
    TakenOver,
}

struct Session {
    conn_id: u64,
    tx: mpsc::Sender<Outgoing>,
    filters: Vec<String>,
}

struct Inner {
    sessions: Mutex<HashMap<String, Session>>,
    inbound: super::Lanes,
    authorize: Authorizer,
    config: BrokerConfig,
    next_conn: AtomicU64,
    dropped: AtomicU64,
}

/// The embedded broker. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// Counters for observability and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerStats {
    pub connected: usize,
    pub dropped: u64,
}

/// `$aws/things/{client}/` — the only namespace a client may use.
fn own_prefix(client_id: &str) -> String {
    format!("$aws/things/{client_id}/")
}

/// A topic name a client may publish to: no wildcards, within AWS IoT's limits.
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 256 && !topic.contains(['+', '#', '\0'])
}

/// A syntactically valid filter: `#` only as the last level, wildcards alone in their level.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > 256 || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// MQTT filter matching (a topic starting with `$` is not matched by a leading wildcard).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" => {
                if t.next().is_none() {
                    return false;
                }
            }
            lit => {
                if t.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    t.next().is_none()
}

/// May `client_id` subscribe to `filter`? Only to filters inside its own namespace.
fn filter_allowed(client_id: &str, filter: &str) -> bool {
    filter
        .strip_prefix(&own_prefix(client_id))
        .is_some_and(|rest| !rest.is_empty())
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] mqttbytes::Error),
    #[error("{0}")]
    Refused(&'static str),
}

impl Broker {
    /// A broker that hands device requests to `inbound` (a channel, or lanes).
    pub fn new(
        config: BrokerConfig,
        authorize: Authorizer,
        inbound: impl Into<super::Lanes>,
    ) -> Self {
        Broker {
            inner: Arc::new(Inner {
                sessions: Mutex::new(HashMap::new()),
                inbound: inbound.into(),
                authorize,
                config,
                next_conn: AtomicU64::new(1),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    pub fn stats(&self) -> BrokerStats {
        BrokerStats {
            connected: self.inner.sessions.lock().map(|s| s.len()).unwrap_or(0),
            dropped: self.inner.dropped.load(Ordering::Relaxed),
        }
    }

    /// Accepts plain-TCP connections until the listener fails.
    pub async fn serve_tcp(self, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let broker = self.clone();
                    tokio::spawn(async move { broker.serve_connection(stream, peer, None).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Serves one established connection (plain or TLS) until it ends.
    pub async fn serve_connection<S>(
        &self,
        stream: S,
        peer: SocketAddr,
        certificate_id: Option<String>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn_id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        match self
            .run_connection(stream, peer, certificate_id, conn_id)
            .await
        {
            Ok(client) => tracing::debug!(%peer, client, "MQTT client disconnected"),
            Err((client, e)) => {
                tracing::debug!(%peer, client, error = %e, "MQTT connection closed")
            }
        }
    }

    fn enqueue(&self, client_id: &str, message: Outgoing) -> bool {
        let tx = match self.inner.sessions.lock() {
            Ok(s) => s.get(client_id).map(|s| s.tx.clone()),
            Err(_) => None,
        };
        match tx {
            Some(tx) => {
                if tx.try_send(message).is_ok() {
                    true
                } else {
                    self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                    false
                }
            }
            None => false,
        }
    }

    async fn run_connection<S>(
        &self,
        stream: S,
        peer: SocketAddr,
        certificate_id: Option<String>,
        conn_id: u64,
    ) -> Result<String, (String, ConnError)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let max = self.inner.config.max_packet;
        let mut buf = BytesMut::with_capacity(4096);
        let unnamed = |e: ConnError| (String::new(), e);

        // CONNECT, within the connect timeout.
        let connect = tokio::time::timeout(self.inner.config.connect_timeout, async {
            loop {
                match Packet::read(&mut buf, max) {
                    Ok(p) => return Ok(p),
                    Err(mqttbytes::Error::InsufficientBytes(_)) => {
                        if reader.read_buf(&mut buf).await? == 0 {
                            return Err(ConnError::Refused("closed before CONNECT"));
                        }
                    }
                    Err(e) => return Err(ConnError::Protocol(e)),
                }
            }
        })
        .await
        .map_err(|_| unnamed(ConnError::Refused("no CONNECT in time")))?
        .map_err(unnamed)?;
        let Packet::Connect(connect) = connect else {
            return Err(unnamed(ConnError::Refused("first packet was not CONNECT")));
        };
        let client_id = connect.client_id.clone();
        let code = if connect.protocol != Protocol::V4 {
            ConnectReturnCode::RefusedProtocolVersion
        } else if !updraft_protocol::ids::is_topic_safe(&client_id) {
            ConnectReturnCode::BadClientId
        } else if !(self.inner.authorize)(ConnectRequest {
            client_id: client_id.clone(),
            peer,
            certificate_id,
        })
        .await
        {
            ConnectReturnCode::NotAuthorized
        } else {
            ConnectReturnCode::Success
        };
        if code != ConnectReturnCode::Success {
            let mut out = BytesMut::new();
            let _ = ConnAck::new(code, false).write(&mut out);
            let _ = writer_write(&mut writer, &out).await;
            return Err((client_id, ConnError::Refused("connection refused")));
        }

        let (tx, mut rx) = mpsc::channel(self.inner.config.client_queue);
        let previous = match self.inner.sessions.lock() {
            Ok(mut s) => s.insert(
                client_id.clone(),
                Session {
                    conn_id,
                    tx,
                    filters: Vec::new(),
                },
            ),
            Err(_) => None,
        };
        if let Some(old) = previous {
            let _ = old.tx.try_send(Outgoing::TakenOver);
        }
        let result = self
            .session_loop(
                &client_id,
                connect.keep_alive,
                &mut reader,
                &mut writer,
                &mut rx,
                buf,
            )
            .await;
        if let Ok(mut s) = self.inner.sessions.lock()
            && s.get(&client_id).is_some_and(|s| s.conn_id == conn_id)
        {
            s.remove(&client_id);
        }
        let _ = writer.shutdown().await;
        result
            .map(|()| client_id.clone())
            .map_err(|e| (client_id, e))
    }

    async fn session_loop<R, W>(
        &self,
        client_id: &str,
        keep_alive: u16,
        reader: &mut R,
        writer: &mut W,
        rx: &mut mpsc::Receiver<Outgoing>,
        mut buf: BytesMut,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max = self.inner.config.max_packet;
        let prefix = own_prefix(client_id);
        let mut out = BytesMut::with_capacity(4096);
        ConnAck::new(ConnectReturnCode::Success, false).write(&mut out)?;
        writer_write(writer, &out).await?;
        out.clear();
        // MQTT: the server disconnects after 1.5 keep-alive periods of silence.
        let idle = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        // Only what the client sends keeps it alive; messages sent to it do not.
        let mut heard = tokio::time::Instant::now();
        let mut next_pkid: u16 = 0;
        loop {
            // Handle every complete packet already buffered.
            loop {
                match Packet::read(&mut buf, max) {
                    Ok(packet) => {
                        if !self
                            .handle_packet(client_id, &prefix, packet, &mut out)
                            .await?
                        {
                            writer_write(writer, &out).await?;
                            return Ok(());
                        }
                    }
                    Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            if !out.is_empty() {
                writer_write(writer, &out).await?;
                out.clear();
            }
            let read = async {
                match idle {
                    Some(d) => tokio::time::timeout_at(heard + d, reader.read_buf(&mut buf))
                        .await
                        .map_err(|_| ConnError::Refused("keep-alive expired"))?
                        .map_err(ConnError::from),
                    None => reader.read_buf(&mut buf).await.map_err(ConnError::from),
                }
            };
            tokio::select! {
                n = read => {
                    heard = tokio::time::Instant::now();
                    if n? == 0 {
                        return Ok(());
                    }
                }
                msg = rx.recv() => {
                    let mut msg = msg;
                    // Write everything queued, then flush once.
                    while let Some(m) = msg {
                        match m {
                            Outgoing::Publish { topic, payload, qos } => {
                                let mut p = Publish::from_bytes(topic, qos, payload);
                                if qos != QoS::AtMostOnce {
                                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                                    p.pkid = next_pkid;
                                }
                                if Packet::Publish(p).write(&mut out, max).is_err() {
                                    self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Outgoing::TakenOver => {
                                writer_write(writer, &out).await?;
                                return Err(ConnError::Refused("client id taken over by a new connection"));
                            }
                        }
                        if out.len() > 64 * 1024 {
                            break;
                        }
                        msg = rx.try_recv().ok();
                    }
                    writer_write(writer, &out).await?;
                    out.clear();
                }
            }
        }
    }

    /// Handles one packet; `Ok(false)` ends the session cleanly.
    async fn handle_packet(
        &self,
        client_id: &str,
        prefix: &str,
        packet: Packet,
        out: &mut BytesMut,
    ) -> Result<bool, ConnError> {
        match packet {
            Packet::Publish(p) => {
                if p.qos == QoS::ExactlyOnce {
                    return Err(ConnError::Refused("QoS 2 is not supported"));
                }
                if !valid_topic(&p.topic) || !p.topic.starts_with(prefix) {
                    // AWS IoT disconnects a client that publishes where it may not.
                    return Err(ConnError::Refused(
                        "publish outside the client's own topics",
                    ));
                }
                let rest = &p.topic[prefix.len()..];
                if rest.starts_with("jobs/") || rest.starts_with("streams/") {
                    let msg = Inbound {
                        client_id: client_id.to_owned(),
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                    };
                    // Back-pressure: a busy server slows this device's reads, not others'.
                    if self.inner.inbound.send(msg).await.is_err() {
                        return Err(ConnError::Refused("server is shutting down"));
                    }
                } else {
                    self.route(&p.topic, p.payload.clone(), QoS::AtMostOnce);
                }
                if p.qos == QoS::AtLeastOnce {
                    PubAck::new(p.pkid).write(out)?;
                }
            }
            Packet::Subscribe(s) => {
                let mut codes = Vec::with_capacity(s.filters.len());
                let mut granted = Vec::new();
                for f in &s.filters {
                    if valid_filter(&f.path) && filter_allowed(client_id, &f.path) {
                        let qos = if f.qos == QoS::AtMostOnce {
                            QoS::AtMostOnce
                        } else {
                            QoS::AtLeastOnce
                        };
                        codes.push(SubscribeReasonCode::Success(qos));
                        granted.push(f.path.clone());
                    } else {
                        codes.push(SubscribeReasonCode::Failure);
                    }
                }
                if let Ok(mut sessions) = self.inner.sessions.lock()
                    && let Some(sess) = sessions.get_mut(client_id)
                {
                    for g in granted {
                        if !sess.filters.contains(&g) {
                            sess.filters.push(g);
                        }
                    }
                }
                SubAck::new(s.pkid, codes).write(out)?;
            }
            Packet::Unsubscribe(u) => {
                if let Ok(mut sessions) = self.inner.sessions.lock()
                    && let Some(sess) = sessions.get_mut(client_id)
                {
                    sess.filters.retain(|f| !u.topics.contains(f));
                }
                UnsubAck::new(u.pkid).write(out)?;
            }
            Packet::PingReq => {
                Packet::PingResp.write(out, self.inner.config.max_packet)?;
            }
            Packet::Disconnect => return Ok(false),
            Packet::PubAck(_) => {}
            Packet::Connect(_) => return Err(ConnError::Refused("second CONNECT")),
            _ => return Err(ConnError::Refused("unexpected packet")),
        }
        Ok(true)
    }

    /// Delivers to the subscribers of `topic`. Only the thing named in an
    /// `$aws/things/{thing}/` topic can have subscribed to it.
    /// The queue of the session subscribed to `topic`, if any (a topic belongs to one
    /// thing, and only that thing may subscribe to it).
    fn subscriber(&self, topic: &str) -> Option<mpsc::Sender<Outgoing>> {
        let thing = updraft_protocol::topics::thing_of_topic(topic)?;
        let sessions = self.inner.sessions.lock().ok()?;
        sessions
            .get(thing)
            .filter(|s| s.filters.iter().any(|f| filter_matches(f, topic)))
            .map(|s| s.tx.clone())
    }

    fn route(&self, topic: &str, payload: Bytes, qos: QoS) {
        if let Some(tx) = self.subscriber(topic)
            && tx
                .try_send(Outgoing::Publish {
                    topic: topic.to_owned(),
                    payload,
                    qos,
                })
                .is_err()
        {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn writer_write<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> Result<(), std::io::Error> {
    if bytes.is_empty() {
        return Ok(());
    }
    w.write_all(bytes).await?;
    w.flush().await
}

impl MessageBus for Broker {
    fn send_to(&self, client_id: &str, topic: String, payload: Bytes) {
        self.enqueue(
            client_id,
            Outgoing::Publish {
                topic,
                payload,
                qos: QoS::AtMostOnce,
            },
        );
    }

    fn publish(&self, topic: String, payload: Bytes) {
        self.route(&topic, payload, QoS::AtLeastOnce);
    }

    fn has_subscribers(&self, topic: &str) -> bool {
        self.subscriber(topic).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert!(filter_matches(
            "$aws/things/d1/jobs/#",
            "$aws/things/d1/jobs/notify"
        ));
        assert!(filter_matches(
            "$aws/things/d1/jobs/+/get/accepted",
            "$aws/things/d1/jobs/$next/get/accepted"
        ));
        assert!(!filter_matches(
            "$aws/things/d1/jobs/+",
            "$aws/things/d1/jobs/a/b"
        ));
        assert!(!filter_matches("#", "$aws/things/d1/jobs/notify"));
        assert!(filter_matches("a/#", "a"));
        assert!(valid_filter("$aws/things/d1/#"));
        assert!(!valid_filter("$aws/things/d1/#/x"));
        assert!(!valid_filter("a/b+"));
        assert!(filter_allowed("d1", "$aws/things/d1/jobs/notify-next"));
        assert!(!filter_allowed("d1", "$aws/things/d2/jobs/notify-next"));
        assert!(!filter_allowed("d1", "$aws/things/+/jobs/notify-next"));
        assert!(!filter_allowed("d1", "#"));
        assert!(!filter_allowed("d1", "$aws/things/d1/"));
        assert!(!valid_topic("$aws/things/d1/+"));
    }
}
