//! The `clipqc` binary as a user runs it, and what a test asserts of a run: that it succeeded,
//! or that it was refused with an exit code and a message naming the culprit.

use std::ffi::OsStr;
use std::process::{Command, Output};

/// `clipqc ARGS` (with `RUST_LOG=warn`: only warnings and errors on stderr), run to its end.
pub fn clipqc<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clipqc"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run clipqc")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that the run succeeded (its stderr in the message); returns its stdout.
pub fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}:\n{}",
        out.status,
        stderr(out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that the run was refused: exit code `code` (any failure for `None`) and each of
/// `needles` in its stderr. Returns the stderr.
pub fn refused(out: &Output, code: Option<i32>, needles: &[&str]) -> String {
    let err = stderr(out);
    match code {
        Some(code) => assert_eq!(out.status.code(), Some(code), "exit code; stderr:\n{err}"),
        None => assert!(!out.status.success(), "succeeded; stderr:\n{err}"),
    }
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in the stderr:\n{err}");
    }
    err
}

/// `--json` output: one JSON object per line.
pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}
