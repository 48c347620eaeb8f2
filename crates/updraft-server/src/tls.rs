//! Updraft's device CA and the TLS (mutual TLS) MQTT listener.
//!
//! The CA is created on first start and kept in the store, so every replica issues and
//! trusts the same certificates. Devices get their certificates from
//! CreateKeysAndCertificate, trust `<data-dir>/ca.pem`, and connect to the TLS listener
//! presenting them; the broker then admits a client only if its certificate is ACTIVE and
//! attached to the thing named by its client id.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::mqtt::broker::Broker;
use crate::store::{Store, StoreError};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// A certificate freshly issued to a device.
pub struct IssuedCertificate {
    pub id: String,
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub public_key_pem: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// The installation's device CA.
pub struct DeviceCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

const DAY_MS: i64 = 86_400_000;

fn ca_name(account: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Updraft");
    dn.push(DnType::CommonName, format!("Updraft device CA {account}"));
    dn
}

fn ca_params(account: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_name(account);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn date(ms: i64) -> time::OffsetDateTime {
    let (y, m, d) = crate::clock::civil(ms);
    rcgen::date_time_ymd(
        i32::try_from(y).unwrap_or(2000),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
    )
}

/// SHA-256 of a certificate's DER, as AWS IoT names certificates.
pub fn certificate_id(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

impl DeviceCa {
    /// Loads the CA from the store, creating it on first start.
    pub async fn load_or_create(store: &dyn Store, account: &str) -> Result<Self, TlsError> {
        let key = match store.get_setting("device_ca_key").await? {
            Some(pem) => KeyPair::from_pem(&pem)?,
            None => {
                let fresh = KeyPair::generate()?;
                let pem = store
                    .init_setting("device_ca_key", &fresh.serialize_pem())
                    .await?;
                KeyPair::from_pem(&pem)?
            }
        };
        let now = crate::clock::now_ms();
        let cert_pem = match store.get_setting("device_ca_cert").await? {
            Some(pem) => pem,
            None => {
                let mut params = ca_params(account);
                params.not_before = date(now - DAY_MS);
                params.not_after = date(now + 30 * 365 * DAY_MS);
                let cert = params.self_signed(&key)?;
                store.init_setting("device_ca_cert", &cert.pem()).await?
            }
        };
        let cert_der = pem_to_der(&cert_pem)
            .ok_or_else(|| TlsError::Verifier("stored CA certificate is not PEM".into()))?;
        Ok(DeviceCa {
            cert_pem,
            cert_der,
            issuer: Issuer::new(ca_params(account), key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a client certificate with a new key pair (ECDSA P-256).
    pub fn issue_device(&self, common_name: &str) -> Result<IssuedCertificate, TlsError> {
        let key = KeyPair::generate()?;
        let now = crate::clock::now_ms();
        let mut params = CertificateParams::default();
        params.distinguished_name = {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, common_name);
            dn
        };
        let not_before = now - DAY_MS;
        let not_after = now + 25 * 365 * DAY_MS;
        params.not_before = date(not_before);
        params.not_after = date(not_after);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(
            &uuid::Uuid::new_v4().into_bytes(),
        ));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            id: certificate_id(cert.der()),
            certificate_pem: cert.pem(),
            private_key_pem: key.serialize_pem(),
            public_key_pem: key.public_key_pem(),
            not_before_ms: not_before - not_before.rem_euclid(DAY_MS),
            not_after_ms: not_after - not_after.rem_euclid(DAY_MS),
        })
    }

    /// The TLS configuration of the device listener: a server certificate for `names`
    /// issued now, and client certificates required and verified against this CA.
    pub fn server_config(&self, names: &[String]) -> Result<rustls::ServerConfig, TlsError> {
        let key = KeyPair::generate()?;
        let now = crate::clock::now_ms();
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = {
            let mut dn = DistinguishedName::new();
            dn.push(
                DnType::CommonName,
                names.first().cloned().unwrap_or_else(|| "updraft".into()),
            );
            dn
        };
        params.not_before = date(now - DAY_MS);
        params.not_after = date(now + 365 * DAY_MS);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone(), self.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        Ok(config)
    }
}

fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()
        .map(CertificateDer::from)
}

/// Accepts TLS connections for the broker. Each handshake runs in its own task with a
/// deadline, so a client that never finishes its handshake holds up nobody.
pub async fn serve_mqtts(
    broker: Broker,
    listener: TcpListener,
    config: rustls::ServerConfig,
    handshake_timeout: Duration,
) {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT/TLS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let broker = broker.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let cert_id = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| certificate_id(c.as_ref()));
            broker.serve_connection(tls, peer, cert_id).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip() {
        let key = KeyPair::generate().expect("key");
        let cert = ca_params("123456789012").self_signed(&key).expect("cert");
        let der = pem_to_der(&cert.pem()).expect("der");
        assert_eq!(der.as_ref(), cert.der().as_ref());
        assert_eq!(certificate_id(der.as_ref()).len(), 64);
    }
}
