//! `updraft bench http`: devices' HTTP data path — pre-signed `Range` GETs of one firmware
//! file from Updraft's S3 endpoint — measured beside nginx serving the same bytes from disk
//! in the same run, with the same client, so the ratio says what the S3 facade costs
//! (SigV4 check, metadata lookup, blob read) against a static file server at its best
//! (`sendfile`, no access log).
//!
//! The client is the device agent's own HTTP/1.1 keep-alive client
//! (`updraft_agent::http::Client`): each of N connections downloads the whole file in sequential `Range` requests, as the FreeRTOS
//! HTTP demo does (one block per request, strictly in order). The clients run in this
//! process, on the runtime that also runs Updraft's server, while nginx has its own
//! processes: on a small machine that costs Updraft some CPU, so read the ratio as a floor.

use anyhow::{Context, bail};
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use updraft_agent::http::{Client, Url};

use super::tempdir::TempDir;
use super::{UNTHROTTLED, create_object, file_contents, temp_server};

#[derive(Args)]
pub struct HttpArgs {
    /// Concurrent clients, each on its own keep-alive connection.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// File size in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    size: usize,
    /// Bytes per Range request (the FreeRTOS HTTP demo asks for one 4 KiB block at a time;
    /// the default is a middle ground between per-request cost and bulk transfer).
    #[arg(long, default_value_t = 64 * 1024)]
    range: usize,
    /// Measured runs of each server (alternating); the best of each is reported.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// The nginx executable [default: `nginx` on PATH, else /usr/sbin/nginx].
    #[arg(long)]
    nginx: Option<PathBuf>,
}

/// Where one server serves the file (for Updraft, the pre-signed URL).
#[derive(Clone)]
struct Target {
    url: Url,
}

pub async fn run(a: HttpArgs) -> anyhow::Result<()> {
    if a.range == 0 || a.clients == 0 || a.size == 0 {
        bail!("--range, --clients and --size must be positive");
    }
    let data = Arc::new(file_contents(a.size));

    let (server, _dir) = temp_server(UNTHROTTLED).await?;
    let state = server.state().clone();
    tokio::spawn(server.run(std::future::pending()));
    create_object(&state, data.to_vec()).await?;
    let updraft = updraft_target(&state).await?;

    let root = TempDir::new()?;
    let nginx = Nginx::start(a.nginx.as_deref(), &root.path, &data).await?;
    let nginx_target = Target {
        url: Url::parse(&format!("http://{}/bench/fw.bin", nginx.addr))?,
    };

    println!(
        "bench http: {} clients x {} bytes in {}-byte Range requests ({} per download)",
        a.clients,
        a.size,
        a.range,
        a.size.div_ceil(a.range)
    );
    // nginx is stopped whatever happens, Ctrl-C included.
    let measured = tokio::select! {
        r = measure(&a, &updraft, &nginx_target, &data) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    nginx.stop().await;
    let (best_nginx, best_updraft) = measured?;

    let mb = (a.clients * a.size) as f64 / 1e6;
    let requests = (a.clients * a.size.div_ceil(a.range)) as f64;
    let line = |name: &str, d: Duration| {
        let s = d.as_secs_f64();
        println!(
            "  {name:<16}: {:>8.1} MB/s {:>9.0} requests/s ({s:.2} s)",
            mb / s,
            requests / s
        );
        mb / s
    };
    let n = line("nginx (sendfile)", best_nginx);
    let u = line("updraft S3 GET", best_updraft);
    println!("  ratio           : {:>8.2}", u / n);
    Ok(())
}

/// Warms both servers (page cache, metadata caches, connection paths), then runs
/// `trials` alternating measurements; returns the best time of nginx and of Updraft.
async fn measure(
    a: &HttpArgs,
    updraft: &Target,
    nginx: &Target,
    data: &Arc<Vec<u8>>,
) -> anyhow::Result<(Duration, Duration)> {
    download_all(updraft, 4, a.range, data).await?;
    download_all(nginx, 4, a.range, data).await?;
    let (mut best_updraft, mut best_nginx) = (Duration::MAX, Duration::MAX);
    for _ in 0..a.trials.max(1) {
        best_nginx = best_nginx.min(download_all(nginx, a.clients, a.range, data).await?);
        best_updraft = best_updraft.min(download_all(updraft, a.clients, a.range, data).await?);
    }
    Ok((best_nginx, best_updraft))
}

/// A pre-signed URL for `bench/fw.bin`, made exactly as job documents get theirs:
/// a `${aws:iot:s3-presigned-url:...}` placeholder substituted by the data plane.
async fn updraft_target(state: &updraft_server::server::AppState) -> anyhow::Result<Target> {
    let now = updraft_server::clock::now_ms();
    let mut details = serde_json::Map::new();
    details.insert(
        "presignedUrlConfig".into(),
        serde_json::json!({ "roleArn": "arn:aws:iam::123456789012:role/bench", "expiresInSec": 3600 }),
    );
    let job = updraft_server::store::Job {
        id: "bench-http".into(),
        status: updraft_protocol::JobStatus::InProgress,
        target_selection: updraft_protocol::TargetSelection::Snapshot,
        targets: vec![],
        description: None,
        document: r#"{"url":"${aws:iot:s3-presigned-url:https://s3.amazonaws.com/bench/fw.bin}"}"#
            .into(),
        document_source: None,
        namespace_id: None,
        details,
        force_canceled: false,
        reason_code: None,
        comment: None,
        created_ms: now,
        updated_ms: now,
        completed_ms: None,
        version: 1,
    };
    let doc: serde_json::Value =
        serde_json::from_str(&state.data_plane.substitute_presigned_urls(&job).await)?;
    let url = doc["url"].as_str().context("no URL in the document")?;
    Ok(Target {
        url: Url::parse(url)?,
    })
}

/// `clients` concurrent downloads of the whole file; returns the wall time.
async fn download_all(
    target: &Target,
    clients: usize,
    range: usize,
    data: &Arc<Vec<u8>>,
) -> anyhow::Result<Duration> {
    // The same HTTP client for both servers: the device agent's. Each connection is opened
    // (by a first one-byte request) before the clock starts.
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut c = Client::new(None, Duration::from_secs(30));
        c.get_range(&target.url, 0, 0).await?;
        conns.push(c);
    }
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for mut c in conns {
        let data = data.clone();
        let url = target.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut offset = 0;
            while offset < data.len() {
                let end = (offset + range).min(data.len());
                let resp = c.get_range(&url, offset as u64, end as u64 - 1).await?;
                if resp.status != 206 {
                    bail!(
                        "status {} for bytes {offset}-{}: {}",
                        resp.status,
                        end - 1,
                        String::from_utf8_lossy(&resp.body)
                    );
                }
                if resp.body != data[offset..end] {
                    bail!("bytes {offset}..{end} differ from the file");
                }
                offset = end;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

/// nginx serving `<root>/www/bench/fw.bin` on a free loopback port, as a child process.
struct Nginx {
    child: Child,
    exe: PathBuf,
    conf: PathBuf,
    prefix: PathBuf,
    addr: SocketAddr,
}

impl Nginx {
    async fn start(exe: Option<&Path>, root: &Path, data: &[u8]) -> anyhow::Result<Nginx> {
        let exe = match exe {
            Some(e) => e.to_owned(),
            None => find_nginx().context(
                "nginx is not installed (apt-get install nginx, or scripts/install-deps.sh)",
            )?,
        };
        let www = root.join("www");
        std::fs::create_dir_all(www.join("bench"))?;
        std::fs::write(www.join("bench/fw.bin"), data)?;
        // A free port: bind, read it, release it for nginx.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        // nginx started as root drops to `nobody` for its workers; stay root instead so the
        // workers can read a private temporary directory.
        let user = if running_as_root() {
            "user root;\n"
        } else {
            ""
        };
        let r = root.display();
        let conf = root.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "{user}daemon off;\nworker_processes auto;\npid {r}/nginx.pid;\nerror_log {r}/error.log warn;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n\
                 keepalive_requests 1000000;\n  keepalive_timeout 60s;\n  default_type application/octet-stream;\n\
                 client_body_temp_path {r}/client_body;\n  proxy_temp_path {r}/proxy;\n\
                 fastcgi_temp_path {r}/fastcgi;\n  uwsgi_temp_path {r}/uwsgi;\n  scgi_temp_path {r}/scgi;\n\
                 server {{\n    listen {addr};\n    root {www};\n  }}\n}}\n",
                www = www.display()
            ),
        )?;
        let child = Command::new(&exe)
            .arg("-p")
            .arg(root)
            .arg("-e")
            .arg(root.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut nginx = Nginx {
            child,
            exe,
            conf,
            prefix: root.to_owned(),
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let log = std::fs::read_to_string(root.join("error.log")).unwrap_or_default();
                bail!("nginx exited ({status}): {log}");
            }
            if Instant::now() > deadline {
                bail!("nginx did not start listening on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(nginx)
    }

    /// Fast shutdown of master and workers (`nginx -s stop` signals the master by pid file).
    async fn stop(mut self) {
        let _ = Command::new(&self.exe)
            .arg("-p")
            .arg(&self.prefix)
            .arg("-e")
            .arg(self.prefix.join("error.log"))
            .arg("-c")
            .arg(&self.conf)
            .args(["-s", "stop"])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn find_nginx() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nginx"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/nginx");
        sbin.is_file().then_some(sbin)
    })
}

/// Whether this process runs as root (the owner of `/proc/self` is the effective user).
#[cfg(unix)]
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(not(unix))]
fn running_as_root() -> bool {
    false
}
