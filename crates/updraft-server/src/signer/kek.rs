//! The key-encryption key (KEK): private keys of imported certificates are stored only
//! sealed under it with AES-256-GCM (aws-lc-rs).
//!
//! The KEK is 32 random bytes in `<data-dir>/signing.key` (created with mode 0600 on first
//! start), or a file the operator names (`--signing-key-file`), holding 32 raw bytes, 64
//! hex digits or base64 of 32 bytes. It never enters the database: a stolen database (or
//! backup) holds only ciphertext.
//!
//! A sealed value is `v1:<kek id>:<base64(nonce ‖ ciphertext ‖ tag)>`, with a random 96-bit
//! nonce per value and the certificate's id as associated data, so a ciphertext cannot be
//! moved to another certificate's row. The KEK id (the first 8 bytes of SHA-256 of the
//! key, hex) tells a wrong key from a damaged value.

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The file name of the generated KEK in the data directory.
pub const KEK_FILE: &str = "signing.key";

const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

#[derive(Debug, Error)]
pub enum KekError {
    #[error("cannot read the signing key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the signing key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the signing key file {0} must hold 32 bytes: raw, as 64 hex digits, or in base64 (e.g. `openssl rand -hex 32`)"
    )]
    Malformed(PathBuf),
    #[error("no randomness available: {0}")]
    Random(String),
    #[error(
        "the private key was sealed under key-encryption key {sealed_with}, but this server runs with {current}; start it with the signing key file the key was imported under"
    )]
    WrongKey {
        sealed_with: String,
        current: String,
    },
    #[error("the sealed private key is damaged or was moved from another certificate")]
    Damaged,
    #[error("sealing failed")]
    Seal,
}

/// The key-encryption key. Its bytes never leave this type (not even in `Debug`).
pub struct Kek {
    key: RandomizedNonceKey,
    id: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({})", self.id)
    }
}

/// 32 key bytes from a file's contents: raw, hex or base64.
fn decode_key(contents: &[u8]) -> Option<[u8; KEY_LEN]> {
    if let Ok(raw) = <[u8; KEY_LEN]>::try_from(contents) {
        return Some(raw);
    }
    let text = std::str::from_utf8(contents).ok()?.trim();
    let bytes = if text.len() == 2 * KEY_LEN {
        hex::decode(text).ok()?
    } else {
        B64.decode(text).ok()?
    };
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).ok()
}

impl Kek {
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Result<Kek, KekError> {
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes).map_err(|_| KekError::Seal)?;
        let id = hex::encode(&Sha256::digest(bytes)[..8]);
        Ok(Kek { key, id })
    }

    /// The operator's key file if given (it must exist), else `<data_dir>/signing.key`,
    /// created with 32 random bytes and mode 0600 if missing.
    pub fn load_or_create(explicit: Option<&Path>, data_dir: &Path) -> Result<Kek, KekError> {
        let (path, create) = match explicit {
            Some(p) => (p.to_owned(), false),
            None => (data_dir.join(KEK_FILE), true),
        };
        let contents = match std::fs::read(&path) {
            Ok(c) => c,
            Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => {
                let mut fresh = [0u8; KEY_LEN];
                getrandom::fill(&mut fresh).map_err(|e| KekError::Random(e.to_string()))?;
                write_new_private(&path, &fresh)?;
                tracing::info!(path = %path.display(), "created the signing key-encryption key");
                fresh.to_vec()
            }
            Err(source) => return Err(KekError::Read { path, source }),
        };
        warn_if_readable_by_others(&path);
        let bytes = decode_key(&contents).ok_or_else(|| KekError::Malformed(path.clone()))?;
        Kek::from_bytes(&bytes)
    }

    /// Identifies the key (not secret: a hash prefix of it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plaintext` for the record named by `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &str) -> Result<String, KekError> {
        let mut buf = plaintext.to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| KekError::Seal)?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&buf);
        Ok(format!("v1:{}:{}", self.id, B64.encode(out)))
    }

    /// Opens a value sealed for the record named by `aad`.
    pub fn open(&self, sealed: &str, aad: &str) -> Result<Vec<u8>, KekError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some("v1"), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(KekError::Damaged);
        };
        if id != self.id {
            return Err(KekError::WrongKey {
                sealed_with: id.to_owned(),
                current: self.id.clone(),
            });
        }
        let raw = B64.decode(body).map_err(|_| KekError::Damaged)?;
        if raw.len() < NONCE_LEN + TAG_LEN {
            return Err(KekError::Damaged);
        }
        let (nonce, ciphertext) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KekError::Damaged)?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| KekError::Damaged)?;
        Ok(plain.to_vec())
    }
}

/// Writes a new file readable only by its owner; never replaces an existing one.
fn write_new_private(path: &Path, bytes: &[u8]) -> Result<(), KekError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| KekError::Create {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(())
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the signing key-encryption key file is readable by others; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(byte: u8) -> Kek {
        Kek::from_bytes(&[byte; 32]).expect("kek")
    }

    #[test]
    fn seals_and_opens_bound_to_the_record() {
        let k = kek(7);
        let sealed = k.seal(b"private key", "cert-1").expect("seal");
        assert!(sealed.starts_with(&format!("v1:{}:", k.id())));
        assert!(!sealed.contains("private key"));
        assert_eq!(k.open(&sealed, "cert-1").expect("open"), b"private key");
        // Another record's id as associated data: refused.
        assert!(matches!(k.open(&sealed, "cert-2"), Err(KekError::Damaged)));
        // Fresh nonce per seal.
        assert_ne!(k.seal(b"private key", "cert-1").expect("seal"), sealed);
        // Tampered ciphertext: refused.
        let mut raw = B64
            .decode(sealed.rsplit(':').next().expect("body"))
            .expect("b64");
        raw[NONCE_LEN] ^= 1;
        let tampered = format!("v1:{}:{}", k.id(), B64.encode(raw));
        assert!(matches!(
            k.open(&tampered, "cert-1"),
            Err(KekError::Damaged)
        ));
        assert!(matches!(k.open("v1:x", "cert-1"), Err(KekError::Damaged)));
    }

    #[test]
    fn a_different_key_is_named_as_such() {
        let sealed = kek(1).seal(b"k", "c").expect("seal");
        match kek(2).open(&sealed, "c") {
            Err(KekError::WrongKey {
                sealed_with,
                current,
            }) => {
                assert_eq!(sealed_with, kek(1).id());
                assert_eq!(current, kek(2).id());
            }
            other => panic!("expected WrongKey, got {other:?}"),
        }
    }

    #[test]
    fn key_files_raw_hex_or_base64() {
        let raw = [9u8; 32];
        assert_eq!(decode_key(&raw), Some(raw));
        assert_eq!(
            decode_key(format!("{}\n", hex::encode(raw)).as_bytes()),
            Some(raw)
        );
        assert_eq!(decode_key(B64.encode(raw).as_bytes()), Some(raw));
        assert_eq!(decode_key(b"short"), None);
        assert_eq!(decode_key(&[0u8; 31]), None);
    }

    #[test]
    fn created_once_with_mode_0600_and_reused() {
        let scratch = crate::test_support::ScratchDir::new("kek");
        let dir = scratch.path();
        let first = Kek::load_or_create(None, dir).expect("create");
        let again = Kek::load_or_create(None, dir).expect("load");
        assert_eq!(first.id(), again.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(KEK_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // An operator's file must exist: it is never created.
        let missing = dir.join("operator.key");
        assert!(matches!(
            Kek::load_or_create(Some(&missing), dir),
            Err(KekError::Read { .. })
        ));
        std::fs::write(&missing, "not a key").expect("write");
        assert!(matches!(
            Kek::load_or_create(Some(&missing), dir),
            Err(KekError::Malformed(_))
        ));
    }
}
