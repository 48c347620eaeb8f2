//! The benchmarks, run small as a user runs them: each checks its own work (every
//! execution of `bench jobs` must end SUCCEEDED, every file `bench stream` downloads must
//! match) and fails otherwise; these tests check that they run and print their figures.

mod common;

use common::updraft;

/// Runs `updraft bench ARGS`; returns stdout, failing the test (with stderr) if the run
/// failed.
fn bench(args: &[&str]) -> String {
    let args: Vec<&str> = std::iter::once("bench")
        .chain(args.iter().copied())
        .collect();
    let (ok, stdout, stderr) = updraft(&args);
    assert!(ok, "updraft {args:?} failed\n{stdout}\n{stderr}");
    stdout
}

/// The number after `label :` on the line that starts with `label`.
fn figure(stdout: &str, label: &str) -> f64 {
    stdout
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.trim_start().strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure for {label} in\n{stdout}"))
}

#[test]
fn bench_jobs_repeated_prints_medians_and_each_runs_ratio() {
    let out = bench(&["jobs", "--devices", "4", "--rounds", "2", "--repeat", "3"]);
    assert!(out.contains("3 runs of each, alternately"), "{out}");
    for label in ["broker reflection", "request/response", "jobs API"] {
        assert!(figure(&out, label) > 0.0, "{label}: {out}");
    }
    let jobs = out.lines().find(|l| l.contains("jobs API")).unwrap_or("");
    assert!(jobs.contains("median of 3"), "{jobs}");
    let ratio_line = out.lines().find(|l| l.contains("ratio")).unwrap_or("");
    let runs: Vec<f64> = ratio_line
        .split("runs:")
        .nth(1)
        .map(|r| {
            r.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(runs.len(), 3, "{ratio_line}");
    let ratio = figure(&out, "ratio");
    let (low, high) = runs
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
    // The printed ratio is of the medians: within the runs' range (rounded to 0.01).
    assert!(ratio >= low - 0.01 && ratio <= high + 0.01, "{ratio_line}");
}

#[test]
fn bench_jobs_once_prints_no_spread() {
    let out = bench(&["jobs", "--devices", "2", "--rounds", "1", "--repeat", "1"]);
    assert!(figure(&out, "jobs API") > 0.0, "{out}");
    assert!(!out.contains("median of"), "{out}");
    assert!(!out.contains("runs:"), "{out}");
}

#[test]
fn bench_jobs_takes_the_median_of_nine_runs_by_default() {
    let out = bench(&["jobs", "--devices", "2", "--rounds", "1"]);
    assert!(out.contains("9 runs of each, alternately"), "{out}");
    assert!(out.contains("median of 9"), "{out}");
}

#[test]
fn bench_rejects_zero_repeats() {
    let (ok, _, stderr) = updraft(&["bench", "jobs", "--repeat", "0"]);
    assert!(!ok);
    assert!(stderr.contains("--repeat"), "{stderr}");
}
