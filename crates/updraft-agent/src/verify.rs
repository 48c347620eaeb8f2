//! Author verification: SHA-256 + ECDSA P-256 over the received file, against the public
//! key of the certificate the job names in `certfile` (data-plane reference §3.2).
//!
//! The signature is the base64 of a DER `ECDSA-Sig-Value` (what AWS Signer and
//! `customCodeSigning` carry in `sig-sha256-ecdsa`). The certificate comes from a
//! [`CertificateStore`] keyed by the job's `certfile` string: a PEM certificate (the public key
//! is taken from its SubjectPublicKeyInfo with a minimal DER walk) or a PEM public key.
//!
//! The agent verifies what the PAL *stored*, reading it back block by block
//! ([`verify_stored_file`]), so a storage fault is caught as surely as a bad download.

use aws_lc_rs::digest;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, ParsedPublicKey};
use std::collections::{BTreeMap, HashMap};

use crate::error::{PalError, PalStatus};
use crate::pal::{FileContext, Pal};

/// The only signature key this agent verifies.
pub const SIGNATURE_KEY: &str = "sig-sha256-ecdsa";

/// Where the agent finds the certificate a job names in `certfile`.
///
/// Implemented for maps from `certfile` to PEM text; a device with its certificates on disk
/// implements it over a directory.
pub trait CertificateStore: Send {
    /// The PEM (or DER) bytes of the certificate or public key for `certfile`.
    fn certificate(&self, certfile: &str) -> Option<Vec<u8>>;
}

impl CertificateStore for BTreeMap<String, String> {
    fn certificate(&self, certfile: &str) -> Option<Vec<u8>> {
        self.get(certfile).map(|s| s.as_bytes().to_vec())
    }
}

impl CertificateStore for HashMap<String, String> {
    fn certificate(&self, certfile: &str) -> Option<Vec<u8>> {
        self.get(certfile).map(|s| s.as_bytes().to_vec())
    }
}

/// An ECDSA P-256 public key that verifies SHA-256 signatures.
#[derive(Clone)]
pub struct PublicKey(ParsedPublicKey);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublicKey(ECDSA P-256)")
    }
}

fn bad_cert(detail: impl Into<String>) -> PalError {
    PalError::new(PalStatus::BadSignerCert, detail)
}

impl PublicKey {
    /// From a PEM `CERTIFICATE` or `PUBLIC KEY` (the first such block), or from DER.
    pub fn from_pem_or_der(bytes: &[u8]) -> Result<Self, PalError> {
        if bytes.first() == Some(&0x30) {
            return Self::from_der(bytes);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| bad_cert("not PEM text"))?;
        let (label, der) = parse_pem(text).map_err(bad_cert)?;
        match label.as_str() {
            "CERTIFICATE" => Self::from_certificate_der(&der),
            "PUBLIC KEY" => Self::from_spki_der(&der),
            other => Err(bad_cert(format!("unexpected PEM block '{other}'"))),
        }
    }

    /// From DER: an X.509 certificate, or else a SubjectPublicKeyInfo.
    pub fn from_der(der: &[u8]) -> Result<Self, PalError> {
        Self::from_certificate_der(der).or_else(|_| Self::from_spki_der(der))
    }

    /// From an X.509 certificate (DER).
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, PalError> {
        let spki = spki_of_certificate(der).map_err(bad_cert)?;
        Self::from_spki_der(spki)
    }

    /// From a SubjectPublicKeyInfo (DER); the key must be on P-256.
    pub fn from_spki_der(spki: &[u8]) -> Result<Self, PalError> {
        ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, spki)
            .map(PublicKey)
            .map_err(|e| bad_cert(format!("not an ECDSA P-256 public key: {e}")))
    }

    /// Checks a DER ECDSA signature over a SHA-256 digest.
    pub fn verify_digest(&self, digest: &digest::Digest, signature: &[u8]) -> Result<(), PalError> {
        self.0.verify_digest_sig(digest, signature).map_err(|_| {
            PalError::new(
                PalStatus::SignatureCheckFailed,
                "the signature does not match the file",
            )
        })
    }

    /// Checks a DER ECDSA signature over `message` (SHA-256).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), PalError> {
        self.verify_digest(&digest::digest(&digest::SHA256, message), signature)
    }
}

/// Looks up and parses the key for a job's `certfile`.
pub fn key_for(certs: &dyn CertificateStore, certfile: &str) -> Result<PublicKey, PalError> {
    let pem = certs
        .certificate(certfile)
        .ok_or_else(|| bad_cert(format!("no certificate for certfile '{certfile}'")))?;
    PublicKey::from_pem_or_der(&pem)
        .map_err(|e| bad_cert(format!("certfile '{certfile}': {}", e.detail)))
}

/// Reads the stored file back through the PAL, hashes it with SHA-256 and checks the
/// signature. A file shorter or longer than `file.file_size` fails the check.
pub fn verify_stored_file<P: Pal + ?Sized>(
    pal: &mut P,
    file: &FileContext,
    key: &PublicKey,
) -> Result<(), PalError> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let chunk = usize::try_from(file.block_size.max(4096)).unwrap_or(4096);
    let mut buf = vec![0u8; chunk];
    let mut offset = 0u64;
    while offset < file.file_size {
        let want = usize::try_from((file.file_size - offset).min(chunk as u64)).unwrap_or(chunk);
        let n = pal.read_block(file, offset, &mut buf[..want])?;
        if n == 0 {
            return Err(PalError::new(
                PalStatus::SignatureCheckFailed,
                format!(
                    "the stored file ends at {offset} bytes, {} expected",
                    file.file_size
                ),
            ));
        }
        ctx.update(&buf[..n.min(want)]);
        offset += n.min(want) as u64;
    }
    key.verify_digest(&ctx.finish(), &file.signature)
}

/// The first PEM block: its label and decoded bytes.
pub fn parse_pem(text: &str) -> Result<(String, Vec<u8>), String> {
    let mut label: Option<&str> = None;
    let mut body = String::new();
    for line in text.lines() {
        let line = line.trim();
        match label {
            None => {
                if let Some(l) = line
                    .strip_prefix("-----BEGIN ")
                    .and_then(|r| r.strip_suffix("-----"))
                {
                    label = Some(l);
                }
            }
            Some(l) => {
                if let Some(end) = line
                    .strip_prefix("-----END ")
                    .and_then(|r| r.strip_suffix("-----"))
                {
                    if end != l {
                        return Err(format!("PEM block BEGIN {l} ends with END {end}"));
                    }
                    let der = updraft_protocol::streams::base64_decode(&body)
                        .ok_or_else(|| format!("PEM block {l} is not valid base64"))?;
                    return Ok((l.to_owned(), der));
                }
                if line.contains(':') {
                    // RFC 1421 headers (Proc-Type, DEK-Info): encrypted PEM is not for us.
                    return Err(format!("PEM block {l} has headers"));
                }
                body.extend(line.chars().filter(|c| !c.is_whitespace()));
            }
        }
    }
    Err(match label {
        None => "no PEM block".into(),
        Some(l) => format!("PEM block {l} has no END line"),
    })
}

/// One DER TLV: (tag, contents, the whole TLV, what follows).
type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

fn tlv(input: &[u8]) -> Result<Tlv<'_>, String> {
    let (&tag, rest) = input.split_first().ok_or("truncated DER")?;
    if tag & 0x1f == 0x1f {
        return Err("multi-byte DER tags are not used in certificates".into());
    }
    let (&first, rest) = rest.split_first().ok_or("truncated DER length")?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err("unsupported DER length".into());
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err("DER value runs past its container".into());
    }
    let header = input.len() - rest.len();
    Ok((tag, &rest[..len], &input[..header + len], &rest[len..]))
}

/// (contents, the whole TLV, what follows).
type Parts<'a> = (&'a [u8], &'a [u8], &'a [u8]);

fn expect<'a>(input: &'a [u8], tag: u8, what: &str) -> Result<Parts<'a>, String> {
    let (t, contents, whole, rest) = tlv(input)?;
    if t != tag {
        return Err(format!(
            "expected {what} (tag 0x{tag:02x}), found tag 0x{t:02x}"
        ));
    }
    Ok((contents, whole, rest))
}

/// The SubjectPublicKeyInfo (whole DER TLV) of an X.509 certificate (RFC 5280 §4.1):
/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
/// serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, ... } ... }`.
pub fn spki_of_certificate(der: &[u8]) -> Result<&[u8], String> {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const VERSION: u8 = 0xa0;
    let (cert, _, _) = expect(der, SEQUENCE, "Certificate")?;
    let (tbs, _, _) = expect(cert, SEQUENCE, "TBSCertificate")?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION) {
        rest = tlv(rest)?.3;
    }
    let (_, _, r) = expect(rest, INTEGER, "serialNumber")?;
    let (_, _, r) = expect(r, SEQUENCE, "signature AlgorithmIdentifier")?;
    let (_, _, r) = expect(r, SEQUENCE, "issuer")?;
    let (_, _, r) = expect(r, SEQUENCE, "validity")?;
    let (_, _, r) = expect(r, SEQUENCE, "subject")?;
    let (_, spki, _) = expect(r, SEQUENCE, "subjectPublicKeyInfo")?;
    Ok(spki)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    };

    /// A self-signed certificate for a fresh P-256 key, and the key to sign with.
    pub(crate) fn signer() -> (String, EcdsaKeyPair) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["signer".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der())
            .expect("pkcs8");
        (cert.pem(), pair)
    }

    pub(crate) fn sign(pair: &EcdsaKeyPair, data: &[u8]) -> Vec<u8> {
        pair.sign(&SystemRandom::new(), data)
            .expect("sign")
            .as_ref()
            .to_vec()
    }

    #[test]
    fn certificate_pem_verifies_signatures() {
        let (pem, pair) = signer();
        let key = PublicKey::from_pem_or_der(pem.as_bytes()).expect("key");
        let data = b"firmware image".repeat(1000);
        let sig = sign(&pair, &data);
        assert!(key.verify(&data, &sig).is_ok());
        let mut tampered = data.clone();
        tampered[5000] ^= 1;
        let e = key.verify(&tampered, &sig).expect_err("tampered");
        assert_eq!(e.status, PalStatus::SignatureCheckFailed);
        let e = key.verify(&data, b"\x30\x02\x00\x00").expect_err("garbage");
        assert_eq!(e.status, PalStatus::SignatureCheckFailed);

        // The SPKI from the DER walk is the key itself.
        let (_, der) = parse_pem(&pem).expect("pem");
        let spki = spki_of_certificate(&der).expect("spki");
        assert!(PublicKey::from_spki_der(spki).is_ok());
        assert!(PublicKey::from_der(&der).is_ok());
        assert!(PublicKey::from_der(spki).is_ok());
        // ... and as a PUBLIC KEY PEM.
        let pub_pem = format!(
            "-----BEGIN PUBLIC KEY-----\r\n{}\r\n-----END PUBLIC KEY-----\r\n",
            updraft_protocol::streams::base64_encode(spki)
        );
        let k2 = PublicKey::from_pem_or_der(pub_pem.as_bytes()).expect("public key pem");
        assert!(k2.verify(&data, &sig).is_ok());
        assert_eq!(pair.public_key().as_ref().len(), 65);
    }

    #[test]
    fn other_keys_and_garbage_are_bad_signer_certs() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["p384".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let e = PublicKey::from_pem_or_der(cert.pem().as_bytes()).expect_err("p384");
        assert_eq!(e.status, PalStatus::BadSignerCert);
        let _ = &ECDSA_P384_SHA384_ASN1_SIGNING;
        for bad in [
            &b""[..],
            b"hello",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n",
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END PUBLIC KEY-----\n",
            b"-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n",
            b"\x30\x03\x02\x01\x00",
            b"\x30\x84\xff\xff\xff\xff",
        ] {
            let e = PublicKey::from_pem_or_der(bad).expect_err("bad");
            assert_eq!(e.status, PalStatus::BadSignerCert, "{bad:?}");
        }
        let certs: BTreeMap<String, String> = BTreeMap::new();
        let e = key_for(&certs, "/certs/none.pem").expect_err("missing");
        assert_eq!(e.status, PalStatus::BadSignerCert);
        assert!(e.detail.contains("/certs/none.pem"));
    }

    #[test]
    fn der_walk_never_panics_on_truncation() {
        let (pem, _) = signer();
        let (_, der) = parse_pem(&pem).expect("pem");
        for end in 0..der.len() {
            assert!(spki_of_certificate(&der[..end]).is_err(), "prefix {end}");
            let _ = PublicKey::from_der(&der[..end]);
        }
        let mut flipped = der.clone();
        for i in 0..flipped.len().min(64) {
            flipped[i] ^= 0xff;
            let _ = spki_of_certificate(&flipped);
            flipped[i] ^= 0xff;
        }
    }
}
