//! The fleet simulator and the demo, run as a user runs them: the `updraft` binary against
//! a temporary in-process server on loopback. Each run also checks itself (every device
//! must end as its knobs predict, and the server must agree); these tests check the
//! figures it prints.

mod common;

use common::updraft;
use std::collections::BTreeMap;

/// The summary's counts: `succeeded`, `failed`, `rejected`, `timed out`.
fn counts(stdout: &str) -> BTreeMap<String, u64> {
    stdout
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            ["succeeded", "failed", "rejected", "timed out"]
                .iter()
                .find(|k| l.starts_with(*k))
                .and_then(|k| {
                    l[k.len()..]
                        .split_whitespace()
                        .next()
                        .and_then(|n| n.parse().ok())
                        .map(|n| ((*k).to_owned(), n))
                })
        })
        .collect()
}

fn expect(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[test]
fn a_thousand_devices_all_succeed() {
    let (ok, out, err) = updraft(&["simulate", "--devices", "1000", "--size", "8192", "--quiet"]);
    assert!(ok, "simulate failed:\n{out}\n{err}");
    assert_eq!(
        counts(&out),
        expect(&[
            ("succeeded", 1000),
            ("failed", 0),
            ("rejected", 0),
            ("timed out", 0)
        ]),
        "{out}"
    );
    assert!(out.contains("server      1000 SUCCEEDED"), "{out}");
}

#[test]
fn failure_knobs_give_the_predicted_counts() {
    for protocol in ["mqtt", "http"] {
        let (ok, out, err) = updraft(&[
            "simulate",
            "--devices",
            "100",
            "--size",
            "40000",
            "--block-size",
            "1024",
            "--failure-rate",
            "0.1",
            "--self-test-failure-rate",
            "0.05",
            "--disconnect-rate",
            "0.2",
            "--slow-rate",
            "0.1",
            "--slow-delay",
            "20ms",
            "--protocol",
            protocol,
            "--seed",
            "42",
            "--quiet",
        ]);
        assert!(ok, "{protocol}: simulate failed:\n{out}\n{err}");
        assert_eq!(
            counts(&out),
            expect(&[
                ("succeeded", 85),
                ("failed", 10),
                ("rejected", 5),
                ("timed out", 0)
            ]),
            "{protocol}: {out}"
        );
        assert!(out.contains("15 FAILED, 85 SUCCEEDED"), "{protocol}: {out}");
        // Twenty devices drop their connection once mid-download (a device that finishes
        // before its link notices does not), and every one of them still ends as predicted.
        let drops: u64 = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("disconnects"))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            (10..=20).contains(&drops),
            "{protocol}: {drops} disconnects\n{out}"
        );
    }
}

#[test]
fn bad_knobs_are_refused() {
    let (ok, _, err) = updraft(&["simulate", "--failure-rate", "1.5"]);
    assert!(!ok);
    assert!(err.contains("--failure-rate must be from 0 to 1"), "{err}");
}

#[test]
fn the_demo_ends_with_twenty_succeeded_devices() {
    let (ok, out, err) = updraft(&["demo"]);
    assert!(ok, "demo failed:\n{out}\n{err}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("fleet-"))
        .collect();
    assert_eq!(rows.len(), 20, "{out}");
    for r in &rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(cols.get(1..3), Some(&["SUCCEEDED", "v1.1.0"][..]), "{r}");
    }
    assert!(out.contains("server      20 SUCCEEDED"), "{out}");
}
