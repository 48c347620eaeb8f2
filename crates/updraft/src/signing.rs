//! Code signing from the command line, without a server:
//!
//! - `updraft sign --key key.pem firmware.bin` prints the base64 DER signature that
//!   CreateOTAUpdate's `customCodeSigning.signature.inlineDocument` takes.
//! - `updraft signer create-certificate --out-dir DIR` writes a self-signed ECDSA P-256
//!   code-signing certificate (`cert.pem`) and its key (`key.pem`, mode 0600), ready for
//!   `aws acm import-certificate`.

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use updraft_server::signer::crypto::{self, Hash, KeyAlgorithm, SigningKey, X509};

/// Sign a file with a private key; prints the base64 DER signature.
#[derive(Args)]
pub struct SignArgs {
    /// PEM private key: ECDSA P-256 (signs ECDSA over SHA-256) or RSA (PKCS#1 v1.5 over SHA-256)
    #[arg(long)]
    key: PathBuf,
    /// Check the signature against this PEM certificate before printing it
    #[arg(long)]
    certificate: Option<PathBuf>,
    /// The file to sign
    file: PathBuf,
}

#[derive(Subcommand)]
pub enum Signer {
    /// Write a self-signed ECDSA P-256 code-signing certificate and key for a quick start.
    CreateCertificate(CreateCertificateArgs),
}

#[derive(Args)]
pub struct CreateCertificateArgs {
    /// Directory for cert.pem and key.pem (created if missing)
    #[arg(long)]
    out_dir: PathBuf,
    /// The certificate's common name
    #[arg(long, default_value = "Updraft code signing")]
    common_name: String,
    /// Days the certificate is valid
    #[arg(long, default_value_t = 3650)]
    days: u32,
    /// Replace cert.pem and key.pem if they exist
    #[arg(long)]
    force: bool,
}

pub fn sign(args: SignArgs) -> anyhow::Result<()> {
    let pem = std::fs::read(&args.key)
        .with_context(|| format!("reading the key {}", args.key.display()))?;
    let key = SigningKey::from_pem(&pem).with_context(|| format!("{}", args.key.display()))?;
    let data =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let signature = key.sign(Hash::Sha256, &data)?;
    if let Some(path) = &args.certificate {
        let cert_pem = std::fs::read(path)
            .with_context(|| format!("reading the certificate {}", path.display()))?;
        let cert = X509::from_pem(&cert_pem).with_context(|| format!("{}", path.display()))?;
        if !key.matches(&cert) {
            bail!(
                "the key {} does not belong to the certificate {}",
                args.key.display(),
                path.display()
            );
        }
        if !crypto::verify(&cert, &data, &signature) {
            bail!("the signature does not verify against {}", path.display());
        }
    }
    let algorithm = match key.algorithm() {
        KeyAlgorithm::Rsa(_) => "RSA",
        _ => "ECDSA",
    };
    eprintln!(
        "updraft: signed {} ({} bytes) with {algorithm} over SHA-256; in customCodeSigning use \
         hashAlgorithm SHA256, signatureAlgorithm {algorithm}",
        args.file.display(),
        data.len()
    );
    println!("{}", B64.encode(signature));
    Ok(())
}

/// Writes `bytes` to a new file (or over an old one with `force`) with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32, force: bool) -> anyhow::Result<()> {
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    opts.mode(mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).with_context(|| {
        if path.exists() && !force {
            format!("{} exists; pass --force to replace it", path.display())
        } else {
            format!("creating {}", path.display())
        }
    })?;
    #[cfg(unix)]
    if force {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn run(cmd: Signer) -> anyhow::Result<()> {
    match cmd {
        Signer::CreateCertificate(args) => create_certificate(args),
    }
}

fn create_certificate(args: CreateCertificateArgs) -> anyhow::Result<()> {
    if args.days == 0 || args.days > 36_500 {
        bail!("--days must be from 1 to 36500");
    }
    if args.common_name.trim().is_empty() {
        bail!("--common-name must not be empty");
    }
    let generated = crypto::code_signing_certificate(&args.common_name, args.days)?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let cert = args.out_dir.join("cert.pem");
    let key = args.out_dir.join("key.pem");
    if !args.force {
        for p in [&cert, &key] {
            if p.exists() {
                bail!("{} exists; pass --force to replace it", p.display());
            }
        }
    }
    write_file(
        &key,
        generated.private_key_pem.as_bytes(),
        0o600,
        args.force,
    )?;
    write_file(
        &cert,
        generated.certificate_pem.as_bytes(),
        0o644,
        args.force,
    )?;
    println!(
        "updraft: wrote {} (ECDSA P-256 code-signing certificate, {} days)",
        cert.display(),
        args.days
    );
    println!(
        "updraft: wrote {} (its private key, mode 0600)",
        key.display()
    );
    println!(
        "updraft: import it with: aws acm import-certificate --certificate fileb://{} --private-key fileb://{}",
        cert.display(),
        key.display()
    );
    Ok(())
}
