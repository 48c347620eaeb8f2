//! Logging: every line to the log file (if configured) and to the systemd journal — over
//! journald's native protocol, one datagram per line to `/run/systemd/journal/socket` —
//! or, without a journal, to stderr.
//!
//! The native protocol (rather than stderr captured by systemd) keeps the priority of each
//! line, so `journalctl -p warning -u updraft-agent` works. It is small enough to write here:
//! `FIELD=value\n` per field, and for values with a newline `FIELD\n`, the length as 64-bit
//! little endian, the bytes, `\n`. The socket is non-blocking: when journald lags, lines are
//! dropped from the journal (the file still has them) rather than stalling the agent.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
const IDENTIFIER: &str = "updraft-agent";

/// Where lines go besides the log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// The journal when its socket exists, else stderr.
    Auto,
    Stderr,
}

pub fn init(level: &str, log_file: Option<&Path>, console: Console) -> Result<()> {
    let level: LevelFilter = level
        .parse()
        .with_context(|| format!("log_level '{level}': use error, warn, info, debug or trace"))?;
    let file = match log_file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the log directory {}", dir.display()))?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the log file {}", path.display()))?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(Mutex::new(f)),
            )
        }
        None => None,
    };
    let journal = match console {
        Console::Auto if Path::new(JOURNAL_SOCKET).exists() => Journal::connect().ok(),
        _ => None,
    };
    let stderr = journal
        .is_none()
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    tracing_subscriber::registry()
        .with(level)
        .with(file)
        .with(journal)
        .with(stderr)
        .try_init()
        .context("installing the logger")
}

/// A tracing layer writing to the journal.
struct Journal {
    socket: UnixDatagram,
}

impl Journal {
    fn connect() -> std::io::Result<Journal> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(JOURNAL_SOCKET)?;
        socket.set_nonblocking(true)?;
        Ok(Journal { socket })
    }
}

/// The event's message followed by its other fields as `name=value`.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

/// syslog priorities.
fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "6",
        _ => "7",
    }
}

/// Appends one field in the native protocol's encoding.
fn push_field(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

impl<S: Subscriber> Layer<S> for Journal {
    fn on_event(&self, event: &Event<'_>, _ctx: LayerContext<'_, S>) {
        let meta = event.metadata();
        let mut text = Text::default();
        event.record(&mut text);
        text.message.push_str(&text.fields);
        let mut buf = Vec::with_capacity(text.message.len() + 96);
        push_field(&mut buf, "PRIORITY", priority(meta.level()));
        push_field(&mut buf, "SYSLOG_IDENTIFIER", IDENTIFIER);
        push_field(&mut buf, "CODE_MODULE", meta.target());
        push_field(&mut buf, "MESSAGE", &text.message);
        // Best effort: the log file has the line even if the journal does not.
        let _ = self.socket.send(&buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_protocol_encoding() {
        let mut buf = Vec::new();
        push_field(&mut buf, "MESSAGE", "one line");
        assert_eq!(buf, b"MESSAGE=one line\n");
        buf.clear();
        push_field(&mut buf, "MESSAGE", "a\nb");
        let mut want = b"MESSAGE\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"a\nb\n");
        assert_eq!(buf, want);
    }

    #[test]
    fn lines_reach_a_journal_socket() {
        let dir = std::env::temp_dir().join(format!("updraft-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("socket");
        let server = UnixDatagram::bind(&path).expect("bind");
        let client = UnixDatagram::unbound().expect("socket");
        client.connect(&path).expect("connect");
        let journal = Journal { socket: client };
        let subscriber = tracing_subscriber::registry().with(journal);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(job = "j-1", "download failed");
        });
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).expect("recv");
        let got = String::from_utf8_lossy(&buf[..n]);
        assert!(got.contains("PRIORITY=4\n"), "{got}");
        assert!(got.contains("SYSLOG_IDENTIFIER=updraft-agent\n"), "{got}");
        assert!(got.contains("MESSAGE=download failed job=j-1\n"), "{got}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
