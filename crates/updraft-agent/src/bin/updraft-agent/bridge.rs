//! Mutual TLS to the broker, with the workspace's rustls + aws-lc-rs.
//!
//! rumqttc's own TLS (`use-rustls-no-provider`) depends on rustls-webpki 0.102, which brings
//! `ring` — a second crypto library in a device binary that already has aws-lc-rs. Instead,
//! rumqttc (built without TLS) connects to a unix socket in a private directory of the
//! daemon, and each connection accepted there is carried over a fresh TLS connection to the
//! broker presenting the device certificate. rumqttc's reconnects are new TLS connections;
//! a handshake failure closes the local side, which rumqttc sees as a lost connection.
//!
//! Only the daemon's user can reach the socket (its directory is 0700), and that user can
//! read the device key anyway: the socket exposes nothing new.

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest path a unix socket address holds (`sun_path`, with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The TLS client configuration: trust `ca`, present `cert` with `key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
        let c = c.with_context(|| format!("{}", ca.display()))?;
        roots
            .add(c)
            .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no CA certificate", ca.display());
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("{}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}", cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the device certificate and key do not go together")
}

/// Where the broker is and how to talk to it.
pub struct Target {
    pub host: String,
    pub port: u16,
    pub server_name: String,
    pub config: rustls::ClientConfig,
}

/// Listens on `socket` (creating its directory, private) and bridges every connection to
/// the broker over TLS. Returns the socket's path for rumqttc.
pub fn start(socket: &Path, target: Target) -> Result<PathBuf> {
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "{}: too long for a unix socket ({MAX_SOCKET_PATH} bytes at most); use a shorter install_dir",
            socket.display()
        );
    }
    let name = ServerName::try_from(target.server_name.clone())
        .with_context(|| format!("broker.server_name '{}'", target.server_name))?;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", dir.display()))?;
    }
    // A socket left by an earlier run: we hold the install directory's lock, so it is ours.
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", socket.display()));
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    info!(
        broker = %format!("{}:{}", target.host, target.port),
        server_name = %target.server_name,
        "MQTT over mutual TLS"
    );
    let connector = TlsConnector::from(Arc::new(target.config));
    let addr = (target.host, target.port);
    tokio::spawn(async move {
        let failing = Arc::new(AtomicBool::new(false));
        loop {
            let local = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("TLS bridge: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (connector, name, addr, failing) = (
                connector.clone(),
                name.clone(),
                addr.clone(),
                failing.clone(),
            );
            tokio::spawn(async move {
                match carry(local, &connector, name, &addr).await {
                    Ok(()) => {}
                    Err(e) => {
                        // Say it once per outage, not at every reconnect.
                        if failing.swap(true, Ordering::Relaxed) {
                            debug!("TLS connection to {}:{}: {e:#}", addr.0, addr.1);
                        } else {
                            warn!("TLS connection to {}:{}: {e:#}", addr.0, addr.1);
                        }
                        return;
                    }
                }
                failing.store(false, Ordering::Relaxed);
            });
        }
    });
    Ok(socket.to_owned())
}

/// Connects to the broker over TLS and copies both ways until either side closes.
async fn carry(
    mut local: UnixStream,
    connector: &TlsConnector,
    name: ServerName<'static>,
    addr: &(String, u16),
) -> Result<()> {
    let connect = async {
        let tcp = TcpStream::connect((addr.0.as_str(), addr.1))
            .await
            .context("connecting")?;
        let _ = tcp.set_nodelay(true);
        connector.connect(name, tcp).await.context("TLS handshake")
    };
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .context("timed out")??;
    debug!("TLS connection to the broker established");
    // Either side ending ends both (MQTT has no half-closed connections): when rumqttc gives
    // up on a silent broker, the TLS connection must not linger until TCP gives up too.
    let (mut local_read, mut local_write) = local.split();
    let (mut tls_read, mut tls_write) = tokio::io::split(tls);
    tokio::select! {
        _ = tokio::io::copy(&mut local_read, &mut tls_write) => {}
        _ = tokio::io::copy(&mut tls_read, &mut local_write) => {}
    }
    Ok(())
}
