//! `updraft`: the operator's command. `updraft serve` runs the whole system.

mod api;
mod bench;
mod demo;
mod signing;
mod simulate;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use updraft_server::config::{FileConfig, ServerConfig};
use updraft_server::server::Server;

/// The server's memory allocator. Device requests are handled across threads: a device's
/// answer is often built on one thread (the database's, a worker) and freed on another.
/// glibc's allocator returns such memory under its arena's lock, and under load the
/// threads queued on those locks (`updraft bench jobs`: 39k → 50k updates/s, the broker's
/// raw request/response 117k → 138k round trips/s, with mimalloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "updraft",
    version,
    about = "Self-hosted over-the-air updates for IoT fleets, AWS IoT compatible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: control plane, S3-compatible artifact endpoint, store.
    Serve(Box<ServeArgs>),
    /// Measure data-plane throughput against a raw broker round trip, in one run.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Sign a file with a private key and print the base64 signature (for customCodeSigning).
    Sign(signing::SignArgs),
    /// Code-signing helpers.
    #[command(subcommand)]
    Signer(signing::Signer),
    /// Run N virtual devices (real agents, in-memory devices) through a signed OTA update.
    Simulate(simulate::SimulateArgs),
    /// The tour: a temporary server, 20 devices, a signed OTA update, live progress, a table.
    Demo(demo::DemoArgs),
}

/// Every option: flag, then `UPDRAFT_*` environment variable, then the TOML file, then default.
#[derive(Args)]
struct ServeArgs {
    /// TOML file with any of the options below, by their long names (data-dir, http, database, ...).
    #[arg(long, env = "UPDRAFT_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the SQLite database, artifacts, credentials and endpoints.json [default: ./updraft-data]
    #[arg(long, env = "UPDRAFT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP listen address; port 0 picks a free port [default: 127.0.0.1:8080]
    #[arg(long, env = "UPDRAFT_HTTP")]
    http: Option<String>,
    /// sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DB [default: sqlite://<data-dir>/updraft.db]
    #[arg(long, env = "UPDRAFT_DATABASE")]
    database: Option<String>,
    /// file://DIR or s3://BUCKET?region=..&endpoint=..&allow_http=true [default: file://<data-dir>/artifacts]
    #[arg(long, env = "UPDRAFT_ARTIFACTS")]
    artifacts: Option<String>,
    /// AWS region used in ARNs and the written client config [default: us-east-1]
    #[arg(long, env = "UPDRAFT_REGION")]
    region: Option<String>,
    /// The embedded broker's plain MQTT listener; port 0 picks a free port [default: 127.0.0.1:1883]
    #[arg(long, env = "UPDRAFT_MQTT")]
    mqtt: Option<String>,
    /// The embedded broker's TLS listener; devices present certificates from CreateKeysAndCertificate [default: 127.0.0.1:8883]
    #[arg(long, env = "UPDRAFT_MQTTS")]
    mqtts: Option<String>,
    /// A DNS name or IP address for the TLS listener's certificate (repeatable) [default: localhost, 127.0.0.1]
    #[arg(long = "tls-name", env = "UPDRAFT_TLS_NAMES", value_delimiter = ',')]
    tls_names: Option<Vec<String>>,
    /// Use an external broker (mqtt://HOST:PORT) instead of the embedded one
    #[arg(long, env = "UPDRAFT_BROKER_URL")]
    broker_url: Option<String>,
    /// The URL devices reach the HTTP API at, for pre-signed download URLs [default: the bound address]
    #[arg(long, env = "UPDRAFT_PUBLIC_URL")]
    public_url: Option<String>,
    /// Allow the plain MQTT listener on a non-loopback address (devices are not authenticated on it)
    #[arg(long, env = "UPDRAFT_ALLOW_INSECURE_MQTT")]
    allow_insecure_mqtt: bool,
    /// Key-encryption key for code-signing private keys (32 bytes: raw, hex or base64) [default: <data-dir>/signing.key, created on first start]
    #[arg(long, env = "UPDRAFT_SIGNING_KEY_FILE")]
    signing_key_file: Option<PathBuf>,
    /// MQTT requests per second one device may make, sustained (bursts of twice as many); 0: no limit [default: 200]
    #[arg(long, env = "UPDRAFT_DEVICE_RATE_LIMIT")]
    device_rate_limit: Option<f64>,
}

impl ServeArgs {
    fn resolve(self) -> anyhow::Result<ServerConfig> {
        let given = FileConfig {
            data_dir: self.data_dir,
            http: self.http,
            database: self.database,
            artifacts: self.artifacts,
            region: self.region,
            mqtt: self.mqtt,
            mqtts: self.mqtts,
            tls_names: self.tls_names,
            broker_url: self.broker_url,
            public_url: self.public_url,
            allow_insecure_mqtt: self.allow_insecure_mqtt.then_some(true),
            signing_key_file: self.signing_key_file,
            device_rate_limit: self.device_rate_limit,
        };
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Ok(ServerConfig::resolve(given.over(file))?)
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let server = Server::start(&config)
        .await
        .context("starting the server")?;
    let d = config.data_dir.display();
    println!("updraft: HTTP API on http://{}", server.http_addr);
    if let Some(mqtt) = server.mqtt_addr {
        println!("updraft: MQTT (embedded broker) on mqtt://{mqtt}");
    }
    if let Some(mqtts) = server.mqtts_addr {
        println!("updraft: MQTT over TLS on mqtts://{mqtts} (CA: {d}/ca.pem)");
    }
    println!("updraft: endpoints in {d}/endpoints.json");
    println!(
        "updraft: AWS_SHARED_CREDENTIALS_FILE={d}/credentials AWS_CONFIG_FILE={d}/config aws --profile updraft --endpoint-url http://{} iot list-things",
        server.http_addr
    );
    server.run(shutdown_signal()).await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A fleet's agents and its server would drown the progress line: only errors, unless
    // UPDRAFT_LOG asks for more.
    let default_filter = match cli.command {
        Command::Simulate(_) | Command::Demo(_) => "error,updraft::simulate=warn",
        _ => "info,sqlx=warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UPDRAFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Bench(b) => runtime.block_on(bench::run(b)),
        Command::Sign(args) => signing::sign(args),
        Command::Signer(cmd) => signing::run(cmd),
        Command::Simulate(args) => runtime.block_on(simulate::run(args)),
        Command::Demo(args) => runtime.block_on(demo::run(args)),
    }
}
