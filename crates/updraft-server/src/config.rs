//! Server configuration. Precedence, highest first: command-line flag, `UPDRAFT_*`
//! environment variable, TOML file (`--config`), built-in default. The binary applies
//! the first two (clap); [`FileConfig`] is the third; [`ServerConfig::resolve`] the last.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {what} '{value}': {message}")]
    Invalid {
        what: &'static str,
        value: String,
        message: String,
    },
}

/// Settings as given by one source; `None` means "not set here".
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub http: Option<String>,
    pub database: Option<String>,
    pub artifacts: Option<String>,
    pub region: Option<String>,
    pub mqtt: Option<String>,
    pub mqtts: Option<String>,
    pub tls_names: Option<Vec<String>>,
    pub broker_url: Option<String>,
    pub public_url: Option<String>,
    pub allow_insecure_mqtt: Option<bool>,
    pub signing_key_file: Option<PathBuf>,
    pub device_rate_limit: Option<f64>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// `self` where set, else `lower`.
    pub fn over(self, lower: FileConfig) -> FileConfig {
        FileConfig {
            data_dir: self.data_dir.or(lower.data_dir),
            http: self.http.or(lower.http),
            database: self.database.or(lower.database),
            artifacts: self.artifacts.or(lower.artifacts),
            region: self.region.or(lower.region),
            mqtt: self.mqtt.or(lower.mqtt),
            mqtts: self.mqtts.or(lower.mqtts),
            tls_names: self.tls_names.or(lower.tls_names),
            broker_url: self.broker_url.or(lower.broker_url),
            public_url: self.public_url.or(lower.public_url),
            allow_insecure_mqtt: self.allow_insecure_mqtt.or(lower.allow_insecure_mqtt),
            signing_key_file: self.signing_key_file.or(lower.signing_key_file),
            device_rate_limit: self.device_rate_limit.or(lower.device_rate_limit),
        }
    }
}

/// The resolved configuration `updraft serve` runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub database: String,
    pub artifacts: String,
    pub region: String,
    /// The embedded broker's plain MQTT listener; `None` with an external broker.
    pub mqtt: Option<SocketAddr>,
    /// The embedded broker's TLS listener (client certificates required); `None` with an
    /// external broker.
    pub mqtts: Option<SocketAddr>,
    /// Names (DNS or IP) the TLS listener's certificate is issued for.
    pub tls_names: Vec<String>,
    /// `mqtt://host:port` of an external broker to use instead of the embedded one.
    pub broker_url: Option<String>,
    /// The URL devices reach the HTTP listener at; defaults to the bound address.
    pub public_url: Option<String>,
    /// Allow the plain (unauthenticated-transport) MQTT listener on a non-loopback address.
    pub allow_insecure_mqtt: bool,
    /// The operator's key-encryption key for signing keys; `None` means
    /// `<data-dir>/signing.key`, created on first start.
    pub signing_key_file: Option<PathBuf>,
    /// MQTT requests per second one device may make, sustained (bursts of twice as many);
    /// beyond it the Jobs API answers `RequestThrottled`. `0` means no limit.
    pub device_rate_limit: f64,
}

pub const DEFAULT_DATA_DIR: &str = "./updraft-data";
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
pub const DEFAULT_REGION: &str = "us-east-1";
pub const DEFAULT_MQTT: &str = "127.0.0.1:1883";
pub const DEFAULT_MQTTS: &str = "127.0.0.1:8883";
pub const DEFAULT_DEVICE_RATE_LIMIT: f64 = 200.0;

impl ServerConfig {
    /// Fills what no source set with the defaults and checks every value.
    pub fn resolve(c: FileConfig) -> Result<Self, ConfigError> {
        let data_dir = c
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let http_text = c.http.unwrap_or_else(|| DEFAULT_HTTP.to_owned());
        let http =
            http_text
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                    what: "HTTP address",
                    value: http_text.clone(),
                    message: e.to_string(),
                })?;
        let database = c
            .database
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("updraft.db").display()));
        if !(database.starts_with("sqlite:")
            || database.starts_with("postgres:")
            || database.starts_with("postgresql:"))
        {
            return Err(ConfigError::Invalid {
                what: "database URL",
                value: database,
                message: "use sqlite://PATH or postgres://USER@HOST:PORT/DB".into(),
            });
        }
        let artifacts = c
            .artifacts
            .unwrap_or_else(|| format!("file://{}", data_dir.join("artifacts").display()));
        if !(artifacts.starts_with("file://") || artifacts.starts_with("s3://")) {
            return Err(ConfigError::Invalid {
                what: "artifact store URL",
                value: artifacts,
                message: "use file://DIR or s3://BUCKET?region=...&endpoint=...".into(),
            });
        }
        let region = c.region.unwrap_or_else(|| DEFAULT_REGION.to_owned());
        if region.is_empty()
            || !region
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
        {
            return Err(ConfigError::Invalid {
                what: "region",
                value: region,
                message: "a region is lower-case letters, digits and '-', like us-east-1".into(),
            });
        }
        let allow_insecure_mqtt = c.allow_insecure_mqtt.unwrap_or(false);
        let broker_url = c.broker_url;
        if let Some(url) = &broker_url
            && !(url.starts_with("mqtt://") || url.starts_with("mqtts://"))
        {
            return Err(ConfigError::Invalid {
                what: "broker URL",
                value: url.clone(),
                message: "use mqtt://HOST:PORT or mqtts://HOST:PORT?ca=FILE[&cert=FILE&key=FILE]"
                    .into(),
            });
        }
        let mqtt = match (&broker_url, c.mqtt) {
            (Some(_), None) => None,
            (_, text) => {
                let text = text.unwrap_or_else(|| DEFAULT_MQTT.to_owned());
                let addr: SocketAddr =
                    text.parse()
                        .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                            what: "MQTT address",
                            value: text.clone(),
                            message: e.to_string(),
                        })?;
                if !addr.ip().is_loopback() && !allow_insecure_mqtt {
                    return Err(ConfigError::Invalid {
                        what: "MQTT address",
                        value: text,
                        message: "the plain MQTT listener does not authenticate devices, so it only binds to \
                                  loopback; pass --allow-insecure-mqtt to bind it elsewhere"
                            .into(),
                    });
                }
                Some(addr)
            }
        };
        let mqtts = match (&broker_url, c.mqtts) {
            (Some(_), None) => None,
            (_, text) => {
                let text = text.unwrap_or_else(|| DEFAULT_MQTTS.to_owned());
                Some(
                    text.parse()
                        .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                            what: "MQTT/TLS address",
                            value: text.clone(),
                            message: e.to_string(),
                        })?,
                )
            }
        };
        let tls_names = c
            .tls_names
            .unwrap_or_else(|| vec!["localhost".to_owned(), "127.0.0.1".to_owned()]);
        if let Some(u) = &c.public_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(ConfigError::Invalid {
                what: "public URL",
                value: u.clone(),
                message: "use http://HOST:PORT or https://HOST".into(),
            });
        }
        let device_rate_limit = c.device_rate_limit.unwrap_or(DEFAULT_DEVICE_RATE_LIMIT);
        if !(device_rate_limit.is_finite() && device_rate_limit >= 0.0) {
            return Err(ConfigError::Invalid {
                what: "device rate limit",
                value: device_rate_limit.to_string(),
                message: "requests per second: a number >= 0 (0: no limit)".into(),
            });
        }
        Ok(ServerConfig {
            data_dir,
            http,
            database,
            artifacts,
            region,
            mqtt,
            mqtts,
            tls_names,
            broker_url,
            public_url: c.public_url,
            allow_insecure_mqtt,
            signing_key_file: c.signing_key_file,
            device_rate_limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_data_dir() {
        let c = ServerConfig::resolve(FileConfig {
            data_dir: Some("/tmp/x".into()),
            ..FileConfig::default()
        })
        .expect("valid");
        assert_eq!(c.http.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database, "sqlite:///tmp/x/updraft.db");
        assert_eq!(c.artifacts, "file:///tmp/x/artifacts");
        assert_eq!(c.region, "us-east-1");
        assert_eq!(
            c.mqtt.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:1883")
        );
    }

    #[test]
    fn plain_mqtt_stays_on_loopback_unless_allowed() {
        let open = FileConfig {
            mqtt: Some("0.0.0.0:1883".into()),
            ..FileConfig::default()
        };
        assert!(ServerConfig::resolve(open.clone()).is_err());
        let allowed = FileConfig {
            allow_insecure_mqtt: Some(true),
            ..open
        };
        assert!(ServerConfig::resolve(allowed).is_ok());
        let external = ServerConfig::resolve(FileConfig {
            broker_url: Some("mqtt://127.0.0.1:1884".into()),
            ..FileConfig::default()
        })
        .expect("external broker");
        assert_eq!(external.mqtt, None);
    }

    #[test]
    fn higher_sources_win_field_by_field() {
        let cli = FileConfig {
            http: Some("127.0.0.1:0".into()),
            ..FileConfig::default()
        };
        let file: FileConfig =
            toml::from_str("http = \"0.0.0.0:1\"\nregion = \"eu-west-1\"\n").expect("toml");
        let merged = cli.over(file);
        assert_eq!(merged.http.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(merged.region.as_deref(), Some("eu-west-1"));
        let file: FileConfig =
            toml::from_str("signing-key-file = \"/etc/updraft/kek\"\n").expect("toml");
        let flag = FileConfig {
            signing_key_file: Some("/run/kek".into()),
            ..FileConfig::default()
        };
        assert_eq!(
            flag.over(file.clone()).signing_key_file,
            Some(PathBuf::from("/run/kek"))
        );
        let resolved = ServerConfig::resolve(FileConfig::default().over(file)).expect("resolve");
        assert_eq!(
            resolved.signing_key_file,
            Some(PathBuf::from("/etc/updraft/kek"))
        );
        assert_eq!(
            ServerConfig::resolve(FileConfig::default())
                .expect("defaults")
                .signing_key_file,
            None
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err = ServerConfig::resolve(FileConfig {
            database: Some("mysql://x".into()),
            ..FileConfig::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("database URL"), "{err}");
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        // TOML writes a whole number of requests as an integer.
        let file: FileConfig = toml::from_str("device-rate-limit = 500").unwrap_or_default();
        assert_eq!(file.device_rate_limit, Some(500.0));
        for rate in [-1.0, f64::NAN, f64::INFINITY] {
            let err = ServerConfig::resolve(FileConfig {
                device_rate_limit: Some(rate),
                ..FileConfig::default()
            })
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
            assert!(err.contains("device rate limit"), "{rate}: {err}");
        }
    }
}
