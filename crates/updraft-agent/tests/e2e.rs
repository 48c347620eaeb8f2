//! End to end: the real Updraft server in-process (SQLite, embedded broker, free ports) and
//! the agent over a real MQTT connection with the in-memory PAL.
//!
//! Firmware is signed with aws-lc-rs (ECDSA P-256, SHA-256) for a certificate made with
//! rcgen; streams and jobs are created directly in the server's store, with the same
//! `afr_ota` document CreateOTAUpdate generates (`support`).

mod support;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rumqttc::{AsyncClient, MqttOptions};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use updraft_agent::mqtt::run_event_loop;
use updraft_agent::pal::memory::MemoryPal;
use updraft_agent::{
    AgentConfig, AgentHandle, AppVersion, FileResumeStore, ImageState, JobEvent, MemoryResumeStore,
    PalImageState, ResumeStore, init,
};
use updraft_protocol::ExecutionStatus;

use support::{Delivery, Env, Update, UpdateSpec, WAIT, details, env, firmware, sign};

const OLD: AppVersion = AppVersion::new(1, 0, 0);
const NEW: AppVersion = AppVersion::new(1, 1, 0);
const BLOCK: u32 = 4096;
const PER_REQUEST: u32 = 8;

// ---- the device --------------------------------------------------------------------------

struct Device {
    handle: AgentHandle,
    agent: JoinHandle<()>,
    mqtt: JoinHandle<()>,
    events: mpsc::UnboundedReceiver<JobEvent>,
}

fn config(thing: &str, version: AppVersion) -> AgentConfig {
    let mut c = AgentConfig::new(thing, version);
    c.block_size = BLOCK;
    c.blocks_per_request = PER_REQUEST;
    c.request_wait = Duration::from_secs(2);
    c.status_frequency = 25;
    c
}

impl Env {
    /// Boots a device: the agent on its own MQTT connection (client id = thing name).
    fn boot(
        &self,
        config: AgentConfig,
        pal: &MemoryPal,
        store: impl ResumeStore + 'static,
    ) -> Device {
        self.boot_cut(config, pal, store, None)
    }

    /// [`Env::boot`], but the device hears only the first `cut` file blocks (it dies
    /// while the rest are on their way).
    fn boot_cut(
        &self,
        config: AgentConfig,
        pal: &MemoryPal,
        store: impl ResumeStore + 'static,
        cut: Option<u64>,
    ) -> Device {
        let mut opts = MqttOptions::new(config.thing_name.clone(), "127.0.0.1", self.port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let (tx, events) = mpsc::unbounded_channel();
        let (agent, handle) = init(
            config,
            pal.clone(),
            store,
            self.certs.clone(),
            client,
            move |e| {
                let _ = tx.send(e);
            },
        )
        .expect("init");
        let agent = tokio::spawn(agent.run());
        let mqtt = match cut {
            None => tokio::spawn(run_event_loop(eventloop, handle.clone(), |_| {})),
            Some(cut) => tokio::spawn(cut_event_loop(eventloop, handle.clone(), cut)),
        };
        Device {
            handle,
            agent,
            mqtt,
            events,
        }
    }
}

/// Feeds the agent like [`run_event_loop`], but no file block after the first `cut`.
async fn cut_event_loop(mut eventloop: rumqttc::EventLoop, handle: AgentHandle, cut: u64) {
    let mut blocks = 0;
    loop {
        match eventloop.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                if p.topic.contains("/data/") {
                    if blocks >= cut {
                        continue;
                    }
                    blocks += 1;
                }
                handle.incoming_bytes(&p.topic, p.payload.clone());
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

impl Device {
    async fn wait_event(&mut self, what: &str, f: impl Fn(&JobEvent) -> bool) -> JobEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) if f(&e) => return e,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the agent stopped before {what}"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    /// A power cut: the agent and its connection vanish between two events.
    fn kill(self) {
        self.agent.abort();
        self.mqtt.abort();
    }

    /// After the agent stopped on its own (activation, reset): drop the connection.
    async fn power_off(self) {
        tokio::time::timeout(WAIT, self.handle.stopped())
            .await
            .expect("agent stops");
        self.mqtt.abort();
        let _ = self.agent.await;
    }
}

/// Downloads and verifies on the old image, activates, and boots the new image until its
/// self-test starts. Returns the new image's device.
async fn to_self_test(env: &Env, u: &Update, pal: &MemoryPal, new: AppVersion) -> Device {
    let mut dev = env.boot(config(&u.thing, OLD), pal, MemoryResumeStore::new());
    dev.wait_event("Activate", |e| matches!(e, JobEvent::Activate { .. }))
        .await;
    // The ready report (QoS 1) reaches the service before the "reboot".
    let e = env
        .wait_execution(u, |e| e.status_details.contains_key("self_test"))
        .await;
    assert_eq!(e.status, ExecutionStatus::InProgress);
    assert_eq!(
        details(&e),
        BTreeMap::from([("self_test", "ready"), ("updatedBy", "0x01000000")])
    );
    dev.handle.activate_new_image().await.expect("activate");
    dev.power_off().await;
    assert_eq!(pal.running_version(), new);
    assert_eq!(pal.snapshot().state, PalImageState::PendingCommit);
    let mut dev = env.boot(config(&u.thing, new), pal, MemoryResumeStore::new());
    dev.wait_event("StartTest", |e| matches!(e, JobEvent::StartTest { .. }))
        .await;
    let e = env
        .wait_execution(u, |e| {
            e.status_details.get("self_test").map(String::as_str) == Some("active")
        })
        .await;
    assert_eq!(details(&e)["updatedBy"], "0x01010000");
    dev
}

// ---- the tests ---------------------------------------------------------------------------

/// The self-test passes: the job SUCCEEDED, the device runs `image`, committed, written once.
async fn accept_and_succeed(env: &Env, u: &Update, pal: &MemoryPal, dev: Device, image: &[u8]) {
    assert_eq!(dev.handle.image_state(), ImageState::Testing);
    dev.handle
        .set_image_state(ImageState::Accepted)
        .await
        .expect("accept");
    let e = env.wait_terminal(u).await;
    assert_eq!(e.status, ExecutionStatus::Succeeded);
    assert_eq!(
        details(&e),
        BTreeMap::from([("reason", "accepted  v1.1.0"), ("updatedBy", "  v1.0.0")])
    );
    let d = pal.snapshot();
    assert_eq!((d.running.version, d.state), (NEW, PalImageState::Valid));
    assert_eq!(d.running.bytes, image);
    assert_eq!(d.writes.len(), image.len().div_ceil(BLOCK as usize));
    assert_eq!(d.rewrites(), 0);
    assert_eq!((d.commits, d.rollbacks), (1, 0));
    dev.handle.shutdown(true).expect("shutdown");
    dev.power_off().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_firmware_over_mqtt_succeeds() {
    let env = env("ok").await;
    let image = firmware(NEW, 300_001, 1);
    let u = env.create("dev-ok", env.spec(&image)).await;
    let pal = MemoryPal::with_version(OLD);
    let dev = to_self_test(&env, &u, &pal, NEW).await;
    accept_and_succeed(&env, &u, &pal, dev, &image).await;
}

/// Runs the old image until the job ends and checks it failed with `reason`, the old image
/// still running.
async fn expect_failure(env: &Env, name: &str, spec: UpdateSpec, reason: &str) {
    let u = env.create(name, spec).await;
    let pal = MemoryPal::with_version(OLD);
    let mut dev = env.boot(config(&u.thing, OLD), &pal, MemoryResumeStore::new());
    let ev = dev
        .wait_event("Fail", |e| matches!(e, JobEvent::Fail { .. }))
        .await;
    let e = env.wait_terminal(&u).await;
    assert_eq!(e.status, ExecutionStatus::Failed, "{name}");
    assert_eq!(
        details(&e),
        BTreeMap::from([("reason", reason)]),
        "{name}: {ev:?}"
    );
    let d = pal.snapshot();
    assert_eq!(d.running.version, OLD, "{name}");
    assert_eq!(
        (d.activations, d.state),
        (0, PalImageState::Valid),
        "{name}"
    );
    assert!(d.staged.is_none(), "{name}: the refused image is discarded");
    assert_eq!(dev.handle.image_state(), ImageState::Rejected, "{name}");
    dev.handle.shutdown(true).expect("shutdown");
    dev.power_off().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signature_tampered_block_wrong_size_and_downgrade_fail() {
    let env = env("fail").await;
    let image = firmware(NEW, 100_000, 2);

    // Signed by someone else.
    let other = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).expect("key");
    let mut spec = env.spec(&image);
    spec.signature = sign(&other, &image);
    expect_failure(&env, "dev-badsig", spec, "0xe3000000: 0xfffffffe").await;

    // One block altered in the store: every block is well-formed, the signature is not.
    let mut spec = env.spec(&image);
    spec.served[10 * BLOCK as usize + 77] ^= 0x20;
    expect_failure(&env, "dev-tampered", spec, "0xe3000000: 0xfffffffe").await;

    // The document claims 100 bytes more than the stream holds: the last block is short.
    let mut spec = env.spec(&image);
    spec.file_size += 100;
    expect_failure(&env, "dev-size", spec, "0xe0000000: 0xfffffff9").await;

    // Correctly signed, but older than the running image.
    let old_image = firmware(AppVersion::new(0, 9, 0), 50_000, 3);
    expect_failure(
        &env,
        "dev-downgrade",
        env.spec(&old_image),
        "rejected: 0x0000000f",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_test_failure_and_timeout_roll_back() {
    let env = env("selftest").await;
    let image = firmware(NEW, 60_000, 4);

    // The application rejects the new image.
    let u = env.create("dev-reject", env.spec(&image)).await;
    let pal = MemoryPal::with_version(OLD);
    let dev = to_self_test(&env, &u, &pal, NEW).await;
    dev.handle
        .set_image_state(ImageState::Rejected)
        .await
        .expect("reject");
    let e = env.wait_terminal(&u).await;
    assert_eq!(e.status, ExecutionStatus::Failed);
    assert_eq!(
        details(&e),
        BTreeMap::from([("reason", "rejected: 0x00000000")])
    );
    dev.power_off().await;
    let d = pal.snapshot();
    assert_eq!((d.running.version, d.rollbacks), (OLD, 1));

    // Nobody answers the self-test: the device resets into the old image, which reports.
    let u = env.create("dev-timeout", env.spec(&image)).await;
    let pal = MemoryPal::with_version(OLD);
    let mut dev = env.boot(config(&u.thing, OLD), &pal, MemoryResumeStore::new());
    dev.wait_event("Activate", |e| matches!(e, JobEvent::Activate { .. }))
        .await;
    env.wait_execution(&u, |e| e.status_details.contains_key("self_test"))
        .await;
    dev.handle.activate_new_image().await.expect("activate");
    dev.power_off().await;
    let mut cfg = config(&u.thing, NEW);
    cfg.self_test_wait = Duration::from_millis(1500);
    let dev = env.boot(cfg, &pal, MemoryResumeStore::new());
    dev.power_off().await; // the self-test timer resets the device
    assert_eq!(pal.running_version(), OLD);
    let mut dev = env.boot(config(&u.thing, OLD), &pal, MemoryResumeStore::new());
    dev.wait_event("SelfTestFailed", |e| {
        matches!(e, JobEvent::SelfTestFailed { .. })
    })
    .await;
    let e = env.wait_terminal(&u).await;
    assert_eq!(e.status, ExecutionStatus::Failed);
    assert_eq!(
        details(&e),
        BTreeMap::from([("reason", "rejected: 0x00000011")])
    );
    dev.handle.shutdown(true).expect("shutdown");
    dev.power_off().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_download_resumes_and_refetches_at_most_one_request() {
    let env = env("resume").await;
    let image = firmware(NEW, 600_000, 5);
    let blocks = image.len().div_ceil(BLOCK as usize) as u64;
    let u = env.create("dev-resume", env.spec(&image)).await;
    let pal = MemoryPal::with_version(OLD);
    let checkpoint = env.dir.0.join("resume.json");

    // First life: dies after 61 blocks, in the middle of its 8th request (7 x 8 + 5).
    let cut = 61;
    let dev = env.boot_cut(
        config(&u.thing, OLD),
        &pal,
        FileResumeStore::new(&checkpoint),
        Some(cut),
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while dev.handle.statistics().packets_processed < cut {
        assert!(tokio::time::Instant::now() < deadline, "download stalled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    dev.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let written_before = pal.snapshot().writes.len() as u64;
    assert_eq!(written_before, cut);
    let saved = FileResumeStore::new(&checkpoint)
        .load()
        .expect("load")
        .expect("a checkpoint");
    let missing = saved.bitmap().expect("bitmap").missing();
    // Checkpointed before the 8th request: the 5 blocks since are not recorded.
    assert_eq!(blocks - missing, 56);

    // Second life: same device, same checkpoint file.
    let mut dev = env.boot(
        config(&u.thing, OLD),
        &pal,
        FileResumeStore::new(&checkpoint),
    );
    dev.wait_event("Activate", |e| matches!(e, JobEvent::Activate { .. }))
        .await;
    let d = pal.snapshot();
    assert_eq!(d.writes.len() as u64, blocks, "every block written");
    assert_eq!(d.rewrites(), 5);
    assert!(
        d.rewrites() <= PER_REQUEST,
        "{} blocks fetched twice, more than one request's worth ({PER_REQUEST})",
        d.rewrites()
    );
    let stats = dev.handle.statistics();
    eprintln!(
        "resume: {blocks} blocks; first life wrote {written_before}, checkpointed {}; \
         second life processed {} ({} fetched twice)",
        blocks - missing,
        stats.packets_processed,
        d.rewrites()
    );
    assert!(
        stats.packets_processed <= blocks - written_before + u64::from(PER_REQUEST),
        "the second life processed {} blocks",
        stats.packets_processed
    );
    // ... and the update completes.
    env.wait_execution(&u, |e| e.status_details.contains_key("self_test"))
        .await;
    dev.handle.activate_new_image().await.expect("activate");
    dev.power_off().await;
    assert_eq!(pal.snapshot().running.bytes, image);
    let mut dev = env.boot(
        config(&u.thing, NEW),
        &pal,
        FileResumeStore::new(&checkpoint),
    );
    dev.wait_event("StartTest", |e| matches!(e, JobEvent::StartTest { .. }))
        .await;
    dev.handle
        .set_image_state(ImageState::Accepted)
        .await
        .expect("accept");
    let e = env.wait_terminal(&u).await;
    assert_eq!(e.status, ExecutionStatus::Succeeded);
    assert!(
        !checkpoint.exists(),
        "the checkpoint is gone once the job is done"
    );
    dev.handle.shutdown(true).expect("shutdown");
    dev.power_off().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_streams_work_too() {
    let env = env("json").await;
    let image = firmware(NEW, 70_000, 6);
    let u = env.create("dev-json", env.spec(&image)).await;
    let pal = MemoryPal::with_version(OLD);
    let mut cfg = config(&u.thing, OLD);
    cfg.format = updraft_protocol::topics::Format::Json;
    cfg.block_size = 1024;
    let mut dev = env.boot(cfg, &pal, MemoryResumeStore::new());
    dev.wait_event("Activate", |e| matches!(e, JobEvent::Activate { .. }))
        .await;
    let e = env
        .wait_execution(&u, |e| e.status_details.contains_key("self_test"))
        .await;
    assert_eq!(details(&e)["self_test"], "ready");
    let d = pal.snapshot();
    assert_eq!(d.writes.len(), image.len().div_ceil(1024));
    assert_eq!(d.staged.map(|s| s.bytes), Some(image));
    dev.handle.shutdown(true).expect("shutdown");
    dev.power_off().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_firmware_over_http_presigned_url_succeeds() {
    let env = env("http").await;
    let image = firmware(NEW, 300_001, 7);
    let mut spec = env.spec(&image);
    spec.delivery = Delivery::Http;
    let u = env.create("dev-http", spec).await;
    // The device receives a URL signed for the server's HTTP listener, not the placeholder.
    let delivered = env
        .state
        .data_plane
        .substitute_presigned_urls(
            &env.state
                .store
                .get_job(&u.job)
                .await
                .expect("store")
                .expect("job"),
        )
        .await;
    assert!(
        delivered.contains(&format!("http://{}/firmware/dev-http/fw.bin?", env.http)),
        "{delivered}"
    );
    assert!(delivered.contains("X-Amz-Signature="), "{delivered}");
    let pal = MemoryPal::with_version(OLD);
    let dev = to_self_test(&env, &u, &pal, NEW).await;
    accept_and_succeed(&env, &u, &pal, dev, &image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_presigned_url_fails_the_job_with_the_http_status() {
    let env = env("expired").await;
    let image = firmware(NEW, 20_000, 8);
    let (access, secret) = env.state.keys.primary().expect("server key");
    // Signed two hours ago for one minute: refused with 403, and asking for the job again
    // brings the same URL (it is literal, not a placeholder).
    let url = updraft_server::auth::presign_s3_get(
        &format!("http://{}", env.http),
        "firmware",
        "dev-expired/fw.bin",
        access,
        secret,
        &env.state.region,
        updraft_server::clock::now_ms() - 2 * 3600 * 1000,
        60,
    );
    let mut spec = env.spec(&image);
    spec.delivery = Delivery::Url(url);
    expect_failure(&env, "dev-expired", spec, "0x00000008: 0x00000193").await;
}
