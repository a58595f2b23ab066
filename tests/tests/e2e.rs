//! End-to-end: the real `ebb-collector` and `ebb-agent` binaries, real processes, real load.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ebb_tests::{
    Running, agent_bin, collector_bin, examples_dir, free_port, processes_mentioning, serial,
    wait_for,
};
use serde_json::Value;

/// The local example with its own loopback range and free ports, so it runs beside anything else.
fn local_config(address_prefix: &str, with_policies: bool) -> String {
    let example = std::fs::read_to_string(examples_dir().join("local.toml")).unwrap();
    let mut config = example
        .replace("127.0.1", address_prefix)
        .replace("127.0.0.1:7300", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:7301", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{}", free_port()));
    if !with_policies {
        config.truncate(config.find("[[groups.policies]]").unwrap());
    }
    config
}

fn grpc_url(config: &str) -> String {
    let line = config
        .lines()
        .find(|l| l.starts_with("grpc_listen"))
        .unwrap();
    format!("http://{}", line.split('"').nth(1).unwrap())
}

fn http_address(config: &str) -> String {
    let line = config
        .lines()
        .find(|l| l.starts_with("http_listen"))
        .unwrap();
    line.split('"').nth(1).unwrap().to_string()
}

#[test]
fn demo_scales_out_under_load_and_back_to_min_after_it() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, local_config("127.0.3", true)).unwrap();
    let started = Instant::now();
    let mut demo = Running::spawn(
        Command::new(collector_bin())
            .args(["demo", "--headless", "--duration-secs", "85", "--config"])
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let stdout = demo.child.stdout.take().unwrap();
    let lines: Vec<Value> = BufReader::new(stdout)
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).expect("every line is JSON"))
        .collect();
    let status = demo.child.wait().unwrap();
    let elapsed = started.elapsed();

    let activities: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("activity").is_some())
        .collect();
    let scale_out = activities
        .iter()
        .find(|a| a["activity"] == "scale_out")
        .unwrap_or_else(|| panic!("no scale_out in {activities:#?}"));
    let cause = scale_out["cause"].as_str().unwrap();
    assert!(
        cause.contains("policy cpu-high"),
        "the cause names the policy: {cause}"
    );
    assert!(
        cause.contains("avg cpu ") && cause.contains("% > 60%"),
        "the cause gives the measured value: {cause}"
    );
    let scale_in = activities
        .iter()
        .find(|a| a["activity"] == "scale_in")
        .unwrap_or_else(|| panic!("no scale_in in {activities:#?}"));
    assert!(
        scale_in["cause"]
            .as_str()
            .unwrap()
            .contains("policy cpu-low: avg cpu "),
        "{scale_in}"
    );

    let statuses: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("capacity").is_some() && l.get("activity").is_none())
        .collect();
    for field in ["elapsed_secs", "group", "capacity", "desired", "cpu_avg"] {
        assert!(
            statuses.iter().all(|s| s.get(field).is_some()),
            "every status line has {field}"
        );
    }
    let peak = statuses
        .iter()
        .map(|s| s["capacity"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(peak >= 3, "scaled out to at least 3 (peak {peak})");

    let summary = &lines.last().unwrap()["summary"];
    assert_eq!(summary["back_to_min"], true, "{summary}");
    assert_eq!(summary["final_capacity"], 1, "{summary}");
    // Every member that was in service while the load ran got traffic through the load balancer.
    let loaded_members: std::collections::BTreeSet<&str> = statuses
        .iter()
        .filter(|s| s["load_rps"].as_u64() > Some(0))
        .flat_map(|s| s["members"].as_array().unwrap())
        .filter(|m| m["state"] == "in_service")
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(loaded_members.len() >= 3, "{loaded_members:?}");
    for member in &loaded_members {
        let served = summary["served_by"][member].as_u64().unwrap_or(0);
        assert!(served > 0, "{member} got no requests: {summary}");
    }
    assert!(status.success(), "the demo reports success: {status}");
    assert!(elapsed < Duration::from_secs(90), "took {elapsed:?}");
    assert_eq!(
        processes_mentioning("127.0.3."),
        Vec::<u32>::new(),
        "the demo left instances running"
    );
}

fn admin(server: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(collector_bin())
        .args(["--server", server])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

fn in_service(server: &str) -> usize {
    admin(server, &["members", "web"])
        .1
        .lines()
        .filter(|l| l.contains(" in_service "))
        .count()
}

fn http_get(address: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn serve_with_admin_commands_metrics_and_a_clean_stop() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = local_config("127.0.4", false);
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, &config).unwrap();
    let server = grpc_url(&config);

    let (ok, text) = admin(
        &server,
        &["validate", "--config", config_path.to_str().unwrap()],
    );
    assert!(ok && text.contains("valid, 1 group(s)"), "{text}");

    let mut collector = Running::spawn(
        Command::new(collector_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("EBB_LOG", "warn"),
    );
    assert!(
        wait_for(Duration::from_secs(30), || in_service(&server) == 1),
        "the first member comes into service"
    );

    let (ok, text) = admin(&server, &["scale", "web", "--to", "3"]);
    assert!(ok, "{text}");
    assert!(
        wait_for(Duration::from_secs(30), || in_service(&server) == 3),
        "{}",
        admin(&server, &["members", "web"]).1
    );

    let (ok, text) = admin(&server, &["scale", "web", "--to", "9"]);
    assert!(
        !ok && text.contains("outside group web's min_size..max_size (1..4)"),
        "{text}"
    );

    let (_, text) = admin(&server, &["activities", "web"]);
    assert!(
        text.contains("set_desired") && text.contains("an operator set desired capacity 1 → 3"),
        "{text}"
    );
    assert!(text.contains("register web-3 ok"), "{text}");

    let (_, text) = admin(&server, &["groups"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("web ") && l.contains(" 3 ")),
        "{text}"
    );

    let metrics = http_get(&http_address(&config), "/metrics");
    assert!(
        metrics.contains("ebb_group_in_service{group=\"web\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("ebb_agents_connected 3"), "{metrics}");
    assert!(
        metrics.contains("ebb_activities_total{group=\"web\",kind=\"launch\",outcome=\"ok\"} 3"),
        "{metrics}"
    );
    assert!(http_get(&http_address(&config), "/").starts_with("HTTP/1.1 404"));

    // A stranger's agent is refused, and says so.
    let stranger = Command::new(agent_bin())
        .args(["--member-id", "stranger", "--collector-url", &server])
        .env("EBB_CONFIG", "/dev/null")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stranger = Running { child: stranger };
    std::thread::sleep(Duration::from_secs(2));
    stranger.terminate(Duration::from_secs(5));
    let mut log = String::new();
    stranger
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("not part of any group"), "{log}");

    let status = collector
        .terminate(Duration::from_secs(30))
        .expect("stops on SIGTERM within the grace period");
    assert!(status.success(), "{status}");
    assert!(
        wait_for(Duration::from_secs(5), || processes_mentioning("127.0.4.")
            .is_empty()),
        "left behind: {:?}",
        processes_mentioning("127.0.4.")
    );
}

#[test]
fn every_example_is_valid() {
    let mut checked = 0;
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, text) = admin(
                "http://127.0.0.1:1",
                &["validate", "--config", path.to_str().unwrap()],
            );
            assert!(ok, "{}: {text}", path.display());
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "one example per seed scenario and the local one; found {checked}"
    );
}

#[test]
fn a_typo_in_the_config_is_reported_with_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(
        &path,
        local_config("127.0.5", true).replace("warmup_secs", "warmup_sec"),
    )
    .unwrap();
    let (ok, text) = admin(
        "http://127.0.0.1:1",
        &["validate", "--config", path.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(
        text.contains(path.to_str().unwrap())
            && text.contains("key `groups[0].warmup_sec`")
            && text.contains("line "),
        "{text}"
    );
}
