//! `updraft serve`: opens the store and artifact store, makes sure the installation has
//! an account id and access keys, binds the listener and serves until shut down.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::artifacts::{ArtifactError, Artifacts};
use crate::auth::KeyRing;
use crate::config::ServerConfig;
use crate::mqtt::broker::{Authorizer, Broker, BrokerConfig};
use crate::mqtt::external::{BrokerTarget, ExternalBus};
use crate::store::{SqlStore, Store, StoreError};
use crate::tls::DeviceCa;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Artifacts(#[from] ArtifactError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("MQTT broker: {0}")]
    Broker(String),
    #[error("signing key: {0}")]
    SigningKey(#[from] crate::signer::kek::KekError),
    #[error(
        "the signing key-encryption key {file} (id {current}) is not the one this installation's private keys are \
         sealed under (id {expected}); start with the original key (--signing-key-file) or data directory"
    )]
    WrongSigningKey {
        file: String,
        current: String,
        expected: String,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub artifacts: Artifacts,
    pub keys: Arc<KeyRing>,
    pub account: String,
    pub region: String,
    /// Where request bodies are spooled before they are committed.
    pub spool_dir: PathBuf,
    /// The device data plane (MQTT bus, notifications, pre-signed URLs).
    pub data_plane: Arc<crate::dataplane::DataPlane>,
    /// The CA that issues device certificates.
    pub device_ca: Arc<DeviceCa>,
    /// The host devices connect to (DescribeEndpoint).
    pub device_endpoint: String,
    /// The key-encryption key that seals code-signing private keys at rest.
    pub signing_key: Arc<crate::signer::kek::Kek>,
}

impl AppState {
    /// An IoT ARN in this installation.
    pub fn arn(&self, kind: updraft_protocol::ResourceKind, name: &str) -> String {
        updraft_protocol::Arn::new(&self.region, &self.account, kind, name).to_string()
    }
}

/// Installation-wide identity, created on first start.
pub struct Identity {
    pub account: String,
    pub access_key: String,
    pub secret_key: String,
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS RNG is always available on the platforms Updraft runs on.
    getrandom::fill(&mut b).unwrap_or_else(|e| panic!("no OS randomness: {e}"));
    b
}

fn random_string(alphabet: &[u8], len: usize) -> String {
    let bytes = random_bytes::<64>();
    bytes
        .iter()
        .take(len)
        .map(|b| alphabet[usize::from(*b) % alphabet.len()] as char)
        .collect()
}

/// Reads the installation identity from the store, creating it on first start.
pub async fn ensure_identity(store: &dyn Store) -> Result<Identity, StoreError> {
    let mut account = random_string(b"0123456789", 12);
    if account.starts_with('0') {
        account.replace_range(0..1, "1");
    }
    let account = store.init_setting("account_id", &account).await?;
    let access_key = store
        .init_setting(
            "access_key_id",
            &format!(
                "AKUD{}",
                random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16)
            ),
        )
        .await?;
    let secret_key = store
        .init_setting(
            "secret_access_key",
            &random_string(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
                40,
            ),
        )
        .await?;
    Ok(Identity {
        account,
        access_key,
        secret_key,
    })
}

fn write_private(path: &Path, contents: &str) -> Result<(), ServeError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| ServeError::Io {
        what: "cannot write",
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Writes `credentials` (0600) and `config` for the `aws` CLI under profile `updraft`.
fn write_client_files(dir: &Path, id: &Identity, region: &str) -> Result<(), ServeError> {
    write_private(
        &dir.join("credentials"),
        &format!(
            "[updraft]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            id.access_key, id.secret_key
        ),
    )?;
    write_private(
        &dir.join("config"),
        &format!("[profile updraft]\nregion = {region}\noutput = json\n"),
    )?;
    Ok(())
}

/// Loads (or creates) the key-encryption key and checks it is the one the installation's
/// private keys are sealed under: the first key an installation starts with is recorded
/// (by id, never the key) and a different one is refused, so replicas sharing a database
/// must share the key too.
async fn load_signing_key(
    store: &dyn Store,
    config: &ServerConfig,
) -> Result<crate::signer::kek::Kek, ServeError> {
    let kek = crate::signer::kek::Kek::load_or_create(
        config.signing_key_file.as_deref(),
        &config.data_dir,
    )?;
    let expected = store.init_setting("signing_kek_id", kek.id()).await?;
    if expected != kek.id() {
        let file = config
            .signing_key_file
            .clone()
            .unwrap_or_else(|| config.data_dir.join(crate::signer::kek::KEK_FILE));
        return Err(ServeError::WrongSigningKey {
            file: file.display().to_string(),
            current: kek.id().to_owned(),
            expected,
        });
    }
    Ok(kek)
}

/// A server that is bound and ready; [`Server::run`] serves until `shutdown` resolves.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    pub http_addr: SocketAddr,
    /// The embedded broker's plain listener, when it runs.
    pub mqtt_addr: Option<SocketAddr>,
    /// The embedded broker's TLS listener, when it runs.
    pub mqtts_addr: Option<SocketAddr>,
}

/// Who may connect to the embedded broker. On the TLS listener: the holder of an ACTIVE
/// certificate attached to the thing its client id names. On the plain (loopback) listener,
/// which cannot authenticate: any client id that names a thing.
fn device_authorizer(state: &AppState) -> Authorizer {
    let store = state.store.clone();
    let (region, account) = (state.region.clone(), state.account.clone());
    Arc::new(move |req| {
        let store = store.clone();
        let cert_arn = req.certificate_id.as_ref().map(|id| {
            updraft_protocol::Arn::new(&region, &account, updraft_protocol::ResourceKind::Cert, id)
                .to_string()
        });
        Box::pin(async move {
            if !matches!(store.get_thing(&req.client_id).await, Ok(Some(_))) {
                return false;
            }
            match (&req.certificate_id, cert_arn) {
                (None, _) => true,
                (Some(id), Some(arn)) => {
                    let active = matches!(store.get_certificate(id).await, Ok(Some(c)) if c.status == "ACTIVE");
                    active
                        && matches!(
                            store.principal_attached(&req.client_id, &arn).await,
                            Ok(true)
                        )
                }
                (Some(_), None) => false,
            }
        })
    })
}

/// Device requests queued in each data-plane worker's lane (a bound, not an allocation:
/// tokio's channels grow in blocks). A full lane slows the reads of the devices whose
/// requests go there, and no one else's.
const LANE_QUEUE: usize = 1024;

/// Data-plane workers: each handles its devices' requests in order, one at a time, so a
/// device that shares a worker waits for the other's group commit. Many workers (cheap
/// idle tasks) keep devices apart and the commits full: 64 gave 100 devices batches of
/// ~15 and half the throughput; with 1,024, a few of 100 devices still shared a worker
/// and finished last. An idle worker costs ~6 KiB (its task holds room for the deepest
/// request it may handle; boxing that per request measured slower), 24 MiB for 4,096;
/// a task per device, started on demand, measured slower too.
const DATA_PLANE_WORKERS: usize = 4096;

impl Server {
    pub async fn start(config: &ServerConfig) -> Result<Server, ServeError> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Io {
            what: "cannot create data directory",
            path: dir.clone(),
            source,
        })?;
        let spool_dir = dir.join("spool");
        // Spooled bodies of interrupted requests are garbage: start clean.
        let _ = std::fs::remove_dir_all(&spool_dir);
        std::fs::create_dir_all(&spool_dir).map_err(|source| ServeError::Io {
            what: "cannot create spool directory",
            path: spool_dir.clone(),
            source,
        })?;
        let store = SqlStore::connect(&config.database).await?;
        let identity = ensure_identity(&store).await?;
        write_client_files(dir, &identity, &config.region)?;
        let signing_key = load_signing_key(&store, config).await?;
        let artifacts = Artifacts::from_url(&config.artifacts)?;
        let listener = TcpListener::bind(config.http)
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.http,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: config.http,
            source,
        })?;
        let device_ca = DeviceCa::load_or_create(&store, &identity.account)
            .await
            .map_err(|e| ServeError::Broker(e.to_string()))?;
        write_private(&dir.join("ca.pem"), device_ca.cert_pem())?;
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{http_addr}"));
        let device_endpoint = public_url
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or(&public_url)
            .split(['/', ':'])
            .next()
            .unwrap_or("127.0.0.1")
            .to_owned();
        let state = AppState {
            store: Arc::new(store),
            artifacts,
            keys: Arc::new(KeyRing::new([(
                identity.access_key.clone(),
                identity.secret_key.clone(),
            )])),
            account: identity.account,
            region: config.region.clone(),
            spool_dir,
            data_plane: Arc::new(crate::dataplane::DataPlane::default()),
            device_ca: Arc::new(device_ca),
            device_endpoint,
            signing_key: Arc::new(signing_key),
        };
        state.data_plane.set_presigner(crate::dataplane::Presigner {
            base_url: public_url,
            access_key: identity.access_key,
            secret_key: identity.secret_key,
            region: config.region.clone(),
        });

        let (inbound_tx, inbound_rx) = crate::mqtt::Lanes::new(DATA_PLANE_WORKERS, LANE_QUEUE);
        let mut mqtt_addr = None;
        let mut mqtts_addr = None;
        let mut endpoints = serde_json::json!({ "http": format!("http://{http_addr}") });
        if let Some(url) = &config.broker_url {
            let target = BrokerTarget::parse(
                url,
                std::env::var("UPDRAFT_BROKER_USERNAME").ok(),
                std::env::var("UPDRAFT_BROKER_PASSWORD").ok(),
                std::env::var("UPDRAFT_BROKER_SHARED_GROUP")
                    .ok()
                    .filter(|g| !g.is_empty()),
            )
            .map_err(|e| ServeError::Broker(e.to_string()))?;
            let bus = ExternalBus::connect(target, inbound_tx);
            state.data_plane.set_bus(Arc::new(bus));
            endpoints["mqtt"] = serde_json::Value::String(url.clone());
        } else if let Some(addr) = config.mqtt {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ServeError::Bind { addr, source })?;
            let authorize = device_authorizer(&state);
            let broker = Broker::new(BrokerConfig::default(), authorize, inbound_tx);
            tokio::spawn(broker.clone().serve_tcp(listener));
            endpoints["mqtt"] = serde_json::Value::String(format!("mqtt://{bound}"));
            mqtt_addr = Some(bound);
            if let Some(addr) = config.mqtts {
                let tls_listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind { addr, source })?;
                let tls_bound = tls_listener
                    .local_addr()
                    .map_err(|source| ServeError::Bind { addr, source })?;
                let tls_config = state
                    .device_ca
                    .server_config(&config.tls_names)
                    .map_err(|e| ServeError::Broker(e.to_string()))?;
                tokio::spawn(crate::tls::serve_mqtts(
                    broker.clone(),
                    tls_listener,
                    tls_config,
                    std::time::Duration::from_secs(10),
                ));
                endpoints["mqtts"] = serde_json::Value::String(format!("mqtts://{tls_bound}"));
                mqtts_addr = Some(tls_bound);
            }
            state.data_plane.set_bus(Arc::new(broker));
        }
        crate::dataplane::spawn_workers(state.clone(), inbound_rx, config.device_rate_limit);
        write_private(&dir.join("endpoints.json"), &format!("{endpoints:#}\n"))?;
        tracing::info!(%http_addr, mqtt = ?mqtt_addr, database = %redact(&config.database), artifacts = ?state.artifacts, "updraft is listening");
        let signing = crate::signer::jobs::resume_pending(&state).await?;
        if signing > 0 {
            tracing::info!(signing, "resuming signing jobs left in progress");
        }
        let resumed = crate::iot::ota::resume_pending(&state).await?;
        if resumed > 0 {
            tracing::info!(resumed, "resuming the creation of OTA updates left pending");
        }
        Ok(Server {
            listener,
            state,
            http_addr,
            mqtt_addr,
            mqtts_addr,
        })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        crate::http::serve(self.listener, self.state, shutdown)
            .await
            .map_err(|source| ServeError::Io {
                what: "server failed on",
                path: PathBuf::from(self.http_addr.to_string()),
                source,
            })
    }
}

/// A database URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..s], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(super::redact("sqlite:///x"), "sqlite:///x");
    }
}
