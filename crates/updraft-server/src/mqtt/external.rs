//! [`MessageBus`] over an external MQTT broker (Mosquitto, EMQX, ...).
//!
//! Updraft connects as one MQTT 3.1.1 client (plain TCP, or TLS with an optional client
//! certificate) and subscribes to every device's reserved request topics. With several
//! Updraft replicas on one broker, set a shared-subscription group
//! (`UPDRAFT_BROKER_SHARED_GROUP`) so each request is handled once: the filters then become
//! `$share/<group>/...`. Mosquitto 2.0 does not match shared subscriptions against topics that
//! start with `$` (verified with 2.0.11), so on Mosquitto run one replica, or use a broker
//! whose shared subscriptions cover `$aws/...` (EMQX). Topic isolation between devices is the
//! broker's job: `docs/mosquitto.md` has the ACL that gives each device only its own
//! `$aws/things/{id}/`.
//!
//! The client is Updraft's own (on rumqttc's codec, like the embedded broker) so that TLS
//! goes through the same rustls/aws-lc-rs stack as everything else.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Packet, Publish, Subscribe, SubscribeFilter,
};
use rumqttc::mqttbytes::{self, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{Inbound, MessageBus};

/// The request topics the server consumes.
pub const REQUEST_FILTERS: [&str; 2] = ["$aws/things/+/jobs/#", "$aws/things/+/streams/#"];

/// Largest packet exchanged with the broker.
const MAX_PACKET: usize = 256 * 1024;
/// Messages waiting to go to the broker before further ones are dropped.
const OUTGOING_QUEUE: usize = 8192;
const KEEP_ALIVE_SECONDS: u16 = 30;

#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error(
        "broker URL '{0}': use mqtt://HOST:PORT or mqtts://HOST:PORT?ca=CA.pem&cert=CLIENT.pem&key=CLIENT.key"
    )]
    Url(String),
    #[error("broker TLS: {0}")]
    Tls(String),
}

/// Where and how to reach the broker.
#[derive(Debug, Clone)]
pub struct BrokerTarget {
    pub host: String,
    pub port: u16,
    /// TLS settings, for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub shared_group: Option<String>,
}

fn load_tls(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<rustls::ClientConfig, ExternalError> {
    let tls_err = |e: String| ExternalError::Tls(e);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = ca.ok_or_else(|| {
        tls_err("mqtts:// needs ca=FILE, the CA that signed the broker's certificate".into())
    })?;
    for c in
        CertificateDer::pem_file_iter(&ca).map_err(|e| tls_err(format!("{}: {e}", ca.display())))?
    {
        let c = c.map_err(|e| tls_err(format!("{}: {e}", ca.display())))?;
        roots
            .add(c)
            .map_err(|e| tls_err(format!("{}: {e}", ca.display())))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .with_root_certificates(roots);
    match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(&cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| tls_err(format!("{}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .map_err(|e| tls_err(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls_err(e.to_string()))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(tls_err("give both cert= and key=, or neither".into())),
    }
}

impl BrokerTarget {
    /// Parses `mqtt://host:port` or `mqtts://host:port?ca=..&cert=..&key=..`.
    pub fn parse(
        url: &str,
        username: Option<String>,
        password: Option<String>,
        shared_group: Option<String>,
    ) -> Result<Self, ExternalError> {
        let bad = || ExternalError::Url(url.to_owned());
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(bad());
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (host, port) = authority
            .trim_end_matches('/')
            .rsplit_once(':')
            .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_owned(), p)))
            .ok_or_else(bad)?;
        let (mut ca, mut cert, mut key) = (None, None, None);
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let path = Some(PathBuf::from(v.as_ref()));
            match k.as_ref() {
                "ca" => ca = path,
                "cert" => cert = path,
                "key" => key = path,
                _ => return Err(bad()),
            }
        }
        let tls = if tls {
            Some(Arc::new(load_tls(ca, cert, key)?))
        } else if ca.is_some() || cert.is_some() || key.is_some() {
            return Err(ExternalError::Tls(
                "ca/cert/key need an mqtts:// URL".into(),
            ));
        } else {
            None
        };
        Ok(BrokerTarget {
            host,
            port,
            tls,
            username,
            password,
            shared_group,
        })
    }
}

/// A client of an external broker.
#[derive(Clone)]
pub struct ExternalBus {
    tx: mpsc::Sender<Publish>,
}

impl ExternalBus {
    /// Connects (and keeps reconnecting) to the broker, forwarding device requests to `inbound`.
    pub fn connect(target: BrokerTarget, inbound: impl Into<super::Lanes>) -> Self {
        let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
        tokio::spawn(run(target, rx, inbound.into()));
        ExternalBus { tx }
    }

    fn send(&self, topic: String, payload: Bytes, qos: QoS) {
        if self
            .tx
            .try_send(Publish::from_bytes(topic, qos, payload))
            .is_err()
        {
            tracing::warn!("the external broker's outgoing queue is full; a message was dropped");
        }
    }
}

impl MessageBus for ExternalBus {
    fn send_to(&self, _client_id: &str, topic: String, payload: Bytes) {
        self.send(topic, payload, QoS::AtMostOnce);
    }

    fn publish(&self, topic: String, payload: Bytes) {
        self.send(topic, payload, QoS::AtLeastOnce);
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] mqttbytes::Error),
    #[error("{0}")]
    Refused(String),
}

/// Connects, serves, and reconnects with a growing pause after failures.
async fn run(target: BrokerTarget, mut outgoing: mpsc::Receiver<Publish>, inbound: super::Lanes) {
    let client_id = format!("updraft-{}", uuid::Uuid::new_v4().simple());
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = match TcpStream::connect((target.host.as_str(), target.port)).await {
            Err(e) => Err(SessionError::Io(e)),
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                match &target.tls {
                    None => {
                        session(
                            tcp,
                            &target,
                            &client_id,
                            &mut outgoing,
                            &inbound,
                            &mut backoff,
                        )
                        .await
                    }
                    Some(config) => {
                        let name = ServerName::try_from(target.host.clone()).map_err(|e| {
                            SessionError::Refused(format!("bad broker host name: {e}"))
                        });
                        match name {
                            Err(e) => Err(e),
                            Ok(name) => match tokio_rustls::TlsConnector::from(config.clone())
                                .connect(name, tcp)
                                .await
                            {
                                Ok(tls) => {
                                    session(
                                        tls,
                                        &target,
                                        &client_id,
                                        &mut outgoing,
                                        &inbound,
                                        &mut backoff,
                                    )
                                    .await
                                }
                                Err(e) => Err(SessionError::Io(e)),
                            },
                        }
                    }
                }
            }
        };
        if inbound.is_closed() {
            return;
        }
        match result {
            Ok(()) => {
                tracing::warn!("the external MQTT broker closed the connection; reconnecting")
            }
            Err(e) => {
                tracing::warn!(error = %e, "external MQTT broker connection failed; reconnecting")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn write_packet<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    p: Packet,
) -> Result<(), SessionError> {
    buf.clear();
    p.write(buf, MAX_PACKET)?;
    w.write_all(buf).await?;
    Ok(())
}

async fn session<S>(
    stream: S,
    target: &BrokerTarget,
    client_id: &str,
    outgoing: &mut mpsc::Receiver<Publish>,
    inbound: &super::Lanes,
    backoff: &mut Duration,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut wbuf = BytesMut::with_capacity(4096);
    let mut rbuf = BytesMut::with_capacity(16 * 1024);
    let mut connect = Connect::new(client_id);
    connect.keep_alive = KEEP_ALIVE_SECONDS;
    connect.clean_session = true;
    if let Some(u) = &target.username {
        connect.set_login(u.clone(), target.password.clone().unwrap_or_default());
    }
    write_packet(&mut writer, &mut wbuf, Packet::Connect(connect)).await?;
    writer.flush().await?;
    let mut skip = 0;
    let ack = tokio::time::timeout(
        Duration::from_secs(10),
        read_packet(&mut reader, &mut rbuf, &mut skip),
    )
    .await
    .map_err(|_| SessionError::Refused("no CONNACK from the broker".into()))??;
    match ack {
        Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => {}
        Packet::ConnAck(a) => {
            return Err(SessionError::Refused(format!(
                "broker refused the connection: {:?}",
                a.code
            )));
        }
        _ => return Err(SessionError::Refused("expected CONNACK".into())),
    }
    let filters = REQUEST_FILTERS
        .iter()
        .map(|f| {
            let path = match &target.shared_group {
                Some(g) => format!("$share/{g}/{f}"),
                None => (*f).to_owned(),
            };
            SubscribeFilter::new(path, QoS::AtLeastOnce)
        })
        .collect();
    write_packet(
        &mut writer,
        &mut wbuf,
        Packet::Subscribe(Subscribe { pkid: 1, filters }),
    )
    .await?;
    writer.flush().await?;
    tracing::info!(host = %target.host, port = target.port, tls = target.tls.is_some(), "connected to the external MQTT broker");
    *backoff = Duration::from_millis(200);

    let mut pkid: u16 = 1;
    let mut ping = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE_SECONDS) / 2));
    ping.tick().await;
    loop {
        tokio::select! {
            packet = read_packet(&mut reader, &mut rbuf, &mut skip) => {
                match packet? {
                    Packet::Publish(p) => {
                        if p.qos == QoS::AtLeastOnce {
                            write_packet(&mut writer, &mut wbuf, Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid))).await?;
                            writer.flush().await?;
                        }
                        forward(p, inbound).await;
                    }
                    Packet::SubAck(s)
                        if s.return_codes.iter().any(|c| matches!(c, rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure)) =>
                    {
                        return Err(SessionError::Refused("the broker refused Updraft's subscriptions (check its ACL)".into()));
                    }
                    _ => {}
                }
            }
            msg = outgoing.recv() => {
                let Some(mut p) = msg else { return Ok(()) };
                // Send everything queued, then flush once.
                loop {
                    if p.qos != QoS::AtMostOnce {
                        pkid = pkid.checked_add(1).unwrap_or(2).max(2);
                        p.pkid = pkid;
                    }
                    let mut one = BytesMut::new();
                    if Packet::Publish(p).write(&mut one, MAX_PACKET).is_ok() {
                        writer.write_all(&one).await?;
                    }
                    match outgoing.try_recv() {
                        Ok(next) => p = next,
                        Err(_) => break,
                    }
                }
                writer.flush().await?;
            }
            _ = ping.tick() => {
                write_packet(&mut writer, &mut wbuf, Packet::PingReq).await?;
                writer.flush().await?;
            }
        }
    }
}

/// The next packet from the broker. A packet over [`MAX_PACKET`] (a device's oversized
/// publish, which the broker may pass on) is skipped, not taken as a broken connection:
/// otherwise any device could cut every device off by sending one. `skip` is the rest of a
/// packet being skipped; it lives with the session, as the read may be cancelled midway.
async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    skip: &mut usize,
) -> Result<Packet, SessionError> {
    loop {
        if *skip > 0 {
            let n = (*skip).min(buf.len());
            buf.advance(n);
            *skip -= n;
        } else {
            match Packet::read(buf, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(mqttbytes::Error::PayloadSizeLimitExceeded(remaining)) => {
                    // The fixed header: a byte, then the remaining length as a varint.
                    let header = 1 + buf.iter().skip(1).take_while(|b| **b & 0x80 != 0).count() + 1;
                    *skip = header + remaining;
                    tracing::warn!(
                        bytes = *skip,
                        limit = MAX_PACKET,
                        "skipped an oversized message from the external broker (set the broker's max_packet_size)"
                    );
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if *skip > 0 && !buf.is_empty() {
            continue;
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(SessionError::Refused(
                "the broker closed the connection".into(),
            ));
        }
    }
}

async fn forward(p: Publish, inbound: &super::Lanes) {
    if !updraft_protocol::topics::is_request_topic(&p.topic) {
        return;
    }
    let Some(thing) = updraft_protocol::topics::thing_of_topic(&p.topic).map(str::to_owned) else {
        return;
    };
    let _ = inbound
        .send(Inbound {
            client_id: thing,
            topic: p.topic,
            payload: p.payload,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oversized_packets_are_skipped_not_fatal() {
        let mut wire = BytesMut::new();
        let big = Publish::new(
            "$aws/things/d/jobs/get",
            QoS::AtMostOnce,
            vec![b' '; MAX_PACKET + 10],
        );
        Packet::Publish(big)
            .write(&mut wire, 2 * MAX_PACKET)
            .expect("encode");
        let small = Publish::new(
            "$aws/things/d/jobs/start-next",
            QoS::AtMostOnce,
            b"{}".to_vec(),
        );
        Packet::Publish(small.clone())
            .write(&mut wire, MAX_PACKET)
            .expect("encode");
        let mut reader = Trickle {
            data: wire.freeze(),
            chunk: 1000,
        };
        let (mut buf, mut skip) = (BytesMut::new(), 0);
        let p = read_packet(&mut reader, &mut buf, &mut skip)
            .await
            .expect("the next packet");
        assert!(
            matches!(p, Packet::Publish(p) if p.topic == small.topic && p.payload == small.payload)
        );
        assert_eq!(skip, 0);
        assert!(
            read_packet(&mut reader, &mut buf, &mut skip).await.is_err(),
            "then the end"
        );
    }

    /// Reads `data` at most `chunk` bytes at a time, as a socket would deliver it.
    struct Trickle {
        data: Bytes,
        chunk: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.chunk.min(buf.remaining()).min(self.data.len());
            let piece = self.data.split_to(n);
            buf.put_slice(&piece);
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn broker_urls() {
        let t = BrokerTarget::parse("mqtt://10.0.0.1:1883", None, None, None).expect("plain");
        assert_eq!(
            (t.host.as_str(), t.port, t.tls.is_none()),
            ("10.0.0.1", 1883, true)
        );
        assert!(BrokerTarget::parse("mqtt://host", None, None, None).is_err());
        assert!(BrokerTarget::parse("tcp://host:1", None, None, None).is_err());
        assert!(matches!(
            BrokerTarget::parse("mqtts://host:8883", None, None, None),
            Err(ExternalError::Tls(_))
        ));
        assert!(matches!(
            BrokerTarget::parse("mqtt://host:1883?ca=/x", None, None, None),
            Err(ExternalError::Tls(_))
        ));
        assert!(BrokerTarget::parse("mqtt://host:1883?bogus=1", None, None, None).is_err());
    }
}
