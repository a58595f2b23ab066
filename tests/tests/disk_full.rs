//! Issue 6's disk-full fault, on a real full filesystem: the collector's state directory is a small tmpfs
//! mounted in a user and mount namespace of its own (no root needed), which the test fills to the last byte.
//! Decisions pause, a metric and one ERROR line say why, nothing is half-written, and the collector resumes
//! once space returns.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ebb_collector::testing::GroupToml;
use ebb_tests::{Running, admin, collector_bin, free_port, running_in, serial, wait_for};

/// The PIDs of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn metric(address: &str, name: &str) -> f64 {
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return 0.0;
    };
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes zeros into `path` until the filesystem is full; how many bytes it took.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    let mut written = 0;
    // Bounded: the filesystem is 8 MiB.
    for _ in 0..4096 {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(nix::libc::ENOSPC), "{e}");
                break;
            }
        }
    }
    let _ = file.sync_all();
    written
}

#[test]
fn a_full_disk_pauses_decisions_and_they_resume_when_space_returns() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (state, cloud, log) = (
        dir.path().join("state"),
        dir.path().join("cloud"),
        dir.path().join("collector.log"),
    );
    std::fs::create_dir_all(&state).unwrap();
    let (admin_address, http_address) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let config = format!(
        r#"
        [server]
        grpc_listen = "127.0.0.1:{}"
        admin_listen = "{admin_address}"
        http_listen = "{http_address}"
        state_dir = "{}"

        {}"#,
        free_port(),
        state.display(),
        GroupToml::fake("web", &cloud)
            .set("max_size", 6)
            .set("drain_secs", 0)
            .provider("latency_ms", 20)
            .to_toml()
    );
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, config).unwrap();

    // The shell is the first process of a new PID namespace: when the guard kills it, the kernel kills the
    // collector too. It stays after the collector exits, keeping the tmpfs for the test to look into.
    let script = r#"mount -t tmpfs -o size=8m tmpfs "$1" || exit 97
"$2" serve --config "$3" 2>"$4" &
wait $!
echo "exited $?" >>"$4"
sleep 120"#;
    let namespace = Running::spawn(
        Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
            ])
            .args(["sh", "-c", script, "sh"])
            .arg(&state)
            .arg(collector_bin())
            .arg(&config_path)
            .arg(&log)
            .stdout(Stdio::null()),
    );
    let mut shell = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            shell = children(namespace.child.id());
            shell.len() == 1 && children(shell[0]).len() == 1
        }),
        "unshare started the shell and the shell the collector (is `unshare` from util-linux installed?)"
    );
    let collector = children(shell[0])[0];
    // The state directory as the collector sees it: the tmpfs, not the empty directory beneath it.
    let seen: PathBuf = format!("/proc/{}/root{}", shell[0], state.display()).into();
    let ask = |args: &[&str]| admin(&admin_address, &seen, args);
    assert!(
        wait_for(Duration::from_secs(30), || ask(&["groups"]).0),
        "the collector answers: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(seen.join("collector.db").exists() && !state.join("collector.db").exists());

    let (ok, text) = ask(&["scale", "web", "--to", "2"]);
    assert!(ok, "{text}");
    assert!(wait_for(Duration::from_secs(20), || running_in(&cloud).len() == 2));
    let before = ask(&["activities", "web"]).1;

    let filler = seen.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0 && filled < 8 << 20, "filled {filled} bytes");
    let (ok, text) = ask(&["scale", "web", "--to", "4"]);
    assert!(ok, "{text}");
    assert!(
        wait_for(Duration::from_secs(20), || metric(
            &http_address,
            "ebb_store_errors_total"
        ) >= 1.0),
        "a store error is counted: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Paused: no launch without its intent on disk.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(running_in(&cloud).len(), 2, "nothing launched while the disk is full");
    let (_, groups) = ask(&["groups"]);
    assert!(groups.contains("paused: the store refuses writes"), "{groups}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        logged.matches("decisions pause until the store accepts writes").count(),
        1,
        "one ERROR line per outage:\n{logged}"
    );

    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || running_in(&cloud).len() == 4),
        "resumes once space returns: {:?}\n{}",
        running_in(&cloud),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let after = ask(&["activities", "web", "--limit", "1000"]).1;
    for line in before.lines().skip(1) {
        assert!(after.contains(line), "kept: {line}\n{after}");
    }
    assert!(
        after.contains("an operator set desired capacity 2 → 4"),
        "the activity recorded while the disk was full is saved once it can be:\n{after}"
    );

    // A clean stop, then the store is whole: the collector starts again on a copy of it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(collector as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_for(Duration::from_secs(30), || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("exited 0")));
    let status = Command::new("cp")
        .arg("-a")
        .arg(seen.join("."))
        .arg(&state)
        .status()
        .unwrap();
    assert!(status.success());
    drop(namespace);
    let _restarted = Running::spawn(
        Command::new(collector_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("EBB_LOG", "error"),
    );
    assert!(wait_for(Duration::from_secs(30), || admin(
        &admin_address,
        &state,
        &["groups"]
    )
    .0));
    let (_, groups) = admin(&admin_address, &state, &["groups"]);
    assert!(
        groups.lines().any(|l| l.starts_with("web ") && l.contains(" 4 ")),
        "{groups}"
    );
    assert_eq!(running_in(&cloud).len(), 4);
}
