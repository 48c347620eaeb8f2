//! The `updraft-agent` daemon end to end: the real server in-process, the built binary run
//! as a child process against an install directory, restarted the way systemd's `Restart=`
//! does whenever it exits with status 75 (an activation or a rollback).

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use updraft_agent::AppVersion;
use updraft_agent::pal::linux::{self, Slot, SlotImageState};
use updraft_protocol::{ExecutionStatus, ResourceKind};
use updraft_server::clock::now_ms;
use updraft_server::store::{Certificate, JobExecution};

use support::{CERT, Env, Update, WAIT, details, env, firmware};

const OLD: AppVersion = AppVersion::new(1, 0, 0);
const NEW: AppVersion = AppVersion::new(1, 1, 0);
const BLOCK: u32 = 1024;
const PER_REQUEST: u32 = 4;
const RESTART: i32 = 75;

fn daemon_bin() -> PathBuf {
    std::env::var_os("UPDRAFT_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_updraft-agent")))
}

/// How a device is set up.
struct Setup {
    tls: bool,
    self_test: Vec<String>,
    self_test_timeout: u64,
    log_level: &'static str,
    block_size: u32,
    per_request: u32,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            tls: false,
            self_test: Vec::new(),
            self_test_timeout: 20,
            log_level: "debug",
            block_size: BLOCK,
            per_request: PER_REQUEST,
        }
    }
}

/// A device: its configuration file, install directory (slot a holds the factory image
/// of version OLD) and log file.
struct Device {
    config: PathBuf,
    install: PathBuf,
    log: PathBuf,
    /// Starts so far (each writes its stdout and stderr to its own file).
    starts: u32,
    factory: Vec<u8>,
    /// Extra arguments of `run`.
    args: Vec<&'static str>,
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

impl Env {
    /// Issues a device certificate for `thing` (as CreateKeysAndCertificate does) and
    /// attaches it; returns (certificate, key) files.
    async fn device_certificate(&self, thing: &str, dir: &Path) -> (PathBuf, PathBuf) {
        let issued = self
            .state
            .device_ca
            .issue_device("Updraft device")
            .expect("issue");
        let now = now_ms();
        self.state
            .store
            .create_certificate(&Certificate {
                id: issued.id.clone(),
                status: "ACTIVE".into(),
                pem: issued.certificate_pem.clone(),
                not_before_ms: issued.not_before_ms,
                not_after_ms: issued.not_after_ms,
                created_ms: now,
                updated_ms: now,
            })
            .await
            .expect("certificate");
        self.state
            .store
            .attach_principal(
                thing,
                &self.state.arn(ResourceKind::Cert, &issued.id),
                false,
            )
            .await
            .expect("attach");
        let (cert, key) = (dir.join("device.pem"), dir.join("device.key"));
        fs::write(&cert, issued.certificate_pem).expect("cert file");
        fs::write(&key, issued.private_key_pem).expect("key file");
        (cert, key)
    }

    async fn device(&self, thing: &str, setup: Setup) -> Device {
        let dir = self.dir.0.join(thing);
        let install = dir.join("install");
        fs::create_dir_all(install.join("slots/a")).expect("install dir");
        let factory = firmware(OLD, 5_000, 99);
        fs::write(install.join("slots/a/image"), &factory).expect("factory image");
        let signer = dir.join("signer.pem");
        fs::write(&signer, &self.signer_pem).expect("signer");
        let broker = if setup.tls {
            let (cert, key) = self.device_certificate(thing, &dir).await;
            format!(
                "host = \"localhost\"\nport = {}\nca = {}\ncert = {}\nkey = {}\n",
                self.tls_port,
                toml_str(&self.dir.0.join("server/ca.pem")),
                toml_str(&cert),
                toml_str(&key)
            )
        } else {
            format!("host = \"127.0.0.1\"\nport = {}\nplain = true\n", self.port)
        };
        let log = dir.join("agent.log");
        let command: Vec<String> = setup.self_test.iter().map(|a| format!("{a:?}")).collect();
        let config = format!(
            r#"thing_name = "{thing}"
install_dir = {install}
log_file = {log}
log_level = "{level}"

[broker]
{broker}
[signers]
"{CERT}" = {signer}

[self_test]
command = [{command}]
timeout_secs = {timeout}

[download]
block_size = {block}
blocks_per_request = {per}
request_wait_secs = 2

[version]
source = "header"
"#,
            install = toml_str(&install),
            log = toml_str(&log),
            level = setup.log_level,
            signer = toml_str(&signer),
            command = command.join(", "),
            timeout = setup.self_test_timeout,
            block = setup.block_size,
            per = setup.per_request,
        );
        let config_path = dir.join("agent.toml");
        fs::write(&config_path, config).expect("config");
        Device {
            config: config_path,
            install,
            log,
            starts: 0,
            factory,
            args: Vec::new(),
        }
    }
}

impl Device {
    fn start(&mut self) -> Child {
        self.starts += 1;
        let out = self
            .install
            .with_file_name(format!("console-{}.txt", self.starts));
        let out = fs::File::create(out).expect("console file");
        Command::new(daemon_bin())
            .args(["run", "--stderr", "--config"])
            .arg(&self.config)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("console"))
            .stderr(out)
            .spawn()
            .expect("start the daemon")
    }

    /// The image `current` points at.
    fn current_image(&self) -> Vec<u8> {
        fs::read(self.install.join("current/image")).expect("the current image")
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn state(&self) -> linux::SlotState {
        linux::read_state(&self.install)
            .expect("state")
            .expect("a state file")
    }

    /// The daemon under a supervisor like systemd: started again whenever it exits with
    /// 75, until `done` holds for the execution and the exit statuses so far. Returns the
    /// running daemon (if any) and the exit statuses.
    async fn supervise(
        &mut self,
        env: &Env,
        u: &Update,
        done: impl Fn(&JobExecution, &[i32]) -> bool,
    ) -> (Option<Child>, Vec<i32>) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut exits = Vec::new();
        let mut child = Some(self.start());
        loop {
            let e = env.execution(u).await;
            if done(&e, &exits) {
                return (child, exits);
            }
            if let Some(c) = child.as_mut()
                && let Some(status) = c.try_wait().expect("wait")
            {
                let code = status.code().unwrap_or(-1);
                exits.push(code);
                child = (code == RESTART).then(|| self.start());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out: execution {:?} {:?}, exits {exits:?}\n{}",
                e.status,
                e.status_details,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Device {
    /// SIGTERM, once the last start handles signals; then the exit status.
    async fn terminate(&self, mut child: Child) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        while (self.log_text().matches(" starting ").count() as u32) < self.starts {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon never started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        child.wait().expect("wait")
    }
}

fn kill9(mut child: Child) {
    child.kill().expect("kill -9");
    child.wait().expect("wait");
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

// ---- the tests ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_over_mutual_tls_installs_self_tests_and_commits() {
    let env = env("daemon-ok").await;
    let image = firmware(NEW, 150_001, 1);
    let u = env.create("dev-ok", env.spec(&image)).await;
    let mut dev = env
        .device(
            &u.thing,
            Setup {
                tls: true,
                // Checks the slot it is given: the image there carries the new version.
                self_test: sh(
                    "test \"$UPDRAFT_VERSION\" = 1.1.0 && test -s \"$UPDRAFT_IMAGE\" \
                     && test \"$(basename \"$PWD\")\" = b && echo self-test ok",
                ),
                ..Setup::default()
            },
        )
        .await;
    let (child, exits) = dev.supervise(&env, &u, |e, _| e.status.is_terminal()).await;
    let e = env.execution(&u).await;
    let log = dev.log_text();
    assert_eq!(e.status, ExecutionStatus::Succeeded, "{log}");
    assert_eq!(
        details(&e),
        BTreeMap::from([("reason", "accepted  v1.1.0"), ("updatedBy", "  v1.0.0")])
    );
    assert_eq!(exits, [RESTART], "one restart, into the new image");
    assert_eq!(linux::current_slot(&dev.install), Some(Slot::B));
    assert_eq!(dev.current_image(), image);
    assert_eq!(
        fs::read(dev.install.join("slots/a/image")).expect("old"),
        dev.factory,
        "the old slot is untouched"
    );
    let s = dev.state();
    assert_eq!(
        (s.active, s.image_state, s.previous),
        (Slot::B, SlotImageState::Accepted, None)
    );
    assert!(log.contains("MQTT over mutual TLS"), "{log}");
    assert!(
        log.contains("updraft_agent::self_test: stdout: self-test ok"),
        "the command's output is logged: {log}"
    );
    assert!(log.contains("self-test passed: committing"), "{log}");
    assert!(log.contains("image committed"), "{log}");
    assert!(!dev.install.join("resume.json").exists());

    let status = Command::new(daemon_bin())
        .args(["status", "--config"])
        .arg(&dev.config)
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("active slot:  b (current -> slots/b)"),
        "{text}"
    );
    assert!(text.contains("version:      1.1.0"), "{text}");
    assert!(text.contains("daemon:       running"), "{text}");

    let child = child.expect("the daemon runs on");
    assert_eq!(
        dev.terminate(child).await.code(),
        Some(0),
        "SIGTERM stops it cleanly"
    );
    assert!(dev.log_text().contains("SIGTERM: stopping"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_exec_reexecutes_in_place_without_a_supervisor() {
    let env = env("daemon-exec").await;
    let image = firmware(NEW, 30_000, 5);
    let u = env.create("dev-exec", env.spec(&image)).await;
    let mut dev = env.device(&u.thing, Setup::default()).await;
    dev.args = vec!["--restart", "exec"];
    let (child, exits) = dev.supervise(&env, &u, |e, _| e.status.is_terminal()).await;
    let log = dev.log_text();
    assert_eq!(
        env.execution(&u).await.status,
        ExecutionStatus::Succeeded,
        "{log}"
    );
    assert!(exits.is_empty(), "the process never exited: {exits:?}");
    assert!(log.contains("restarting: re-executing"), "{log}");
    assert_eq!(log.matches(" starting ").count(), 2, "{log}");
    assert_eq!(dev.current_image(), image);
    // Still the process the test started (exec keeps the pid), now holding the lock again.
    let child = child.expect("running");
    let lock = fs::read_to_string(dev.install.join(linux::LOCK_FILE)).expect("lock");
    assert_eq!(lock, child.id().to_string());
    assert_eq!(dev.terminate(child).await.code(), Some(0));
}

/// Runs a device whose self-test fails in `setup`'s way, until the job ended and the
/// daemon runs the old image again. Returns the log.
async fn expect_rollback(env: &Env, name: &str, setup: Setup, reason: &str) -> String {
    let image = firmware(NEW, 40_000, 2);
    let u = env.create(name, env.spec(&image)).await;
    let mut dev = env.device(&u.thing, setup).await;
    let install = dev.install.clone();
    let (child, exits) = dev
        .supervise(env, &u, |e, exits| {
            e.status.is_terminal()
                && exits.len() == 2
                && linux::read_state(&install)
                    .ok()
                    .flatten()
                    .is_some_and(|s| s.active == Slot::A)
        })
        .await;
    let log = dev.log_text();
    let e = env.execution(&u).await;
    assert_eq!(e.status, ExecutionStatus::Failed, "{name}: {log}");
    assert_eq!(details(&e), BTreeMap::from([("reason", reason)]), "{name}");
    assert_eq!(
        exits,
        [RESTART, RESTART],
        "{name}: activation, then rollback"
    );
    assert_eq!(linux::current_slot(&dev.install), Some(Slot::A), "{name}");
    assert_eq!(
        dev.current_image(),
        dev.factory,
        "{name}: the old image runs again"
    );
    let s = dev.state();
    assert_eq!(
        (s.image_state, s.previous, s.rolled_back_from),
        (SlotImageState::Accepted, None, Some(Slot::B)),
        "{name}"
    );
    assert!(
        log.contains("rolled back from slot b to slot a"),
        "{name}: {log}"
    );
    // Back on the old image, the daemon runs on (and reports its version as 1.0.0).
    let child = child.expect("running");
    assert_eq!(dev.terminate(child).await.code(), Some(0), "{name}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_test_failure_and_timeout_roll_back() {
    let env = env("daemon-rollback").await;
    let failing = Setup {
        self_test: sh("echo 'health check: service does not answer' >&2; exit 7"),
        ..Setup::default()
    };
    let hanging = Setup {
        self_test: sh("exec sleep 60"),
        self_test_timeout: 3,
        ..Setup::default()
    };
    let (fail_log, timeout_log) = tokio::join!(
        // The application's rejection: FAILED with the C agent's `rejected` reason.
        expect_rollback(&env, "dev-fail", failing, "rejected: 0x00000000"),
        // No verdict in time: the command is killed, the agent's self-test timer resets into
        // the old image, which finds the job still in self-test and reports it FAILED
        // (ImageStateMismatch).
        expect_rollback(&env, "dev-hang", hanging, "rejected: 0x00000011"),
    );
    assert!(
        fail_log.contains("exited with exit status: 7"),
        "{fail_log}"
    );
    assert!(fail_log.contains("service does not answer"), "{fail_log}");
    assert!(
        timeout_log.contains("the self-test did not finish within 3s: resetting to roll back"),
        "{timeout_log}"
    );
    // The hanging command was killed with the image it tested.
    let pid = timeout_log
        .lines()
        .find(|l| l.contains("self-test started"))
        .and_then(|l| l.rsplit("pid=").next())
        .and_then(|p| p.trim().parse::<u32>().ok())
        .expect("the self-test's pid");
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    assert!(
        matches!(state, None | Some("Z")),
        "the self-test command (pid {pid}) still runs: {stat}"
    );
}

/// The blocks the PAL wrote, in order, from the daemon's trace log.
fn blocks_written(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("block written"))
        .filter_map(|l| {
            let rest = &l[l.find(" block=")? + 7..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_25_50_75_percent_resumes_and_refetches_at_most_one_request_per_kill() {
    let env = env("daemon-kill").await;
    let image = firmware(NEW, 400_000, 3);
    let blocks = image.len().div_ceil(BLOCK as usize) as u64;
    let u = env.create("dev-kill", env.spec(&image)).await;
    let mut dev = env
        .device(
            &u.thing,
            Setup {
                log_level: "trace",
                ..Setup::default()
            },
        )
        .await;
    let mut kills = 0;
    for percent in [25, 50, 75] {
        let child = dev.start();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let written = blocks_written(&dev.log_text());
            let distinct: std::collections::BTreeSet<_> = written.iter().collect();
            if distinct.len() as u64 * 100 >= blocks * percent {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "stalled before {percent}%"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        kill9(child);
        kills += 1;
        let distinct: std::collections::BTreeSet<_> =
            blocks_written(&dev.log_text()).into_iter().collect();
        assert!(
            (distinct.len() as u64) < blocks,
            "killed at {percent}% but the download had finished"
        );
    }
    // The last life completes the download, activates, and the new image commits.
    let (child, exits) = dev.supervise(&env, &u, |e, _| e.status.is_terminal()).await;
    let log = dev.log_text();
    assert_eq!(
        env.execution(&u).await.status,
        ExecutionStatus::Succeeded,
        "{log}"
    );
    assert_eq!(exits, [RESTART]);
    assert_eq!(dev.current_image(), image);
    let written = blocks_written(&log);
    let distinct: std::collections::BTreeSet<_> = written.iter().copied().collect();
    let twice = written.len() as u64 - distinct.len() as u64;
    eprintln!(
        "daemon resume: {blocks} blocks, {kills} kills, {} writes, {twice} blocks fetched twice",
        written.len()
    );
    assert_eq!(distinct.len() as u64, blocks, "every block written");
    assert!(
        twice <= kills * u64::from(PER_REQUEST),
        "{twice} blocks fetched twice: more than one request ({PER_REQUEST}) per kill"
    );
    assert_eq!(
        log.matches("resuming: ").count(),
        3,
        "each restart resumed instead of starting over"
    );
    dev.terminate(child.expect("running")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_install_dir_refuses_to_start() {
    let env = env("daemon-lock").await;
    let mut dev = env.device("dev-lock", Setup::default()).await;
    let first = dev.start();
    let lock = dev.install.join(linux::LOCK_FILE);
    let deadline = tokio::time::Instant::now() + WAIT;
    // Locked, and handling signals.
    while fs::read_to_string(&lock).unwrap_or_default() != first.id().to_string()
        || !dev.log_text().contains("starting")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first never locked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = Command::new(daemon_bin())
        .args(["run", "--stderr", "--config"])
        .arg(&dev.config)
        .output()
        .expect("second");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another updraft-agent (pid {}) holds the lock {}",
            first.id(),
            lock.display()
        )),
        "{stderr}"
    );
    assert_eq!(dev.terminate(first).await.code(), Some(0));
    assert_eq!(
        dev.state().active,
        Slot::A,
        "the first instance's state is intact"
    );
}

/// Peak RSS of the daemon downloading a 4 MiB image over mutual TLS (VmHWM), for the
/// footprint figures.
/// Run with the release binary:
/// `UPDRAFT_AGENT_BIN=target/release/updraft-agent cargo test -p updraft-agent --test daemon -- --ignored --nocapture footprint`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints the daemon's peak RSS"]
async fn footprint() {
    let env = env("daemon-rss").await;
    let image = firmware(NEW, 4 * 1024 * 1024, 4);
    let u = env.create("dev-rss", env.spec(&image)).await;
    let mut dev = env
        .device(
            &u.thing,
            Setup {
                tls: true,
                log_level: "info",
                block_size: 4096,
                per_request: 8,
                ..Setup::default()
            },
        )
        .await;
    let mut child = dev.start();
    let status = format!("/proc/{}/status", child.id());
    let (mut hwm, mut rss) = (String::new(), String::new());
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if let Ok(s) = fs::read_to_string(&status) {
            for l in s.lines() {
                if l.starts_with("VmHWM:") {
                    hwm = l.to_owned();
                } else if l.starts_with("VmRSS:") {
                    rss = l.to_owned();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "footprint: {} downloading {} bytes in {:?}: {hwm}, last {rss}",
        daemon_bin().display(),
        image.len(),
        started.elapsed()
    );
    assert_eq!(dev.current_image(), image);
}
