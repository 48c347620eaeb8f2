//! CONTINUOUS jobs follow thing-group membership: a thing added to a targeted group (or to
//! a descendant of one) gets a QUEUED execution; a thing that leaves every target before
//! starting has its QUEUED execution REMOVED.

use updraft_protocol::job::Actor;
use updraft_protocol::{ExecutionStatus, JobStatus, ResourceKind, TargetSelection};

use crate::clock::now_ms;
use crate::error::ApiResult;
use crate::server::AppState;
use crate::store::{Job, JobExecution, JobFilter, PageRequest};

/// `group` and its ancestors, nearest first.
async fn group_chain(state: &AppState, group: &str) -> ApiResult<Vec<String>> {
    let mut chain = vec![group.to_owned()];
    let mut next = state
        .store
        .get_thing_group(group)
        .await?
        .and_then(|g| g.parent);
    while let Some(p) = next {
        if chain.contains(&p) || chain.len() > 16 {
            break;
        }
        next = state
            .store
            .get_thing_group(&p)
            .await?
            .and_then(|g| g.parent);
        chain.push(p);
    }
    Ok(chain)
}

/// The CONTINUOUS, IN_PROGRESS jobs that target `group` or one of its ancestors.
async fn continuous_jobs(state: &AppState, group: &str) -> ApiResult<Vec<Job>> {
    let mut jobs: Vec<Job> = Vec::new();
    for g in group_chain(state, group).await? {
        let filter = JobFilter {
            status: Some(JobStatus::InProgress),
            target_selection: Some(TargetSelection::Continuous),
            target: Some(state.arn(ResourceKind::ThingGroup, &g)),
            namespace_id: None,
        };
        let mut page = PageRequest {
            after: None,
            limit: 250,
        };
        loop {
            let p = state.store.list_jobs(&filter, &page).await?;
            for j in p.items {
                if !jobs.iter().any(|k| k.id == j.id) {
                    jobs.push(j);
                }
            }
            match p.next {
                Some(n) => page.after = Some(n),
                None => break,
            }
        }
    }
    Ok(jobs)
}

/// After `thing` joined `group`: queue it for the continuous jobs that now target it.
pub(crate) async fn thing_joined(state: &AppState, group: &str, thing: &str) -> ApiResult<()> {
    let now = now_ms();
    let mut queued = false;
    for job in continuous_jobs(state, group).await? {
        let e = JobExecution::queued(&job.id, thing, now);
        queued |= state.store.queue_execution_if_absent(&e).await?;
    }
    if queued {
        state.data_plane.thing_changed(state, thing).await;
    }
    Ok(())
}

/// After `thing` left `group`: its QUEUED executions of continuous jobs that no longer
/// target it become REMOVED.
pub(crate) async fn thing_left(state: &AppState, group: &str, thing: &str) -> ApiResult<()> {
    let thing_arn = state.arn(ResourceKind::Thing, thing);
    let mut member_of = std::collections::BTreeSet::new();
    let mut page = PageRequest {
        after: None,
        limit: 250,
    };
    loop {
        let p = state.store.list_groups_for_thing(thing, &page).await?;
        for g in p.items {
            for a in group_chain(state, &g.name).await? {
                member_of.insert(state.arn(ResourceKind::ThingGroup, &a));
            }
        }
        match p.next {
            Some(n) => page.after = Some(n),
            None => break,
        }
    }
    let mut changed = false;
    for job in continuous_jobs(state, group).await? {
        if job
            .targets
            .iter()
            .any(|t| *t == thing_arn || member_of.contains(t))
        {
            continue;
        }
        let Some(mut e) = state.store.get_execution(&job.id, thing, None).await? else {
            continue;
        };
        if e.status != ExecutionStatus::Queued {
            continue;
        }
        if let Ok(s) = e
            .status
            .transition(ExecutionStatus::Removed, Actor::Service)
        {
            e.status = s;
            e.updated_ms = now_ms();
            e.version += 1;
            state.store.update_execution(&e).await?;
            changed = true;
        }
    }
    if changed {
        state.data_plane.thing_changed(state, thing).await;
    }
    Ok(())
}
