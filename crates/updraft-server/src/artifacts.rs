//! The artifact store: where object bytes live. Local disk by default, any S3-compatible
//! store by configuration — one `object_store` abstraction either way.
//!
//! Blobs are immutable and named by the server (`blobs/<uuid>`); which blob holds which
//! bucket/key/version is recorded in the [`crate::store::Store`]. The S3-compatible API
//! Updraft serves is therefore a facade: many user buckets live in one backing store.

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// Reads up to this size are one read into memory rather than a stream of pieces.
const SINGLE_READ_MAX: u64 = 4 * 1024 * 1024;
use thiserror::Error;
use tokio::io::AsyncReadExt;

#[derive(Debug, Error)]
pub enum ArtifactError {
    #[error("artifact store configuration: {0}")]
    Config(String),
    #[error("artifact {0} is missing from the artifact store")]
    Missing(String),
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
    #[error("artifact I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes go to the backing store in parts of this size.
const PART_SIZE: usize = 8 * 1024 * 1024;

#[derive(Clone)]
pub struct Artifacts {
    inner: Arc<dyn ObjectStore>,
    description: String,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl Artifacts {
    /// `file://DIR` (created if missing) or `s3://BUCKET?region=..&endpoint=..&allow_http=true`.
    /// S3 credentials come from the usual `AWS_*` environment variables, or from
    /// `access_key_id` / `secret_access_key` query parameters.
    pub fn from_url(url: &str) -> Result<Self, ArtifactError> {
        if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir)?;
            let fs = LocalFileSystem::new_with_prefix(dir)?.with_automatic_cleanup(true);
            return Ok(Artifacts {
                inner: Arc::new(fs),
                description: format!("local directory {dir}"),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ArtifactError::Config(format!("'{url}' names no bucket")));
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            for (k, v) in form_urlencoded::parse(query.as_bytes()) {
                builder = match k.as_ref() {
                    "region" => builder.with_region(v),
                    "endpoint" => builder.with_endpoint(v),
                    "allow_http" => builder.with_allow_http(v == "true"),
                    "access_key_id" => builder.with_access_key_id(v),
                    "secret_access_key" => builder.with_secret_access_key(v),
                    other => {
                        return Err(ArtifactError::Config(format!(
                            "unknown S3 option '{other}' (use region, endpoint, allow_http, access_key_id, secret_access_key)"
                        )));
                    }
                };
            }
            let s3 = builder.build()?;
            return Ok(Artifacts {
                inner: Arc::new(s3),
                description: format!("S3 bucket {bucket}"),
            });
        }
        Err(ArtifactError::Config(format!(
            "unsupported artifact URL '{url}': use file://DIR or s3://BUCKET?..."
        )))
    }

    /// A fresh blob name.
    pub fn new_blob() -> String {
        format!("blobs/{}", uuid::Uuid::new_v4().simple())
    }

    fn path(blob: &str) -> StorePath {
        StorePath::from(blob)
    }

    pub async fn put_bytes(&self, blob: &str, bytes: Bytes) -> Result<(), ArtifactError> {
        self.inner
            .put(&Self::path(blob), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// Copies a local file into the blob, in parts for large files.
    pub async fn put_file(&self, blob: &str, file: &Path, len: u64) -> Result<(), ArtifactError> {
        let mut f = tokio::fs::File::open(file).await?;
        if len <= PART_SIZE as u64 {
            let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            f.read_to_end(&mut buf).await?;
            return self.put_bytes(blob, Bytes::from(buf)).await;
        }
        let upload = self.inner.put_multipart(&Self::path(blob)).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(2).await?;
            writer.write(&buf[..n]);
        }
        writer.finish().await?;
        Ok(())
    }

    /// Concatenates blobs into a new one (multipart-upload completion).
    pub async fn concat(&self, blob: &str, parts: &[String]) -> Result<(), ArtifactError> {
        let upload = self.inner.put_multipart(&Self::path(blob)).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        for part in parts {
            let mut stream = self.read(part, None).await?;
            while let Some(chunk) = stream.next().await {
                writer.wait_for_capacity(2).await?;
                writer.write(&chunk?);
            }
        }
        writer.finish().await?;
        Ok(())
    }

    /// Streams a blob, or the byte range `range` of it.
    pub async fn read(
        &self,
        blob: &str,
        range: Option<Range<u64>>,
    ) -> Result<BoxStream<'static, Result<Bytes, ArtifactError>>, ArtifactError> {
        if let Some(r) = &range
            && r.is_empty()
        {
            return Ok(futures::stream::empty().boxed());
        }
        let opts = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let result = self
            .inner
            .get_opts(&Self::path(blob), opts)
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => ArtifactError::Missing(blob.to_owned()),
                e => ArtifactError::Store(e),
            })?;
        // A range of modest size is read in one go: the local store otherwise reads in 8 KiB
        // pieces, each a hand-off to the blocking pool.
        if result.range.end - result.range.start <= SINGLE_READ_MAX {
            let bytes = result.bytes().await.map_err(ArtifactError::Store)?;
            return Ok(futures::stream::once(async move { Ok(bytes) }).boxed());
        }
        Ok(result
            .into_stream()
            .map(|r| r.map_err(ArtifactError::Store))
            .boxed())
    }

    /// Reads a whole blob into memory (documents, and stream files for the cache).
    pub async fn read_all(&self, blob: &str, max: u64) -> Result<Bytes, ArtifactError> {
        let mut out = Vec::new();
        let mut stream = self.read(blob, None).await?;
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
            if out.len() as u64 > max {
                break;
            }
        }
        Ok(Bytes::from(out))
    }

    /// Removes blobs; a blob already gone is not an error.
    pub async fn delete(&self, blobs: &[String]) {
        for blob in blobs {
            match self.inner.delete(&Self::path(blob)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(blob, error = %e, "could not delete blob; it is orphaned"),
            }
        }
    }
}
