//! The daemon's configuration file (TOML). `packaging/updraft-agent.toml` is the annotated
//! example; unknown keys are errors, so a typo does not silently fall back to a default.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use updraft_agent::AppVersion;
use updraft_agent::pal::linux::{LinuxPalOptions, VersionSource};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The thing name: MQTT client id and the `{thingName}` of the topics.
    pub thing_name: String,
    /// Where the slots, the state and the checkpoints live (the daemon's only writable place).
    pub install_dir: PathBuf,
    /// Every log line also goes here (appended).
    pub log_file: Option<PathBuf>,
    /// error, warn, info, debug or trace.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    pub broker: Broker,
    /// `certfile` of the job document → the PEM file of that signer's certificate.
    pub signers: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub self_test: SelfTest,
    #[serde(default)]
    pub download: Download,
    #[serde(default)]
    pub version: Version,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    /// The CA that signed the broker's certificate (Updraft: `<data-dir>/ca.pem`).
    pub ca: Option<PathBuf>,
    /// The device certificate and its private key (PEM), from CreateKeysAndCertificate.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the broker's certificate must carry; defaults to `host`.
    pub server_name: Option<String>,
    /// Plain MQTT without TLS: development only, and only to a loopback address.
    #[serde(default)]
    pub plain: bool,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfTest {
    /// The program and its arguments (no shell). Empty: the new image is accepted as soon
    /// as the daemon runs it and reaches the service.
    #[serde(default)]
    pub command: Vec<String>,
    /// How long the new image may take, from its start to the verdict (connecting, the job,
    /// the command). Past it, the command is killed and the image rolled back.
    #[serde(default = "default_self_test_timeout")]
    pub timeout_secs: u64,
}

impl Default for SelfTest {
    fn default() -> Self {
        SelfTest {
            command: Vec::new(),
            timeout_secs: default_self_test_timeout(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Download {
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Also the most blocks fetched again after a kill or power cut.
    #[serde(default = "default_blocks_per_request")]
    pub blocks_per_request: u32,
    #[serde(default = "default_max_file_size")]
    pub max_file_size: u64,
    /// Silence after which blocks are asked for again.
    #[serde(default = "default_request_wait")]
    pub request_wait_secs: u64,
    /// Streams encoding: "cbor" (the C agent's) or "json".
    #[serde(default = "default_format")]
    pub format: String,
    /// The CA certificate (PEM) that `https://` pre-signed URLs are checked against. Without
    /// it, only `http://` URLs (and MQTT Streams) are used.
    #[serde(default)]
    pub http_ca: Option<PathBuf>,
}

impl Default for Download {
    fn default() -> Self {
        Download {
            block_size: default_block_size(),
            blocks_per_request: default_blocks_per_request(),
            max_file_size: default_max_file_size(),
            request_wait_secs: default_request_wait(),
            format: default_format(),
            http_ca: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Version {
    /// "header": the Updraft image header at the start of the image; "file": the file at
    /// `file` (`{slot}` = the active slot's directory) holding `major.minor.build`.
    #[serde(default = "default_version_source")]
    pub source: String,
    pub file: Option<String>,
    /// The version while the active slot holds no image (a fresh install).
    #[serde(default = "default_factory_version")]
    pub factory: String,
    /// Accept images not newer than the running one.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Never accept an image older than this (anti-rollback floor).
    pub floor: Option<String>,
}

impl Default for Version {
    fn default() -> Self {
        Version {
            source: default_version_source(),
            file: None,
            factory: default_factory_version(),
            allow_downgrade: false,
            floor: None,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_self_test_timeout() -> u64 {
    60
}
fn default_block_size() -> u32 {
    4096
}
fn default_blocks_per_request() -> u32 {
    8
}
fn default_max_file_size() -> u64 {
    256 * 1024 * 1024
}
fn default_request_wait() -> u64 {
    10
}
fn default_format() -> String {
    "cbor".into()
}
fn default_version_source() -> String {
    "header".into()
}
fn default_factory_version() -> String {
    "0.0.1".into()
}

/// How the daemon reaches the broker.
pub enum Transport {
    Plain,
    Tls {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        server_name: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration {}", path.display()))?;
        Config::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("the configuration {}", path.display()))
    }

    /// Parses and checks a configuration; relative paths are relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config> {
        let mut c: Config = toml::from_str(text)?;
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut c.install_dir);
        if let Some(p) = c.log_file.as_mut() {
            abs(p);
        }
        for p in [
            &mut c.broker.ca,
            &mut c.broker.cert,
            &mut c.broker.key,
            &mut c.download.http_ca,
        ]
        .into_iter()
        .flatten()
        {
            abs(p);
        }
        for p in c.signers.values_mut() {
            abs(p);
        }
        c.transport()?;
        c.pal_options()?;
        c.agent_config(AppVersion::default())?;
        Ok(c)
    }

    pub fn transport(&self) -> Result<Transport> {
        let b = &self.broker;
        match (&b.ca, &b.cert, &b.key, b.plain) {
            (None, None, None, true) => {
                let loopback = b.host == "localhost"
                    || b.host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    bail!(
                        "broker.plain is for development on loopback only, not '{}': give ca, cert and key",
                        b.host
                    );
                }
                Ok(Transport::Plain)
            }
            (Some(ca), Some(cert), Some(key), false) => Ok(Transport::Tls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: b.server_name.clone().unwrap_or_else(|| b.host.clone()),
            }),
            _ => bail!(
                "[broker] needs ca, cert and key (mutual TLS), or plain = true (loopback, development)"
            ),
        }
    }

    pub fn pal_options(&self) -> Result<LinuxPalOptions> {
        let v = &self.version;
        let version_source = match (v.source.as_str(), &v.file) {
            ("header", None) => VersionSource::Header,
            ("file", Some(f)) => VersionSource::File(f.clone()),
            ("file", None) => bail!("version.source = \"file\" needs version.file"),
            ("header", Some(_)) => bail!("version.file is only for version.source = \"file\""),
            (other, _) => bail!("version.source is \"header\" or \"file\", not \"{other}\""),
        };
        Ok(LinuxPalOptions {
            version_source,
            factory_version: v.factory.parse().context("version.factory")?,
            max_file_size: self.download.max_file_size,
        })
    }

    /// The agent's configuration for a device running `running`.
    pub fn agent_config(&self, running: AppVersion) -> Result<updraft_agent::AgentConfig> {
        let d = &self.download;
        let mut a = updraft_agent::AgentConfig::new(self.thing_name.clone(), running);
        a.block_size = d.block_size;
        a.blocks_per_request = d.blocks_per_request;
        a.max_file_size = d.max_file_size;
        a.request_wait = Duration::from_secs(d.request_wait_secs.max(1));
        a.self_test_wait = self.self_test_timeout();
        a.format = match d.format.as_str() {
            "cbor" => updraft_protocol::topics::Format::Cbor,
            "json" => updraft_protocol::topics::Format::Json,
            other => bail!("download.format is \"cbor\" or \"json\", not \"{other}\""),
        };
        if let Some(ca) = &d.http_ca {
            a.http_ca_pem = Some(
                std::fs::read_to_string(ca)
                    .with_context(|| format!("download.http_ca {}", ca.display()))?,
            );
        }
        a.allow_downgrade = self.version.allow_downgrade;
        a.version_floor = match &self.version.floor {
            Some(f) => Some(f.parse().context("version.floor")?),
            None => None,
        };
        a.validate().context("the [download] settings")?;
        Ok(a)
    }

    pub fn self_test_timeout(&self) -> Duration {
        Duration::from_secs(self.self_test.timeout_secs.max(1))
    }

    /// certfile → PEM text, read now so a missing certificate stops the start.
    pub fn load_signers(&self) -> Result<BTreeMap<String, String>> {
        if self.signers.is_empty() {
            bail!("[signers] is empty: no image could be verified");
        }
        self.signers
            .iter()
            .map(|(certfile, path)| {
                let pem = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "reading the signer certificate {} for '{certfile}'",
                        path.display()
                    )
                })?;
                Ok((certfile.clone(), pem))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../../../packaging/updraft-agent.toml");

    #[test]
    fn the_shipped_example_is_valid() {
        let c = Config::parse(EXAMPLE, Path::new("/etc/updraft-agent")).expect("example");
        assert!(
            matches!(c.transport(), Ok(Transport::Tls { server_name, .. }) if server_name == "updraft.example.com")
        );
        assert_eq!(c.install_dir, Path::new("/var/lib/updraft-agent"));
        assert_eq!(c.self_test_timeout(), Duration::from_secs(60));
        let a = c
            .agent_config(AppVersion::new(1, 0, 0))
            .expect("agent config");
        assert_eq!((a.block_size, a.blocks_per_request), (4096, 8));
    }

    #[test]
    fn mistakes_are_refused() {
        let base = Path::new("/etc");
        let minimal = |broker: &str, extra: &str| {
            format!(
                "thing_name = \"d\"\ninstall_dir = \"i\"\n{extra}\n[broker]\n{broker}\n[signers]\n\"c\" = \"s.pem\"\n"
            )
        };
        let plain = "host = \"127.0.0.1\"\nport = 1883\nplain = true";
        let c = Config::parse(&minimal(plain, ""), base).expect("minimal");
        assert_eq!(c.install_dir, Path::new("/etc/i"), "relative to the file");
        assert_eq!(c.signers["c"], Path::new("/etc/s.pem"));
        for (broker, extra) in [
            ("host = \"10.0.0.1\"\nport = 1883\nplain = true", ""),
            ("host = \"h\"\nport = 8883\nca = \"ca.pem\"", ""),
            (plain, "typo = 1"),
            (plain, "[download]\nblock_size = 10"),
            (plain, "[download]\nformat = \"xml\""),
            (plain, "[version]\nsource = \"file\""),
            (plain, "[version]\nfactory = \"one\""),
        ] {
            assert!(
                Config::parse(&minimal(broker, extra), base).is_err(),
                "{broker} {extra}"
            );
        }
    }
}
