//! The operator commands on hostile or mistaken input: devices and huge files given as configs, snapshots that
//! break the rules, output into a closed pipe, odd names. Each is a clear error (or a quiet end), never a
//! panic or memory running out.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ebb_tests::{collector_bin, examples_dir};

/// Runs the collector's CLI; whether it succeeded, and stdout + stderr.
fn run(args: &[&str]) -> (bool, String) {
    let output = Command::new(collector_bin()).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    assert!(!text.contains("panicked"), "{args:?}: {text}");
    (output.status.success(), text)
}

/// `evaluate` of seed 003's group (examples/k5-recovery.toml) on `snapshot`.
fn evaluate(snapshot: &str) -> (bool, String) {
    let config = examples_dir().join("k5-recovery.toml");
    run(&[
        "evaluate",
        "--config",
        config.to_str().unwrap(),
        "--group",
        "web-server",
        "--snapshot",
        snapshot,
    ])
}

#[test]
fn a_device_or_a_huge_file_as_the_config_is_refused_at_once() {
    let started = Instant::now();
    let (ok, text) = run(&["validate", "--config", "/dev/zero"]);
    assert!(
        !ok && text.contains("/dev/zero") && text.contains("not a regular file"),
        "{text}"
    );
    let (ok, text) = run(&["validate", "--config", "/tmp"]);
    assert!(!ok && text.contains("not a regular file"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.toml");
    std::fs::write(&huge, "# padding\n".repeat(600_000)).unwrap();
    let (ok, text) = run(&["validate", "--config", huge.to_str().unwrap()]);
    assert!(!ok && text.contains("larger than"), "{text}");
    let (ok, text) = evaluate("/dev/zero");
    assert!(!ok && text.contains("not a regular file"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_snapshot_with_min_above_max_is_an_error_not_a_panic() {
    let snapshot = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        snapshot.path(),
        r#"{"now": "2026-01-01T00:10:00Z", "desired": 2, "min_size": 5, "max_size": 2, "members": []}"#,
    )
    .unwrap();
    let (ok, text) = evaluate(snapshot.path().to_str().unwrap());
    assert!(!ok && text.contains("min_size 5 is above max_size 2"), "{text}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // A pipe whose reader is gone before the command writes a byte: `ebb-collector gen-config | head -0`.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let output = Command::new(collector_bin())
        .arg("gen-config")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
}

#[test]
fn group_and_policy_names_are_limited_in_length_and_characters() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(examples_dir().join("local.toml")).unwrap();
    let group = example.lines().find(|l| l.starts_with("name = ")).unwrap().to_string();
    for (name, problem) in [
        ("w".repeat(64), "at most 63"),
        ("wéb".to_string(), "letters, digits"),
        ("web\\u0000".to_string(), "letters, digits"),
    ] {
        let path = dir.path().join("collector.toml");
        std::fs::write(&path, example.replacen(&group, &format!("name = \"{name}\""), 1)).unwrap();
        let (ok, text) = run(&["validate", "--config", path.to_str().unwrap()]);
        assert!(
            !ok && text.contains("groups[0].name") && text.contains(problem),
            "{name}: {text}"
        );
    }
}
