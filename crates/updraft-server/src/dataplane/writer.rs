//! Group commit for device execution updates.
//!
//! Every device update is a small write transaction; on SQLite the commits, not the
//! statements, are what is serialized. The writer collects the updates that arrive while
//! the previous batch is being written and commits them together, so the cost of a commit
//! is shared by every device waiting on it. Each caller still waits for its own write to
//! be committed before it answers the device.

use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

use crate::store::{JobExecution, Store, StoreError, StoreResult};

/// The most updates committed together.
const MAX_BATCH: usize = 256;

type Request = (JobExecution, oneshot::Sender<StoreResult<bool>>);

#[derive(Clone)]
pub struct ExecutionWriter {
    tx: mpsc::Sender<Request>,
}

impl ExecutionWriter {
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(store, rx));
        ExecutionWriter { tx }
    }

    /// Writes `e` if its stored version is `e.version - 1`: `Ok(false)` on a conflict.
    pub async fn write(&self, e: JobExecution) -> StoreResult<bool> {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send((e, done_tx)).await.is_err() {
            return Err(StoreError::Invalid("the server is shutting down".into()));
        }
        done_rx
            .await
            .unwrap_or_else(|_| Err(StoreError::Invalid("the server is shutting down".into())))
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Request>) {
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let executions: Vec<JobExecution> = batch.iter().map(|(e, _)| e.clone()).collect();
        match store.update_executions(&executions).await {
            Ok(written) => {
                for ((_, done), ok) in batch.drain(..).zip(written) {
                    let _ = done.send(Ok(ok));
                }
            }
            Err(e) => {
                // Write them one by one, so each caller gets its own outcome.
                tracing::warn!(error = %e, size = batch.len(), "group commit failed; writing singly");
                for (ex, done) in batch.drain(..) {
                    let r = match store.update_execution(&ex).await {
                        Ok(()) => Ok(true),
                        Err(StoreError::VersionConflict(_)) => Ok(false),
                        Err(e) => Err(e),
                    };
                    let _ = done.send(r);
                }
            }
        }
    }
}
