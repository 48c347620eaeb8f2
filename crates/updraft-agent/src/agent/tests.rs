//! The agent against a simulated service, with a fake clock: every flow, deterministic and
//! fast. The real server is exercised by `tests/e2e.rs`.

use super::*;
use crate::handle::init;
use crate::mqtt::{FnClient, Request};
use crate::pal::memory::{MemoryPal, image_with_version};
use crate::resume::MemoryResumeStore;
use crate::verify::tests::{sign, signer};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Mutex;
use updraft_protocol::streams::{BlockResponse, StreamError, select_blocks};

const THING: &str = "dev-1";
const JOB: &str = "AFR_OTA-ota1";
const STREAM: &str = "AFR_OTA-2b0a4b6c-1f6c-4c0e-9d3b-8f6b1f2a3c4d";
const CERT: &str = "/certs/signer.pem";
const OLD: AppVersion = AppVersion::new(1, 0, 0);
const NEW: AppVersion = AppVersion::new(1, 1, 0);

#[derive(Debug, Clone)]
enum Out {
    Publish(String, Vec<u8>, Qos),
    Subscribe(String),
    Unsubscribe(String),
}

/// The service: one job with one file, Jobs and Streams over "MQTT".
struct Service {
    job: String,
    file: Vec<u8>,
    doc: Value,
    status: ExecutionStatus,
    details: BTreeMap<String, String>,
    updates: Vec<String>,
    gets: Vec<GetStreamRequest>,
    blocks_sent: u64,
    /// Lose this many block messages.
    lose_blocks: u64,
    /// Never answer GetStream.
    silent: bool,
    /// Answer GetStream with this error.
    reject: Option<RejectCode>,
    /// Stop delivering blocks after this many (a crash of the device, seen from outside).
    cut_after: Option<u64>,
    /// Flip a byte of this block on the wire.
    tamper_block: Option<u64>,
}

use updraft_protocol::ExecutionStatus;

impl Service {
    fn new(file: Vec<u8>, signature: &[u8]) -> Self {
        let doc = json!({"afr_ota":{"protocols":["MQTT"],"streamname":STREAM,"files":[{
            "filepath":"fw.bin","filesize":file.len(),"fileid":0,"certfile":CERT,
            "update_data_url":null,"auth_scheme":null,
            "sig-sha256-ecdsa":updraft_protocol::streams::base64_encode(signature)}]}});
        Service {
            job: JOB.to_owned(),
            file,
            doc,
            status: ExecutionStatus::Queued,
            details: BTreeMap::new(),
            updates: vec![],
            gets: vec![],
            blocks_sent: 0,
            lose_blocks: 0,
            silent: false,
            reject: None,
            cut_after: None,
            tamper_block: None,
        }
    }

    fn file_field(&mut self, key: &str, v: Value) {
        self.doc["afr_ota"]["files"][0][key] = v;
    }

    fn execution(&self) -> Value {
        if self.status.is_terminal() {
            return json!({"timestamp":1});
        }
        let mut e = json!({"jobId":self.job,"status":self.status.as_str(),"queuedAt":1,
            "lastUpdatedAt":1,"versionNumber":1,"executionNumber":1,"jobDocument":self.doc});
        if !self.details.is_empty() {
            e["statusDetails"] = json!(self.details);
        }
        json!({"timestamp":1,"execution":e})
    }

    fn reason(&self) -> Option<&str> {
        self.details.get("reason").map(String::as_str)
    }

    /// Answers one publish of the device.
    fn handle(&mut self, topic: &str, payload: &[u8]) -> Vec<(String, Bytes)> {
        let p = format!("$aws/things/{THING}/");
        let rest = topic.strip_prefix(&p).unwrap_or(topic);
        if rest == "jobs/$next/get" {
            let mut a = self.execution();
            if let Ok(req) = serde_json::from_slice::<Value>(payload) {
                a["clientToken"] = req["clientToken"].clone();
            }
            return vec![(
                format!("{p}jobs/$next/get/accepted"),
                Bytes::from(a.to_string()),
            )];
        }
        if let Some(job) = rest
            .strip_prefix("jobs/")
            .and_then(|r| r.strip_suffix("/update"))
        {
            assert_eq!(job, self.job);
            let text = String::from_utf8(payload.to_vec()).expect("utf8");
            let v: Value = serde_json::from_str(&text).expect("json");
            assert!(!self.status.is_terminal(), "update after terminal: {text}");
            self.status = v["status"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("status");
            if let Some(d) = v["statusDetails"].as_object() {
                self.details = d
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
            }
            self.updates.push(text);
            return vec![];
        }
        if rest == format!("streams/{STREAM}/get/cbor") {
            let req = GetStreamRequest::decode(Format::Cbor, payload).expect("request");
            self.gets.push(req.clone());
            if self.silent {
                return vec![];
            }
            if let Some(code) = self.reject {
                return vec![(
                    format!("{p}streams/{STREAM}/rejected/cbor"),
                    Bytes::from(StreamError::new(code, "no").encode(Format::Cbor)),
                )];
            }
            let blocks = match select_blocks(self.file.len() as u64, &req) {
                Ok(b) => b,
                Err(e) => {
                    return vec![(
                        format!("{p}streams/{STREAM}/rejected/cbor"),
                        Bytes::from(e.encode(Format::Cbor)),
                    )];
                }
            };
            let mut out = vec![];
            for b in blocks {
                if self.cut_after.is_some_and(|n| self.blocks_sent >= n) {
                    break;
                }
                self.blocks_sent += 1;
                if self.lose_blocks > 0 {
                    self.lose_blocks -= 1;
                    continue;
                }
                let l = req.block_size as usize;
                let start = b as usize * l;
                let end = (start + l).min(self.file.len());
                let mut chunk = self.file[start..end].to_vec();
                if self.tamper_block == Some(b) {
                    chunk[0] ^= 0x55;
                }
                let msg = BlockResponse {
                    client_token: req.client_token.as_deref(),
                    file_id: 0,
                    block_id: b,
                    payload: &chunk,
                }
                .encode(Format::Cbor);
                out.push((format!("{p}streams/{STREAM}/data/cbor"), Bytes::from(msg)));
            }
            return out;
        }
        vec![]
    }
}

/// One running agent, driven by hand.
struct Sim {
    agent: Agent,
    handle: crate::AgentHandle,
    rx: crate::handle::Receivers,
    out: Arc<Mutex<Vec<Out>>>,
    subs: BTreeSet<String>,
    events: Arc<Mutex<Vec<JobEvent>>>,
    now: Instant,
}

fn config(version: AppVersion) -> AgentConfig {
    let mut c = AgentConfig::new(THING, version);
    c.block_size = 256;
    c.blocks_per_request = 4;
    c.status_frequency = 8;
    c
}

fn certs(pem: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(CERT.to_owned(), pem.to_owned())])
}

impl Sim {
    fn boot(
        config: AgentConfig,
        pal: &MemoryPal,
        store: &MemoryResumeStore,
        certs: BTreeMap<String, String>,
    ) -> Sim {
        let out = Arc::new(Mutex::new(Vec::new()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        let mqtt = FnClient(move |r: Request<'_>| {
            let m = match r {
                Request::Publish {
                    topic,
                    payload,
                    qos,
                } => Out::Publish(topic.to_owned(), payload, qos),
                Request::Subscribe { filter, .. } => Out::Subscribe(filter.to_owned()),
                Request::Unsubscribe { filter } => Out::Unsubscribe(filter.to_owned()),
            };
            o.lock().expect("lock").push(m);
            Ok(())
        });
        let e = events.clone();
        let (mut agent, handle) =
            init(config, pal.clone(), store.clone(), certs, mqtt, move |ev| {
                e.lock().expect("lock").push(ev)
            })
            .expect("init");
        let rx = agent.rx.take().expect("rx");
        let now = Instant::now();
        agent.start(now);
        Sim {
            agent,
            handle,
            rx,
            out,
            subs: BTreeSet::new(),
            events,
            now,
        }
    }

    /// Exchanges messages until nothing moves.
    fn pump(&mut self, svc: &mut Service) {
        loop {
            let msgs: Vec<Out> = std::mem::take(&mut *self.out.lock().expect("lock"));
            let mut moved = !msgs.is_empty();
            for m in msgs {
                match m {
                    Out::Publish(t, p, qos) => {
                        if t.ends_with("/update") {
                            // Progress at QoS 0, every other report at QoS 1 (as the C agent).
                            let progress = p.windows(9).any(|w| w == b"\"receive\"");
                            let want = if progress {
                                Qos::AtMostOnce
                            } else {
                                Qos::AtLeastOnce
                            };
                            assert_eq!(qos, want, "{}", String::from_utf8_lossy(&p));
                        }
                        for (topic, payload) in svc.handle(&t, &p) {
                            assert!(self.handle.incoming_bytes(&topic, payload), "{topic}");
                        }
                    }
                    Out::Subscribe(f) => {
                        self.subs.insert(f);
                    }
                    Out::Unsubscribe(f) => {
                        self.subs.remove(&f);
                    }
                }
            }
            while let Ok(cmd) = self.rx.control.try_recv() {
                self.agent.command(cmd, self.now);
                moved = true;
            }
            while let Ok(b) = self.rx.blocks.try_recv() {
                self.agent.command(b.into(), self.now);
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    fn advance(&mut self, d: Duration, svc: &mut Service) {
        self.now += d;
        self.agent.on_timers(self.now);
        self.pump(svc);
    }

    fn events(&self) -> Vec<JobEvent> {
        self.events.lock().expect("lock").clone()
    }

    fn has_event(&self, f: impl Fn(&JobEvent) -> bool) -> bool {
        self.events().iter().any(f)
    }

    fn set_image_state(&mut self, s: ImageState, svc: &mut Service) -> Result<(), Error> {
        let r = self.agent.set_image_state(s);
        self.agent.drain(self.now);
        self.pump(svc);
        r
    }

    fn activate(&mut self, svc: &mut Service) -> Result<(), Error> {
        let r = self.agent.activate_new_image();
        self.agent.drain(self.now);
        self.pump(svc);
        r
    }
}

/// A signed firmware of `version` with `len` payload bytes, its service, and the device.
fn setup(
    version: AppVersion,
    len: usize,
) -> (
    Service,
    MemoryPal,
    MemoryResumeStore,
    BTreeMap<String, String>,
) {
    let (pem, key) = signer();
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let image = image_with_version(version, &payload);
    let sig = sign(&key, &image);
    (
        Service::new(image, &sig),
        MemoryPal::with_version(OLD),
        MemoryResumeStore::new(),
        certs(&pem),
    )
}

fn run_download(
    svc: &mut Service,
    pal: &MemoryPal,
    store: &MemoryResumeStore,
    c: &BTreeMap<String, String>,
) -> Sim {
    let mut sim = Sim::boot(config(OLD), pal, store, c.clone());
    sim.pump(svc);
    sim
}

#[test]
fn download_verify_activate_self_test_accept() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    let total = svc.file.len().div_ceil(256) as u64;
    assert_eq!(total, 12);
    // Subscribed to what it uses.
    assert!(
        sim.subs
            .contains(&format!("$aws/things/{THING}/jobs/notify-next"))
    );
    assert!(
        sim.subs
            .contains(&format!("$aws/things/{THING}/jobs/$next/get/accepted"))
    );
    // Progress on the first block and every 8, then ready with the running version.
    assert_eq!(
        svc.updates,
        vec![
            r#"{"status":"IN_PROGRESS","statusDetails":{"receive":"1/12"}}"#.to_owned(),
            r#"{"status":"IN_PROGRESS","statusDetails":{"receive":"8/12"}}"#.to_owned(),
            r#"{"status":"IN_PROGRESS","statusDetails":{"self_test":"ready","updatedBy":"0x01000000"}}"#.to_owned(),
        ]
    );
    assert_eq!(svc.gets.len(), 3);
    assert!(svc.gets.iter().all(|g| g.number_of_blocks == Some(4)));
    assert_eq!(sim.agent.state(), AgentState::WaitingForJob);
    assert!(sim.has_event(|e| matches!(e, JobEvent::ReceivedJob { .. })));
    assert!(sim.has_event(|e| matches!(e, JobEvent::Activate { .. })));
    // The stream topics were released.
    assert!(!sim.subs.iter().any(|s| s.contains("/streams/")));
    let stats = sim.handle.statistics();
    assert_eq!(
        (
            stats.packets_received,
            stats.packets_queued,
            stats.packets_processed,
            stats.packets_dropped
        ),
        (12, 12, 12, 0)
    );
    assert_eq!(sim.handle.image_state(), ImageState::Testing);
    assert_eq!(store.get().map(|s| s.phase), Some(Phase::Verified));

    sim.activate(&mut svc).expect("activate");
    assert_eq!(sim.agent.state(), AgentState::Stopped);
    assert_eq!(pal.running_version(), NEW);

    // The new image boots.
    let mut sim = Sim::boot(config(NEW), &pal, &store, c.clone());
    sim.pump(&mut svc);
    assert!(sim.agent.self_test_deadline.is_some());
    assert_eq!(
        svc.updates.last().map(String::as_str),
        Some(
            r#"{"status":"IN_PROGRESS","statusDetails":{"self_test":"active","updatedBy":"0x01010000"}}"#
        )
    );
    assert!(sim.has_event(|e| matches!(e, JobEvent::StartTest { .. })));
    sim.set_image_state(ImageState::Accepted, &mut svc)
        .expect("accept");
    assert_eq!(svc.status, ExecutionStatus::Succeeded);
    assert_eq!(
        svc.updates.last().map(String::as_str),
        Some(
            r#"{"status":"SUCCEEDED","statusDetails":{"reason":"accepted  v1.1.0","updatedBy":"  v1.0.0"}}"#
        )
    );
    let d = pal.snapshot();
    assert_eq!(
        (d.running.version, d.state, d.commits),
        (NEW, PalImageState::Valid, 1)
    );
    assert_eq!(store.get(), None);
    assert_eq!(sim.agent.self_test_deadline, None);
}

#[test]
fn self_test_reject_rolls_back() {
    let (mut svc, pal, store, c) = setup(NEW, 1000);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    sim.activate(&mut svc).expect("activate");
    let mut sim = Sim::boot(config(NEW), &pal, &store, c);
    sim.pump(&mut svc);
    sim.set_image_state(ImageState::Rejected, &mut svc)
        .expect("reject");
    assert_eq!(svc.status, ExecutionStatus::Failed);
    assert_eq!(svc.reason(), Some("rejected: 0x00000000"));
    // The reset waits for the report to leave.
    assert_eq!(pal.running_version(), NEW);
    assert_eq!(
        sim.agent.next_deadline(),
        Some(sim.now + Duration::from_secs(2))
    );
    sim.advance(Duration::from_secs(2), &mut svc);
    assert_eq!(sim.agent.state(), AgentState::Stopped);
    assert_eq!(pal.running_version(), OLD);
    assert_eq!(pal.snapshot().rollbacks, 1);
}

#[test]
fn self_test_timeout_rolls_back_and_the_old_image_reports() {
    let (mut svc, pal, store, c) = setup(NEW, 1000);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    sim.activate(&mut svc).expect("activate");
    let mut sim = Sim::boot(config(NEW), &pal, &store, c.clone());
    sim.pump(&mut svc);
    assert_eq!(
        svc.details.get("self_test").map(String::as_str),
        Some("active")
    );
    sim.advance(Duration::from_secs(15), &mut svc);
    assert_eq!(pal.running_version(), NEW, "not yet");
    sim.advance(Duration::from_secs(2), &mut svc);
    assert_eq!(sim.agent.state(), AgentState::Stopped);
    assert_eq!(pal.running_version(), OLD, "rolled back");
    // The old image comes back, finds the job in self-test and itself not under test.
    let mut sim = Sim::boot(config(OLD), &pal, &store, c);
    sim.pump(&mut svc);
    assert_eq!(svc.status, ExecutionStatus::Failed);
    assert_eq!(svc.reason(), Some("rejected: 0x00000011"));
    assert!(sim.has_event(|e| matches!(e, JobEvent::SelfTestFailed { .. })));
}

#[test]
fn downgrade_and_same_version_are_refused_before_activation() {
    for (version, reason) in [
        (AppVersion::new(0, 9, 9), "rejected: 0x0000000f"),
        (OLD, "rejected: 0x00000010"),
    ] {
        let (mut svc, pal, store, c) = setup(version, 1000);
        let sim = run_download(&mut svc, &pal, &store, &c);
        assert_eq!(svc.status, ExecutionStatus::Failed);
        assert_eq!(svc.reason(), Some(reason));
        assert!(sim.has_event(|e| matches!(e, JobEvent::Fail { .. })));
        let d = pal.snapshot();
        assert_eq!((d.running.version, d.activations), (OLD, 0));
        assert!(d.staged.is_none(), "the rejected image is discarded");
        assert_eq!(store.get(), None);
        assert_eq!(sim.agent.state(), AgentState::WaitingForJob);
    }
    // Allowed by configuration.
    let (mut svc, pal, store, c) = setup(AppVersion::new(0, 9, 9), 1000);
    let mut cfg = config(OLD);
    cfg.allow_downgrade = true;
    let mut sim = Sim::boot(cfg, &pal, &store, c);
    sim.pump(&mut svc);
    assert_eq!(
        svc.details.get("self_test").map(String::as_str),
        Some("ready")
    );
}

#[test]
fn version_floor_applies_after_reboot_when_the_image_has_no_version() {
    // An image without a version header: the check happens in the self-test (C agent's way).
    let (pem, key) = signer();
    let image = b"no header, just code".repeat(40);
    let sig = sign(&key, &image);
    let mut svc = Service::new(image, &sig);
    let pal = MemoryPal::with_version(OLD);
    let store = MemoryResumeStore::new();
    let mut sim = Sim::boot(config(OLD), &pal, &store, certs(&pem));
    sim.pump(&mut svc);
    sim.activate(&mut svc).expect("activate");
    // Pretend the image turned out to be 0.9.0 when it runs.
    let mut sim = Sim::boot(config(AppVersion::new(0, 9, 0)), &pal, &store, certs(&pem));
    sim.pump(&mut svc);
    assert_eq!(svc.status, ExecutionStatus::Failed);
    assert_eq!(svc.reason(), Some("rejected: 0x0000000f"));
    sim.advance(Duration::from_secs(2), &mut svc);
    assert_eq!(sim.agent.state(), AgentState::Stopped);
    assert_eq!(pal.running_version(), OLD);
}

#[test]
fn tampered_block_fails_the_signature_check() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    svc.tamper_block = Some(5);
    let sim = run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.status, ExecutionStatus::Failed);
    assert_eq!(svc.reason(), Some("0xe3000000: 0xfffffffe"));
    assert!(sim.has_event(|e| matches!(e, JobEvent::Fail { .. })));
    assert_eq!(pal.snapshot().activations, 0);
    assert_eq!(sim.agent.state(), AgentState::WaitingForJob);
}

#[test]
fn bad_signature_and_unknown_certificate() {
    let (mut svc, pal, store, c) = setup(NEW, 1000);
    let (_, other_key) = signer();
    let sig = sign(&other_key, &svc.file);
    svc.file_field(
        "sig-sha256-ecdsa",
        json!(updraft_protocol::streams::base64_encode(&sig)),
    );
    run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.reason(), Some("0xe3000000: 0xfffffffe"));

    let (mut svc, pal, store, c) = setup(NEW, 1000);
    svc.file_field("certfile", json!("/certs/unknown.pem"));
    run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.reason(), Some("0xe7000000: 0xfffffffe"));
}

#[test]
fn wrong_size_fails_the_block_check() {
    // The document claims 100 more bytes than the stream holds: the last block is short.
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    let claimed = svc.file.len() + 100;
    svc.file_field("filesize", json!(claimed));
    run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.status, ExecutionStatus::Failed);
    assert_eq!(svc.reason(), Some("0xe0000000: 0xfffffff9"));
    assert_eq!(pal.running_version(), OLD);
}

#[test]
fn claimed_size_beyond_the_stream_aborts_on_the_rejection() {
    // 1024 bytes: 4 whole blocks, then the stream has nothing more.
    let (mut svc, pal, store, c) = setup(NEW, 1012);
    let claimed = svc.file.len() + 5000;
    svc.file_field("filesize", json!(claimed));
    let sim = run_download(&mut svc, &pal, &store, &c);
    // Blocks past the end are refused by the stream (ResourceNotFound): fail fast.
    assert_eq!(svc.status, ExecutionStatus::Failed);
    assert_eq!(svc.reason(), Some("aborted: 0x00000008"));
    assert_eq!(sim.agent.state(), AgentState::WaitingForJob);
}

#[test]
fn job_parse_failures_are_reported_with_the_c_codes() {
    let (mut svc, pal, store, c) = setup(NEW, 1000);
    svc.file_field("filesize", json!(0));
    run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.reason(), Some("0x0000000c: 0x00000003"));

    let (mut svc, pal, store, c) = setup(NEW, 1000);
    svc.file_field("filesize", Value::Null);
    run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.reason(), Some("0x0000000c: 0x00000004"));

    let (mut svc, pal, store, c) = setup(NEW, 1000);
    svc.doc["afr_ota"]["protocols"] = json!(["HTTP"]);
    run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.reason(), Some("0x0000000d: 0x00000000"));

    let (mut svc, pal, store, c) = setup(NEW, 1000);
    pal.update(|d| d.capacity = 10);
    run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.reason(), Some("0xe5000000: 0x00000000"));
}

#[test]
fn lost_blocks_are_asked_for_again_after_the_timer() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    svc.lose_blocks = 3;
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.status, ExecutionStatus::InProgress);
    assert!(!svc.details.contains_key("self_test"));
    sim.advance(Duration::from_secs(10), &mut svc);
    assert_eq!(
        svc.details.get("self_test").map(String::as_str),
        Some("ready")
    );
    // The re-request asked exactly for the lost blocks (bitmap-driven).
    let retry = &svc.gets[1];
    assert_eq!(retry.offset, 0);
    assert_eq!(retry.bitmap.as_deref(), Some(&[0b0001_0111][..]));
    assert_eq!(pal.snapshot().rewrites(), 0);
}

#[test]
fn silence_ends_in_a_momentum_abort() {
    let (mut svc, pal, store, c) = setup(NEW, 1000);
    svc.silent = true;
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    for _ in 0..40 {
        sim.advance(Duration::from_secs(10), &mut svc);
    }
    assert_eq!(svc.status, ExecutionStatus::Failed);
    assert_eq!(svc.reason(), Some("aborted: 0x0000000e"));
    assert_eq!(svc.gets.len(), 32);
    assert_eq!(sim.agent.state(), AgentState::WaitingForJob);
    assert_eq!(sim.agent.next_deadline(), None);
}

#[test]
fn restart_mid_download_resumes_from_the_checkpoint() {
    let (mut svc, pal, store, c) = setup(NEW, 256 * 40 - 12);
    let total = svc.file.len().div_ceil(256) as u64;
    svc.cut_after = Some(22);
    let sim = run_download(&mut svc, &pal, &store, &c);
    assert_eq!(sim.handle.statistics().packets_processed, 22);
    drop(sim); // kill -9: nothing runs on the way out
    let checkpoint = store.get().expect("checkpoint");
    assert_eq!(checkpoint.phase, Phase::Downloading);
    let missing = checkpoint.bitmap().expect("bitmap").missing();
    // Checkpointed before the request that brought blocks 20 and 21.
    assert_eq!(total - missing, 20);

    svc.cut_after = None;
    let mut sim = Sim::boot(config(OLD), &pal, &store, c);
    sim.pump(&mut svc);
    assert_eq!(
        svc.details.get("self_test").map(String::as_str),
        Some("ready")
    );
    assert!(sim.has_event(|e| matches!(e, JobEvent::Activate { .. })));
    let d = pal.snapshot();
    assert_eq!(d.writes.len() as u64, total);
    assert!(d.rewrites() <= 4, "refetched {} blocks", d.rewrites());
    assert_eq!(d.rewrites(), 2);
    // The second agent asked only for what was missing.
    assert_eq!(sim.handle.statistics().packets_processed, total - 20);
}

#[test]
fn a_checkpoint_for_another_file_is_discarded() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    svc.cut_after = Some(5);
    run_download(&mut svc, &pal, &store, &c);
    // The job's file changed (a new signature): start over.
    let (pem2, key2) = signer();
    let sig = sign(&key2, &svc.file);
    svc.file_field(
        "sig-sha256-ecdsa",
        json!(updraft_protocol::streams::base64_encode(&sig)),
    );
    svc.cut_after = None;
    let mut sim = Sim::boot(config(OLD), &pal, &store, certs(&pem2));
    sim.pump(&mut svc);
    assert_eq!(
        svc.details.get("self_test").map(String::as_str),
        Some("ready")
    );
    assert_eq!(sim.handle.statistics().packets_processed, 12);
}

#[test]
fn restart_after_ready_offers_activation_again() {
    let (mut svc, pal, store, c) = setup(NEW, 1000);
    let sim = run_download(&mut svc, &pal, &store, &c);
    drop(sim);
    let mut sim = Sim::boot(config(OLD), &pal, &store, c);
    sim.pump(&mut svc);
    assert!(sim.has_event(|e| matches!(e, JobEvent::Activate { .. })));
    assert_eq!(svc.status, ExecutionStatus::InProgress);
    sim.activate(&mut svc).expect("activate");
    assert_eq!(pal.running_version(), NEW);
}

#[test]
fn announcements_during_a_download() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    svc.cut_after = Some(4);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    assert_eq!(sim.agent.state(), AgentState::WaitingForFileBlock);
    // The same job announced again: the download goes on.
    let again = Bytes::from(svc.execution().to_string());
    sim.handle
        .incoming_bytes(&format!("$aws/things/{THING}/jobs/notify-next"), again);
    sim.pump(&mut svc);
    assert_eq!(sim.agent.state(), AgentState::WaitingForFileBlock);
    // The job is canceled: notify-next with nothing. Abandoned, no status for it.
    let updates = svc.updates.len();
    svc.status = ExecutionStatus::Canceled;
    sim.handle.incoming_bytes(
        &format!("$aws/things/{THING}/jobs/notify-next"),
        Bytes::from_static(br#"{"timestamp":2}"#),
    );
    sim.pump(&mut svc);
    assert_eq!(sim.agent.state(), AgentState::WaitingForJob);
    assert_eq!(svc.updates.len(), updates);
    assert_eq!(store.get(), None);
    assert!(pal.snapshot().staged.is_none());
    assert!(sim.has_event(|e| matches!(e, JobEvent::NoActiveJob)));
}

#[test]
fn suspend_and_resume_continue_without_refetching() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    svc.cut_after = Some(6);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    sim.agent
        .command(Command::Signal(AgentEvent::Suspend, Data::None), sim.now);
    assert_eq!(sim.agent.state(), AgentState::Suspended);
    assert_eq!(sim.agent.next_deadline(), None);
    svc.cut_after = None;
    sim.agent
        .command(Command::Signal(AgentEvent::Resume, Data::None), sim.now);
    sim.pump(&mut svc);
    assert_eq!(
        svc.details.get("self_test").map(String::as_str),
        Some("ready")
    );
    assert_eq!(pal.snapshot().rewrites(), 0);
}

#[test]
fn full_queue_drops_blocks_and_counts_them() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    let mut cfg = config(OLD);
    cfg.event_queue_size = 2;
    let mut sim = Sim::boot(cfg, &pal, &store, c);
    sim.pump(&mut svc);
    let s = sim.handle.statistics();
    assert!(s.packets_dropped > 0);
    assert_eq!(s.packets_received, s.packets_queued + s.packets_dropped);
    for _ in 0..20 {
        sim.advance(Duration::from_secs(10), &mut svc);
    }
    assert_eq!(
        svc.details.get("self_test").map(String::as_str),
        Some("ready")
    );
}

#[test]
fn non_firmware_files_complete_without_activation() {
    let (mut svc, pal, store, c) = setup(NEW, 1000);
    svc.file_field("fileType", json!(1));
    let sim = run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.status, ExecutionStatus::Succeeded);
    assert_eq!(
        svc.updates.last().map(String::as_str),
        Some(
            r#"{"status":"SUCCEEDED","statusDetails":{"reason":"accepted  v0.0.1","updatedBy":"  v0.0.0"}}"#
        )
    );
    assert!(sim.has_event(|e| matches!(e, JobEvent::UpdateComplete { .. })));
}

#[test]
fn user_abort_and_shutdown() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    svc.cut_after = Some(4);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    sim.set_image_state(ImageState::Aborted, &mut svc)
        .expect("abort");
    assert_eq!(svc.reason(), Some("aborted: 0x00000013"));
    assert_eq!(sim.agent.state(), AgentState::WaitingForJob);
    assert!(!sim.subs.iter().any(|s| s.contains("/streams/")));
    // Nothing left to abort: the state does not change.
    sim.set_image_state(ImageState::Aborted, &mut svc)
        .expect("abort");
    assert_eq!(sim.agent.state(), AgentState::WaitingForJob);
    assert!(sim.set_image_state(ImageState::Unknown, &mut svc).is_err());
    sim.agent
        .command(Command::Shutdown { unsubscribe: true }, sim.now);
    sim.pump(&mut svc);
    assert_eq!(sim.agent.state(), AgentState::Stopped);
    assert_eq!(sim.handle.state(), AgentState::Stopped);
    assert!(sim.subs.is_empty(), "{:?}", sim.subs);
}

#[test]
fn request_windows() {
    let mut m = Bitmap::all_missing(100);
    for b in [0, 1, 2, 5, 9] {
        m.mark_received(b);
    }
    let (req, wanted) = next_request(&m, 3, 1024, 4);
    assert_eq!(req.offset, 3);
    assert_eq!(wanted.into_iter().collect::<Vec<_>>(), vec![3, 4, 6, 7]);
    assert_eq!(req.bitmap.as_deref(), Some(&[0b0001_1011][..]));
    assert_eq!(req.number_of_blocks, Some(4));
    assert_eq!(req.file_id, 3);
    // The service picks the same blocks.
    let picked = select_blocks(100 * 1024, &req).expect("select");
    assert_eq!(picked, vec![3, 4, 6, 7]);
    let mut cfg = config(OLD);
    cfg.block_size = 65536;
    cfg.blocks_per_request = 8;
    assert_eq!(cfg.effective_blocks_per_request(), 2);
    cfg.block_size = 100;
    assert!(cfg.validate().is_err());
}

#[test]
fn a_different_job_after_resume_replaces_the_transfer() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    svc.cut_after = Some(4);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    sim.agent
        .command(Command::Signal(AgentEvent::Suspend, Data::None), sim.now);
    // While suspended, the job is canceled and another one queued.
    let first_updates = svc.updates.clone();
    svc.job = "AFR_OTA-ota2".into();
    svc.status = ExecutionStatus::Queued;
    svc.details.clear();
    svc.updates.clear();
    svc.cut_after = None;
    sim.agent
        .command(Command::Signal(AgentEvent::Resume, Data::None), sim.now);
    sim.pump(&mut svc);
    assert_eq!(
        svc.details.get("self_test").map(String::as_str),
        Some("ready")
    );
    assert_eq!(first_updates.len(), 1, "no status for the abandoned job");
    assert_eq!(
        store.get().map(|s| s.job_id),
        Some("AFR_OTA-ota2".to_owned())
    );
    let d = pal.snapshot();
    assert_eq!(
        d.staged.as_ref().map(|s| s.job_id.as_str()),
        Some("AFR_OTA-ota2")
    );
    assert_eq!(d.rewrites(), 0, "the new file started from an empty slot");
}

/// A document of the job captured before the service recorded `self_test: ready` (a
/// notify-next on its way while the download finished, or a lost `ready` report).
fn stale_document(svc: &Service) -> Bytes {
    let mut v = svc.execution();
    v["execution"]["status"] = json!("IN_PROGRESS");
    v["execution"]
        .as_object_mut()
        .expect("execution")
        .remove("statusDetails");
    Bytes::from(v.to_string())
}

#[test]
fn the_verified_job_seen_without_ready_is_not_downloaded_again() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    assert!(sim.has_event(|e| matches!(e, JobEvent::Activate { .. })));
    let (gets, writes, updates) = (
        svc.gets.len(),
        pal.snapshot().writes.len(),
        svc.updates.len(),
    );
    sim.handle.incoming_bytes(
        &format!("$aws/things/{THING}/jobs/notify-next"),
        stale_document(&svc),
    );
    sim.pump(&mut svc);
    // No new download; the ready report goes out again; activation still possible.
    assert_eq!(svc.gets.len(), gets);
    assert_eq!(pal.snapshot().writes.len(), writes);
    assert_eq!(
        svc.updates[updates..],
        [
            r#"{"status":"IN_PROGRESS","statusDetails":{"self_test":"ready","updatedBy":"0x01000000"}}"#
        ]
    );
    assert_eq!(store.get().map(|s| s.phase), Some(Phase::Verified));
    sim.activate(&mut svc).expect("activate");
    assert_eq!(pal.running_version(), NEW);
}

#[test]
fn stale_documents_after_the_self_test_verdict_are_ignored() {
    for verdict in [ImageState::Accepted, ImageState::Rejected] {
        let (mut svc, pal, store, c) = setup(NEW, 1000);
        let mut sim = run_download(&mut svc, &pal, &store, &c);
        sim.activate(&mut svc).expect("activate");
        let mut sim = Sim::boot(config(NEW), &pal, &store, c.clone());
        sim.pump(&mut svc);
        // Captured while the self-test was running, delivered after the verdict.
        let in_test = Bytes::from(svc.execution().to_string());
        sim.set_image_state(verdict, &mut svc).expect("verdict");
        let updates = svc.updates.len();
        let events = sim.events().len();
        sim.handle.incoming_bytes(
            &format!("$aws/things/{THING}/jobs/$next/get/accepted"),
            in_test,
        );
        sim.pump(&mut svc);
        assert_eq!(
            svc.updates.len(),
            updates,
            "{verdict:?}: no report contradicts the verdict"
        );
        assert_eq!(sim.events().len(), events, "{verdict:?}");
    }
}

#[test]
fn a_lost_verdict_is_reported_again_when_the_job_is_still_open() {
    let (mut svc, pal, store, c) = setup(NEW, 1000);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    sim.activate(&mut svc).expect("activate");
    let mut sim = Sim::boot(config(NEW), &pal, &store, c.clone());
    sim.pump(&mut svc);
    sim.set_image_state(ImageState::Accepted, &mut svc)
        .expect("accept");
    let verdict = svc.updates.last().cloned().expect("verdict");
    // The SUCCEEDED report never reached the service (the connection dropped under it).
    svc.status = ExecutionStatus::InProgress;
    svc.details = BTreeMap::from([("self_test".to_owned(), "active".to_owned())]);
    // After the reconnection the agent asks for its job: the answer is authoritative.
    sim.handle.suspend().expect("suspend");
    sim.pump(&mut svc);
    sim.handle.resume().expect("resume");
    sim.pump(&mut svc);
    assert_eq!(svc.status, ExecutionStatus::Succeeded);
    assert_eq!(svc.updates.last(), Some(&verdict));
}

#[test]
fn a_failed_execution_is_not_retried_on_a_stale_document_but_a_new_execution_is() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    svc.tamper_block = Some(2);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.status, ExecutionStatus::Failed);
    let gets = svc.gets.len();
    // A notify-next captured while the download ran, delivered after the failure.
    svc.status = ExecutionStatus::InProgress;
    let stale = stale_document(&svc);
    svc.status = ExecutionStatus::Failed;
    sim.handle
        .incoming_bytes(&format!("$aws/things/{THING}/jobs/notify-next"), stale);
    sim.pump(&mut svc);
    assert_eq!(
        svc.gets.len(),
        gets,
        "no second download of a failed execution"
    );
    // The job is retried: execution 2 of the same job downloads again.
    svc.status = ExecutionStatus::Queued;
    svc.tamper_block = None;
    let mut retry = svc.execution();
    retry["execution"]["executionNumber"] = json!(2);
    sim.handle.incoming_bytes(
        &format!("$aws/things/{THING}/jobs/notify-next"),
        Bytes::from(retry.to_string()),
    );
    sim.pump(&mut svc);
    assert!(svc.gets.len() > gets);
    assert!(sim.has_event(|e| matches!(e, JobEvent::Activate { .. })));
}

#[test]
fn client_tokens_stay_within_64_characters() {
    assert_eq!(client_token(7, "dev-1"), "7:dev-1");
    let long = "t".repeat(128);
    let token = client_token(u32::MAX, &long);
    assert_eq!(token.chars().count(), 64);
    assert!(token.starts_with("4294967295:ttt"));
    assert_eq!(
        request_number(format!(r#"{{"clientToken":"{token}"}}"#).as_bytes()),
        Some(u32::MAX)
    );
}

#[test]
fn a_job_created_again_under_the_same_id_is_a_new_job() {
    let (mut svc, pal, store, c) = setup(NEW, 3000);
    svc.tamper_block = Some(2);
    let mut sim = run_download(&mut svc, &pal, &store, &c);
    assert_eq!(svc.status, ExecutionStatus::Failed);
    let gets = svc.gets.len();
    let updates = svc.updates.len();
    // The operator deletes the job and creates it again: same id, execution 1 again, but
    // queued later. It is not the concluded execution: no old verdict, a new download.
    svc.status = ExecutionStatus::Queued;
    svc.tamper_block = None;
    let mut again = svc.execution();
    again["execution"]["queuedAt"] = json!(2);
    sim.handle.incoming_bytes(
        &format!("$aws/things/{THING}/jobs/notify-next"),
        Bytes::from(again.to_string()),
    );
    sim.pump(&mut svc);
    assert!(svc.gets.len() > gets, "the new job is downloaded");
    assert!(
        !svc.updates[updates..].iter().any(|u| u.contains("FAILED")),
        "the old verdict is not reported for the new job: {:?}",
        &svc.updates[updates..]
    );
    assert!(sim.has_event(|e| matches!(e, JobEvent::Activate { .. })));
}
