//! `updraft bench`: data-plane throughput, measured side by side with a raw broker
//! round-trip in the same run, so the figure says what Updraft's own work costs. For the
//! Jobs API the raw figure is a request/response through the same broker code with an
//! in-process responder that answers at once (and, for reference, broker reflection with
//! no responder at all).
//!
//! Each benchmark starts a server in-process on a temporary data directory (SQLite, the
//! embedded broker, free loopback ports) and drives it with N real MQTT clients.

mod http;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use updraft_server::clock::now_ms;
use updraft_server::config::{FileConfig, ServerConfig};
use updraft_server::server::{AppState, Server};
use updraft_server::store::{Job, JobExecution, Thing};

#[derive(Subcommand)]
pub enum Bench {
    /// Job execution updates/s through the Jobs MQTT API (start-next, IN_PROGRESS, SUCCEEDED).
    Jobs(JobsArgs),
    /// MB/s of stream downloads over MQTT (GetStream, CBOR) by N devices.
    Stream(StreamArgs),
    /// MB/s of pre-signed Range downloads from the S3 endpoint, beside nginx serving the same file.
    Http(http::HttpArgs),
}

#[derive(Args)]
pub struct StreamArgs {
    /// Simulated devices, each downloading the whole file over its own connection.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// File size in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    size: usize,
    /// Block size `l` (256..131072).
    #[arg(long, default_value_t = 4096)]
    block_size: usize,
    /// Blocks asked for per request `n` (capped so one answer is at most 128 KiB).
    #[arg(long, default_value_t = 32)]
    blocks_per_request: usize,
}

#[derive(Args)]
pub struct JobsArgs {
    /// Simulated devices, each with its own MQTT connection.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Jobs each device works through (three requests each), after one unmeasured job
    /// (caches, prepared statements and connections warm up).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Measure the Jobs API and the request/response it is compared with this many times,
    /// alternately, and print the medians (with the spread): one short run is noisy (±10 %
    /// and more, the first often lowest), a median of five still varies by ±4 %. An odd
    /// count gives a true median (of an even one, the upper of the two middle runs).
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u16).range(1..))]
    repeat: u16,
}

pub async fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Jobs(a) => jobs(a).await,
        Bench::Stream(a) => stream(a).await,
        Bench::Http(a) => http::run(a).await,
    }
}

/// Benchmark devices go as fast as the server answers them: measured, not throttled.
const UNTHROTTLED: Option<f64> = Some(0.0);

/// A server on a temporary directory with free ports; `device_rate_limit` as
/// `serve --device-rate-limit` (`None`: the default).
pub async fn temp_server(
    device_rate_limit: Option<f64>,
) -> anyhow::Result<(Server, tempdir::TempDir)> {
    let dir = tempdir::TempDir::new()?;
    let config = ServerConfig::resolve(FileConfig {
        data_dir: Some(dir.path.clone()),
        http: Some("127.0.0.1:0".into()),
        mqtt: Some("127.0.0.1:0".into()),
        mqtts: Some("127.0.0.1:0".into()),
        device_rate_limit,
        ..FileConfig::default()
    })?;
    let server = Server::start(&config)
        .await
        .context("starting the server")?;
    Ok((server, dir))
}

pub mod tempdir {
    use std::path::PathBuf;

    /// A directory removed on drop.
    pub struct TempDir {
        pub path: PathBuf,
    }

    impl TempDir {
        pub fn new() -> std::io::Result<Self> {
            let path = std::env::temp_dir().join(format!("updraft-{}", uuid_like()));
            std::fs::create_dir_all(&path)?;
            Ok(TempDir { path })
        }
    }

    fn uuid_like() -> String {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{}-{t:x}", std::process::id())
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One MQTT client: a sender, and the publishes it receives.
pub struct Client {
    pub client: AsyncClient,
    pub rx: mpsc::Receiver<(String, Bytes)>,
}

pub async fn connect(port: u16, id: &str, subscribe: &[String]) -> anyhow::Result<Client> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(512 * 1024, 512 * 1024);
    opts.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::channel(256);
    let (ready_tx, mut ready_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = ready_tx.send(()).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(()).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.clone())).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
        .await
        .context("CONNACK timeout")?;
    for f in subscribe {
        client.subscribe(f.clone(), QoS::AtMostOnce).await?;
        tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
            .await
            .context("SUBACK timeout")?;
    }
    Ok(Client { client, rx })
}

impl Client {
    /// The next message, within 30 s (`what` names it in the error).
    pub async fn next(&mut self, what: &str) -> anyhow::Result<(String, Bytes)> {
        tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
            .await
            .with_context(|| format!("{what} timeout"))?
            .context("connection closed")
    }

    /// Publishes and waits for a message on `reply` (or `reply_alt`).
    pub async fn request(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        reply: &str,
    ) -> anyhow::Result<Bytes> {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload)
            .await?;
        loop {
            let (t, p) = self.next("reply").await?;
            if t == reply {
                return Ok(p);
            }
            if t.ends_with("/rejected") {
                bail!("rejected on {t}: {}", String::from_utf8_lossy(&p));
            }
        }
    }
}

async fn create_fleet(
    state: &AppState,
    devices: usize,
    rounds: usize,
) -> anyhow::Result<Vec<String>> {
    let now = now_ms();
    let things: Vec<String> = (0..devices).map(|i| format!("bench-{i:05}")).collect();
    for t in &things {
        state
            .store
            .create_thing(&Thing {
                name: t.clone(),
                id: t.clone(),
                type_name: None,
                attributes: BTreeMap::new(),
                version: 1,
                created_ms: now,
            })
            .await?;
    }
    for r in 0..rounds {
        let id = format!("bench-job-{r}");
        let job = Job {
            id: id.clone(),
            status: updraft_protocol::JobStatus::InProgress,
            target_selection: updraft_protocol::TargetSelection::Snapshot,
            targets: vec![],
            description: None,
            document: r#"{"operation":"bench"}"#.into(),
            document_source: None,
            namespace_id: None,
            details: serde_json::Map::new(),
            force_canceled: false,
            reason_code: None,
            comment: None,
            created_ms: now + i64::try_from(r).unwrap_or(0),
            updated_ms: now,
            completed_ms: None,
            version: 1,
        };
        let executions: Vec<JobExecution> = things
            .iter()
            .map(|t| {
                // Rounds queue in order: round r's job is the next one for every device.
                let mut e = JobExecution::queued(&id, t, now);
                e.queued_ms += i64::try_from(r).unwrap_or(0);
                e
            })
            .collect();
        state.store.create_job(&job, &executions).await?;
    }
    Ok(things)
}

async fn jobs(a: JobsArgs) -> anyhow::Result<()> {
    let (server, _dir) = temp_server(UNTHROTTLED).await?;
    let port = server.mqtt_addr.context("no MQTT listener")?.port();
    let state = server.state().clone();
    tokio::spawn(server.run(std::future::pending()));
    let repeat = usize::from(a.repeat);
    println!(
        "bench jobs: {} devices x {} jobs (after one to warm up), 3 requests per job{}",
        a.devices,
        a.rounds,
        if repeat > 1 {
            format!("; {repeat} runs of each, alternately")
        } else {
            String::new()
        }
    );
    let jobs_count = 1 + a.rounds * repeat;
    let things = create_fleet(&state, a.devices, jobs_count).await?;

    // The Jobs API: each device works through its jobs, one request at a time; the first
    // job is the warm-up. The request/response runs the same requests, answered with the
    // answers the Jobs API gave.
    work_jobs(port, &things, 1).await?;
    let (mut jobs_runs, mut echo_runs) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        let (timing, answers) = work_jobs(port, &things, a.rounds).await?;
        jobs_runs.push(timing);
        let (started, updated) = answers.into_iter().next().context("no job ran")?;
        echo_runs.push(request_response(&things, a.rounds, started, updated).await?);
    }
    for r in 0..jobs_count {
        let counts = state
            .store
            .count_executions(&format!("bench-job-{r}"))
            .await?;
        let ok = counts
            .get(&updraft_protocol::ExecutionStatus::Succeeded)
            .copied()
            .unwrap_or(0);
        if ok != i64::try_from(a.devices).unwrap_or(0) {
            bail!("bench-job-{r}: {ok} of {} executions succeeded", a.devices);
        }
    }

    let reflected = reflection(port, &things, a.rounds * 3).await?;
    let requests = (a.devices * a.rounds * 3) as f64;
    let rate = |t: &Timing| requests / t.secs();
    let echoed = Median::of(&echo_runs, rate).context("no request/response run")?;
    let jobs = Median::of(&jobs_runs, rate).context("no Jobs API run")?;
    println!(
        "  broker reflection : {:>10.0} round-trips/s ({:.2} s; no responder{})",
        rate(&reflected),
        reflected.secs(),
        reflected.cpu_note(requests, "round-trip")
    );
    println!(
        "  request/response  : {:>10.0} round-trips/s ({:.2} s; in-process echo{}){}",
        echoed.rate,
        echoed.run.secs(),
        echoed.run.cpu_note(requests, "round-trip"),
        echoed.spread()
    );
    println!(
        "  jobs API          : {:>10.0} updates/s     ({:.2} s{}){}",
        jobs.rate,
        jobs.run.secs(),
        jobs.run.cpu_note(requests, "update"),
        jobs.spread()
    );
    println!(
        "  ratio             : {:>10.2} (of request/response; {:.2} of reflection){}",
        jobs.rate / echoed.rate,
        jobs.rate / rate(&reflected),
        if repeat > 1 {
            let each: Vec<String> = jobs_runs
                .iter()
                .zip(&echo_runs)
                .map(|(j, e)| format!("{:.2}", rate(j) / rate(e)))
                .collect();
            format!("; runs: {}", each.join(" "))
        } else {
            String::new()
        }
    );
    Ok(())
}

/// The run of median rate among several (the upper median of an even count), and the
/// spread of the rates.
struct Median<'a> {
    run: &'a Timing,
    rate: f64,
    min: f64,
    max: f64,
    count: usize,
}

impl<'a> Median<'a> {
    /// `None` without runs.
    fn of(runs: &'a [Timing], rate: impl Fn(&Timing) -> f64) -> Option<Median<'a>> {
        let mut rated: Vec<(f64, &Timing)> = runs.iter().map(|t| (rate(t), t)).collect();
        rated.sort_by(|a, b| a.0.total_cmp(&b.0));
        let &(rate, run) = rated.get(rated.len() / 2)?;
        Some(Median {
            run,
            rate,
            min: rated.first()?.0,
            max: rated.last()?.0,
            count: rated.len(),
        })
    }

    /// `; median of N, MIN–MAX` when there were several runs.
    fn spread(&self) -> String {
        if self.count > 1 {
            format!(
                "; median of {}, {:.0}–{:.0}",
                self.count, self.min, self.max
            )
        } else {
            String::new()
        }
    }
}

/// How long a phase took, and the CPU time the whole process (server and benchmark
/// devices alike) spent meanwhile, when Linux tells (`/proc/self/task/*/schedstat`).
#[derive(Clone, Copy)]
struct Timing {
    wall: Duration,
    cpu: Option<Cpu>,
}

/// CPU time of the process's threads, and of its database threads (sqlx's SQLite connection
/// threads; SQLite's device writes are committed on the async workers, and on a blocking
/// thread when they wait, see `store/sql/sqlite_devices.rs`: not counted).
#[derive(Clone, Copy, Default)]
struct Cpu {
    all: Duration,
    database: Duration,
}

/// Each live thread's CPU time so far, by thread id, and whether it is a database thread.
/// A thread that ends between the directory listing and its reading is left out.
struct Threads(std::collections::HashMap<u64, (Duration, bool)>);

impl Threads {
    fn now() -> Option<Threads> {
        let mut threads = std::collections::HashMap::new();
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let Some(id) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let path = task.path();
            let Some(used) = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
            else {
                continue;
            };
            let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let database = name.starts_with("sqlx-sqlite");
            threads.insert(id, (Duration::from_nanos(used), database));
        }
        Some(Threads(threads))
    }

    /// The CPU time spent since `before` by the threads alive now (a thread that ended
    /// meanwhile is not counted: in these benchmarks, only idle ones do).
    fn since(&self, before: &Threads) -> Cpu {
        let mut cpu = Cpu::default();
        for (id, (used, database)) in &self.0 {
            let earlier = before.0.get(id).map_or(Duration::ZERO, |(u, _)| *u);
            let spent = used.saturating_sub(earlier);
            cpu.all += spent;
            if *database {
                cpu.database += spent;
            }
        }
        cpu
    }
}

impl Timing {
    fn secs(&self) -> f64 {
        self.wall.as_secs_f64()
    }

    /// `; X µs CPU per <what> (Y in database threads), Z cores busy` for `count`
    /// operations, or nothing.
    fn cpu_note(&self, count: f64, what: &str) -> String {
        let micros = |d: Duration| d.as_secs_f64() * 1e6 / count;
        match self.cpu {
            Some(cpu) if count > 0.0 && !self.wall.is_zero() => {
                let database = if cpu.database.is_zero() {
                    String::new()
                } else {
                    format!(" ({:.1} in database threads)", micros(cpu.database))
                };
                format!(
                    "; {:.1} µs CPU per {what}{database}, {:.2} cores busy",
                    micros(cpu.all),
                    cpu.all.as_secs_f64() / self.secs()
                )
            }
            _ => String::new(),
        }
    }
}

/// Runs `work` for each of `things` at once, each device on its own connection to
/// `port`; how long they all took, and what each returned.
async fn on_every_device<F, Fut, T>(
    port: u16,
    things: &[String],
    subscribe: impl Fn(&str) -> Vec<String>,
    work: F,
) -> anyhow::Result<(Timing, Vec<T>)>
where
    F: Fn(String, Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut clients = Vec::new();
    for t in things {
        clients.push(connect(port, t, &subscribe(t)).await?);
    }
    let threads_before = Threads::now();
    let start = Instant::now();
    let tasks: Vec<_> = things
        .iter()
        .cloned()
        .zip(clients)
        .map(|(t, c)| tokio::spawn(work(t, c)))
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await??);
    }
    let wall = start.elapsed();
    let cpu = Threads::now()
        .zip(threads_before)
        .map(|(after, before)| after.since(&before));
    Ok((Timing { wall, cpu }, results))
}

/// Every device works through `rounds` jobs (start-next, IN_PROGRESS, SUCCEEDED), one
/// request at a time; the last start-next and update answers of each.
async fn work_jobs(
    port: u16,
    things: &[String],
    rounds: usize,
) -> anyhow::Result<(Timing, Vec<(Bytes, Bytes)>)> {
    on_every_device(
        port,
        things,
        |_| Vec::new(),
        move |t, mut c| async move {
            let base = format!("$aws/things/{t}/jobs");
            let mut answers = (Bytes::new(), Bytes::new());
            for _ in 0..rounds {
                let started = c
                    .request(
                        &format!("{base}/start-next"),
                        b"{}".to_vec(),
                        &format!("{base}/start-next/accepted"),
                    )
                    .await?;
                let v: serde_json::Value = serde_json::from_slice(&started)?;
                let job = v["execution"]["jobId"]
                    .as_str()
                    .context("nothing to start")?
                    .to_owned();
                let topic = format!("{base}/{job}/update");
                let accepted = format!("{topic}/accepted");
                c.request(&topic, br#"{"status":"IN_PROGRESS"}"#.to_vec(), &accepted)
                    .await?;
                let updated = c
                    .request(&topic, br#"{"status":"SUCCEEDED"}"#.to_vec(), &accepted)
                    .await?;
                answers = (started, updated);
            }
            c.client.disconnect().await?;
            anyhow::Ok(answers)
        },
    )
    .await
}

/// Broker reflection: each device publishes on a topic it subscribes to and waits for its
/// own message, `count` times — one broker hop each way, no responder.
async fn reflection(port: u16, things: &[String], count: usize) -> anyhow::Result<Timing> {
    let echo = |t: &str| format!("$aws/things/{t}/echo");
    let (timing, _) = on_every_device(
        port,
        things,
        |t| vec![echo(t)],
        move |t, mut c| async move {
            let topic = echo(&t);
            for _ in 0..count {
                c.request(&topic, br#"{"status":"IN_PROGRESS"}"#.to_vec(), &topic)
                    .await?;
            }
            c.client.disconnect().await?;
            anyhow::Ok(())
        },
    )
    .await?;
    Ok(timing)
}

/// The raw request/response the Jobs API is measured against: a second embedded broker
/// (the same code, authorizing anyone) whose device requests go to an in-process responder
/// that answers each at once with a recorded Jobs answer of its kind (`started` for
/// start-next, `updated` for an update). The devices run the very same requests as against
/// the Jobs API, so topics, sizes and order are the same; what is left out is exactly the
/// Jobs API's own work.
async fn request_response(
    things: &[String],
    rounds: usize,
    started: Bytes,
    updated: Bytes,
) -> anyhow::Result<Timing> {
    use updraft_server::mqtt::MessageBus;
    use updraft_server::mqtt::broker::{Authorizer, Broker, BrokerConfig};
    let (inbound_tx, mut inbound) = mpsc::channel::<updraft_server::mqtt::Inbound>(8192);
    let anyone: Authorizer = std::sync::Arc::new(|_| Box::pin(async { true }));
    let broker = Broker::new(BrokerConfig::default(), anyone, inbound_tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(broker.clone().serve_tcp(listener));
    let responder = tokio::spawn(async move {
        while let Some(m) = inbound.recv().await {
            let answer = if m.topic.ends_with("/start-next") {
                started.clone()
            } else {
                updated.clone()
            };
            broker.send_to(&m.client_id, format!("{}/accepted", m.topic), answer);
        }
    });
    // The same warm-up as the Jobs API's.
    let measured = match work_jobs(port, things, 1).await {
        Ok(_) => work_jobs(port, things, rounds).await,
        Err(e) => Err(e),
    };
    server.abort();
    responder.abort();
    Ok(measured?.0)
}

/// `size` bytes of a fixed pseudo-random pattern (the file every benchmark downloads).
fn file_contents(size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// Stores `data` as object `bench/fw.bin` (bucket created here); returns its size.
async fn create_object(state: &AppState, data: Vec<u8>) -> anyhow::Result<u64> {
    use updraft_server::store::{Bucket, ObjectVersion, Versioning};
    let now = now_ms();
    state
        .store
        .create_bucket(&Bucket {
            name: "bench".into(),
            versioning: Versioning::Unversioned,
            created_ms: now,
        })
        .await?;
    let blob = updraft_server::artifacts::Artifacts::new_blob();
    let size = data.len() as u64;
    state.artifacts.put_bytes(&blob, Bytes::from(data)).await?;
    state
        .store
        .put_object(&ObjectVersion {
            bucket: "bench".into(),
            key: "fw.bin".into(),
            version_id: "null".into(),
            delete_marker: false,
            size,
            etag: "\"bench\"".into(),
            content_type: None,
            checksum: None,
            metadata: BTreeMap::new(),
            blob,
            created_ms: now,
            is_latest: true,
        })
        .await?;
    Ok(size)
}

/// Uploads `data` as the only file of stream `bench-stream`.
async fn create_stream(state: &AppState, data: Vec<u8>) -> anyhow::Result<()> {
    use updraft_server::store::{Stream, StreamFile};
    let now = now_ms();
    let size = create_object(state, data).await?;
    state
        .store
        .create_stream(&Stream {
            id: "bench-stream".into(),
            version: 1,
            description: None,
            files: vec![StreamFile {
                file_id: 0,
                bucket: "bench".into(),
                key: "fw.bin".into(),
                version: None,
                resolved_version: "null".into(),
                size,
                etag: None,
            }],
            role_arn: "arn:aws:iam::123456789012:role/bench".into(),
            created_ms: now,
            updated_ms: now,
        })
        .await?;
    Ok(())
}

async fn stream(a: StreamArgs) -> anyhow::Result<()> {
    if !(256..=131_072).contains(&a.block_size) {
        bail!("--block-size must be from 256 to 131072");
    }
    let per_request = a.blocks_per_request.clamp(1, 131_072 / a.block_size);
    let (server, _dir) = temp_server(UNTHROTTLED).await?;
    let port = server.mqtt_addr.context("no MQTT listener")?.port();
    let state = server.state().clone();
    tokio::spawn(server.run(std::future::pending()));
    let data = file_contents(a.size);
    create_stream(&state, data.clone()).await?;
    let things = create_fleet(&state, a.devices, 0).await?;
    let blocks = a.size.div_ceil(a.block_size);
    println!(
        "bench stream: {} devices x {} bytes, {}-byte blocks, {} blocks per request (CBOR)",
        a.devices, a.size, a.block_size, per_request
    );

    // Raw broker: the same number and size of downstream messages, echoed through each
    // device's own topic (the upstream leg carries the payload too, so this favours raw).
    let (size, bs) = (a.size, a.block_size);
    let echo_topic = |t: &str| format!("$aws/things/{t}/echo");
    let (echo, _) = on_every_device(
        port,
        &things,
        |t| vec![echo_topic(t)],
        move |t, mut c| async move {
            let topic = echo_topic(&t);
            let mut offset = 0;
            while offset < blocks {
                let n = per_request.min(blocks - offset);
                for b in offset..offset + n {
                    let len = bs.min(size - b * bs);
                    c.client
                        .publish(topic.clone(), QoS::AtMostOnce, false, vec![0u8; len])
                        .await?;
                }
                for _ in 0..n {
                    c.next("echo").await?;
                }
                offset += n;
            }
            c.client.disconnect().await?;
            anyhow::Ok(())
        },
    )
    .await?;

    let stream_base = |t: &str| format!("$aws/things/{t}/streams/bench-stream");
    let (streamed, _) = on_every_device(
        port,
        &things,
        |t| {
            let base = stream_base(t);
            vec![format!("{base}/data/cbor"), format!("{base}/rejected/cbor")]
        },
        move |t, mut c| async move {
            let base = stream_base(&t);
            let mut received = 0usize;
            let mut offset = 0;
            while offset < blocks {
                let n = per_request.min(blocks - offset);
                let req = updraft_protocol::streams::GetStreamRequest {
                    client_token: None,
                    stream_version: None,
                    file_id: 0,
                    block_size: bs as u64,
                    offset: offset as u64,
                    number_of_blocks: Some(n as u64),
                    bitmap: None,
                };
                c.client
                    .publish(
                        format!("{base}/get/cbor"),
                        QoS::AtMostOnce,
                        false,
                        req.to_cbor(),
                    )
                    .await?;
                for _ in 0..n {
                    let (topic, payload) = c.next("block").await?;
                    if topic.ends_with("/rejected/cbor") {
                        bail!("rejected: {payload:?}");
                    }
                    let block = updraft_protocol::streams::DataBlock::decode(
                        updraft_protocol::topics::Format::Cbor,
                        &payload,
                    )
                    .map_err(|e| anyhow::anyhow!("bad block: {}", e.message))?;
                    received += block.payload.len();
                }
                offset += n;
            }
            if received != size {
                bail!("{t}: received {received} of {size} bytes");
            }
            anyhow::Ok(())
        },
    )
    .await?;
    let mb = (a.devices * a.size) as f64 / 1e6;
    let echo_rate = mb / echo.secs();
    let stream_rate = mb / streamed.secs();
    println!(
        "  raw broker echo : {echo_rate:>8.1} MB/s ({:.2} s{})",
        echo.secs(),
        echo.cpu_note(mb, "MB")
    );
    println!(
        "  stream (CBOR)   : {stream_rate:>8.1} MB/s ({:.2} s{})",
        streamed.secs(),
        streamed.cpu_note(mb, "MB")
    );
    println!("  ratio           : {:>8.2}", stream_rate / echo_rate);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ms: u64) -> Timing {
        Timing {
            wall: Duration::from_millis(ms),
            cpu: None,
        }
    }

    /// The rate of a run taking `ms`: 1,000 operations.
    fn rate(t: &Timing) -> f64 {
        1000.0 / t.secs()
    }

    #[test]
    fn the_median_run_and_the_spread() {
        assert!(Median::of(&[], rate).is_none());
        let one = [run(100)];
        let m = Median::of(&one, rate).expect("one run");
        assert_eq!((m.rate, m.count), (10_000.0, 1));
        assert_eq!(m.spread(), "");
        // Odd: the middle rate, whichever order the runs came in.
        let odd = [run(125), run(100), run(250), run(200), run(50)];
        let m = Median::of(&odd, rate).expect("runs");
        assert_eq!((m.rate, m.min, m.max), (8_000.0, 4_000.0, 20_000.0));
        assert_eq!(m.run.wall, Duration::from_millis(125));
        assert_eq!(m.spread(), "; median of 5, 4000–20000");
        // Even: the upper of the two middle runs.
        let even = [run(100), run(200), run(250), run(125)];
        let m = Median::of(&even, rate).expect("runs");
        assert_eq!(m.rate, 8_000.0);
    }
}
