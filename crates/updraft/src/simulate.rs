//! `updraft simulate`: a fleet of virtual devices in one process, each a real
//! `updraft_agent` agent with an in-memory device ([`MemoryPal`]) on its own MQTT
//! connection, updated through the server's public API exactly as an operator would: a
//! signing certificate imported into ACM, a signing profile, the firmware uploaded to S3,
//! things in a thing group, and CreateOTAUpdate.
//!
//! Knobs make some devices misbehave, chosen from `--seed` so a run can be repeated and its
//! outcome predicted: corrupted downloads (the signature check fails: FAILED), self-tests
//! that fail (the device rolls back: FAILED, `rejected`), slow links, and connections
//! dropped mid-download (the agent resumes). The run fails when the outcome differs from
//! the prediction, so it doubles as a test.
//!
//! The engine ([`Target`], [`provision`], [`run_fleet`], [`Summary`]) is shared with
//! `updraft demo`.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use updraft_agent::pal::memory::{MemoryPal, image_with_version};
use updraft_agent::verify::PublicKey;
use updraft_agent::{
    AgentConfig, AgentHandle, AppVersion, FileContext, ImageState, JobEvent, MemoryResumeStore,
    Pal, PalError, PalImageState, init,
};
use updraft_protocol::job::Protocol;

use crate::api::{Api, Credentials};

/// The version every device runs at the start, and the one it is updated to.
pub const OLD: AppVersion = AppVersion::new(1, 0, 0);
pub const NEW: AppVersion = AppVersion::new(1, 1, 0);
/// Where devices find the signer's certificate (`certfile` of the job document).
const CERTFILE: &str = "/certs/updraft-fleet-signer.pem";

#[derive(Args, Clone)]
pub struct SimulateArgs {
    /// Virtual devices, each with its own MQTT connection.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Use the running server whose endpoints.json this is (its data directory must also
    /// hold `credentials` and `config`); without it a temporary server runs in-process.
    #[arg(long)]
    pub endpoints: Option<PathBuf>,
    /// Share of devices whose download is corrupted (their signature check fails).
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Share of devices whose self-test fails after the reboot (they roll back).
    #[arg(long, default_value_t = 0.0)]
    pub self_test_failure_rate: f64,
    /// Share of devices on a slow link: each block message they receive is delayed.
    #[arg(long, default_value_t = 0.0)]
    pub slow_rate: f64,
    /// The delay of a slow device, per block message (e.g. 50ms, 1s).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub slow_delay: Duration,
    /// Share of devices whose connection drops once mid-download (they reconnect and resume).
    #[arg(long, default_value_t = 0.0)]
    pub disconnect_rate: f64,
    /// Firmware size in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    pub size: usize,
    /// Block size (256..131072).
    #[arg(long, default_value_t = 4096)]
    pub block_size: u32,
    /// Blocks per request.
    #[arg(long, default_value_t = 8)]
    pub blocks_per_request: u32,
    /// How the devices download: MQTT Streams, or HTTP through the pre-signed URL.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Mqtt)]
    pub protocol: ProtocolArg,
    /// Seed of the choice of misbehaving devices and of the firmware bytes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A device that has not finished after this long counts as timed out.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum ProtocolArg {
    Mqtt,
    Http,
}

impl std::fmt::Display for ProtocolArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.protocol().as_str())
    }
}

impl ProtocolArg {
    fn protocol(self) -> Protocol {
        match self {
            ProtocolArg::Mqtt => Protocol::Mqtt,
            ProtocolArg::Http => Protocol::Http,
        }
    }
}

/// `250ms`, `2s`, `1m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("'{s}': use ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("'{s}': {e}"))
}

impl SimulateArgs {
    fn check(&self) -> anyhow::Result<()> {
        for (name, r) in [
            ("--failure-rate", self.failure_rate),
            ("--self-test-failure-rate", self.self_test_failure_rate),
            ("--slow-rate", self.slow_rate),
            ("--disconnect-rate", self.disconnect_rate),
        ] {
            if !(0.0..=1.0).contains(&r) {
                bail!("{name} must be from 0 to 1");
            }
        }
        if self.failure_rate + self.self_test_failure_rate > 1.0 {
            bail!("--failure-rate and --self-test-failure-rate add up to more than 1");
        }
        if self.devices == 0 {
            bail!("--devices must be at least 1");
        }
        if !(256..=131_072).contains(&self.block_size) {
            bail!("--block-size must be from 256 to 131072");
        }
        if self.size < 64 || self.size > 24 * 1024 * 1024 {
            bail!("--size must be from 64 bytes to 24 MiB");
        }
        Ok(())
    }
}

// ---- the server ----------------------------------------------------------------------------

/// The server the fleet talks to: its API and its MQTT listener, and — when it runs
/// in-process — what keeps it alive.
pub struct Target {
    pub api: Api,
    pub http: String,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    /// Sockets each device costs in this process (its own, plus the server's end when the
    /// server runs here).
    pub fds_per_connection: u64,
    _dir: Option<crate::bench::tempdir::TempDir>,
}

impl Target {
    /// A server on a temporary data directory and free loopback ports, in this process.
    pub async fn in_process() -> anyhow::Result<Target> {
        let (server, dir) = crate::bench::temp_server(None).await?;
        let mqtt = server
            .mqtt_addr
            .context("the server has no MQTT listener")?;
        let http = format!("http://{}", server.http_addr);
        let state = server.state().clone();
        let (access, secret) = state.keys.primary().context("the server has no API key")?;
        let creds = Credentials {
            access_key: access.to_owned(),
            secret_key: secret.to_owned(),
            region: state.region.clone(),
        };
        tokio::spawn(server.run(std::future::pending()));
        Ok(Target {
            api: Api::new(&http, creds)?,
            http,
            mqtt_host: mqtt.ip().to_string(),
            mqtt_port: mqtt.port(),
            fds_per_connection: 2,
            _dir: Some(dir),
        })
    }

    /// A running server, from the `endpoints.json` in its data directory (with the
    /// `credentials` and `config` it writes next to it).
    pub fn from_endpoints(path: &std::path::Path) -> anyhow::Result<Target> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let http = v["http"]
            .as_str()
            .context("endpoints.json has no http endpoint")?
            .to_owned();
        let mqtt = v["mqtt"]
            .as_str()
            .and_then(|m| m.strip_prefix("mqtt://"))
            .context(
                "endpoints.json has no plain mqtt:// endpoint (the simulator does not do mTLS)",
            )?;
        let (host, port) = mqtt
            .rsplit_once(':')
            .context("the mqtt endpoint has no port")?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let creds = Credentials::from_data_dir(dir)?;
        Ok(Target {
            api: Api::new(&http, creds)?,
            http,
            mqtt_host: host.to_owned(),
            mqtt_port: port.parse().context("the mqtt endpoint's port")?,
            fds_per_connection: 1,
            _dir: None,
        })
    }
}

// ---- the update ------------------------------------------------------------------------------

/// What [`provision`] made.
pub struct Fleet {
    pub things: Vec<String>,
    pub job_id: String,
    pub image: Arc<Vec<u8>>,
    /// certfile → PEM: what every device trusts.
    pub certs: BTreeMap<String, String>,
}

/// A pseudo-random generator (splitmix64): enough for picking devices and filling firmware,
/// and the same sequence for the same seed on every platform.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// The numbers `0..n` in a random order.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// A firmware image of `size` bytes in the in-memory device's format (its version in a
/// header, so downgrades are caught before activation).
pub fn firmware(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed.wrapping_add(7));
    let payload: Vec<u8> = (0..size.saturating_sub(12))
        .map(|_| rng.next() as u8)
        .collect();
    image_with_version(NEW, &payload)
}

/// Runs `f` over `items` with at most `limit` at a time; the first error wins.
async fn for_each_limited<T, F, Fut>(items: Vec<T>, limit: usize, f: F) -> anyhow::Result<()>
where
    T: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(limit.max(1)));
    let mut set = JoinSet::new();
    for item in items {
        let permit = sem.clone().acquire_owned().await?;
        let fut = f(item);
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// Makes everything an update needs through the API: a code-signing certificate in ACM, a
/// signing profile naming [`CERTFILE`], a versioned bucket with the firmware, `devices`
/// things in a thing group, and an OTA update for the group, signed by the server's signer.
/// `say` narrates each step.
pub async fn provision(
    api: &Arc<Api>,
    devices: usize,
    size: usize,
    seed: u64,
    protocol: ProtocolArg,
    say: &dyn Fn(&str),
) -> anyhow::Result<Fleet> {
    let stamp = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let prefix = format!("fleet-{stamp}");

    say(&format!(
        "registering {devices} devices (things in thing group {prefix})"
    ));
    let group = api
        .json(
            "iot",
            "POST",
            &format!("/thing-groups/{prefix}"),
            Some(json!({})),
        )
        .await?;
    let group_arn = group["thingGroupArn"]
        .as_str()
        .context("CreateThingGroup returned no ARN")?
        .to_owned();
    let account = group_arn
        .split(':')
        .nth(4)
        .unwrap_or("123456789012")
        .to_owned();
    let things: Vec<String> = (0..devices).map(|i| format!("{prefix}-{i:05}")).collect();
    let created = Arc::new(AtomicU64::new(0));
    for_each_limited(things.clone(), 16, |thing| {
        let api = api.clone();
        let group = prefix.clone();
        let created = created.clone();
        async move {
            api.json("iot", "POST", &format!("/things/{thing}"), Some(json!({})))
                .await?;
            api.json(
                "iot",
                "PUT",
                "/thing-groups/addThingToThingGroup",
                Some(json!({"thingGroupName": group, "thingName": thing})),
            )
            .await?;
            created.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    })
    .await?;

    say("creating a code-signing certificate and importing it into ACM");
    let generated =
        updraft_server::signer::crypto::code_signing_certificate("Updraft fleet signer", 30)?;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let imported = api
        .acm(
            "ImportCertificate",
            json!({
                "Certificate": b64.encode(generated.certificate_pem.as_bytes()),
                "PrivateKey": b64.encode(generated.private_key_pem.as_bytes()),
            }),
        )
        .await?;
    let cert_arn = imported["CertificateArn"]
        .as_str()
        .context("ImportCertificate returned no ARN")?;
    let profile = format!("fleet_{stamp}");
    say(&format!(
        "creating signing profile {profile} (AmazonFreeRTOS-Default, certfile {CERTFILE})"
    ));
    api.json(
        "signer",
        "PUT",
        &format!("/signing-profiles/{profile}"),
        Some(json!({
            "platformId": "AmazonFreeRTOS-Default",
            "signingMaterial": {"certificateArn": cert_arn},
            "signingParameters": {"certname": CERTFILE},
        })),
    )
    .await?;

    let image = firmware(size, seed);
    let bucket = format!("updraft-{prefix}");
    say(&format!(
        "uploading firmware v{NEW} ({} bytes) to s3://{bucket}/firmware.bin",
        image.len()
    ));
    api.call("s3", "PUT", &format!("/{bucket}"), &[], &[])
        .await?;
    let versioning = br#"<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Status>Enabled</Status></VersioningConfiguration>"#;
    api.call(
        "s3",
        "PUT",
        &format!("/{bucket}?versioning"),
        &[],
        versioning,
    )
    .await?;
    let put = api
        .call("s3", "PUT", &format!("/{bucket}/firmware.bin"), &[], &image)
        .await?;
    let version = put
        .header("x-amz-version-id")
        .context("PutObject returned no version id")?
        .to_owned();

    let ota_id = prefix.clone();
    let protocols = match protocol {
        ProtocolArg::Mqtt => json!(["MQTT"]),
        ProtocolArg::Http => json!(["HTTP"]),
    };
    say(&format!(
        "CreateOTAUpdate {ota_id}: sign with {profile}, deliver over {protocols}, target the group"
    ));
    api.json(
        "iot",
        "POST",
        &format!("/otaUpdates/{ota_id}"),
        Some(json!({
            "description": "updraft simulate",
            "targets": [group_arn],
            "targetSelection": "SNAPSHOT",
            "protocols": protocols,
            "roleArn": format!("arn:aws:iam::{account}:role/updraft-ota"),
            "awsJobPresignedUrlConfig": {"expiresInSec": 3600},
            "files": [{
                "fileName": "firmware.bin",
                "fileVersion": NEW.to_string(),
                "fileLocation": {"s3Location": {"bucket": bucket, "key": "firmware.bin", "version": version}},
                "codeSigning": {"startSigningJobParameter": {
                    "signingProfileName": profile,
                    "destination": {"s3Destination": {"bucket": bucket, "prefix": "signed/"}},
                }},
            }],
        })),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let job_id = loop {
        let info = api
            .json("iot", "GET", &format!("/otaUpdates/{ota_id}"), None)
            .await?;
        let info = &info["otaUpdateInfo"];
        match info["otaUpdateStatus"].as_str() {
            Some("CREATE_COMPLETE") => {
                break info["awsIotJobId"]
                    .as_str()
                    .context("the OTA update has no job")?
                    .to_owned();
            }
            Some("CREATE_FAILED") => bail!("CreateOTAUpdate failed: {}", info["errorInfo"]),
            _ if Instant::now() > deadline => bail!("the OTA update was not created in 2 minutes"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    say(&format!("job {job_id} is ready"));
    Ok(Fleet {
        things,
        job_id,
        image: Arc::new(image),
        certs: BTreeMap::from([(CERTFILE.to_owned(), generated.certificate_pem)]),
    })
}

// ---- the devices -----------------------------------------------------------------------------

/// How one device misbehaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Role {
    /// Its download is corrupted: the signature check fails.
    pub corrupt: bool,
    /// Its self-test fails after the reboot.
    pub reject: bool,
    /// Each block message reaches it late.
    pub slow: bool,
    /// Its connection drops once after this many blocks.
    pub disconnect_after: Option<u64>,
}

/// What a device ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// The job failed before activation (download, verification).
    Failed(String),
    /// The new image failed its self-test and was rolled back.
    Rejected(String),
    TimedOut,
}

impl Outcome {
    fn kind(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed(_) => "failed",
            Outcome::Rejected(_) => "rejected",
            Outcome::TimedOut => "timed out",
        }
    }
}

impl Role {
    /// The outcome this role should produce.
    pub fn expected(&self) -> Outcome {
        if self.corrupt {
            Outcome::Failed(String::new())
        } else if self.reject {
            Outcome::Rejected(String::new())
        } else {
            Outcome::Succeeded
        }
    }
}

/// The knobs of a run, as shares of the fleet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rates {
    pub failure: f64,
    pub self_test_failure: f64,
    pub slow: f64,
    pub disconnect: f64,
}

/// Picks the misbehaving devices: exactly `round(rate × n)` of each kind, from the seed.
/// Corrupt and self-test-failing devices are disjoint, so the expected counts are exact.
pub fn plan(n: usize, rates: Rates, blocks: u64, seed: u64) -> Vec<Role> {
    let count = |r: f64| ((r * n as f64).round() as usize).min(n);
    let mut rng = Rng::new(seed);
    let mut roles = vec![Role::default(); n];
    let order = rng.permutation(n);
    let (bad, rejecting) = (count(rates.failure), count(rates.self_test_failure));
    for &i in order.iter().take(bad) {
        roles[i].corrupt = true;
    }
    for &i in order.iter().skip(bad).take(rejecting) {
        roles[i].reject = true;
    }
    for &i in rng.permutation(n).iter().take(count(rates.slow)) {
        roles[i].slow = true;
    }
    if blocks >= 2 {
        for &i in rng.permutation(n).iter().take(count(rates.disconnect)) {
            roles[i].disconnect_after = Some(1 + rng.below(blocks - 1));
        }
    }
    roles
}

/// Live counters for the progress line.
#[derive(Default)]
pub struct Counters {
    pub bytes: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub rejected: AtomicU64,
    pub timed_out: AtomicU64,
    pub disconnects: AtomicU64,
}

impl Counters {
    fn done(&self) -> u64 {
        [
            &self.succeeded,
            &self.failed,
            &self.rejected,
            &self.timed_out,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// The in-memory device as the simulator runs it: bytes counted, and a corrupted download
/// for devices whose role says so (one byte of the first block flipped, as a bad flash
/// write or a tampered transfer would).
#[derive(Clone)]
struct SimPal {
    inner: MemoryPal,
    corrupt: bool,
    counters: Arc<Counters>,
}

impl Pal for SimPal {
    fn abort(&mut self, file: &FileContext) -> Result<(), PalError> {
        self.inner.abort(file)
    }
    fn create_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        self.inner.create_file(file)
    }
    fn reopen_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        self.inner.reopen_file(file)
    }
    fn write_block(
        &mut self,
        file: &FileContext,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PalError> {
        self.counters
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if self.corrupt && offset == 0 && !data.is_empty() {
            let mut bad = data.to_vec();
            let last = bad.len() - 1;
            bad[last] ^= 0x5a;
            return self.inner.write_block(file, offset, &bad);
        }
        self.inner.write_block(file, offset, data)
    }
    fn read_block(
        &mut self,
        file: &FileContext,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, PalError> {
        self.inner.read_block(file, offset, buf)
    }
    fn flush(&mut self, file: &FileContext) -> Result<(), PalError> {
        self.inner.flush(file)
    }
    fn close_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        self.inner.close_file(file)
    }
    fn verify_signature(&mut self, file: &FileContext, key: &PublicKey) -> Result<(), PalError> {
        self.inner.verify_signature(file, key)
    }
    fn image_version(&mut self, file: &FileContext) -> Result<Option<AppVersion>, PalError> {
        self.inner.image_version(file)
    }
    fn activate_new_image(&mut self) -> Result<(), PalError> {
        self.inner.activate_new_image()
    }
    fn reset_device(&mut self) -> Result<(), PalError> {
        self.inner.reset_device()
    }
    fn set_platform_image_state(&mut self, state: ImageState) -> Result<(), PalError> {
        self.inner.set_platform_image_state(state)
    }
    fn get_platform_image_state(&mut self) -> Result<PalImageState, PalError> {
        self.inner.get_platform_image_state()
    }
}

/// How the devices are configured.
#[derive(Clone)]
pub struct DeviceSettings {
    pub mqtt_host: String,
    pub mqtt_port: u16,
    pub block_size: u32,
    pub blocks_per_request: u32,
    pub protocol: ProtocolArg,
    pub slow_delay: Duration,
    pub timeout: Duration,
}

/// One device's result.
#[derive(Debug, Clone)]
pub struct DeviceResult {
    pub thing: String,
    pub role: Role,
    pub outcome: Outcome,
    /// The version it runs at the end.
    pub version: AppVersion,
    /// From its first connection to its outcome.
    pub elapsed: Duration,
}

/// A booted device: the agent, its connection, and what its callback says.
struct Booted {
    handle: AgentHandle,
    agent: JoinHandle<()>,
    link: JoinHandle<()>,
    events: mpsc::UnboundedReceiver<JobEvent>,
    reports: Arc<Reports>,
}

impl Drop for Booted {
    /// A device given up on (timed out) stops for good: a dropped `JoinHandle` would only
    /// detach its tasks, which could then still change the server's state.
    fn drop(&mut self) {
        self.link.abort();
        self.agent.abort();
    }
}

/// What the device's link has seen of its job: whether the service has recorded the
/// `self_test: ready` report (a job document carrying it came back).
#[derive(Default)]
struct Reports {
    ready_seen: std::sync::atomic::AtomicBool,
}

impl Booted {
    /// The device powers off: connection and agent go.
    async fn power_off(self) {
        // Dropping `self` at the end aborts both tasks (see `Drop`).
        self.link.abort();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.handle.stopped()).await;
        self.agent.abort();
    }

    async fn next_event(&mut self) -> Option<JobEvent> {
        self.events.recv().await
    }

    /// Waits (up to `limit`) until the service shows the `self_test: ready` report: a real
    /// device takes seconds to reboot, which leaves the service time to record it; a
    /// simulated one reboots at once and must not overtake it (its new image would find the
    /// job not in self-test and roll back). The device asks for its job (the service
    /// answers in order, after the report) until the answer carries `ready`; if the report
    /// was lost with a dropped connection, the agent sends it again on seeing the job
    /// without it.
    async fn ready_recorded(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.reports.ready_seen.load(Ordering::Relaxed) && Instant::now() < deadline {
            let _ = self.handle.check_for_update();
            let wait = Instant::now() + Duration::from_secs(1);
            while !self.reports.ready_seen.load(Ordering::Relaxed) && Instant::now() < wait {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn boot(
    thing: &str,
    version: AppVersion,
    pal: SimPal,
    role: Role,
    fleet: &Fleet,
    settings: &DeviceSettings,
    counters: &Arc<Counters>,
) -> anyhow::Result<Booted> {
    let mut opts = MqttOptions::new(thing, settings.mqtt_host.clone(), settings.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, eventloop) = AsyncClient::new(opts, 64);
    let mut config = AgentConfig::new(thing, version);
    config.block_size = settings.block_size;
    config.blocks_per_request = settings.blocks_per_request;
    config.data_protocols = vec![settings.protocol.protocol()];
    config.report_flush_wait = Duration::from_millis(300);
    let (tx, events) = mpsc::unbounded_channel();
    let reports = Arc::new(Reports::default());
    let (agent, handle) = init(
        config,
        pal,
        MemoryResumeStore::new(),
        fleet.certs.clone(),
        client,
        move |e| {
            let _ = tx.send(e);
        },
    )?;
    // Every log line of the device names it (UPDRAFT_LOG=updraft_agent=info to follow one).
    let span = tracing::info_span!("device", thing = %thing, life = %version);
    let agent = tokio::spawn(agent.run().instrument(span.clone()));
    let link = tokio::spawn(
        link(
            eventloop,
            handle.clone(),
            role.slow.then_some(settings.slow_delay),
            role.disconnect_after,
            counters.clone(),
            reports.clone(),
        )
        .instrument(span),
    );
    Ok(Booted {
        handle,
        agent,
        link,
        events,
        reports,
    })
}

/// Once the agent has stopped (a reset), sends what it queued last — its final report —
/// as a device's MQTT stack does before the reboot: polls until nothing is queued or in
/// flight, for at most two seconds.
async fn flush(eventloop: &mut EventLoop) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
            eventloop.poll(),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                let idle = eventloop.state.inflight() == 0 && eventloop.pending.is_empty();
                if idle || tokio::time::Instant::now() >= deadline {
                    return;
                }
            }
        }
    }
}

/// The device's side of its MQTT connection, like `updraft_agent::mqtt::run_event_loop`
/// (suspend on a lost connection, resume on the next CONNACK) plus the simulated link's
/// faults: a delay per block message, and one dropped connection once the agent has
/// processed `disconnect_after` blocks.
async fn link(
    mut eventloop: EventLoop,
    handle: AgentHandle,
    delay: Option<Duration>,
    mut disconnect_after: Option<u64>,
    counters: Arc<Counters>,
    reports: Arc<Reports>,
) {
    let mut connected_once = false;
    let mut suspended = false;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        let event = tokio::select! {
            () = handle.stopped() => {
                flush(&mut eventloop).await;
                return;
            }
            e = eventloop.poll() => Some(e),
            _ = tick.tick(), if disconnect_after.is_some() => None,
        };
        if let Some(at) = disconnect_after
            && handle.statistics().packets_processed >= at
            && connected_once
        {
            // Drop the TCP connection under the agent's feet; the next poll reconnects.
            disconnect_after = None;
            counters.disconnects.fetch_add(1, Ordering::Relaxed);
            let _ = handle.suspend();
            suspended = true;
            eventloop.clean();
            eventloop.network = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        match event {
            Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                if let Some(d) = delay
                    && p.topic.contains("/streams/")
                {
                    tokio::time::sleep(d).await;
                }
                if p.topic.ends_with("/update/rejected") {
                    tracing::warn!(
                        "the service refused a status report: {}",
                        String::from_utf8_lossy(&p.payload)
                    );
                }
                if (p.topic.ends_with("/$next/get/accepted") || p.topic.ends_with("/notify-next"))
                    && p.payload
                        .windows(19)
                        .any(|w| w == br#""self_test":"ready""#)
                {
                    reports.ready_seen.store(true, Ordering::Relaxed);
                }
                handle.incoming_bytes(&p.topic, p.payload.clone());
            }
            Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                tracing::debug!("connected");
                if connected_once && suspended {
                    let _ = handle.resume();
                }
                connected_once = true;
                suspended = false;
            }
            Some(Ok(_)) | None => {}
            Some(Err(e)) => {
                tracing::debug!("connection: {e}");
                if connected_once && !suspended {
                    let _ = handle.suspend();
                    suspended = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// One device's life: download on the old image, activate, reboot into the new one, test
/// it, and accept it (or reject it, if its role says so). Returns its result and, if it is
/// still running, the device (its connection stays up until the fleet is done, so its last
/// report is surely delivered).
async fn device(
    idx: usize,
    role: Role,
    fleet: Arc<Fleet>,
    settings: Arc<DeviceSettings>,
    counters: Arc<Counters>,
) -> (DeviceResult, Option<Booted>) {
    let thing = fleet.things[idx].clone();
    let pal = MemoryPal::with_version(OLD);
    let sim = SimPal {
        inner: pal.clone(),
        corrupt: role.corrupt,
        counters: counters.clone(),
    };
    let start = Instant::now();
    let mut live = None;
    let life = async {
        let mut dev = boot(&thing, OLD, sim.clone(), role, &fleet, &settings, &counters)?;
        loop {
            match dev.next_event().await {
                Some(JobEvent::Activate { .. }) => break,
                Some(JobEvent::Fail { reason, .. }) => {
                    live = Some(dev);
                    return anyhow::Ok(Outcome::Failed(reason));
                }
                Some(_) => {}
                None => bail!("the agent stopped"),
            }
        }
        dev.ready_recorded(Duration::from_secs(30)).await;
        dev.handle.activate_new_image().await?;
        dev.power_off().await;
        let mut dev = boot(&thing, NEW, sim.clone(), role, &fleet, &settings, &counters)?;
        loop {
            match dev.next_event().await {
                Some(JobEvent::StartTest { .. }) => break,
                Some(JobEvent::SelfTestFailed { reason, .. }) => {
                    live = Some(dev);
                    return Ok(Outcome::Rejected(reason));
                }
                Some(_) => {}
                None => bail!("the agent stopped during the self-test"),
            }
        }
        let outcome = if role.reject {
            dev.handle.set_image_state(ImageState::Rejected).await?;
            Outcome::Rejected("the self-test failed".into())
        } else {
            dev.handle.set_image_state(ImageState::Accepted).await?;
            Outcome::Succeeded
        };
        live = Some(dev);
        Ok(outcome)
    };
    let outcome = match tokio::time::timeout(settings.timeout, life).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => Outcome::Failed(format!("{e:#}")),
        Err(_) => Outcome::TimedOut,
    };
    let counter = match outcome {
        Outcome::Succeeded => &counters.succeeded,
        Outcome::Failed(_) => &counters.failed,
        Outcome::Rejected(_) => &counters.rejected,
        Outcome::TimedOut => &counters.timed_out,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let result = DeviceResult {
        thing,
        role,
        outcome,
        version: pal.running_version(),
        elapsed: start.elapsed(),
    };
    (result, live)
}

/// Prints a progress line on stderr until `stop` is set: a bar over the devices that are
/// done, the outcomes so far, and the data written.
pub fn progress(
    total: u64,
    counters: Arc<Counters>,
    start: Instant,
) -> (tokio::sync::watch::Sender<bool>, JoinHandle<()>) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let tty = std::io::stderr().is_terminal();
    let task = tokio::spawn(async move {
        let every = if tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        loop {
            let finished = tokio::time::timeout(every, stopped.changed()).await.is_ok();
            let done = counters.done();
            let width = 30u64;
            let filled = (done * width).checked_div(total).unwrap_or(width) as usize;
            let mb = counters.bytes.load(Ordering::Relaxed) as f64 / 1e6;
            let secs = start.elapsed().as_secs_f64().max(1e-3);
            let line = format!(
                "[{}{}] {done}/{total} devices | ok {} failed {} rejected {} | {mb:.1} MB {:.1} MB/s | {secs:.0} s",
                "#".repeat(filled),
                "-".repeat(width as usize - filled),
                counters.succeeded.load(Ordering::Relaxed),
                counters.failed.load(Ordering::Relaxed),
                counters.rejected.load(Ordering::Relaxed),
                mb / secs,
            );
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r{line}\x1b[K")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
            if finished {
                if tty {
                    let _ = writeln!(err);
                }
                return;
            }
        }
    });
    (stop, task)
}

/// What a fleet run gives: every device's result (in thing order), the execution status of
/// each thing as the server has it, and the figures.
pub struct FleetRun {
    pub results: Vec<DeviceResult>,
    pub statuses: HashMap<String, String>,
    pub summary: Summary,
}

/// Runs every device of the fleet at once, with live progress unless `quiet`; then reads
/// the executions' statuses through the API (once every device that finished has its
/// final status, or after 30 s) and powers the devices off.
pub async fn run_fleet(
    api: &Api,
    fleet: Arc<Fleet>,
    roles: &[Role],
    settings: DeviceSettings,
    quiet: bool,
) -> anyhow::Result<FleetRun> {
    let counters = Arc::new(Counters::default());
    let settings = Arc::new(settings);
    let start = Instant::now();
    let bar = (!quiet).then(|| progress(roles.len() as u64, counters.clone(), start));
    let mut set = JoinSet::new();
    for (i, role) in roles.iter().enumerate() {
        set.spawn(device(
            i,
            *role,
            fleet.clone(),
            settings.clone(),
            counters.clone(),
        ));
    }
    let mut results = Vec::with_capacity(roles.len());
    let mut live = Vec::new();
    let mut lost = 0usize;
    while let Some(r) = set.join_next().await {
        match r {
            Ok((result, dev)) => {
                results.push(result);
                live.extend(dev);
            }
            Err(e) => {
                tracing::warn!("a device task failed: {e}");
                lost += 1;
            }
        }
    }
    let wall = start.elapsed();
    if let Some((stop, task)) = bar {
        let _ = stop.send(true);
        let _ = task.await;
    }
    results.sort_by(|a, b| a.thing.cmp(&b.thing));
    let finished = results
        .iter()
        .filter(|r| r.outcome != Outcome::TimedOut)
        .count();
    let statuses = execution_statuses(api, &fleet.job_id, finished, Duration::from_secs(30)).await;
    for d in live {
        let _ = d.handle.shutdown(false);
        d.power_off().await;
    }
    if lost > 0 {
        anyhow::bail!("{lost} simulated devices crashed (their tasks panicked); see the log");
    }
    let statuses = statuses?;
    let summary = Summary::new(&results, &statuses, wall, &counters);
    Ok(FleetRun {
        results,
        statuses,
        summary,
    })
}

/// The execution status of every thing of the job, once none is still moving (or after
/// `wait`).
pub async fn execution_statuses(
    api: &Api,
    job_id: &str,
    expect_terminal: usize,
    wait: Duration,
) -> anyhow::Result<HashMap<String, String>> {
    let deadline = Instant::now() + wait;
    loop {
        let mut out = HashMap::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/jobs/{job_id}/things?maxResults=250");
            if let Some(t) = &token {
                path.push_str(&format!(
                    "&nextToken={}",
                    updraft_server::auth::uri_encode(t, true)
                ));
            }
            let page = api.json("iot", "GET", &path, None).await?;
            for s in page["executionSummaries"].as_array().into_iter().flatten() {
                let thing = s["thingArn"]
                    .as_str()
                    .and_then(|a| a.rsplit('/').next())
                    .unwrap_or_default()
                    .to_owned();
                let status = s["jobExecutionSummary"]["status"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned();
                out.insert(thing, status);
            }
            token = page["nextToken"].as_str().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        let terminal = out
            .values()
            .filter(|s| !matches!(s.as_str(), "QUEUED" | "IN_PROGRESS"))
            .count();
        if terminal >= expect_terminal || Instant::now() > deadline {
            return Ok(out);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The C agent's report for an image whose signature check failed (`PalStatus::
/// SignatureCheckFailed`, `IngestResult::SigCheckFail`).
const SIG_CHECK_FAILED: &str = "0xe3000000: 0xfffffffe";

/// The figures of a run.
pub struct Summary {
    pub devices: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub rejected: usize,
    pub timed_out: usize,
    pub bytes: u64,
    pub wall: Duration,
    pub p50: Duration,
    pub p95: Duration,
    pub max: Duration,
    pub disconnects: u64,
    /// Devices whose outcome is not what their role predicts, or whose execution status on
    /// the server disagrees with their outcome.
    pub mismatches: Vec<(String, String)>,
    pub statuses: BTreeMap<String, usize>,
}

impl Summary {
    pub fn new(
        results: &[DeviceResult],
        statuses: &HashMap<String, String>,
        wall: Duration,
        counters: &Counters,
    ) -> Summary {
        let count = |k: &str| results.iter().filter(|r| r.outcome.kind() == k).count();
        let mut times: Vec<Duration> = results.iter().map(|r| r.elapsed).collect();
        times.sort();
        let pct = |p: f64| {
            times
                .get(((times.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        let mut mismatches = Vec::new();
        for r in results {
            // A corrupted download must fail its signature check, not anything else.
            let wrong_reason = match &r.outcome {
                Outcome::Failed(reason) if r.role.corrupt => !reason.starts_with(SIG_CHECK_FAILED),
                _ => false,
            };
            if r.outcome.kind() != r.role.expected().kind() || wrong_reason {
                mismatches.push((
                    r.thing.clone(),
                    format!(
                        "{} ({:?}), expected {}",
                        r.outcome.kind(),
                        r.outcome,
                        r.role.expected().kind()
                    ),
                ));
            }
            let want = match r.outcome {
                Outcome::Succeeded => Some("SUCCEEDED"),
                Outcome::Failed(_) | Outcome::Rejected(_) => Some("FAILED"),
                Outcome::TimedOut => None,
            };
            let got = statuses.get(&r.thing).map(String::as_str);
            if let Some(want) = want
                && got != Some(want)
            {
                mismatches.push((
                    r.thing.clone(),
                    format!(
                        "the device says {}, the server {}",
                        r.outcome.kind(),
                        got.unwrap_or("has no execution")
                    ),
                ));
            }
        }
        let mut by_status = BTreeMap::new();
        for s in statuses.values() {
            *by_status.entry(s.clone()).or_insert(0) += 1;
        }
        Summary {
            devices: results.len(),
            succeeded: count("succeeded"),
            failed: count("failed"),
            rejected: count("rejected"),
            timed_out: count("timed out"),
            bytes: counters.bytes.load(Ordering::Relaxed),
            wall,
            p50: pct(0.50),
            p95: pct(0.95),
            max: times.last().copied().unwrap_or_default(),
            disconnects: counters.disconnects.load(Ordering::Relaxed),
            mismatches,
            statuses: by_status,
        }
    }

    pub fn print(&self) {
        let mb = self.bytes as f64 / 1e6;
        let secs = self.wall.as_secs_f64().max(1e-6);
        println!("  succeeded  {:>7}", self.succeeded);
        println!(
            "  failed     {:>7}   (download or verification)",
            self.failed
        );
        println!(
            "  rejected   {:>7}   (self-test failed, rolled back)",
            self.rejected
        );
        println!("  timed out  {:>7}", self.timed_out);
        println!(
            "  data       {mb:>9.1} MB in {secs:.2} s = {:.1} MB/s",
            mb / secs
        );
        println!(
            "  per device  p50 {:.2} s   p95 {:.2} s   max {:.2} s",
            self.p50.as_secs_f64(),
            self.p95.as_secs_f64(),
            self.max.as_secs_f64()
        );
        if self.disconnects > 0 {
            println!(
                "  disconnects{:>7}   (mid-download, resumed)",
                self.disconnects
            );
        }
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        println!("  server      {}", statuses.join(", "));
    }
}

/// How many sockets this process may open, from `/proc/self/limits` (Linux); `None`
/// elsewhere.
fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Refuses a fleet that cannot get its sockets, with the fix. `per_device` counts the
/// server's end too when the server runs in this process.
pub fn check_fd_limit(devices: usize, per_device: u64) -> anyhow::Result<()> {
    let need = devices as u64 * per_device + 256;
    if let Some(limit) = open_file_limit()
        && limit < need
    {
        let split = if per_device > 1 {
            ", run the server in its own process (`updraft serve`, then `--endpoints \
             <data-dir>/endpoints.json`: each process then needs one per device)"
        } else {
            ""
        };
        bail!(
            "{devices} devices need about {need} open files but this process may open {limit}; \
             raise the limit (e.g. `ulimit -n {}`){split} or run fewer devices",
            need.next_power_of_two()
        );
    }
    Ok(())
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    args.check()?;
    let target = match &args.endpoints {
        Some(p) => Target::from_endpoints(p)?,
        None => Target::in_process().await?,
    };
    let http_extra = if args.protocol == ProtocolArg::Http {
        target.fds_per_connection
    } else {
        0
    };
    check_fd_limit(args.devices, target.fds_per_connection + http_extra)?;
    let blocks = args.size.div_ceil(args.block_size as usize) as u64;
    eprintln!(
        "simulate: {} devices, {}-byte firmware over {} ({}-byte blocks), server {}, seed {}",
        args.devices, args.size, args.protocol, args.block_size, target.http, args.seed
    );
    let api = Arc::new(target.api);
    let say = |s: &str| eprintln!("  - {s}");
    let fleet = provision(
        &api,
        args.devices,
        args.size,
        args.seed,
        args.protocol,
        &say,
    )
    .await?;
    let rates = Rates {
        failure: args.failure_rate,
        self_test_failure: args.self_test_failure_rate,
        slow: args.slow_rate,
        disconnect: args.disconnect_rate,
    };
    let roles = plan(args.devices, rates, blocks, args.seed);
    let settings = DeviceSettings {
        mqtt_host: target.mqtt_host.clone(),
        mqtt_port: target.mqtt_port,
        block_size: args.block_size,
        blocks_per_request: args.blocks_per_request,
        protocol: args.protocol,
        slow_delay: args.slow_delay,
        timeout: args.timeout,
    };
    let fleet = Arc::new(fleet);
    let run = run_fleet(&api, fleet.clone(), &roles, settings, args.quiet).await?;
    let (summary, wall) = (&run.summary, run.summary.wall);
    println!(
        "simulate: {} devices, {} bytes over {}, {} s",
        summary.devices,
        fleet.image.len(),
        args.protocol,
        format_args!("{:.2}", wall.as_secs_f64())
    );
    summary.print();
    if !summary.mismatches.is_empty() {
        for (thing, m) in summary.mismatches.iter().take(10) {
            let details = api
                .json(
                    "iot",
                    "GET",
                    &format!("/things/{thing}/jobs/{}", fleet.job_id),
                    None,
                )
                .await
                .map(|v| v["execution"]["statusDetails"]["detailsMap"].to_string())
                .unwrap_or_default();
            eprintln!("  mismatch: {thing}: {m}; execution details {details}");
        }
        bail!(
            "{} devices did not end as the knobs predict",
            summary.mismatches.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_exact_disjoint_and_repeatable() {
        let rates = Rates {
            failure: 0.1,
            self_test_failure: 0.05,
            slow: 0.2,
            disconnect: 0.3,
        };
        let a = plan(100, rates, 64, 7);
        assert_eq!(a, plan(100, rates, 64, 7));
        assert_ne!(a, plan(100, rates, 64, 8));
        assert_eq!(a.iter().filter(|r| r.corrupt).count(), 10);
        assert_eq!(a.iter().filter(|r| r.reject).count(), 5);
        assert!(!a.iter().any(|r| r.corrupt && r.reject));
        assert_eq!(a.iter().filter(|r| r.slow).count(), 20);
        let cuts: Vec<u64> = a.iter().filter_map(|r| r.disconnect_after).collect();
        assert_eq!(cuts.len(), 30);
        assert!(cuts.iter().all(|&c| (1..64).contains(&c)));
        assert!(
            plan(10, rates, 1, 1)
                .iter()
                .all(|r| r.disconnect_after.is_none())
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("1h").is_err());
    }
}
