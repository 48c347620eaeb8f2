//! `updraft`: the operator's command. `updraft serve` runs the whole system.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use updraft_server::config::{FileConfig, ServerConfig};
use updraft_server::server::Server;

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
    Serve(ServeArgs),
}

/// Every option: flag, then `UPDRAFT_*` environment variable, then the TOML file, then default.
#[derive(Args)]
struct ServeArgs {
    /// TOML file with any of: data-dir, http, database, artifacts, region.
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
}

impl ServeArgs {
    fn resolve(self) -> anyhow::Result<ServerConfig> {
        let given = FileConfig {
            data_dir: self.data_dir,
            http: self.http,
            database: self.database,
            artifacts: self.artifacts,
            region: self.region,
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
    println!("updraft: endpoints in {d}/endpoints.json");
    println!(
        "updraft: AWS_SHARED_CREDENTIALS_FILE={d}/credentials AWS_CONFIG_FILE={d}/config aws --profile updraft --endpoint-url http://{} iot list-things",
        server.http_addr
    );
    server.run(shutdown_signal()).await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UPDRAFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    }
}
