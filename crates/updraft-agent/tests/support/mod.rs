//! What the end-to-end tests share: the real Updraft server in-process (SQLite, embedded
//! broker, free ports), a code-signing key, and updates (thing, object, stream, job) created
//! directly in the server's store with the `afr_ota` document CreateOTAUpdate generates.
#![allow(dead_code)]

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use updraft_agent::AppVersion;
use updraft_agent::pal::memory::image_with_version;
use updraft_protocol::job::Protocol;
use updraft_protocol::otadoc::{OtaFile, OtaJobDocument, Signature, presigned_placeholder};
use updraft_protocol::streams::base64_encode;
use updraft_protocol::{JobStatus, TargetSelection};
use updraft_server::clock::now_ms;
use updraft_server::config::{FileConfig, ServerConfig};
use updraft_server::server::{AppState, Server};
use updraft_server::store::{
    Bucket, Job, JobExecution, ObjectVersion, Stream, StreamFile, Thing, Versioning,
};

/// The `certfile` of the test updates.
pub const CERT: &str = "/certs/updraft-signer.pem";
pub const WAIT: Duration = Duration::from_secs(30);

// ---- the server ------------------------------------------------------------------------

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "updraft-agent-e2e-{tag}-{}-{t:x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Env {
    pub state: AppState,
    /// The plain MQTT listener.
    pub port: u16,
    /// The mutual-TLS MQTT listener.
    pub tls_port: u16,
    /// The HTTP listener: where pre-signed URLs point.
    pub http: std::net::SocketAddr,
    pub dir: TempDir,
    pub signer: EcdsaKeyPair,
    /// The signer certificate (PEM).
    pub signer_pem: String,
    pub certs: BTreeMap<String, String>,
}

pub async fn env(tag: &str) -> Env {
    let dir = TempDir::new(tag);
    let config = ServerConfig::resolve(FileConfig {
        data_dir: Some(dir.0.join("server")),
        http: Some("127.0.0.1:0".into()),
        mqtt: Some("127.0.0.1:0".into()),
        mqtts: Some("127.0.0.1:0".into()),
        ..FileConfig::default()
    })
    .expect("config");
    let server = Server::start(&config).await.expect("server");
    let port = server.mqtt_addr.expect("mqtt listener").port();
    let tls_port = server.mqtts_addr.expect("mqtts listener").port();
    let http = server.http_addr;
    let state = server.state().clone();
    tokio::spawn(server.run(std::future::pending()));
    state
        .store
        .create_bucket(&Bucket {
            name: "firmware".into(),
            versioning: Versioning::Unversioned,
            created_ms: now_ms(),
        })
        .await
        .expect("bucket");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["updraft code signing".into()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der())
        .expect("pkcs8");
    Env {
        state,
        port,
        tls_port,
        http,
        dir,
        signer,
        signer_pem: cert.pem(),
        certs: BTreeMap::from([(CERT.to_owned(), cert.pem())]),
    }
}

pub fn sign(key: &EcdsaKeyPair, data: &[u8]) -> String {
    let sig = key.sign(&SystemRandom::new(), data).expect("sign");
    base64_encode(sig.as_ref())
}

/// A firmware image of `version` with `len` bytes of pseudo-random payload.
pub fn firmware(version: AppVersion, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let payload: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    image_with_version(version, &payload)
}

/// What the update looks like to the service.
pub struct Update {
    pub thing: String,
    pub job: String,
}

pub struct UpdateSpec {
    /// The bytes the stream serves.
    pub served: Vec<u8>,
    /// The signature in the job document.
    pub signature: String,
    /// `filesize` in the job document.
    pub file_size: u64,
    /// How the file is delivered.
    pub delivery: Delivery,
}

/// The data protocol of an update.
pub enum Delivery {
    /// MQTT Streams.
    Mqtt,
    /// HTTP through the pre-signed-URL placeholder, as CreateOTAUpdate with HTTP writes it.
    Http,
    /// HTTP through this literal URL.
    Url(String),
}

impl Env {
    pub fn spec(&self, image: &[u8]) -> UpdateSpec {
        UpdateSpec {
            served: image.to_vec(),
            signature: sign(&self.signer, image),
            file_size: image.len() as u64,
            delivery: Delivery::Mqtt,
        }
    }

    /// A thing, an object, a stream and a job with one QUEUED execution.
    pub async fn create(&self, name: &str, spec: UpdateSpec) -> Update {
        let now = now_ms();
        let st = &self.state;
        st.store
            .create_thing(&Thing {
                name: name.into(),
                id: name.into(),
                type_name: None,
                attributes: BTreeMap::new(),
                version: 1,
                created_ms: now,
            })
            .await
            .expect("thing");
        let blob = updraft_server::artifacts::Artifacts::new_blob();
        let size = spec.served.len() as u64;
        st.artifacts
            .put_bytes(&blob, Bytes::from(spec.served))
            .await
            .expect("blob");
        let key = format!("{name}/fw.bin");
        st.store
            .put_object(&ObjectVersion {
                bucket: "firmware".into(),
                key: key.clone(),
                version_id: "null".into(),
                delete_marker: false,
                size,
                etag: format!("\"{name}\""),
                content_type: None,
                checksum: None,
                metadata: BTreeMap::new(),
                blob,
                created_ms: now,
                is_latest: true,
            })
            .await
            .expect("object");
        // AFR_OTA-<uuid>-shaped: 44 characters, as the C agent requires.
        let stream = format!("AFR_OTA-{:0>36}", name.replace('_', "-"));
        assert_eq!(stream.len(), 44);
        st.store
            .create_stream(&Stream {
                id: stream.clone(),
                version: 1,
                description: None,
                files: vec![StreamFile {
                    file_id: 0,
                    bucket: "firmware".into(),
                    key,
                    version: None,
                    resolved_version: "null".into(),
                    size,
                    etag: None,
                }],
                role_arn: "arn:aws:iam::123456789012:role/ota".into(),
                created_ms: now,
                updated_ms: now,
            })
            .await
            .expect("stream");
        let (protocols, stream_name, url) = match spec.delivery {
            Delivery::Mqtt => (vec![Protocol::Mqtt], Some(stream), None),
            Delivery::Http => (
                vec![Protocol::Http],
                None,
                Some(presigned_placeholder(
                    &st.region,
                    "firmware",
                    &format!("{name}/fw.bin"),
                )),
            ),
            Delivery::Url(u) => (vec![Protocol::Http], None, Some(u)),
        };
        // A job with a URL placeholder has its presignedUrlConfig, as CreateOTAUpdate makes it.
        let mut details = serde_json::Map::new();
        if url.is_some() {
            details.insert(
                "presignedUrlConfig".into(),
                serde_json::json!({"roleArn": "arn:aws:iam::123456789012:role/ota", "expiresInSec": 3600}),
            );
        }
        let doc = OtaJobDocument {
            protocols,
            stream_name,
            files: vec![OtaFile {
                file_path: "fw.bin".into(),
                file_size: spec.file_size,
                file_id: 0,
                cert_file: Some(CERT.into()),
                file_type: None,
                update_data_url: url,
                signature: Some(Signature {
                    hash_algorithm: Some("SHA256".into()),
                    signature_algorithm: Some("ECDSA".into()),
                    value: spec.signature,
                }),
            }],
        };
        let job = format!("AFR_OTA-{name}");
        st.store
            .create_job(
                &Job {
                    id: job.clone(),
                    status: JobStatus::InProgress,
                    target_selection: TargetSelection::Snapshot,
                    targets: vec![],
                    description: None,
                    document: doc.to_json(),
                    document_source: None,
                    namespace_id: None,
                    details,
                    force_canceled: false,
                    reason_code: None,
                    comment: None,
                    created_ms: now,
                    updated_ms: now,
                    completed_ms: None,
                    version: 1,
                },
                &[JobExecution::queued(&job, name, now)],
            )
            .await
            .expect("job");
        Update {
            thing: name.into(),
            job,
        }
    }

    pub async fn execution(&self, u: &Update) -> JobExecution {
        self.state
            .store
            .get_execution(&u.job, &u.thing, None)
            .await
            .expect("store")
            .expect("execution")
    }

    /// Waits until the execution satisfies `f`.
    pub async fn wait_execution(
        &self,
        u: &Update,
        f: impl Fn(&JobExecution) -> bool,
    ) -> JobExecution {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let e = self.execution(u).await;
            if f(&e) {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out; execution is {:?} {:?}",
                e.status,
                e.status_details
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_terminal(&self, u: &Update) -> JobExecution {
        self.wait_execution(u, |e| e.status.is_terminal()).await
    }
}

pub fn details(e: &JobExecution) -> BTreeMap<&str, &str> {
    e.status_details
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}
