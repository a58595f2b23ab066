//! The packaged collector under a low open-file limit: a flood of connections to the agents' port takes
//! only the places that fit, and the collector stays reachable for `/metrics`, the Admin API and its store.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use ebb_tests::{Running, admin, collector_bin, examples_dir, free_port, serial, try_http_get, wait_for};

#[test]
fn a_connection_flood_under_a_low_open_file_limit_leaves_the_collector_reachable() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (grpc, http) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let example = std::fs::read_to_string(examples_dir().join("local.toml")).unwrap();
    let mut config = example
        .replace("127.0.0.1:7300", &grpc)
        .replace("127.0.0.1:7301", &http)
        .replace("127.0.0.1:7302", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.1", "127.0.6")
        .replace("/var/lib/ebb", state.to_str().unwrap());
    config.truncate(config.find("[[groups.policies]]").unwrap());
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = dir.path().join("collector.log");

    // 300 descriptors in all: the default max_connections (20,000) does not fit.
    let mut collector = Running::collector(
        Command::new("prlimit")
            .arg("--nofile=300:300")
            .arg(collector_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("EBB_LOG", "warn")
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap())),
        &state,
    );
    assert!(
        wait_for(Duration::from_secs(30), || try_http_get(&http, "/metrics").is_ok()),
        "the collector starts"
    );

    // 400 connections that never handshake: most are refused at once, none makes the collector deaf.
    let flood: Vec<TcpStream> = (0..400).filter_map(|_| TcpStream::connect(&grpc).ok()).collect();
    assert!(!flood.is_empty());
    std::thread::sleep(Duration::from_millis(500));
    let text = try_http_get(&http, "/metrics").expect("/metrics answers during the flood");
    let refused: u64 = text
        .lines()
        .find(|l| l.starts_with("ebb_requests_refused_total{service=\"grpc\",reason=\"connection_limit\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(refused >= 300, "{text}");
    let (ok, groups) = admin("", &state, &["groups"]);
    assert!(
        ok && groups.contains("web"),
        "the Admin API answers during the flood: {groups}"
    );
    drop(flood);

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("open-file limit is too low") && logged.contains("LimitNOFILE"),
        "{logged}"
    );
    assert!(
        collector
            .terminate(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );
}
