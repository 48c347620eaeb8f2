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
}

pub const DEFAULT_DATA_DIR: &str = "./updraft-data";
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
pub const DEFAULT_REGION: &str = "us-east-1";

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
        Ok(ServerConfig {
            data_dir,
            http,
            database,
            artifacts,
            region,
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
    }
}
