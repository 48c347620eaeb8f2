//! `updraft-agent`: the Updraft OTA agent as a Linux daemon. The agent library over one MQTT
//! connection (mutual TLS, or plain on loopback for development), A/B slots in an install
//! directory ([`updraft_agent::pal::linux::LinuxPal`]), a self-test command, logs to a file
//! and the journal. See the crate README's "Daemon" section.
//!
//! A "reboot" (activation of a new image, or a reset that rolls one back) is a restart of
//! the daemon: it exits with [`EXIT_RESTART`] for systemd to start it again
//! (`RestartForceExitStatus=75` in the shipped unit), or with `--restart exec` re-executes
//! itself in place.

mod bridge;
mod config;
mod logging;
mod selftest;

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, MqttOptions, Transport};
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use updraft_agent::mqtt::run_event_loop;
use updraft_agent::pal::linux::{self, LinuxPal, LinuxPalError, Restart};
use updraft_agent::status::CustomJobStatus;
use updraft_agent::{AgentHandle, FileResumeStore, ImageState, JobEvent, ResumeStore, init};

use crate::config::{Config, Transport as BrokerTransport};
use crate::selftest::Verdict;

/// Exit status asking the service manager to start the daemon again: a new image was
/// activated, or an image on trial was rolled back.
const EXIT_RESTART: u8 = 75;
/// Exit status when another instance holds the install directory.
const EXIT_LOCKED: u8 = 3;
const EXIT_USAGE: u8 = 2;

/// How long after the self-test deadline the command is killed if the agent has not yet
/// acted on its own timer (which resets into the old image, killing the command).
const SELF_TEST_GRACE: Duration = Duration::from_secs(2);

/// The resume checkpoint, in the install directory.
const RESUME_FILE: &str = "resume.json";
/// The private socket rumqttc reaches the TLS bridge through.
const BRIDGE_SOCKET: &str = "run/broker.sock";

const HELP: &str = "\
updraft-agent: the Updraft OTA agent daemon (A/B slots, self-test, rollback)

Usage:
  updraft-agent run --config <FILE> [--stderr] [--restart exit|exec]
  updraft-agent status --config <FILE>
  updraft-agent --help | --version

Commands:
  run      Connect to the broker, take OTA jobs, download into the inactive slot, verify,
           activate, run the self-test, and commit or roll back.
  status   Print the install directory's slots and state (read-only).

Options:
  --config <FILE>   The configuration (TOML); see packaging/updraft-agent.toml.
  --stderr          Log to stderr instead of the systemd journal (the log file, if
                    configured, is written either way).
  --restart <MODE>  How activation or rollback restarts the daemon:
                      exit  exit with status 75 for systemd (Restart=) to start it again
                            (default)
                      exec  re-execute this program in place
  -h, --help        This text.
  -V, --version     The version.

Exit status: 0 stopped (SIGTERM/SIGINT), 75 restart requested, 3 another instance holds the
install directory, 2 usage error, 1 other errors.
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestartMode {
    Exit,
    Exec,
}

#[derive(Debug)]
enum Command {
    Run {
        config: PathBuf,
        stderr: bool,
        restart: RestartMode,
    },
    Status {
        config: PathBuf,
    },
    Help,
    Version,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command> {
    let mut args = args.into_iter();
    let Some(cmd) = args.next() else {
        bail!("no command");
    };
    let cmd = cmd.to_string_lossy().into_owned();
    match cmd.as_str() {
        "-h" | "--help" | "help" => return Ok(Command::Help),
        "-V" | "--version" => return Ok(Command::Version),
        "run" | "status" => {}
        other => bail!("unknown command '{other}'"),
    }
    let (mut config, mut stderr, mut restart) = (None, false, RestartMode::Exit);
    while let Some(a) = args.next() {
        let a = a.to_string_lossy().into_owned();
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (a.clone(), None),
        };
        let mut value = |name: &str| -> Result<OsString> {
            match &inline {
                Some(v) => Ok(v.into()),
                None => args.next().with_context(|| format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "--config" | "-c" => config = Some(PathBuf::from(value("--config")?)),
            "--stderr" if cmd == "run" => stderr = true,
            "--restart" if cmd == "run" => {
                restart = match value("--restart")?.to_str() {
                    Some("exit") => RestartMode::Exit,
                    Some("exec") => RestartMode::Exec,
                    _ => bail!("--restart is exit or exec"),
                }
            }
            "-h" | "--help" => return Ok(Command::Help),
            _ => bail!("unknown option '{a}' for {cmd}"),
        }
    }
    let config = config.context("--config <FILE> is required")?;
    Ok(if cmd == "run" {
        Command::Run {
            config,
            stderr,
            restart,
        }
    } else {
        Command::Status { config }
    })
}

fn main() -> ExitCode {
    let cmd = match parse_args(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("updraft-agent: {e:#}\n\n{HELP}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = match cmd {
        Command::Help => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("updraft-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Status { config } => status(&config),
        Command::Run {
            config,
            stderr,
            restart,
        } => start(&config, stderr, restart),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("updraft-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `run`: configuration, logging, the install directory's lock, then the daemon proper.
fn start(path: &Path, stderr: bool, mode: RestartMode) -> Result<ExitCode> {
    let cfg = Config::load(path)?;
    let console = if stderr {
        logging::Console::Stderr
    } else {
        logging::Console::Auto
    };
    logging::init(&cfg.log_level, cfg.log_file.as_deref(), console)?;
    // Everything that can be wrong with the configuration is found before the install
    // directory is opened: opening it counts a new image's one trial boot, which a missing
    // certificate file must not use up.
    cfg.load_signers()?;
    if let BrokerTransport::Tls { ca, cert, key, .. } = cfg.transport()? {
        bridge::client_config(&ca, &cert, &key)?;
    }
    let pal = match LinuxPal::open(&cfg.install_dir, cfg.pal_options()?) {
        Ok(p) => p,
        Err(e @ LinuxPalError::Locked { .. }) => {
            error!("{e}: not starting a second instance");
            eprintln!("updraft-agent: {e}: not starting a second instance");
            return Ok(ExitCode::from(EXIT_LOCKED));
        }
        Err(e) => return Err(e).context("opening the install directory"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let restart = runtime.block_on(run(&cfg, pal))?;
    drop(runtime);
    let Some(why) = restart else {
        info!("stopped");
        return Ok(ExitCode::SUCCESS);
    };
    match mode {
        RestartMode::Exit => {
            info!(?why, "restarting: exiting with status {EXIT_RESTART}");
            Ok(ExitCode::from(EXIT_RESTART))
        }
        RestartMode::Exec => {
            use std::os::unix::process::CommandExt;
            info!(?why, "restarting: re-executing");
            let exe = std::env::current_exe().context("finding this program")?;
            let e = std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .exec();
            Err(e).context("re-executing")
        }
    }
}

/// The daemon: the agent, its MQTT connection, and the application's side of the agent
/// (activation, self-test) until the agent stops. Returns the restart the PAL asked for.
async fn run(cfg: &Config, pal: LinuxPal) -> Result<Option<Restart>> {
    let started = Instant::now();
    // First, so that a stop request from now on is handled (checkpoint, clean exit).
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let version = pal.running_version()?;
    let state = pal.state().clone();
    let slot = state.active;
    let slot_dir = pal.slot_dir(slot);
    let image = pal.image_path(slot);
    let restart = pal.restart_signal();
    info!(
        thing = %cfg.thing_name,
        version = %version,
        slot = slot.name(),
        image_state = ?state.image_state,
        install_dir = %cfg.install_dir.display(),
        "updraft-agent {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let agent_config = cfg.agent_config(version)?;
    let certs = cfg.load_signers()?;
    let mut opts = match cfg.transport()? {
        BrokerTransport::Plain => {
            warn!(
                "plain MQTT to {}:{} (development only)",
                cfg.broker.host, cfg.broker.port
            );
            MqttOptions::new(&cfg.thing_name, &cfg.broker.host, cfg.broker.port)
        }
        BrokerTransport::Tls {
            ca,
            cert,
            key,
            server_name,
        } => {
            let socket = bridge::start(
                &cfg.install_dir.join(BRIDGE_SOCKET),
                bridge::Target {
                    host: cfg.broker.host.clone(),
                    port: cfg.broker.port,
                    server_name,
                    config: bridge::client_config(&ca, &cert, &key)?,
                },
            )?;
            let mut o = MqttOptions::new(&cfg.thing_name, socket.to_string_lossy(), 0);
            o.set_transport(Transport::Unix);
            o
        }
    };
    opts.set_keep_alive(Duration::from_secs(cfg.broker.keep_alive_secs.max(5)));
    // One Streams answer is at most 128 KiB of blocks plus its encoding.
    opts.set_max_packet_size(192 * 1024, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    // Longer than the TLS bridge's own connect timeout: a CONNECT rumqttc gave up on must
    // never reach the broker late and take over the session of the next attempt.
    let mut network = eventloop.network_options();
    network.set_connection_timeout(bridge::CONNECT_TIMEOUT.as_secs() * 2);
    eventloop.set_network_options(network);
    let (tx, mut events) = mpsc::unbounded_channel();
    let (agent, handle) = init(
        agent_config,
        pal,
        FileResumeStore::new(cfg.install_dir.join(RESUME_FILE)),
        certs,
        client,
        move |e| {
            let _ = tx.send(e);
        },
    )?;
    let mut agent_task = tokio::spawn(agent.run());
    let mqtt_task = tokio::spawn(run_event_loop(eventloop, handle.clone(), |p| {
        debug!(topic = %p.topic, "message for nobody");
    }));
    // Activation and the self-test: ended (the self-test command killed) when the agent stops.
    let mut tasks = JoinSet::new();
    let self_test_deadline = started + cfg.self_test_timeout();
    // Jobs whose self-test this process started: a reconnect while testing delivers the job
    // again, and a second, concurrent run could reject a good image.
    let mut tested: HashSet<String> = HashSet::new();
    let mut signalled = false;
    let mut agent_result = None;
    loop {
        tokio::select! {
            () = handle.stopped() => break,
            r = &mut agent_task => {
                agent_result = Some(r);
                break;
            }
            Some(event) = events.recv() => match event {
                JobEvent::ReceivedJob { job_id } => info!(job = %job_id, "OTA job received"),
                JobEvent::Activate { job_id } => {
                    info!(job = %job_id, "image downloaded and verified: activating");
                    let h = handle.clone();
                    tasks.spawn(async move {
                        if let Err(e) = h.activate_new_image().await {
                            error!(job = %job_id, "activation failed: {e}");
                        }
                    });
                }
                JobEvent::StartTest { job_id } => {
                    if !tested.insert(job_id.clone()) {
                        info!(job = %job_id, "the self-test of this job is already running or done");
                        continue;
                    }
                    let subject = selftest::Subject {
                        slot_dir: slot_dir.clone(),
                        image: image.clone(),
                        version: version.to_string(),
                        job_id,
                    };
                    let argv = cfg.self_test.command.clone();
                    // The agent's self-test timer decides a timeout; this is a backstop.
                    let left = self_test_deadline.saturating_duration_since(Instant::now())
                        + SELF_TEST_GRACE;
                    tasks.spawn(self_test(handle.clone(), argv, subject, left));
                }
                JobEvent::Fail { job_id, reason } => {
                    warn!(job = %job_id, reason = %reason, "OTA job failed; the running image is unchanged");
                }
                JobEvent::SelfTestFailed { job_id, reason } => {
                    warn!(job = %job_id, reason = %reason, "the new image failed its self-test");
                }
                JobEvent::UpdateComplete { job_id } => info!(job = %job_id, "file received"),
                JobEvent::ParseCustomJob { job_id, .. } => {
                    // Left QUEUED, it would stay at the head of the queue and hold up every
                    // OTA job behind it.
                    info!(job = %job_id, "not an OTA job: rejecting it");
                    let details = std::collections::BTreeMap::from([(
                        "reason".to_owned(),
                        "updraft-agent runs OTA (afr_ota) jobs only".to_owned(),
                    )]);
                    if let Err(e) = handle.report_custom_job(&job_id, CustomJobStatus::Rejected, details) {
                        warn!(job = %job_id, "cannot reject the job: {e}");
                    }
                }
                JobEvent::NoActiveJob => debug!("no job"),
            },
            _ = term.recv() => {
                signalled = true;
                if !stop(&handle, "SIGTERM") {
                    break;
                }
            }
            _ = int.recv() => {
                signalled = true;
                if !stop(&handle, "SIGINT") {
                    break;
                }
            }
        }
    }
    tasks.shutdown().await;
    let agent_result = match agent_result {
        Some(r) => r,
        None => agent_task.await,
    };
    mqtt_task.abort();
    if let Err(e) = agent_result
        && e.is_panic()
    {
        bail!("the agent panicked: {e}");
    }
    let s = handle.statistics();
    info!(
        received = s.packets_received,
        processed = s.packets_processed,
        dropped = s.packets_dropped,
        "agent stopped"
    );
    let requested = restart.requested();
    if requested.is_none() && !signalled {
        // Neither asked to stop nor to restart (a failed reset or rollback, say): a
        // failure, so that the service manager starts the daemon again.
        bail!("the agent stopped on its own");
    }
    Ok(requested)
}

/// Asks the agent to stop; `false` when it cannot be asked (it is gone already).
fn stop(handle: &AgentHandle, why: &str) -> bool {
    info!("{why}: stopping (download progress is checkpointed)");
    match handle.shutdown(false) {
        Ok(()) => true,
        Err(e) => {
            warn!("{e}");
            false
        }
    }
}

/// Runs the self-test command and gives the agent its verdict: pass → Accepted (committed,
/// SUCCEEDED); fail → Rejected (FAILED, reset, rolled back). No verdict by the deadline: the
/// agent's self-test timer resets the device, which rolls back, stops the agent and so
/// kills the command; the old image then reports the job FAILED.
async fn self_test(
    handle: AgentHandle,
    argv: Vec<String>,
    subject: selftest::Subject,
    left: Duration,
) {
    let job = subject.job_id.clone();
    if argv.is_empty() {
        info!(job = %job, "no self-test command configured: accepting the new image");
    }
    let verdict = selftest::run(&argv, &subject, left).await;
    let state = match verdict {
        Verdict::Pass => {
            info!(job = %job, "self-test passed: committing the new image");
            ImageState::Accepted
        }
        Verdict::Fail(why) => {
            warn!(job = %job, "self-test failed ({why}): rejecting the new image");
            ImageState::Rejected
        }
        Verdict::TimedOut => {
            warn!(job = %job, "self-test did not finish in time: killed; the image rolls back");
            return;
        }
    };
    if let Err(e) = handle.set_image_state(state).await {
        error!(job = %job, "setting the image state {state}: {e}");
    }
}

/// `status`: what the install directory holds, without taking it over.
fn status(path: &Path) -> Result<ExitCode> {
    let cfg = Config::load(path)?;
    let dir = &cfg.install_dir;
    let options = cfg.pal_options()?;
    println!("install dir:  {}", dir.display());
    let Some(state) = linux::read_state(dir)? else {
        println!("not initialized (the daemon has not run yet)");
        return Ok(ExitCode::SUCCESS);
    };
    let version = linux::slot_version(dir, state.active, &options)
        .map_or_else(|e| format!("unknown ({e})"), |v| v.to_string());
    let link = linux::current_slot(dir).map_or("broken".into(), |s| format!("slots/{}", s.name()));
    println!("active slot:  {} (current -> {link})", state.active.name());
    println!("version:      {version}");
    print!("image state:  {:?}", state.image_state);
    if let Some(p) = state.previous {
        print!(
            " (trial boots {}, rollback to slot {})",
            state.trial_boots,
            p.name()
        );
    }
    println!();
    if let Some(r) = &state.receiving {
        println!(
            "receiving:    job {} into slot {}, {} bytes{}",
            r.job_id,
            r.slot.name(),
            r.file_size,
            if r.verified { ", verified" } else { "" }
        );
    }
    if let Ok(Some(c)) = FileResumeStore::new(dir.join(RESUME_FILE)).load() {
        let missing = c.bitmap().map(|b| (b.missing(), b.len()));
        if let Some((missing, total)) = missing {
            println!(
                "checkpoint:   job {}, {} of {total} blocks written",
                c.job_id,
                total - missing
            );
        }
    }
    if let Some(s) = state.rolled_back_from {
        println!("last rollback: from slot {}", s.name());
    }
    let holder = std::fs::read_to_string(dir.join(linux::LOCK_FILE)).unwrap_or_default();
    let held = std::fs::File::open(dir.join(linux::LOCK_FILE))
        .map(|f| f.try_lock_shared().is_err())
        .unwrap_or(false);
    if held {
        println!("daemon:       running (pid {})", holder.trim());
    } else {
        println!("daemon:       not running");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn command_line() {
        assert!(matches!(parse_args(args("--help")), Ok(Command::Help)));
        assert!(matches!(
            parse_args(args("run --config /etc/a.toml --stderr --restart=exec")),
            Ok(Command::Run { config, stderr: true, restart: RestartMode::Exec })
                if config == Path::new("/etc/a.toml")
        ));
        assert!(matches!(
            parse_args(args("run -c a.toml")),
            Ok(Command::Run {
                stderr: false,
                restart: RestartMode::Exit,
                ..
            })
        ));
        assert!(matches!(
            parse_args(args("status --config a.toml")),
            Ok(Command::Status { .. })
        ));
        for bad in [
            "",
            "run",
            "run --config",
            "run --restart now --config a",
            "status --stderr --config a",
            "fly",
        ] {
            assert!(parse_args(args(bad)).is_err(), "{bad}");
        }
    }
}
