//! `notify` and `notify-next`: what a device hears when its pending executions change.
//!
//! `notify` carries the pending list (IN_PROGRESS first, then QUEUED; at most 10).
//! A device's own write that ended an execution hands over the list its transaction left;
//! other changes read it.
//! `notify-next` is sent only when the head of that list changes, with the new head's
//! execution and document, or just a timestamp when nothing is pending any more.

use bytes::Bytes;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Mutex;
use updraft_protocol::ExecutionStatus;

use super::jobs_mqtt::{execution_json, summary_json};
use crate::clock::now_ms;
use crate::mqtt::MessageBus;
use crate::server::AppState;
use crate::store::{ENDED_PENDING_LIMIT, JobExecution};

/// How many of `thing`'s pending executions its notifications need: the `notify` list's
/// ten when anybody listens to it, else the head. The head is read even when nobody
/// listens to `notify-next`: it is sent only when the head changes, so a device that
/// subscribes later must hear the next change from the head as it then was, not the
/// head it already knows (a FreeRTOS agent would restart the job it is running).
pub(super) fn wanted(bus: &dyn MessageBus, thing: &str) -> usize {
    if bus.has_subscribers(&notify_topic(thing)) {
        ENDED_PENDING_LIMIT
    } else {
        1
    }
}

/// Reads `thing`'s pending list and announces it (when anybody listens).
pub(super) async fn announce(
    state: &AppState,
    bus: &dyn MessageBus,
    heads: &Mutex<HashMap<String, Option<(String, i64)>>>,
    thing: &str,
) {
    match state
        .store
        .pending_executions(thing, wanted(bus, thing))
        .await
    {
        Ok(pending) => publish(state, bus, heads, thing, &pending).await,
        Err(e) => tracing::warn!(thing, error = %e, "cannot compute notifications"),
    }
}

fn notify_topic(thing: &str) -> String {
    format!("$aws/things/{thing}/jobs/notify")
}

fn notify_next_topic(thing: &str) -> String {
    format!("$aws/things/{thing}/jobs/notify-next")
}

/// Announces `pending`, `thing`'s pending list as just read (at least as long as
/// [`wanted`] asked).
pub(super) async fn publish(
    state: &AppState,
    bus: &dyn MessageBus,
    heads: &Mutex<HashMap<String, Option<(String, i64)>>>,
    thing: &str,
    pending: &[JobExecution],
) {
    // A message nobody subscribed to is not built (the head is still tracked, so what a
    // device hears after it subscribes is the same either way).
    let timestamp = now_ms() / 1000;
    let notify = notify_topic(thing);
    if bus.has_subscribers(&notify) {
        let mut jobs = Map::new();
        for status in [ExecutionStatus::InProgress, ExecutionStatus::Queued] {
            let list: Vec<Value> = pending
                .iter()
                .filter(|e| e.status == status)
                .map(summary_json)
                .collect();
            if !list.is_empty() {
                jobs.insert(status.as_str().to_owned(), Value::Array(list));
            }
        }
        let body = json!({ "timestamp": timestamp, "jobs": jobs });
        bus.publish(notify, Bytes::from(body.to_string()));
    }

    let next = notify_next_topic(thing);
    let head = pending
        .first()
        .map(|e| (e.job_id.clone(), e.execution_number));
    let changed = match heads.lock() {
        Ok(mut h) => {
            let previous = h.insert(thing.to_owned(), head.clone());
            previous.is_none_or(|p| p != head)
        }
        Err(_) => true,
    };
    if !changed || !bus.has_subscribers(&next) {
        return;
    }
    let body = match pending.first() {
        Some(e) => {
            let document = match state.data_plane.job_of(state, e).await {
                Ok(Some(job)) => state.data_plane.substitute_presigned_urls(&job).await,
                _ => return,
            };
            json!({ "timestamp": timestamp, "execution": execution_json(e, Some(&document)) })
        }
        None => json!({ "timestamp": timestamp }),
    };
    bus.publish(next, Bytes::from(body.to_string()));
}
