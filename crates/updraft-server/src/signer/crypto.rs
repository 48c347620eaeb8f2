//! The cryptography of code signing. Every private-key operation is aws-lc-rs's
//! (constant-time, maintained); certificates are read with a strict DER reader (yasna).
//!
//! - [`X509`]: what Updraft needs from a certificate (names, validity, key, usages).
//! - [`SigningKey`]: an ECDSA P-256 or RSA private key from PEM (PKCS#8, SEC1, PKCS#1),
//!   checked against a certificate with [`SigningKey::matches`].
//! - [`SigningKey::sign`]: ECDSA P-256 over SHA-256 (ASN.1 DER signature) or RSA PKCS#1
//!   v1.5 over SHA-256; [`verify`] checks a signature against a certificate.
//! - [`code_signing_certificate`]: a self-signed ECDSA P-256 code-signing certificate.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, RSA_PKCS1_SHA256, RsaKeyPair,
    UnparsedPublicKey,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use yasna::models::TaggedDerValue;
use yasna::{BERReader, Tag};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CryptoError {
    #[error("{0}")]
    Certificate(String),
    #[error("{0}")]
    PrivateKey(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("the signing operation failed")]
    Sign,
    #[error("cannot make a certificate: {0}")]
    Generate(String),
}

// Object identifiers (dotted form, as yasna prints them).
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";
const OID_KEY_USAGE: &str = "2.5.29.15";
const OID_EXT_KEY_USAGE: &str = "2.5.29.37";
const OID_SUBJECT_ALT_NAME: &str = "2.5.29.17";
const OID_COMMON_NAME: &str = "2.5.4.3";

/// The key types of ACM's `KeyAlgorithm` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    EcP256,
    EcP384,
    EcP521,
    /// RSA with a modulus of this many bits.
    Rsa(u32),
}

impl KeyAlgorithm {
    /// ACM's name: `EC_prime256v1`, `EC_secp384r1`, `EC_secp521r1`, `RSA_2048`, ...
    pub fn acm_name(self) -> String {
        match self {
            KeyAlgorithm::EcP256 => "EC_prime256v1".into(),
            KeyAlgorithm::EcP384 => "EC_secp384r1".into(),
            KeyAlgorithm::EcP521 => "EC_secp521r1".into(),
            KeyAlgorithm::Rsa(bits) => format!("RSA_{bits}"),
        }
    }

    /// Signer's encryption algorithm for this key: `ECDSA` or `RSA`.
    pub fn encryption(self) -> &'static str {
        match self {
            KeyAlgorithm::Rsa(_) => "RSA",
            _ => "ECDSA",
        }
    }

    /// Whether ACM accepts the key type (RSA 1024/2048/3072/4096 and the three curves).
    pub fn acm_supported(self) -> bool {
        match self {
            KeyAlgorithm::Rsa(bits) => matches!(bits, 1024 | 2048 | 3072 | 4096),
            _ => true,
        }
    }
}

/// The hash of a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha1 => "SHA1",
            Hash::Sha256 => "SHA256",
        }
    }
}

/// What Updraft reads from an X.509 certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct X509 {
    pub der: Vec<u8>,
    /// Colon-separated lower-case hex, as ACM shows serial numbers.
    pub serial: String,
    pub subject: String,
    pub issuer: String,
    pub common_name: Option<String>,
    /// DNS names of the subjectAltName extension.
    pub dns_names: Vec<String>,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub key_algorithm: KeyAlgorithm,
    /// The subjectPublicKey bits: an EC point, or a DER RSAPublicKey.
    pub public_key: Vec<u8>,
    /// ACM's form, e.g. `SHA256WITHECDSA`.
    pub signature_algorithm: String,
    /// ACM's KeyUsage names (`DIGITAL_SIGNATURE`, ...).
    pub key_usages: Vec<&'static str>,
    /// ACM's ExtendedKeyUsage (name, OID) pairs.
    pub extended_key_usages: Vec<(&'static str, String)>,
}

/// The raw parts of a certificate, before interpretation.
struct RawCertificate {
    serial: Vec<u8>,
    issuer: Vec<(String, TaggedDerValue)>,
    not_before: TaggedDerValue,
    not_after: TaggedDerValue,
    subject: Vec<(String, TaggedDerValue)>,
    spki_algorithm: String,
    spki_parameters: Option<Vec<u8>>,
    public_key: Vec<u8>,
    extensions: Vec<(String, Vec<u8>)>,
    signature_algorithm: String,
}

fn read_algorithm(r: BERReader<'_, '_>) -> yasna::ASN1Result<(String, Option<Vec<u8>>)> {
    r.read_sequence(|r| {
        let oid = r.next().read_oid()?.to_string();
        let params = r.read_optional(|r| r.read_der())?;
        Ok((oid, params))
    })
}

fn read_name(r: BERReader<'_, '_>) -> yasna::ASN1Result<Vec<(String, TaggedDerValue)>> {
    let mut out = Vec::new();
    r.read_sequence_of(|r| {
        r.read_set_of(|r| {
            let attr = r.read_sequence(|r| {
                let oid = r.next().read_oid()?.to_string();
                let value = r.next().read_tagged_der()?;
                Ok((oid, value))
            })?;
            out.push(attr);
            Ok(())
        })
    })?;
    Ok(out)
}

fn read_extensions(der: &[u8]) -> yasna::ASN1Result<Vec<(String, Vec<u8>)>> {
    yasna::parse_der(der, |r| {
        let mut out = Vec::new();
        r.read_sequence_of(|r| {
            let ext = r.read_sequence(|r| {
                let oid = r.next().read_oid()?.to_string();
                // `critical` defaults to FALSE; accept an explicit FALSE too (non-DER but common).
                let _critical = r.read_optional(|r| r.read_bool())?;
                let value = r.next().read_bytes()?;
                Ok((oid, value))
            })?;
            out.push(ext);
            Ok(())
        })?;
        Ok(out)
    })
}

fn parse_raw(der: &[u8]) -> yasna::ASN1Result<RawCertificate> {
    yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let mut raw = r.next().read_sequence(|r| {
                let _version =
                    r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_i64()))?;
                let (serial, _nonnegative) = r.next().read_bigint_bytes()?;
                let _tbs_signature = read_algorithm(r.next())?;
                let issuer = read_name(r.next())?;
                let (not_before, not_after) = r.next().read_sequence(|r| {
                    Ok((r.next().read_tagged_der()?, r.next().read_tagged_der()?))
                })?;
                let subject = read_name(r.next())?;
                let (spki_algorithm, spki_parameters, public_key) =
                    r.next().read_sequence(|r| {
                        let (alg, params) = read_algorithm(r.next())?;
                        let (bits, _len) = r.next().read_bitvec_bytes()?;
                        Ok((alg, params, bits))
                    })?;
                let mut extensions = Vec::new();
                // issuerUniqueID [1], subjectUniqueID [2], extensions [3].
                while let Some(v) = r.read_optional(|r| r.read_tagged_der())? {
                    if v.tag() == Tag::context(3) {
                        extensions = read_extensions(v.value())?;
                    }
                }
                Ok(RawCertificate {
                    serial,
                    issuer,
                    not_before,
                    not_after,
                    subject,
                    spki_algorithm,
                    spki_parameters,
                    public_key,
                    extensions,
                    signature_algorithm: String::new(),
                })
            })?;
            let (signature_algorithm, _) = read_algorithm(r.next())?;
            let _signature = r.next().read_bitvec_bytes()?;
            raw.signature_algorithm = signature_algorithm;
            Ok(raw)
        })
    })
}

/// Text of a directory-string value (UTF8String, PrintableString, IA5String, BMPString, ...).
fn string_value(v: &TaggedDerValue) -> String {
    use yasna::tags::{TAG_BMPSTRING, TAG_UNIVERSALSTRING};
    let bytes = v.value();
    if v.tag() == TAG_BMPSTRING {
        let units: Vec<u16> = bytes
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
            .collect();
        return String::from_utf16_lossy(&units);
    }
    if v.tag() == TAG_UNIVERSALSTRING {
        return bytes
            .chunks(4)
            .filter_map(|c| {
                let mut b = [0u8; 4];
                b[..c.len()].copy_from_slice(c);
                char::from_u32(u32::from_be_bytes(b))
            })
            .collect();
    }
    String::from_utf8_lossy(bytes).into_owned()
}

fn attribute_label(oid: &str) -> String {
    match oid {
        OID_COMMON_NAME => "CN".into(),
        "2.5.4.6" => "C".into(),
        "2.5.4.7" => "L".into(),
        "2.5.4.8" => "ST".into(),
        "2.5.4.10" => "O".into(),
        "2.5.4.11" => "OU".into(),
        "2.5.4.5" => "SERIALNUMBER".into(),
        "1.2.840.113549.1.9.1" => "EMAILADDRESS".into(),
        "0.9.2342.19200300.100.1.25" => "DC".into(),
        other => other.to_owned(),
    }
}

fn render_name(name: &[(String, TaggedDerValue)]) -> String {
    name.iter()
        .map(|(oid, v)| format!("{}={}", attribute_label(oid), string_value(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSS[.f]Z`) as epoch ms.
fn time_value(v: &TaggedDerValue) -> Option<i64> {
    use yasna::tags::{TAG_GENERALIZEDTIME, TAG_UTCTIME};
    let s = std::str::from_utf8(v.value()).ok()?;
    let body = s.strip_suffix('Z')?;
    let full = if v.tag() == TAG_UTCTIME {
        let yy: i64 = body.get(0..2)?.parse().ok()?;
        let century = if yy < 50 { "20" } else { "19" };
        format!("{century}{body}")
    } else if v.tag() == TAG_GENERALIZEDTIME {
        body.to_owned()
    } else {
        return None;
    };
    let (main, frac) = full.split_once('.').unwrap_or((&full, "0"));
    if main.len() != 14 || !main.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let iso = format!(
        "{}-{}-{}T{}:{}:{}.{}Z",
        &main[0..4],
        &main[4..6],
        &main[6..8],
        &main[8..10],
        &main[10..12],
        &main[12..14],
        frac
    );
    crate::clock::parse_iso8601(&iso)
}

fn signature_algorithm_name(oid: &str) -> String {
    match oid {
        "1.2.840.10045.4.1" => "SHA1WITHECDSA".into(),
        "1.2.840.10045.4.3.2" => "SHA256WITHECDSA".into(),
        "1.2.840.10045.4.3.3" => "SHA384WITHECDSA".into(),
        "1.2.840.10045.4.3.4" => "SHA512WITHECDSA".into(),
        "1.2.840.113549.1.1.5" => "SHA1WITHRSA".into(),
        "1.2.840.113549.1.1.11" => "SHA256WITHRSA".into(),
        "1.2.840.113549.1.1.12" => "SHA384WITHRSA".into(),
        "1.2.840.113549.1.1.13" => "SHA512WITHRSA".into(),
        "1.2.840.113549.1.1.10" => "RSASSA-PSS".into(),
        other => other.to_owned(),
    }
}

/// Bits of a big-endian unsigned integer.
fn bit_length(bytes: &[u8]) -> u32 {
    let trimmed: &[u8] = match bytes.iter().position(|b| *b != 0) {
        Some(i) => &bytes[i..],
        None => return 0,
    };
    let whole = u32::try_from(trimmed.len() - 1).unwrap_or(u32::MAX / 16) * 8;
    whole + (8 - trimmed[0].leading_zeros())
}

fn rsa_modulus_bits(public_key: &[u8]) -> Option<u32> {
    yasna::parse_der(public_key, |r| {
        r.read_sequence(|r| {
            let (modulus, _) = r.next().read_bigint_bytes()?;
            let _exponent = r.next().read_bigint_bytes()?;
            Ok(bit_length(&modulus))
        })
    })
    .ok()
}

fn key_algorithm(
    algorithm: &str,
    parameters: Option<&[u8]>,
    public_key: &[u8],
) -> Result<KeyAlgorithm, String> {
    match algorithm {
        OID_EC_PUBLIC_KEY => {
            let curve = parameters
                .and_then(|p| yasna::parse_der(p, |r| r.read_oid()).ok())
                .map(|o| o.to_string())
                .unwrap_or_default();
            match curve.as_str() {
                OID_P256 => Ok(KeyAlgorithm::EcP256),
                OID_P384 => Ok(KeyAlgorithm::EcP384),
                OID_P521 => Ok(KeyAlgorithm::EcP521),
                other => Err(format!("elliptic curve {other} is not supported")),
            }
        }
        OID_RSA => rsa_modulus_bits(public_key)
            .map(KeyAlgorithm::Rsa)
            .ok_or_else(|| "the RSA public key cannot be read".to_owned()),
        other => Err(format!("public key algorithm {other} is not supported")),
    }
}

fn key_usage_names(der: &[u8]) -> Vec<&'static str> {
    const NAMES: [&str; 9] = [
        "DIGITAL_SIGNATURE",
        "NON_REPUDIATION",
        "KEY_ENCIPHERMENT",
        "DATA_ENCIPHERMENT",
        "KEY_AGREEMENT",
        "CERTIFICATE_SIGNING",
        "CRL_SIGNING",
        "ENCIPHER_ONLY",
        "DECIPHER_ONLY",
    ];
    let Ok((bytes, len)) = yasna::parse_der(der, |r| r.read_bitvec_bytes()) else {
        return Vec::new();
    };
    NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            *i < len
                && bytes
                    .get(i / 8)
                    .is_some_and(|b| (b >> (7 - i % 8)) & 1 == 1)
        })
        .map(|(_, n)| *n)
        .collect()
}

fn extended_key_usage_name(oid: &str) -> &'static str {
    match oid {
        "1.3.6.1.5.5.7.3.1" => "TLS_WEB_SERVER_AUTHENTICATION",
        "1.3.6.1.5.5.7.3.2" => "TLS_WEB_CLIENT_AUTHENTICATION",
        "1.3.6.1.5.5.7.3.3" => "CODE_SIGNING",
        "1.3.6.1.5.5.7.3.4" => "EMAIL_PROTECTION",
        "1.3.6.1.5.5.7.3.5" => "IPSEC_END_SYSTEM",
        "1.3.6.1.5.5.7.3.6" => "IPSEC_TUNNEL",
        "1.3.6.1.5.5.7.3.7" => "IPSEC_USER",
        "1.3.6.1.5.5.7.3.8" => "TIME_STAMPING",
        "1.3.6.1.5.5.7.3.9" => "OCSP_SIGNING",
        "2.5.29.37.0" => "ANY",
        _ => "CUSTOM",
    }
}

fn extended_key_usages(der: &[u8]) -> Vec<(&'static str, String)> {
    yasna::parse_der(der, |r| {
        r.collect_sequence_of(|r| Ok(r.read_oid()?.to_string()))
    })
    .unwrap_or_default()
    .into_iter()
    .map(|oid| (extended_key_usage_name(&oid), oid))
    .collect()
}

fn dns_names(der: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let _ = yasna::parse_der(der, |r| {
        r.read_sequence_of(|r| {
            let v = r.read_tagged_der()?;
            if v.tag() == Tag::context(2) {
                out.push(String::from_utf8_lossy(v.value()).into_owned());
            }
            Ok(())
        })
    });
    out
}

impl X509 {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<X509, CryptoError> {
        let raw = parse_raw(der).map_err(|e| {
            CryptoError::Certificate(format!("The certificate is not valid DER X.509 ({e})."))
        })?;
        let key_algorithm = key_algorithm(
            &raw.spki_algorithm,
            raw.spki_parameters.as_deref(),
            &raw.public_key,
        )
        .map_err(|m| CryptoError::Unsupported(format!("The certificate's {m}.")))?;
        let time = |v: &TaggedDerValue, which: &str| {
            time_value(v).ok_or_else(|| {
                CryptoError::Certificate(format!("The certificate's {which} time cannot be read."))
            })
        };
        let serial = match raw.serial.as_slice() {
            [0, rest @ ..] if !rest.is_empty() => rest,
            all => all,
        };
        let mut x = X509 {
            der: der.to_vec(),
            serial: serial
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
            subject: render_name(&raw.subject),
            issuer: render_name(&raw.issuer),
            common_name: raw
                .subject
                .iter()
                .find(|(oid, _)| oid == OID_COMMON_NAME)
                .map(|(_, v)| string_value(v)),
            dns_names: Vec::new(),
            not_before_ms: time(&raw.not_before, "notBefore")?,
            not_after_ms: time(&raw.not_after, "notAfter")?,
            key_algorithm,
            public_key: raw.public_key,
            signature_algorithm: signature_algorithm_name(&raw.signature_algorithm),
            key_usages: Vec::new(),
            extended_key_usages: Vec::new(),
        };
        for (oid, value) in &raw.extensions {
            match oid.as_str() {
                OID_KEY_USAGE => x.key_usages = key_usage_names(value),
                OID_EXT_KEY_USAGE => x.extended_key_usages = extended_key_usages(value),
                OID_SUBJECT_ALT_NAME => x.dns_names = dns_names(value),
                _ => {}
            }
        }
        Ok(x)
    }

    /// Every certificate of a PEM text, in order; at least one.
    pub fn all_from_pem(pem: &[u8]) -> Result<Vec<X509>, CryptoError> {
        let mut out = Vec::new();
        for item in CertificateDer::pem_slice_iter(pem) {
            let der = item.map_err(|e| {
                CryptoError::Certificate(format!("The certificate is not valid PEM ({e})."))
            })?;
            out.push(X509::from_der(&der)?);
        }
        if out.is_empty() {
            return Err(CryptoError::Certificate(
                "No PEM certificate (-----BEGIN CERTIFICATE-----) was found.".into(),
            ));
        }
        Ok(out)
    }

    /// The one certificate of a PEM text.
    pub fn from_pem(pem: &[u8]) -> Result<X509, CryptoError> {
        let mut all = X509::all_from_pem(pem)?;
        if all.len() > 1 {
            return Err(CryptoError::Certificate(format!(
                "Expected one certificate, found {}; put the others in the certificate chain.",
                all.len()
            )));
        }
        all.pop()
            .ok_or_else(|| CryptoError::Certificate("No certificate was found.".into()))
    }

    /// The certificate as PEM text.
    pub fn to_pem(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.der);
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
        out
    }

    /// ACM's DomainName: the common name, else the first DNS name.
    pub fn domain_name(&self) -> Option<String> {
        self.common_name
            .clone()
            .or_else(|| self.dns_names.first().cloned())
    }
}

/// A private key Updraft can sign with.
pub enum SigningKey {
    EcP256(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.algorithm().acm_name())
    }
}

fn pkcs8_algorithm(der: &[u8]) -> Option<(String, Option<String>)> {
    yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let _version = r.next().read_i64()?;
            let (alg, params) = read_algorithm(r.next())?;
            let _key = r.next().read_bytes()?;
            while r.read_optional(|r| r.read_der())?.is_some() {}
            let curve = params
                .as_deref()
                .and_then(|p| yasna::parse_der(p, |r| r.read_oid()).ok())
                .map(|o| o.to_string());
            Ok((alg, curve))
        })
    })
    .ok()
}

impl SigningKey {
    /// Reads an unencrypted private key from PEM: PKCS#8 (`PRIVATE KEY`), SEC1
    /// (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`).
    pub fn from_pem(pem: &[u8]) -> Result<SigningKey, CryptoError> {
        let text = String::from_utf8_lossy(pem);
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            return Err(CryptoError::PrivateKey(
                "The private key is encrypted; give it unencrypted (openssl pkey -in key.pem -out plain.pem)."
                    .into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
            CryptoError::PrivateKey(format!(
                "No PEM private key (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY) was found ({e})."
            ))
        })?;
        match key {
            PrivateKeyDer::Pkcs8(k) => SigningKey::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Sec1(k) => {
                EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, k.secret_sec1_der())
                    .map(SigningKey::EcP256)
                    .map_err(|e| {
                        CryptoError::Unsupported(format!(
                            "The EC private key is not a usable P-256 key ({e}); Updraft signs with P-256 (prime256v1) EC keys."
                        ))
                    })
            }
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der())
                .map(SigningKey::Rsa)
                .map_err(|e| CryptoError::PrivateKey(format!("The RSA private key is not valid ({e}).")))
            ,
            _ => Err(CryptoError::Unsupported(
                "The private key is of a kind Updraft cannot use.".into(),
            )),
        }
    }

    /// Reads a PKCS#8 DER private key (the form Updraft stores, sealed).
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, CryptoError> {
        let Some((alg, curve)) = pkcs8_algorithm(der) else {
            return Err(CryptoError::PrivateKey(
                "The private key is not a valid PKCS#8 structure.".into(),
            ));
        };
        match alg.as_str() {
            OID_EC_PUBLIC_KEY => match curve.as_deref() {
                Some(OID_P256) => {
                    EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, der)
                        .map(SigningKey::EcP256)
                        .map_err(|e| {
                            CryptoError::PrivateKey(format!("The EC private key is not valid ({e})."))
                        })
                }
                Some(OID_P384) => Err(CryptoError::Unsupported(
                    "The private key is an EC secp384r1 key; Updraft signs with P-256 (prime256v1) and RSA keys.".into(),
                )),
                Some(OID_P521) => Err(CryptoError::Unsupported(
                    "The private key is an EC secp521r1 key; Updraft signs with P-256 (prime256v1) and RSA keys.".into(),
                )),
                _ => Err(CryptoError::Unsupported(
                    "The EC private key is on a curve Updraft does not support; use P-256 (prime256v1).".into(),
                )),
            },
            OID_RSA => RsaKeyPair::from_pkcs8(der)
                .map(SigningKey::Rsa)
                .map_err(|e| CryptoError::PrivateKey(format!("The RSA private key is not valid ({e})."))),
            other => Err(CryptoError::Unsupported(format!(
                "The private key's algorithm ({other}) is not supported; use an ECDSA P-256 or RSA key."
            ))),
        }
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        match self {
            SigningKey::EcP256(_) => KeyAlgorithm::EcP256,
            SigningKey::Rsa(k) => {
                KeyAlgorithm::Rsa(u32::try_from(k.public_modulus_len() * 8).unwrap_or(0))
            }
        }
    }

    /// The public key in the form a certificate carries it (EC point or RSAPublicKey).
    pub fn public_key(&self) -> &[u8] {
        match self {
            SigningKey::EcP256(k) => k.public_key().as_ref(),
            SigningKey::Rsa(k) => k.public_key().as_ref(),
        }
    }

    /// Whether this key is the private half of the certificate's public key.
    pub fn matches(&self, cert: &X509) -> bool {
        self.algorithm() == cert.key_algorithm && self.public_key() == cert.public_key.as_slice()
    }

    /// The key as PKCS#8 DER (what is sealed and stored).
    pub fn to_pkcs8(&self) -> Result<Vec<u8>, CryptoError> {
        match self {
            SigningKey::EcP256(k) => k
                .to_pkcs8v1()
                .map(|d| d.as_ref().to_vec())
                .map_err(|_| CryptoError::PrivateKey("The key cannot be serialized.".into())),
            SigningKey::Rsa(k) => {
                let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'static>>::as_der(k)
                    .map_err(|_| CryptoError::PrivateKey("The key cannot be serialized.".into()))?;
                let bytes: &[u8] = der.as_ref();
                Ok(bytes.to_vec())
            }
        }
    }

    /// Signs `data`: ECDSA P-256 over SHA-256 (ASN.1 DER), or RSA PKCS#1 v1.5 over
    /// SHA-256. Other hashes are refused: aws-lc-rs offers no SHA-1 signing.
    pub fn sign(&self, hash: Hash, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if hash != Hash::Sha256 {
            return Err(CryptoError::Unsupported(format!(
                "Signing with {} is not supported; Updraft signs with SHA-256.",
                hash.name()
            )));
        }
        let rng = SystemRandom::new();
        match self {
            SigningKey::EcP256(k) => k
                .sign(&rng, data)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| CryptoError::Sign),
            SigningKey::Rsa(k) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, data, &mut sig)
                    .map_err(|_| CryptoError::Sign)?;
                Ok(sig)
            }
        }
    }
}

/// Checks a SHA-256 signature over `data` against a certificate's public key.
pub fn verify(cert: &X509, data: &[u8], signature: &[u8]) -> bool {
    match cert.key_algorithm {
        KeyAlgorithm::EcP256 => UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &cert.public_key)
            .verify(data, signature)
            .is_ok(),
        KeyAlgorithm::Rsa(_) => UnparsedPublicKey::new(
            &RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
            &cert.public_key,
        )
        .verify(data, signature)
        .is_ok(),
        _ => false,
    }
}

/// A freshly made self-signed code-signing certificate and its key, both PEM.
pub struct GeneratedCertificate {
    pub certificate_pem: String,
    pub private_key_pem: String,
}

/// Makes a self-signed ECDSA P-256 certificate for code signing (keyUsage
/// digitalSignature, extendedKeyUsage codeSigning), valid from yesterday for `days` days.
pub fn code_signing_certificate(
    common_name: &str,
    days: u32,
) -> Result<GeneratedCertificate, CryptoError> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
        KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    let err = |e: rcgen::Error| CryptoError::Generate(e.to_string());
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::from_unix_timestamp(crate::clock::now_ms() / 1000)
        .map_err(|e| CryptoError::Generate(e.to_string()))?;
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(
        &uuid::Uuid::new_v4().into_bytes(),
    ));
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(GeneratedCertificate {
        certificate_pem: cert.pem(),
        private_key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated() -> (X509, SigningKey) {
        let g = code_signing_certificate("updraft unit test", 30).expect("generate");
        let cert = X509::from_pem(g.certificate_pem.as_bytes()).expect("cert");
        let key = SigningKey::from_pem(g.private_key_pem.as_bytes()).expect("key");
        (cert, key)
    }

    #[test]
    fn generated_certificate_is_a_p256_code_signing_certificate() {
        let (cert, key) = generated();
        assert_eq!(cert.key_algorithm, KeyAlgorithm::EcP256);
        assert_eq!(cert.key_algorithm.acm_name(), "EC_prime256v1");
        assert_eq!(cert.subject, "CN=updraft unit test");
        assert_eq!(cert.issuer, cert.subject);
        assert_eq!(cert.domain_name().as_deref(), Some("updraft unit test"));
        assert_eq!(cert.signature_algorithm, "SHA256WITHECDSA");
        assert_eq!(cert.key_usages, ["DIGITAL_SIGNATURE"]);
        assert_eq!(
            cert.extended_key_usages,
            [("CODE_SIGNING", "1.3.6.1.5.5.7.3.3".to_owned())]
        );
        let now = crate::clock::now_ms();
        assert!(cert.not_before_ms < now && now < cert.not_after_ms);
        assert!((29..=31).contains(&((cert.not_after_ms - now) / 86_400_000)));
        assert!(cert.serial.split(':').all(|b| b.len() == 2));
        assert!(key.matches(&cert));
        // PEM round trip.
        assert_eq!(X509::from_pem(cert.to_pem().as_bytes()), Ok(cert));
    }

    #[test]
    fn ecdsa_signatures_are_der_and_verify_only_for_the_signed_bytes() {
        let (cert, key) = generated();
        let data = b"firmware image bytes";
        let sig = key.sign(Hash::Sha256, data).expect("sign");
        // ASN.1 DER: SEQUENCE { INTEGER r, INTEGER s }.
        assert_eq!(sig[0], 0x30);
        assert_eq!(usize::from(sig[1]) + 2, sig.len());
        assert!(verify(&cert, data, &sig));
        assert!(!verify(&cert, b"firmware image bytez", &sig));
        let mut bad = sig.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(!verify(&cert, data, &bad));
        assert!(matches!(
            key.sign(Hash::Sha1, data),
            Err(CryptoError::Unsupported(_))
        ));
    }

    #[test]
    fn keys_round_trip_through_pkcs8_and_mismatches_are_seen() {
        let (cert, key) = generated();
        let again = SigningKey::from_pkcs8(&key.to_pkcs8().expect("pkcs8")).expect("parse");
        assert!(again.matches(&cert));
        let (_, other) = generated();
        assert!(!other.matches(&cert));
    }

    #[test]
    fn rsa_keys_sign_with_pkcs1_sha256() {
        let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa");
        let key = SigningKey::Rsa(rsa);
        assert_eq!(key.algorithm(), KeyAlgorithm::Rsa(2048));
        let pkcs8 = key.to_pkcs8().expect("pkcs8");
        let key = SigningKey::from_pkcs8(&pkcs8).expect("parse");
        let sig = key.sign(Hash::Sha256, b"data").expect("sign");
        assert_eq!(sig.len(), 256);
        let public = UnparsedPublicKey::new(
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            key.public_key(),
        );
        assert!(public.verify(b"data", &sig).is_ok());
        assert_eq!(rsa_modulus_bits(key.public_key()), Some(2048));
    }

    #[test]
    fn garbage_is_refused_with_reasons() {
        assert!(matches!(
            X509::from_pem(b"hello"),
            Err(CryptoError::Certificate(_))
        ));
        assert!(matches!(
            X509::from_pem(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"),
            Err(CryptoError::Certificate(_))
        ));
        assert!(matches!(
            SigningKey::from_pem(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----\n"),
            Err(CryptoError::PrivateKey(m)) if m.contains("encrypted")
        ));
        assert!(SigningKey::from_pem(b"nothing here").is_err());
    }

    #[test]
    fn times_and_bits() {
        use yasna::tags::{TAG_GENERALIZEDTIME, TAG_UTCTIME};
        let utc = TaggedDerValue::from_tag_and_bytes(TAG_UTCTIME, b"240229123456Z".to_vec());
        assert_eq!(time_value(&utc), Some(1_709_210_096_000));
        let gen_time =
            TaggedDerValue::from_tag_and_bytes(TAG_GENERALIZEDTIME, b"20240229123456Z".to_vec());
        assert_eq!(time_value(&gen_time), Some(1_709_210_096_000));
        let old = TaggedDerValue::from_tag_and_bytes(TAG_UTCTIME, b"991231235959Z".to_vec());
        assert_eq!(
            time_value(&old),
            crate::clock::parse_iso8601("1999-12-31T23:59:59Z")
        );
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x01]), 1);
        assert_eq!(bit_length(&[]), 0);
    }
}
