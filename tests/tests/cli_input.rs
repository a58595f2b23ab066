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

/// `simulate` of the recommended web group on `trace`, with `extra` arguments.
fn simulate(trace: &str, extra: &[&str]) -> (bool, String) {
    let config = examples_dir().join("web-recommended.toml");
    let args = [
        &[
            "simulate",
            "--config",
            config.to_str().unwrap(),
            "--group",
            "web",
            "--member-capacity",
            "100",
            "--trace",
            trace,
        ][..],
        extra,
    ]
    .concat();
    run(&args)
}

#[test]
fn simulate_reads_an_operators_trace_and_refuses_what_it_cannot_use() {
    let (ok, text) = simulate("/dev/zero", &[]);
    assert!(!ok && text.contains("not a regular file"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "time,demand\n0,100\n60,lots\n").unwrap();
    let (ok, text) = simulate(bad.to_str().unwrap(), &[]);
    assert!(!ok && text.contains("line 3: demand `lots` is not a number"), "{text}");
    // A day of demand stepping up and down: the JSON has a record per policy, the SVG is written.
    let trace = dir.path().join("day.csv");
    let text: String = (0..=1440)
        .map(|minute| {
            format!(
                "{},{}\n",
                minute * 60,
                if (480..1080).contains(&minute) { 1500 } else { 300 }
            )
        })
        .collect();
    std::fs::write(&trace, text).unwrap();
    let chart = dir.path().join("day.svg");
    let (ok, out) = simulate(
        trace.to_str().unwrap(),
        &["--compare", "all", "--json", "--svg", chart.to_str().unwrap()],
    );
    assert!(ok, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = json["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["policy"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "ebb:web",
            "ec2-target",
            "ec2-step",
            "heat",
            "k5",
            "ssh-scale",
            "hpa",
            "oracle"
        ]
    );
    assert!(std::fs::read_to_string(&chart).unwrap().starts_with("<svg"));
    let (ok, text) = simulate(trace.to_str().unwrap(), &["--compare", "nomad"]);
    assert!(!ok && text.contains("no anchor `nomad`"), "{text}");
}
