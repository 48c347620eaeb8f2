//! What the device-plane integration tests share: an Updraft server in-process (SQLite, free
//! loopback ports) behind either its embedded broker or a real Mosquitto started here with
//! the repository's ACL, an MQTT-only test device, and store fixtures.
//!
//! Fixtures are written straight into the store (and announced as CreateJob does), so the
//! tests exercise only what a device can reach: MQTT topics and payloads.

#![allow(dead_code)] // each test binary uses its own subset

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use updraft_protocol::{JobStatus, TargetSelection};
use updraft_server::clock::now_ms;
use updraft_server::config::{FileConfig, ServerConfig};
use updraft_server::server::{AppState, Server};
use updraft_server::store::{
    Bucket, Job, JobExecution, ObjectVersion, Stream, StreamFile, Thing, Versioning,
};

/// How long any single answer may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

// ---- temporary directories ----------------------------------------------------------------

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("updraft-{tag}-{}-{t:x}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the server, behind one of two brokers ------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// Updraft's own broker: answers reach the asking device without a subscription.
    Embedded,
    /// Mosquitto with `deploy/mosquitto/updraft.acl`, Updraft connected over mutual TLS.
    Mosquitto,
}

pub struct Env {
    pub broker: Broker,
    pub state: AppState,
    /// Where devices connect (plain MQTT, loopback).
    pub device_port: u16,
    _mosquitto: Option<Mosquitto>,
    _dir: TempDir,
}

impl Env {
    /// A server with the embedded broker.
    pub async fn embedded(tag: &str) -> Env {
        let dir = TempDir::new(tag);
        let server = start_server(&dir.0, None).await;
        let device_port = server.mqtt_addr.expect("mqtt listener").port();
        let state = server.state().clone();
        tokio::spawn(server.run(std::future::pending()));
        Env {
            broker: Broker::Embedded,
            state,
            device_port,
            _mosquitto: None,
            _dir: dir,
        }
    }

    /// A server behind a Mosquitto started here; `None` (with the reason printed) when
    /// mosquitto is not installed, except under `CI=true`, where that fails the test.
    pub async fn mosquitto(tag: &str) -> Option<Env> {
        let Some(exe) = find_executable("mosquitto") else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("mosquitto is required under CI=true (apt-get install mosquitto)");
            }
            eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
            return None;
        };
        let dir = TempDir::new(tag);
        let mosquitto = Mosquitto::start(&exe, &dir.0.join("mosquitto")).await;
        let tls = &mosquitto.tls;
        let url = format!(
            "mqtts://127.0.0.1:{}?ca={}&cert={}&key={}",
            mosquitto.tls_port,
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display()
        );
        let server = start_server(&dir.0.join("server"), Some(url)).await;
        let state = server.state().clone();
        tokio::spawn(server.run(std::future::pending()));
        Some(Env {
            broker: Broker::Mosquitto,
            state,
            device_port: mosquitto.port,
            _mosquitto: Some(mosquitto),
            _dir: dir,
        })
    }

    /// Connects a device (client id = thing name) subscribed to its whole namespace, and
    /// waits until the server answers it (an external broker connects Updraft lazily).
    pub async fn device(&self, thing: &str) -> Device {
        let mut d = Device::connect(self.device_port, thing).await;
        d.wait_until_served().await;
        d
    }
}

async fn start_server(dir: &Path, broker_url: Option<String>) -> Server {
    let external = broker_url.is_some();
    let config = ServerConfig::resolve(FileConfig {
        data_dir: Some(dir.to_owned()),
        http: Some("127.0.0.1:0".into()),
        mqtt: (!external).then(|| "127.0.0.1:0".into()),
        mqtts: (!external).then(|| "127.0.0.1:0".into()),
        broker_url,
        ..FileConfig::default()
    })
    .expect("config");
    Server::start(&config).await.expect("server")
}

pub fn find_executable(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin").join(name);
        sbin.is_file().then_some(sbin)
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// A CA, Mosquitto's server certificate for 127.0.0.1 and Updraft's client certificate
/// (CN `updraft`, the user the ACL grants every thing's topics).
fn make_tls_files(root: &Path) -> TlsFiles {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test broker CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |sans: Vec<String>, cn: &str| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &issuer).expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = leaf(vec!["127.0.0.1".into()], "server");
    let (client_pem, client_key) = leaf(vec![], "updraft");
    let files = TlsFiles {
        ca: root.join("ca.pem"),
        cert: root.join("updraft.pem"),
        key: root.join("updraft.key"),
        server_cert: root.join("server.pem"),
        server_key: root.join("server.key"),
    };
    for (path, text) in [
        (&files.ca, ca_cert.pem()),
        (&files.cert, client_pem),
        (&files.key, client_key),
        (&files.server_cert, server_pem),
        (&files.server_key, server_key),
    ] {
        std::fs::write(path, text).expect("write TLS file");
    }
    files
}

/// Mosquitto on two free loopback ports: plain MQTT for devices (anonymous, confined by the
/// ACL to `$aws/things/<client id>/#`), mutual TLS for Updraft (its certificate's CN is its
/// user name). Killed when dropped.
struct Mosquitto {
    child: Child,
    port: u16,
    tls_port: u16,
    tls: TlsFiles,
}

impl Mosquitto {
    async fn start(exe: &Path, root: &Path) -> Mosquitto {
        std::fs::create_dir_all(root).expect("mosquitto dir");
        let acl_src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/mosquitto/updraft.acl");
        let acl = root.join("updraft.acl");
        std::fs::copy(&acl_src, &acl).expect("the repository's ACL file");
        let tls = make_tls_files(root);
        let (port, tls_port) = (free_port(), free_port());
        // Started as root, mosquitto would switch to the `mosquitto` user, who cannot read
        // this private directory.
        let user = if running_as_root() { "user root\n" } else { "" };
        let conf = root.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "{user}per_listener_settings false\nallow_anonymous true\nacl_file {acl}\n\
                 persistence false\nlog_dest file {log}\n\
                 listener {port} 127.0.0.1\n\
                 listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
                 require_certificate true\nuse_identity_as_username true\n",
                acl = acl.display(),
                log = root.join("mosquitto.log").display(),
                ca = tls.ca.display(),
                cert = tls.server_cert.display(),
                key = tls.server_key.display(),
            ),
        )
        .expect("mosquitto.conf");
        let mut child = Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start mosquitto");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let plain = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
            let tls_up = tokio::net::TcpStream::connect(("127.0.0.1", tls_port)).await;
            if plain.is_ok() && tls_up.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(root.join("mosquitto.log")).unwrap_or_default();
                panic!("mosquitto exited ({status}): {log}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "mosquitto did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Mosquitto {
            child,
            port,
            tls_port,
            tls,
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

// ---- the device ----------------------------------------------------------------------------

/// A device that speaks only MQTT: client id = thing name, subscribed to
/// `$aws/things/<thing>/#` (needed on an external broker, harmless on the embedded one).
pub struct Device {
    pub thing: String,
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Bytes)>,
    /// Messages received but not yet asked for, oldest first.
    pending: VecDeque<(String, Bytes)>,
    sync_counter: u64,
}

/// The answer to a Jobs request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub accepted: bool,
    pub body: Value,
}

impl Answer {
    /// The rejected code, or `None` when accepted.
    pub fn code(&self) -> Option<&str> {
        (!self.accepted).then(|| self.body["code"].as_str().unwrap_or("<no code>"))
    }
}

impl Device {
    pub async fn connect(port: u16, thing: &str) -> Device {
        let mut opts = MqttOptions::new(thing, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        opts.set_inflight(200);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_) | Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.clone())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        tokio::time::timeout(WAIT, ready_rx.recv())
            .await
            .expect("CONNACK")
            .expect("connected");
        client
            .subscribe(format!("$aws/things/{thing}/#"), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        tokio::time::timeout(WAIT, ready_rx.recv())
            .await
            .expect("SUBACK")
            .expect("subscribed");
        Device {
            thing: thing.to_owned(),
            client,
            rx,
            pending: VecDeque::new(),
            sync_counter: 0,
        }
    }

    /// `$aws/things/<thing>/jobs/<suffix>`.
    pub fn jobs_topic(&self, suffix: &str) -> String {
        format!("$aws/things/{}/jobs/{suffix}", self.thing)
    }

    /// `$aws/things/<thing>/streams/<stream>/<op>/<format>`.
    pub fn stream_topic(&self, stream: &str, op: &str, format: &str) -> String {
        format!("$aws/things/{}/streams/{stream}/{op}/{format}", self.thing)
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload.into())
            .await
            .expect("publish");
    }

    /// The next message whose topic satisfies `wanted`, keeping the others for later;
    /// `None` after `timeout`.
    pub async fn next_matching(
        &mut self,
        wanted: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<(String, Bytes)> {
        if let Some(i) = self.pending.iter().position(|(t, _)| wanted(t)) {
            return self.pending.remove(i);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()?
                .expect("device connection closed");
            if wanted(&msg.0) {
                return Some(msg);
            }
            self.pending.push_back(msg);
        }
    }

    /// The next message on exactly `topic`; panics after [`WAIT`].
    pub async fn expect(&mut self, topic: &str) -> Bytes {
        match self.next_matching(|t| t == topic, WAIT).await {
            Some((_, p)) => p,
            None => panic!("{}: nothing on {topic}", self.thing),
        }
    }

    /// The next message on `topic` as JSON.
    pub async fn expect_json(&mut self, topic: &str) -> Value {
        let p = self.expect(topic).await;
        serde_json::from_slice(&p).unwrap_or_else(|e| panic!("{topic}: not JSON ({e}): {p:?}"))
    }

    /// Forgets every message received so far whose topic satisfies `drop`.
    pub fn discard(&mut self, drop: impl Fn(&str) -> bool) {
        while let Ok(m) = self.rx.try_recv() {
            self.pending.push_back(m);
        }
        self.pending.retain(|(t, _)| !drop(t));
    }

    /// Publishes a Jobs request on `jobs/<suffix>` and returns its answer.
    pub async fn jobs(&mut self, suffix: &str, payload: impl Into<Vec<u8>>) -> Answer {
        let topic = self.jobs_topic(suffix);
        let (acc, rej) = (format!("{topic}/accepted"), format!("{topic}/rejected"));
        self.discard(|t| t == acc || t == rej);
        self.publish(&topic, payload).await;
        match self.next_matching(|t| t == acc || t == rej, WAIT).await {
            Some((t, p)) => Answer {
                accepted: t == acc,
                body: serde_json::from_slice(&p)
                    .unwrap_or_else(|e| panic!("{t}: not JSON ({e}): {p:?}")),
            },
            None => panic!("{}: no answer to {topic}", self.thing),
        }
    }

    /// [`Device::jobs`] with a JSON payload.
    pub async fn jobs_json(&mut self, suffix: &str, payload: Value) -> Answer {
        self.jobs(suffix, payload.to_string()).await
    }

    /// Waits until the server answers this device (behind an external broker, Updraft's
    /// own connection and subscriptions come up in the background).
    pub async fn wait_until_served(&mut self) {
        let topic = self.jobs_topic("get");
        let answers = [format!("{topic}/accepted"), format!("{topic}/rejected")];
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            self.publish(&topic, "{}").await;
            if self
                .next_matching(
                    |t| answers.iter().any(|a| a == t),
                    Duration::from_millis(250),
                )
                .await
                .is_some()
            {
                // Late answers to the earlier attempts must not be taken for later ones.
                tokio::time::sleep(Duration::from_millis(300)).await;
                self.discard(|t| answers.iter().any(|a| a == t));
                return;
            }
        }
        panic!("{}: the server never answered", self.thing);
    }

    /// Everything the server sent up to now, in order: requests from this device are
    /// handled in order, so once a marker request is answered, every answer to earlier
    /// requests has arrived. Returns the messages before the marker (own publishes echoed by
    /// an external broker are left out).
    pub async fn sync(&mut self) -> Vec<(String, Bytes)> {
        self.sync_counter += 1;
        let token = format!("sync-{}", self.sync_counter);
        let topic = self.jobs_topic("sync-marker/get");
        let rejected = format!("{topic}/rejected");
        self.publish(
            &topic,
            serde_json::json!({ "clientToken": token }).to_string(),
        )
        .await;
        let mut before: Vec<(String, Bytes)> = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = match self.pending.pop_front() {
                Some(m) => m,
                None => tokio::time::timeout_at(deadline, self.rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{}: no answer to the sync marker", self.thing))
                    .expect("device connection closed"),
            };
            if msg.0 == rejected
                && serde_json::from_slice::<Value>(&msg.1)
                    .is_ok_and(|v| v["clientToken"] == token.as_str())
            {
                return before
                    .into_iter()
                    .filter(|(t, _)| !is_request_topic(t))
                    .collect();
            }
            before.push(msg);
        }
    }
}

/// Whether a device publishes on `topic` (an external broker echoes those back to it).
pub use updraft_protocol::topics::is_request_topic;

// ---- fixtures -----------------------------------------------------------------------------

pub async fn create_thing(state: &AppState, name: &str) {
    state
        .store
        .create_thing(&Thing {
            name: name.into(),
            id: name.into(),
            type_name: None,
            attributes: BTreeMap::new(),
            version: 1,
            created_ms: now_ms(),
        })
        .await
        .expect("create thing");
}

/// A SNAPSHOT job with one QUEUED execution per thing, queued at `queued_ms`, announced to
/// the things as CreateJob does.
pub async fn create_job(
    state: &AppState,
    id: &str,
    things: &[&str],
    document: &str,
    queued_ms: i64,
) {
    let job = Job {
        id: id.into(),
        status: JobStatus::InProgress,
        target_selection: TargetSelection::Snapshot,
        targets: vec![],
        description: None,
        document: document.into(),
        document_source: None,
        namespace_id: None,
        details: serde_json::Map::new(),
        force_canceled: false,
        reason_code: None,
        comment: None,
        created_ms: queued_ms,
        updated_ms: queued_ms,
        completed_ms: None,
        version: 1,
    };
    let executions: Vec<JobExecution> = things
        .iter()
        .map(|t| JobExecution::queued(id, t, queued_ms))
        .collect();
    state
        .store
        .create_job(&job, &executions)
        .await
        .expect("create job");
    for t in things {
        state.data_plane.thing_changed(state, t).await;
    }
}

/// Stores `data` as `bucket/key` (the bucket is created if missing).
pub async fn put_object(state: &AppState, bucket: &str, key: &str, data: &[u8]) {
    if state
        .store
        .get_bucket(bucket)
        .await
        .expect("bucket")
        .is_none()
    {
        state
            .store
            .create_bucket(&Bucket {
                name: bucket.into(),
                versioning: Versioning::Unversioned,
                created_ms: now_ms(),
            })
            .await
            .expect("create bucket");
    }
    let blob = updraft_server::artifacts::Artifacts::new_blob();
    state
        .artifacts
        .put_bytes(&blob, Bytes::copy_from_slice(data))
        .await
        .expect("blob");
    state
        .store
        .put_object(&ObjectVersion {
            bucket: bucket.into(),
            key: key.into(),
            version_id: "null".into(),
            delete_marker: false,
            size: data.len() as u64,
            etag: "\"test\"".into(),
            content_type: None,
            checksum: None,
            metadata: BTreeMap::new(),
            blob,
            created_ms: now_ms(),
            is_latest: true,
        })
        .await
        .expect("put object");
}

/// A stream (version 1) whose file `f` is object `bucket/key`, recorded with `size` bytes.
pub async fn create_stream(
    state: &AppState,
    id: &str,
    description: &str,
    files: &[(u8, &str, &str, u64)],
) {
    let now = now_ms();
    state
        .store
        .create_stream(&Stream {
            id: id.into(),
            version: 1,
            description: Some(description.into()),
            files: files
                .iter()
                .map(|&(file_id, bucket, key, size)| StreamFile {
                    file_id,
                    bucket: bucket.into(),
                    key: key.into(),
                    version: None,
                    resolved_version: "null".into(),
                    size,
                    etag: None,
                })
                .collect(),
            role_arn: "arn:aws:iam::123456789012:role/streams".into(),
            created_ms: now,
            updated_ms: now,
        })
        .await
        .expect("create stream");
}

/// `len` bytes of a fixed pseudo-random pattern.
pub fn file_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every execution of `thing`, as the store has it (to show a request changed nothing).
pub async fn executions_of(state: &AppState, thing: &str) -> Vec<JobExecution> {
    let page = updraft_server::store::PageRequest {
        after: None,
        limit: 1000,
    };
    state
        .store
        .list_executions_for_thing(thing, None, None, &page)
        .await
        .expect("list executions")
        .items
}
