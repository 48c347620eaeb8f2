//! The device data plane: the Jobs API over MQTT and HTTPS (iot-jobs-data), Streams over
//! MQTT, pre-signed HTTP downloads, and the notifications devices receive.
//!
//! Device requests arrive as [`Inbound`] messages from whichever [`MessageBus`] is in use.
//! They are spread over a fixed set of workers by client id, so one device's requests are
//! handled in order while different devices proceed in parallel.

pub mod jobs;
pub mod jobs_http;
mod jobs_mqtt;
mod notify;
pub mod streams_mqtt;
mod writer;

use bytes::Bytes;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc;

use crate::mqtt::{Inbound, MessageBus};
use crate::server::AppState;
use crate::store::{DeviceWrite, DeviceWriteOutcome, Job, JobExecution};
use updraft_protocol::streams::{RejectCode, StreamError};

/// Placeholders CreateJob documents may carry; replaced with pre-signed URLs on delivery.
const PRESIGN_PREFIX: &str = "${aws:iot:s3-presigned-url:";

/// Pre-signed URL lifetime when a job has a placeholder but no `expiresInSec`.
const DEFAULT_PRESIGN_SECONDS: i64 = 3600;

/// Data-plane state shared by every request.
#[derive(Default)]
pub struct DataPlane {
    bus: OnceLock<Arc<dyn MessageBus>>,
    /// How pre-signed URLs are made: where devices reach the HTTP listener, and the key.
    presign: OnceLock<Presigner>,
    /// The head of each thing's pending list as last announced on `notify-next`.
    heads: Mutex<HashMap<String, Option<(String, i64)>>>,
    /// Stream file contents, so a fleet downloading one file reads it once.
    files: Mutex<FileCache>,
    /// Blob reads in progress: a fleet's first requests for a file not in memory yet all
    /// wait for one read (not one each: a rollout's devices ask at once).
    file_reads: Loading<Bytes>,
    /// Group commit of devices' writes (started with the workers), for a store that does
    /// not group-commit them itself (`JobStore::group_commits`).
    writer: OnceLock<writer::DeviceWriter>,
    /// Streams as recently read, and which blob holds each of their files: a fleet asking
    /// for blocks of one stream costs the database one read per [`METADATA_TTL`].
    stream_meta: Recent<String, Arc<crate::store::Stream>>,
    /// (blob, size, ETag) of object versions.
    blobs: Recent<ObjectRef, (String, u64, String)>,
    /// Object versions as recently read for pre-signed downloads, by (bucket, key,
    /// version asked for); dropped whenever this server takes an S3 write.
    objects: Recent<(String, String, Option<String>), Arc<crate::store::ObjectVersion>>,
    /// Jobs as recently read, for their documents: a fleet starting one job costs the
    /// database one read per [`METADATA_TTL`].
    /// Each with the time (ms) it was read.
    jobs: Recent<String, (i64, Arc<Job>)>,
    /// Each device's executions as this server last wrote or read them, by thing (a few
    /// each: looked up by `&str`, no key to allocate per request), then job. Only a
    /// starting point for UpdateJobExecution's read-modify-write: the write checks the
    /// stored version, so a stale entry costs a retry from the store, never a wrong answer
    /// (and an error found against it is checked again against the store).
    executions: Mutex<ExecutionCache>,
}

/// See `DataPlane::executions`.
#[derive(Default)]
struct ExecutionCache {
    by_thing: HashMap<String, Vec<JobExecution>>,
    /// Executions held, over every thing.
    count: usize,
}

/// Values read from the store, served from memory while younger than [`METADATA_TTL`].
struct Recent<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K, V> Default for Recent<K, V> {
    fn default() -> Self {
        Recent {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

/// Reads in progress, by key: concurrent [`Loading::run`] calls for one key share one
/// read. A read that fails (or is abandoned) is not shared: each caller that waited on it
/// then reads on its own, all at once (not one after another, each waiting out the
/// store's timeout in turn).
struct Loading<V> {
    reads: Mutex<HashMap<String, Reading<V>>>,
}

/// A read in progress: `None` until it ends, then its value, or `None` if it failed.
type Reading<V> = tokio::sync::watch::Receiver<Option<Option<V>>>;

impl<V> Default for Loading<V> {
    fn default() -> Self {
        Loading {
            reads: Mutex::new(HashMap::new()),
        }
    }
}

/// The caller doing a key's read: takes the key out of [`Loading`] when it ends or is
/// dropped (a read abandoned midway is not waited on by later callers), then tells those
/// waiting how it ended.
struct Leading<'a, V> {
    loading: &'a Loading<V>,
    key: &'a str,
    done: tokio::sync::watch::Sender<Option<Option<V>>>,
}

impl<V> Leading<'_, V> {
    /// Tells those waiting the read's value (`None`: it failed); the key goes as `self` is
    /// dropped (a caller coming in between finds the read ended).
    fn end(self, value: Option<V>) {
        let _ = self.done.send(Some(value));
    }
}

impl<V> Drop for Leading<'_, V> {
    fn drop(&mut self) {
        if let Ok(mut reads) = self.loading.reads.lock()
            && reads
                .get(self.key)
                .is_some_and(|r| r.same_channel(&self.done.subscribe()))
        {
            reads.remove(self.key);
        }
    }
}

/// A caller's part in a key's read.
enum Part<'a, V> {
    /// It reads, for those who come meanwhile too.
    Lead(Leading<'a, V>),
    /// It waits for the read in progress.
    Wait(Reading<V>),
    /// It reads for itself (the map of reads is unusable).
    Alone,
}

impl<V: Clone> Loading<V> {
    /// `read()`'s value, or the value of the `read` for `key` already in progress.
    async fn run<E, F, Fut>(&self, key: &str, read: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, E>>,
    {
        let part = match self.reads.lock() {
            Ok(mut reads) => match reads.get(key) {
                Some(reading) => Part::Wait(reading.clone()),
                None => {
                    let (done, reading) = tokio::sync::watch::channel(None);
                    reads.insert(key.to_owned(), reading);
                    Part::Lead(Leading {
                        loading: self,
                        key,
                        done,
                    })
                }
            },
            Err(_) => Part::Alone,
        };
        match part {
            Part::Lead(leading) => {
                let result = read().await;
                leading.end(result.as_ref().ok().cloned());
                result
            }
            Part::Wait(mut reading) => {
                if let Ok(ended) = reading.wait_for(Option::is_some).await
                    && let Some(Some(value)) = &*ended
                {
                    return Ok(value.clone());
                }
                // The read failed or was abandoned: this caller reads on its own.
                read().await
            }
            Part::Alone => read().await,
        }
    }
}

/// Entries a [`Recent`] holds before expired ones are swept out.
const RECENT_SWEEP_AT: usize = 10_000;

impl<K: Hash + Eq, V: Clone> Recent<K, V> {
    fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let m = self.entries.lock().ok()?;
        let (at, v) = m.get(key)?;
        (at.elapsed() < METADATA_TTL).then(|| v.clone())
    }

    fn put(&self, key: K, value: V) {
        if let Ok(mut m) = self.entries.lock() {
            if m.len() >= RECENT_SWEEP_AT {
                m.retain(|_, (at, _)| at.elapsed() < METADATA_TTL);
            }
            m.insert(key, (Instant::now(), value));
        }
    }

    fn clear(&self) {
        if let Ok(mut m) = self.entries.lock() {
            m.clear();
        }
    }

    fn forget<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Ok(mut m) = self.entries.lock() {
            m.remove(key);
        }
    }
}

/// How far apart two replicas' clocks may be, for comparing a time read on one with a time
/// written by another.
const CLOCK_SKEW_MS: i64 = 1_000;

/// Executions the cache holds before it starts over (it is only a starting point).
const MAX_CACHED_EXECUTIONS: usize = 200_000;
/// Executions the cache holds per thing (the oldest out first).
const MAX_CACHED_PER_THING: usize = 8;

/// (bucket, key, version id) of an object version.
type ObjectRef = (String, String, String);

/// How long stream metadata may be served from memory. Changes made through this server
/// (UpdateStream, DeleteStream) invalidate it at once; this bounds how long a change made
/// through another replica can go unseen.
const METADATA_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Blob contents by blob name, bounded by total size (oldest out first). Blobs are
/// immutable, so entries never go stale.
#[derive(Default)]
struct FileCache {
    entries: HashMap<String, Bytes>,
    order: std::collections::VecDeque<String>,
    bytes: usize,
}

/// Largest total size of cached stream files, and of one cached file.
const FILE_CACHE_BYTES: usize = 256 * 1024 * 1024;
pub(crate) const MAX_CACHED_FILE: u64 = 64 * 1024 * 1024;

impl FileCache {
    fn get(&self, blob: &str) -> Option<Bytes> {
        self.entries.get(blob).cloned()
    }

    fn insert(&mut self, blob: String, data: Bytes) {
        if self.entries.contains_key(&blob) {
            return;
        }
        self.bytes += data.len();
        self.order.push_back(blob.clone());
        self.entries.insert(blob, data);
        while self.bytes > FILE_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(d) = self.entries.remove(&old) {
                self.bytes -= d.len();
            }
        }
    }
}

impl DataPlane {
    pub fn set_bus(&self, bus: Arc<dyn MessageBus>) {
        let _ = self.bus.set(bus);
    }

    pub fn set_presigner(&self, presigner: Presigner) {
        let _ = self.presign.set(presigner);
    }

    pub fn bus(&self) -> Option<&Arc<dyn MessageBus>> {
        self.bus.get()
    }

    /// Applies a device's write, group-committed with concurrent ones.
    async fn device_write(
        &self,
        state: &AppState,
        w: DeviceWrite,
    ) -> crate::store::StoreResult<DeviceWriteOutcome> {
        match self.writer.get() {
            Some(writer) => writer.write(w).await,
            None => state.store.device_write(w).await,
        }
    }

    /// Writes a device's execution update: `Updated(false)` when the stored version moved
    /// on, `Ended` when it ended the execution, which so left the thing's pending list:
    /// then the thing's listeners hear the list (`notify`, and `notify-next` if the
    /// execution was its head).
    pub async fn write_execution(
        &self,
        state: &AppState,
        e: &JobExecution,
    ) -> crate::store::StoreResult<DeviceWriteOutcome> {
        let pending = match (self.bus.get(), e.status.is_terminal()) {
            (Some(bus), true) => notify::wanted(bus.as_ref(), &e.thing_name),
            _ => 0,
        };
        let w = DeviceWrite::Update {
            execution: e.clone(),
            pending,
        };
        let outcome = self.device_write(state, w).await?;
        match &outcome {
            DeviceWriteOutcome::Ended(list) => {
                self.remember_execution(e);
                if let Some(bus) = self.bus.get() {
                    if notify::wanted(bus.as_ref(), &e.thing_name) > pending {
                        // A device subscribed to `notify` meanwhile: the list read is
                        // too short for it.
                        notify::announce(state, bus.as_ref(), &self.heads, &e.thing_name).await;
                    } else {
                        notify::publish(state, bus.as_ref(), &self.heads, &e.thing_name, list)
                            .await;
                    }
                }
            }
            DeviceWriteOutcome::Updated(true) => self.remember_execution(e),
            _ => self.forget_execution(&e.thing_name, &e.job_id),
        }
        Ok(outcome)
    }

    /// StartNextPendingJobExecution for `thing`, group-committed.
    pub async fn start_next(
        &self,
        state: &AppState,
        thing: &str,
        status_details: Option<BTreeMap<String, String>>,
        now_ms: i64,
    ) -> crate::store::StoreResult<Option<JobExecution>> {
        let w = DeviceWrite::StartNext {
            thing: thing.to_owned(),
            status_details,
            now_ms,
        };
        match self.device_write(state, w).await? {
            DeviceWriteOutcome::Started(Some(e)) => {
                self.remember_execution(&e);
                Ok(Some(e))
            }
            _ => Ok(None),
        }
    }

    /// The execution of `job_id` on `thing` as this server last saw it (see `executions`).
    pub fn cached_execution(
        &self,
        thing: &str,
        job_id: &str,
        execution_number: Option<i64>,
    ) -> Option<JobExecution> {
        let m = self.executions.lock().ok()?;
        let e = m.by_thing.get(thing)?.iter().find(|e| e.job_id == job_id)?;
        execution_number
            .is_none_or(|n| n == e.execution_number)
            .then(|| e.clone())
    }

    fn remember_execution(&self, e: &JobExecution) {
        if e.status.is_terminal() {
            // Nothing more will be written to it by its device.
            self.forget_execution(&e.thing_name, &e.job_id);
            return;
        }
        let Ok(mut m) = self.executions.lock() else {
            return;
        };
        if m.count >= MAX_CACHED_EXECUTIONS {
            *m = ExecutionCache::default();
        }
        let m = &mut *m;
        let Some(list) = m.by_thing.get_mut(&e.thing_name) else {
            m.by_thing.insert(e.thing_name.clone(), vec![e.clone()]);
            m.count += 1;
            return;
        };
        if let Some(cached) = list.iter_mut().find(|c| c.job_id == e.job_id) {
            cached.clone_from(e);
            return;
        }
        if list.len() >= MAX_CACHED_PER_THING {
            list.remove(0);
        } else {
            m.count += 1;
        }
        list.push(e.clone());
    }

    pub fn forget_execution(&self, thing: &str, job_id: &str) {
        let Ok(mut m) = self.executions.lock() else {
            return;
        };
        let m = &mut *m;
        if let Some(list) = m.by_thing.get_mut(thing) {
            let before = list.len();
            list.retain(|c| c.job_id != job_id);
            m.count -= before - list.len();
            if list.is_empty() {
                m.by_thing.remove(thing);
            }
        }
    }

    /// The job of `execution`, from memory if it was read less than [`METADATA_TTL`] ago
    /// and is the job the execution was queued for. A job deleted and created again under
    /// the same id (on another replica, say) queues new executions, which must never pair
    /// with a copy of the old job. The copy is the execution's job when CreateJob queued the
    /// execution with the job (its queue time is the job's creation time: the case of every
    /// execution of a fleet rollout, read by all its devices in the first seconds), or when
    /// the copy was read after the execution was queued (CONTINUOUS jobs' later members).
    pub async fn job_of(
        &self,
        state: &AppState,
        execution: &JobExecution,
    ) -> crate::store::StoreResult<Option<Arc<Job>>> {
        if let Some((read_ms, j)) = self.jobs.get(&execution.job_id)
            && (j.created_ms == execution.queued_ms
                || read_ms > execution.queued_ms.saturating_add(CLOCK_SKEW_MS))
        {
            return Ok(Some(j));
        }
        let read_ms = crate::clock::now_ms();
        let Some(j) = state.store.get_job(&execution.job_id).await? else {
            return Ok(None);
        };
        let j = Arc::new(j);
        self.jobs
            .put(execution.job_id.clone(), (read_ms, j.clone()));
        Ok(Some(j))
    }

    /// An object version (the latest when `version` is `None`), from memory if it was read
    /// less than [`METADATA_TTL`] ago.
    pub async fn object(
        &self,
        state: &AppState,
        bucket: &str,
        key: &str,
        version: Option<&str>,
    ) -> crate::store::StoreResult<Option<Arc<crate::store::ObjectVersion>>> {
        let k = (
            bucket.to_owned(),
            key.to_owned(),
            version.map(str::to_owned),
        );
        if let Some(o) = self.objects.get(&k) {
            return Ok(Some(o));
        }
        let Some(o) = state.store.get_object(bucket, key, version).await? else {
            return Ok(None);
        };
        let o = Arc::new(o);
        self.objects.put(k, o.clone());
        Ok(Some(o))
    }

    /// Forgets every cached object version (an S3 write happened).
    pub fn forget_objects(&self) {
        self.objects.clear();
    }

    /// Forgets what is cached about a job (it was created, updated or deleted here).
    pub fn invalidate_job(&self, job_id: &str) {
        self.jobs.forget(job_id);
    }

    /// The job document as a device receives it: pre-signed URL placeholders replaced when
    /// the job has a `presignedUrlConfig`.
    pub async fn substitute_presigned_urls(&self, job: &Job) -> String {
        let Some(config) = job.details.get("presignedUrlConfig") else {
            return job.document.clone();
        };
        if !job.document.contains(PRESIGN_PREFIX) {
            return job.document.clone();
        }
        let expires = config
            .get("expiresInSec")
            .and_then(Value::as_i64)
            .unwrap_or(DEFAULT_PRESIGN_SECONDS);
        let Some(p) = self.presign.get() else {
            return job.document.clone();
        };
        let mut out = String::with_capacity(job.document.len() + 256);
        let mut rest = job.document.as_str();
        while let Some(i) = rest.find(PRESIGN_PREFIX) {
            out.push_str(&rest[..i]);
            let after = &rest[i + PRESIGN_PREFIX.len()..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[i..]);
                rest = "";
                break;
            };
            let inner = &after[..end];
            match crate::iot::parse_s3_url(inner) {
                Some((bucket, key)) => out.push_str(&crate::auth::presign_s3_get(
                    &p.base_url,
                    &bucket,
                    &key,
                    &p.access_key,
                    &p.secret_key,
                    &p.region,
                    crate::clock::now_ms(),
                    expires,
                )),
                None => out.push_str(&rest[i..i + PRESIGN_PREFIX.len() + end + 1]),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }

    /// A stream, from memory if it was read less than [`METADATA_TTL`] ago.
    pub async fn stream(
        &self,
        state: &AppState,
        stream_id: &str,
    ) -> crate::store::StoreResult<Option<Arc<crate::store::Stream>>> {
        if let Some(s) = self.stream_meta.get(stream_id) {
            return Ok(Some(s));
        }
        let Some(s) = state.store.get_stream(stream_id).await? else {
            return Ok(None);
        };
        let s = Arc::new(s);
        self.stream_meta.put(stream_id.to_owned(), s.clone());
        Ok(Some(s))
    }

    /// Forgets what is cached about a stream (it was updated or deleted).
    pub fn invalidate_stream(&self, stream_id: &str) {
        self.stream_meta.forget(stream_id);
    }

    /// The blob and size of a stream file's object version, if it still holds what the
    /// stream was made from.
    async fn blob_of(
        &self,
        state: &AppState,
        file: &crate::store::StreamFile,
    ) -> Result<(String, u64), StreamError> {
        let key = (
            file.bucket.clone(),
            file.key.clone(),
            file.resolved_version.clone(),
        );
        let (blob, size, etag) = match self.blobs.get(&key) {
            Some(found) => found,
            None => {
                let object = state
                    .store
                    .get_object(&file.bucket, &file.key, Some(&file.resolved_version))
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "store failure serving a stream file");
                        StreamError::new(RejectCode::InternalError, "Internal error")
                    })?
                    .filter(|o| !o.delete_marker)
                    .ok_or_else(|| {
                        StreamError::new(
                            RejectCode::ResourceNotFound,
                            format!("the object behind file {} no longer exists", file.file_id),
                        )
                    })?;
                let found = (object.blob, object.size, object.etag);
                self.blobs.put(key, found.clone());
                found
            }
        };
        // An overwrite in an unversioned bucket keeps the version id: serving the new bytes
        // under the old size would hand devices a mix of two files.
        if size != file.size || file.etag.as_ref().is_some_and(|e| *e != etag) {
            return Err(StreamError::new(
                RejectCode::ETagMismatch,
                format!(
                    "the object behind file {} changed after the stream was written",
                    file.file_id
                ),
            ));
        }
        Ok((blob, size))
    }

    /// The contents of a stream file (from the cache when it is there).
    pub async fn file_bytes(
        &self,
        state: &AppState,
        file: &crate::store::StreamFile,
    ) -> Result<Bytes, StreamError> {
        let (blob, size) = self.blob_of(state, file).await?;
        self.blob_bytes(state, &blob, size).await.map_err(|e| {
            tracing::error!(error = %e, blob, "cannot read a stream file");
            StreamError::new(RejectCode::InternalError, "Internal error")
        })
    }

    /// A blob's contents if they are in memory (see [`Self::blob_bytes`]), without
    /// waiting: the pre-signed download path's common case.
    pub fn cached_blob(&self, blob: &str) -> Option<Bytes> {
        self.files.lock().ok().and_then(|c| c.get(blob))
    }

    /// A blob's contents, from memory when a device asked for it before. Blobs are
    /// immutable, so a cached one is never stale; blobs over [`MAX_CACHED_FILE`] are read
    /// but not kept.
    pub async fn blob_bytes(
        &self,
        state: &AppState,
        blob: &str,
        size: u64,
    ) -> Result<Bytes, crate::artifacts::ArtifactError> {
        if let Some(b) = self.cached_blob(blob) {
            return Ok(b);
        }
        self.file_reads
            .run(blob, || async {
                let data = state.artifacts.read_all(blob, size).await?;
                // Kept before the read is over: a request arriving once it is finds it.
                if size <= MAX_CACHED_FILE
                    && let Ok(mut c) = self.files.lock()
                {
                    c.insert(blob.to_owned(), data.clone());
                }
                Ok(data)
            })
            .await
    }

    /// Announces a change in `thing`'s pending executions (`notify`, and `notify-next`
    /// when the head of the list changed).
    pub async fn thing_changed(&self, state: &AppState, thing: &str) {
        if let Some(bus) = self.bus.get() {
            notify::announce(state, bus.as_ref(), &self.heads, thing).await;
        }
    }

    /// Announces changes for many things (a new job, a cancel), in the background.
    pub fn things_changed(&self, state: &AppState, things: Vec<String>) {
        if self.bus.get().is_none() || things.is_empty() {
            return;
        }
        let state = state.clone();
        tokio::spawn(async move {
            for t in things {
                state.data_plane.thing_changed(&state, &t).await;
            }
        });
    }
}

/// What pre-signed URLs are made with.
#[derive(Debug, Clone)]
pub struct Presigner {
    /// Where devices reach the HTTP listener, e.g. `http://10.0.0.5:8080`.
    pub base_url: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

/// Consumes device requests: one task per lane (see [`crate::mqtt::Lanes`]), each handling
/// its devices' requests in order. Each device may make `rate` requests per second,
/// sustained (0: no limit).
pub fn spawn_workers(state: AppState, lanes: Vec<mpsc::Receiver<Inbound>>, rate: f64) {
    if !state.store.group_commits() {
        match writer::DeviceWriter::spawn(state.store.clone()) {
            Ok(w) => {
                let _ = state.data_plane.writer.set(w);
            }
            Err(e) => {
                tracing::warn!(error = %e, "no group-commit writer thread; device writes commit one by one");
            }
        }
    }
    for mut rx in lanes {
        let state = state.clone();
        tokio::spawn(async move {
            // A device always comes down the same lane: its bucket is here.
            let mut limiter = RateLimiter::new(rate);
            while let Some(msg) = rx.recv().await {
                if limiter.allow(&msg.client_id, std::time::Instant::now()) {
                    handle(&state, msg).await;
                } else {
                    throttled(&state, &msg);
                }
            }
        });
    }
}

/// A token bucket per client id: `rate` requests per second sustained, bursts of twice
/// that. Beyond it a device's requests are refused (`RequestThrottled`) so one device
/// cannot starve the others that share its worker.
struct RateLimiter {
    rate: f64,
    buckets: HashMap<String, (f64, std::time::Instant)>,
    seen: u64,
}

impl RateLimiter {
    /// `rate` 0 lets everything through.
    fn new(rate: f64) -> Self {
        RateLimiter {
            rate,
            buckets: HashMap::new(),
            seen: 0,
        }
    }

    fn burst(&self) -> f64 {
        2.0 * self.rate
    }

    fn allow(&mut self, client: &str, now: std::time::Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let (rate, burst) = (self.rate, self.burst());
        self.seen += 1;
        if self.seen.is_multiple_of(100_000) {
            // Forget devices that have been quiet long enough to have a full bucket again.
            self.buckets
                .retain(|_, (_, at)| now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        // Looked up by reference first: the key is allocated once per device, not per request.
        if !self.buckets.contains_key(client) {
            self.buckets.insert(client.to_owned(), (burst, now));
        }
        let Some((tokens, at)) = self.buckets.get_mut(client) else {
            return true;
        };
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Answers a refused Jobs request with `RequestThrottled` (stream requests are dropped:
/// the Streams API has no throttling code, and devices re-request missing blocks).
fn throttled(state: &AppState, msg: &Inbound) {
    use updraft_protocol::topics::{DeviceTopic, JobsTopic};
    let Some(bus) = state.data_plane.bus() else {
        return;
    };
    if let Ok(DeviceTopic::Jobs {
        topic: JobsTopic::Request(_),
        ..
    }) = DeviceTopic::parse(&msg.topic)
    {
        let e = jobs::JobsError::new(
            jobs::JobsErrorCode::RequestThrottled,
            "Rate exceeded for this device",
        );
        reply(
            bus.as_ref(),
            &msg.client_id,
            format!("{}/rejected", msg.topic),
            jobs_mqtt::rejected_body(&e, &None),
        );
    }
}

async fn handle(state: &AppState, msg: Inbound) {
    use updraft_protocol::topics::{DeviceTopic, JobsTopic, Namespace, TopicError};
    let Some(bus) = state.data_plane.bus().cloned() else {
        return;
    };
    match DeviceTopic::parse(&msg.topic) {
        // Only the thing itself may ask (the embedded broker enforces it; this also holds
        // the line behind an external broker with a lax ACL).
        Ok(t) if t.thing() != msg.client_id => {}
        Ok(DeviceTopic::Jobs {
            topic: JobsTopic::Request(op),
            ..
        }) => jobs_mqtt::handle(state, bus.as_ref(), &msg, Ok(op)).await,
        Ok(DeviceTopic::Stream {
            stream_id,
            op,
            format,
            ..
        }) if op.is_request() => {
            streams_mqtt::handle(state, bus.as_ref(), &msg, stream_id, op, format).await
        }
        Err(TopicError::InvalidTopic {
            namespace: Namespace::Jobs,
            reason,
        }) => jobs_mqtt::handle(state, bus.as_ref(), &msg, Err(reason)).await,
        Err(TopicError::InvalidTopic {
            namespace: Namespace::Streams,
            ..
        }) => streams_mqtt::invalid_topic(bus.as_ref(), &msg),
        // Replies and notifications, and topics outside the reserved namespaces: nothing
        // to answer.
        _ => {}
    }
}

/// Sends `body` to `client` on `topic`.
pub(crate) fn reply(bus: &dyn MessageBus, client: &str, topic: String, body: Vec<u8>) {
    bus.send_to(client, topic, Bytes::from(body));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn concurrent_reads_of_one_key_share_one_read() {
        let loading: Loading<Bytes> = Loading::default();
        let reads = AtomicUsize::new(0);
        let read = || async {
            reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, String>(Bytes::from_static(b"firmware"))
        };
        let all = futures::future::join_all((0..50).map(|_| loading.run("blob", read))).await;
        assert!(all.iter().all(|r| r.as_deref() == Ok(&b"firmware"[..])));
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "one read for fifty callers"
        );
        // Once over, a read is not kept: the next call reads again.
        assert!(loading.run("blob", read).await.is_ok());
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        // Another key is another read.
        assert!(loading.run("other", read).await.is_ok());
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failed_read_is_not_shared() {
        let loading: Loading<Bytes> = Loading::default();
        let reads = AtomicUsize::new(0);
        let read = || async {
            let n = reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            if n == 0 {
                Err("disk error".to_owned())
            } else {
                Ok(Bytes::from_static(b"ok"))
            }
        };
        let (first, second) = tokio::join!(loading.run("b", read), loading.run("b", read));
        assert_eq!(first, Err("disk error".to_owned()));
        assert_eq!(
            second.as_deref(),
            Ok(&b"ok"[..]),
            "the waiting caller read again"
        );
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn after_a_failed_read_the_waiting_callers_read_at_once() {
        // Not one after another: with a store that fails slowly, the k-th caller would wait
        // k times its timeout.
        let loading: Loading<Bytes> = Loading::default();
        let (reads, in_flight, most) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let read = || async {
            let n = reads.fetch_add(1, Ordering::SeqCst);
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            if n == 0 {
                Err("store unavailable".to_owned())
            } else {
                Ok(Bytes::from_static(b"ok"))
            }
        };
        let all = futures::future::join_all((0..10).map(|_| loading.run("k", read))).await;
        assert_eq!(
            all.iter().filter(|r| r.is_err()).count(),
            1,
            "only the failed read's own caller"
        );
        assert_eq!(
            reads.load(Ordering::SeqCst),
            10,
            "each waiting caller read on its own"
        );
        assert_eq!(most.load(Ordering::SeqCst), 9, "the nine read all at once");
    }

    #[tokio::test]
    async fn an_abandoned_read_is_not_waited_on() {
        let loading: Loading<Bytes> = Loading::default();
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, String>(Bytes::from_static(b"never"))
        };
        let fast = || async { Ok::<_, String>(Bytes::from_static(b"fast")) };
        // The leader is dropped midway (its device went away) while another caller waits.
        let abandoned = tokio::time::timeout(Duration::from_millis(10), loading.run("k", slow));
        let (gone, waited) = tokio::join!(abandoned, async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            loading.run("k", fast).await
        });
        assert!(gone.is_err(), "the leader timed out");
        assert_eq!(
            waited.as_deref(),
            Ok(&b"fast"[..]),
            "the waiter read on its own"
        );
        // Nothing is left behind for later callers to wait on.
        assert!(loading.reads.lock().is_ok_and(|r| r.is_empty()));
        assert_eq!(loading.run("k", fast).await.as_deref(), Ok(&b"fast"[..]));
    }

    #[test]
    fn the_execution_cache_keeps_each_things_open_executions() {
        use updraft_protocol::ExecutionStatus;
        let plane = DataPlane::default();
        let mut a = JobExecution::queued("job-a", "t1", 1);
        a.status = ExecutionStatus::InProgress;
        a.version = 2;
        plane.remember_execution(&a);
        plane.remember_execution(&JobExecution::queued("job-b", "t1", 1));
        plane.remember_execution(&JobExecution::queued("job-a", "t2", 1));
        let version = |thing, job| plane.cached_execution(thing, job, None).map(|e| e.version);
        assert_eq!(version("t1", "job-a"), Some(2));
        assert_eq!(version("t1", "job-b"), Some(1));
        assert_eq!(version("t2", "job-a"), Some(1));
        assert_eq!(version("t2", "job-b"), None);
        assert!(
            plane.cached_execution("t1", "job-a", Some(2)).is_none(),
            "other number"
        );
        // A newer copy replaces the old; an ended execution leaves.
        a.version = 3;
        plane.remember_execution(&a);
        assert_eq!(version("t1", "job-a"), Some(3));
        a.status = ExecutionStatus::Succeeded;
        plane.remember_execution(&a);
        assert_eq!(version("t1", "job-a"), None);
        assert_eq!(version("t1", "job-b"), Some(1));
        // A thing holds a bounded number, the oldest out first.
        for i in 0..MAX_CACHED_PER_THING {
            plane.remember_execution(&JobExecution::queued(&format!("job-{i}"), "t3", 1));
        }
        plane.remember_execution(&JobExecution::queued("job-last", "t3", 1));
        assert_eq!(version("t3", "job-0"), None);
        assert_eq!(version("t3", "job-1"), Some(1));
        assert_eq!(version("t3", "job-last"), Some(1));
        plane.forget_execution("t2", "job-a");
        assert_eq!(version("t2", "job-a"), None);
        assert!(
            plane.executions.lock().is_ok_and(
                |m| !m.by_thing.contains_key("t2") && m.count == 1 + MAX_CACHED_PER_THING
            ),
            "t1's job-b and t3's eight"
        );
    }

    #[test]
    fn a_flooding_device_is_throttled_alone() {
        let mut l = RateLimiter::new(200.0);
        let t0 = Instant::now();
        let allowed = (0..1000).filter(|_| l.allow("noisy", t0)).count();
        assert_eq!(allowed, 400);
        assert!(l.allow("quiet", t0), "other devices are unaffected");
        // Tokens come back at the sustained rate.
        let later = t0 + Duration::from_millis(100);
        let refilled = (0..1000).filter(|_| l.allow("noisy", later)).count();
        assert_eq!(refilled, 20);
    }

    #[test]
    fn no_limit_lets_everything_through() {
        let mut l = RateLimiter::new(0.0);
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| l.allow("busy", t0)));
    }
}
