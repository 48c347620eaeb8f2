//! The self-test command: run against the new slot, with a deadline.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tracing::{info, warn};

/// What the command is told about the image under test (as environment variables).
pub struct Subject {
    pub slot_dir: PathBuf,
    pub image: PathBuf,
    pub version: String,
    pub job_id: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
    TimedOut,
}

/// Runs `argv` in the slot's directory with `UPDRAFT_SLOT_DIR`, `UPDRAFT_IMAGE`,
/// `UPDRAFT_VERSION` and `UPDRAFT_JOB_ID` set. Its output goes to the log line by line. Exit
/// status 0 passes; anything else, or failing to start it, fails. Past `timeout` it is
/// killed.
pub async fn run(argv: &[String], subject: &Subject, timeout: Duration) -> Verdict {
    let Some((program, args)) = argv.split_first() else {
        return Verdict::Pass;
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(&subject.slot_dir)
        .env("UPDRAFT_SLOT_DIR", &subject.slot_dir)
        .env("UPDRAFT_IMAGE", &subject.image)
        .env("UPDRAFT_VERSION", &subject.version)
        .env("UPDRAFT_JOB_ID", &subject.job_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that what it started goes with it.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Verdict::Fail(format!("cannot start {program}: {e}")),
    };
    // Whatever happens next (a verdict, a timeout, the daemon stopping and dropping this
    // future), nothing the self-test started outlives it.
    let _group = GroupGuard(child.id());
    info!(pid = child.id(), "self-test started: {}", argv.join(" "));
    let out = child
        .stdout
        .take()
        .map(|s| tokio::spawn(log_lines(s, "stdout")));
    let err = child
        .stderr
        .take()
        .map(|s| tokio::spawn(log_lines(s, "stderr")));
    let verdict = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Verdict::Pass,
        Ok(Ok(status)) => Verdict::Fail(format!("the self-test exited with {status}")),
        Ok(Err(e)) => Verdict::Fail(format!("waiting for the self-test: {e}")),
        Err(_) => {
            if let Err(e) = child.kill().await {
                warn!("killing the self-test: {e}");
            }
            Verdict::TimedOut
        }
    };
    // A grandchild may keep the pipes open: do not wait for them.
    for t in [out, err].into_iter().flatten() {
        t.abort();
    }
    verdict
}

/// Kills a process group when dropped.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let Some(pgid) = self.0 else {
            return;
        };
        // kill(1) with a negative pid signals the group (no unsafe code for kill(2)).
        let killed = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Err(e) = killed {
            warn!("cannot kill the self-test's process group {pgid}: {e}");
        }
    }
}

async fn log_lines(stream: impl AsyncRead + Unpin, which: &'static str) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        info!(target: "updraft_agent::self_test", "{which}: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject {
        Subject {
            slot_dir: std::env::temp_dir(),
            image: std::env::temp_dir().join("image"),
            version: "1.2.3".into(),
            job_id: "job-1".into(),
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn verdicts() {
        let s = subject();
        let t = Duration::from_secs(10);
        assert_eq!(run(&[], &s, t).await, Verdict::Pass);
        assert_eq!(
            run(
                &sh("test \"$UPDRAFT_VERSION\" = 1.2.3 && test \"$UPDRAFT_JOB_ID\" = job-1"),
                &s,
                t
            )
            .await,
            Verdict::Pass
        );
        assert!(matches!(run(&sh("exit 3"), &s, t).await, Verdict::Fail(m) if m.contains('3')));
        assert!(matches!(
            run(&["/nonexistent/self-test".into()], &s, t).await,
            Verdict::Fail(m) if m.contains("cannot start")
        ));
        assert_eq!(
            run(&sh("exec sleep 30"), &s, Duration::from_millis(200)).await,
            Verdict::TimedOut
        );
    }

    #[tokio::test]
    async fn what_a_self_test_started_dies_with_it() {
        let s = subject();
        let pid_file =
            std::env::temp_dir().join(format!("updraft-selftest-{}", std::process::id()));
        let script = format!("sleep 30 & echo $! > {}; sleep 30", pid_file.display());
        assert_eq!(
            run(&sh(&script), &s, Duration::from_millis(500)).await,
            Verdict::TimedOut
        );
        let pid = std::fs::read_to_string(&pid_file).expect("pid file");
        let _ = std::fs::remove_file(&pid_file);
        let stat = format!("/proc/{}/stat", pid.trim());
        // Gone, or a zombie waiting for whoever adopted it.
        let alive = |stat: &str| {
            std::fs::read_to_string(stat)
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().to_owned())
                })
                .is_some_and(|rest| !rest.starts_with('Z'))
        };
        for _ in 0..50 {
            if !alive(&stat) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "the self-test's background process {} is still running",
            pid.trim()
        );
    }
}
