//! What the tests of the `updraft` binary share.

use std::process::Command;

/// Runs `updraft ARGS` with the open-file limit raised to the hard limit (a fleet needs a
/// socket or two per device; CI shells often start at 1024). Returns (success, stdout,
/// stderr).
pub fn updraft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_updraft"))
        .args(args)
        .env_remove("UPDRAFT_LOG")
        .output()
        .expect("running updraft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
