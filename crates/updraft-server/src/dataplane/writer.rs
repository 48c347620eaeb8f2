//! Group commit for devices' writes (execution updates and StartNext), for stores that do
//! not group-commit them themselves (`JobStore::group_commits`: PostgreSQL; SQLite does it
//! on its device-write connection's thread, `store/sql/sqlite_devices.rs`).
//!
//! Every device write is a small transaction, and each is a round trip (or several) to the
//! database. One writer (on a thread of its own: see [`DeviceWriter::spawn`]) takes the
//! writes that arrive while the previous batch is being committed and commits them
//! together, so a commit's cost and round trips are shared by every device waiting on it
//! and device writes never contend for row locks among themselves. Each caller still waits
//! for its own write to be committed before it answers the device.

use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

use crate::store::{DeviceWrite, DeviceWriteOutcome, Store, StoreError, StoreResult};

/// The most writes committed together.
const MAX_BATCH: usize = 256;

type Request = (
    DeviceWrite,
    oneshot::Sender<StoreResult<DeviceWriteOutcome>>,
);

#[derive(Clone)]
pub struct DeviceWriter {
    tx: mpsc::Sender<Request>,
}

fn shutting_down() -> StoreError {
    StoreError::Invalid("the server is shutting down".into())
}

impl DeviceWriter {
    /// Starts the writer on a thread of its own. It is the one stage every device write
    /// passes in turn (batch after batch), and wakes once per batch and per answer of the
    /// database: as a task among the server's others, each wake-up waited behind every
    /// task ready at that moment (broker connections, handlers), and the database stood
    /// idle meanwhile.
    pub fn spawn(store: Arc<dyn Store>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("updraft-writer".into())
            .spawn(move || runtime.block_on(run(store, rx)))?;
        Ok(DeviceWriter { tx })
    }

    /// Applies `w` in the next batch and returns its outcome.
    pub async fn write(&self, w: DeviceWrite) -> StoreResult<DeviceWriteOutcome> {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send((w, done_tx)).await.is_err() {
            return Err(shutting_down());
        }
        done_rx.await.unwrap_or_else(|_| Err(shutting_down()))
    }
}

type Waiting = Vec<oneshot::Sender<StoreResult<DeviceWriteOutcome>>>;

/// Answers each waiting caller with its outcome.
fn deliver(waiting: Waiting, outcomes: Vec<DeviceWriteOutcome>) {
    for (done, outcome) in waiting.into_iter().zip(outcomes) {
        let _ = done.send(Ok(outcome));
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Request>) {
    let mut writes: Vec<DeviceWrite> = Vec::with_capacity(MAX_BATCH);
    let mut waiting: Waiting = Vec::with_capacity(MAX_BATCH);
    // The previous batch's outcomes, not yet delivered: see below.
    let mut committed: Option<(Waiting, Vec<DeviceWriteOutcome>)> = None;
    loop {
        if committed.is_none() {
            // Nothing to deliver: wait for a write.
            let Some((w, done)) = rx.recv().await else {
                return;
            };
            writes.push(w);
            waiting.push(done);
        }
        while writes.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((w, done)) => {
                    writes.push(w);
                    waiting.push(done);
                }
                Err(_) => break,
            }
        }
        if writes.is_empty() {
            if let Some((w, o)) = committed.take() {
                deliver(w, o);
            }
            continue;
        }
        // The next batch is handed to the database first, and the previous one's callers
        // are answered while it runs: waking them is the writer's biggest chore, and the
        // database would otherwise stand idle meanwhile. (Their next writes cannot be in
        // this batch: they have not been answered yet.)
        let result = {
            let batch = store.device_writes(&writes);
            tokio::pin!(batch);
            // One poll sends it (it is polled again, with this task's waker, below).
            let early = futures::FutureExt::now_or_never(batch.as_mut());
            if let Some((w, o)) = committed.take() {
                deliver(w, o);
            }
            match early {
                Some(r) => r,
                None => batch.await,
            }
        };
        match result {
            Ok(outcomes) => {
                let spare = Vec::with_capacity(MAX_BATCH);
                committed = Some((std::mem::replace(&mut waiting, spare), outcomes));
                writes.clear();
            }
            Err(e) => {
                // Apply them one by one, so each caller gets its own outcome.
                tracing::warn!(error = %e, size = writes.len(), "group commit failed; writing singly");
                for (w, done) in writes.drain(..).zip(waiting.drain(..)) {
                    let _ = done.send(store.device_write(w).await);
                }
            }
        }
    }
}
