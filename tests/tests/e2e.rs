//! End-to-end: the real `ebb-collector` and `ebb-agent` binaries, real processes, real load, real
//! enrolment and mutual TLS.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ebb_collector::testing::GroupToml;
use ebb_tests::{
    Running, admin, agent_bin, collector_bin, examples_dir, free_port, processes_mentioning, running_in, serial,
    try_http_get, wait_for,
};
use serde_json::Value;

/// The local example with its own loopback range, free ports and state directory, so it runs beside
/// anything else.
fn local_config(address_prefix: &str, with_policies: bool, state_dir: &Path) -> String {
    let example = std::fs::read_to_string(examples_dir().join("local.toml")).unwrap();
    let mut config = example
        .replace("127.0.1", address_prefix)
        .replace("127.0.0.1:7300", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:7301", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:7302", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{}", free_port()))
        .replace("/var/lib/ebb", state_dir.to_str().unwrap());
    if !with_policies {
        config.truncate(config.find("[[groups.policies]]").unwrap());
    }
    config
}

/// The address a `key = "host:port"` line of the configuration names.
fn address(config: &str, key: &str) -> String {
    let line = config.lines().find(|l| l.starts_with(key)).unwrap();
    line.split('"').nth(1).unwrap().to_string()
}

#[test]
fn demo_scales_out_under_load_and_back_to_min_after_it() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, local_config("127.0.3", true, dir.path())).unwrap();
    let mut demo = Running::collector(
        Command::new(collector_bin())
            // The demo stops itself after 85 s whatever happened; how long it took is benchmarked, not asserted.
            .args(["demo", "--headless", "--duration-secs", "85", "--config"])
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
        dir.path(),
    );
    let stdout = demo.child.stdout.take().unwrap();
    let lines: Vec<Value> = BufReader::new(stdout)
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).expect("every line is JSON"))
        .collect();
    let status = demo.child.wait().unwrap();

    let activities: Vec<&Value> = lines.iter().filter(|l| l.get("activity").is_some()).collect();
    let scale_out = activities
        .iter()
        .find(|a| a["activity"] == "scale_out")
        .unwrap_or_else(|| panic!("no scale_out in {activities:#?}"));
    let cause = scale_out["cause"].as_str().unwrap();
    assert!(cause.contains("policy cpu-high"), "the cause names the policy: {cause}");
    assert!(
        cause.contains("avg cpu > 60%: cpu ") && cause.contains("% over 5 s"),
        "the cause gives the measured value: {cause}"
    );
    let scale_in = activities
        .iter()
        .find(|a| a["activity"] == "scale_in")
        .unwrap_or_else(|| panic!("no scale_in in {activities:#?}"));
    assert!(
        scale_in["cause"].as_str().unwrap().contains("policy cpu-low: avg cpu "),
        "{scale_in}"
    );

    let statuses: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("capacity").is_some() && l.get("activity").is_none())
        .collect();
    for field in ["elapsed_secs", "group", "capacity", "desired", "cpu", "cpu_of"] {
        assert!(
            statuses.iter().all(|s| s.get(field).is_some()),
            "every status line has {field}"
        );
    }
    // One CPU figure: the one the policies decide on, saying which.
    assert!(
        statuses
            .iter()
            .any(|s| s["cpu"].is_number() && s["cpu_of"].as_str().is_some_and(|of| of.ends_with("avg over 5 s"))),
        "{statuses:?}"
    );
    let peak = statuses.iter().map(|s| s["capacity"].as_u64().unwrap()).max().unwrap();
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
    assert_eq!(
        processes_mentioning("127.0.3."),
        Vec::<u32>::new(),
        "the demo left instances running"
    );
}

/// A command that needs no collector.
fn offline(args: &[&str]) -> (bool, String) {
    admin("127.0.0.1:1", Path::new("/nonexistent"), args)
}

fn in_service(server: &str, state_dir: &Path) -> usize {
    admin(server, state_dir, &["members", "web"])
        .1
        .lines()
        .filter(|l| l.contains(" in_service "))
        .count()
}

fn http_get(address: &str, path: &str) -> String {
    try_http_get(address, path).unwrap_or_else(|e| panic!("GET http://{address}{path}: {e}"))
}

#[test]
fn serve_with_enrolled_members_admin_commands_metrics_and_a_clean_stop() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = local_config("127.0.4", false, &state);
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, &config).unwrap();
    let server = address(&config, "admin_listen");

    let (ok, text) = offline(&["validate", "--config", config_path.to_str().unwrap()]);
    assert!(ok && text.contains("valid, 1 group(s)"), "{text}");

    let mut collector = Running::collector(
        Command::new(collector_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("EBB_LOG", "warn"),
        &state,
    );
    assert!(
        wait_for(Duration::from_secs(30), || in_service(&server, &state) == 1),
        "the first member enrols and comes into service: {}",
        admin(&server, &state, &["members", "web"]).1
    );

    // The CA's fingerprint, as agents pin it.
    let (ok, fingerprint) = offline(&["ca", "show", "--state-dir", state.to_str().unwrap()]);
    assert!(ok, "{fingerprint}");
    let fingerprint = fingerprint.split_whitespace().next().unwrap().to_string();
    assert_eq!(fingerprint.len(), 64);

    let (ok, text) = admin(&server, &state, &["scale", "web", "--to", "3"]);
    assert!(ok, "{text}");
    assert!(
        wait_for(Duration::from_secs(30), || in_service(&server, &state) == 3),
        "{}",
        admin(&server, &state, &["members", "web"]).1
    );
    let (ok, text) = admin(&server, &state, &["scale", "web", "--to", "9"]);
    assert!(
        !ok && text.contains("outside group web's min_size..max_size (1..4)"),
        "{text}"
    );
    let (_, text) = admin(&server, &state, &["activities", "web"]);
    assert!(
        text.contains("set_desired") && text.contains("an operator set desired capacity 1 → 3"),
        "{text}"
    );
    assert!(text.contains("register web-3 ok"), "{text}");
    let (_, text) = admin(&server, &state, &["groups"]);
    assert!(
        text.lines().any(|l| l.starts_with("web ") && l.contains(" 3 ")),
        "{text}"
    );
    let (ok, text) = admin(&server, &state, &["explain", "web", "--since", "10m"]);
    assert!(
        ok && text.contains("hold at 3 (no_policies): the group has no scaling policy"),
        "{text}"
    );
    assert!(
        text.contains("evaluations)"),
        "a quiet group's seconds are one record: {text}"
    );
    let (ok, text) = admin(
        &server,
        &state,
        &["suspend", "web", "--process", "launch", "--process", "terminate"],
    );
    assert!(ok && text.contains("web: suspended: launch, terminate"), "{text}");
    let (ok, text) = admin(&server, &state, &["suspend", "web", "--process", "launchs"]);
    assert!(!ok && text.contains("no process named `launchs`"), "{text}");
    let (ok, text) = admin(&server, &state, &["resume", "web"]);
    assert!(ok && text.contains("web: every process runs"), "{text}");
    let (_, text) = admin(&server, &state, &["activities", "web", "--limit", "2"]);
    assert!(
        text.contains("suspension") && text.contains("an operator resumed decide, launch, terminate"),
        "{text}"
    );

    // Live reload: a new max_size applies at once, members untouched; a broken file is refused.
    std::fs::write(&config_path, config.replacen("max_size = 4", "max_size = 6", 1)).unwrap();
    let (ok, text) = admin(&server, &state, &["reload"]);
    assert!(
        ok && text.contains("reloaded: web: min_size..max_size 1..4 → 1..6"),
        "{text}"
    );
    let (_, text) = admin(&server, &state, &["groups"]);
    assert!(
        text.lines().any(|l| l.starts_with("web ") && l.contains(" 6 ")),
        "{text}"
    );
    assert_eq!(in_service(&server, &state), 3, "members are not touched");
    std::fs::write(&config_path, config.replacen("max_size = 4", "max_size = 0", 1)).unwrap();
    let (ok, text) = admin(&server, &state, &["reload"]);
    assert!(
        !ok && text.contains("min_size") && text.contains("running configuration is kept"),
        "{text}"
    );
    // SIGHUP does the same as `reload`.
    std::fs::write(&config_path, config.replacen("max_size = 4", "max_size = 5", 1)).unwrap();
    nix::sys::signal::kill(collector.pid(), nix::sys::signal::Signal::SIGHUP).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || admin(&server, &state, &["groups"])
            .1
            .lines()
            .any(|l| l.starts_with("web ") && l.contains(" 5 "))),
        "SIGHUP reloads"
    );
    // The same over the Admin API's Unix socket in the state directory, the default.
    let (ok, text) = admin("", &state, &["groups"]);
    assert!(
        ok && text.lines().any(|l| l.starts_with("web ") && l.contains(" 3 ")),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("admin.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is the owner's only");

    // An admin certificate for another operator, used over TCP with explicit files.
    let ops = dir.path().join("ops");
    let (ok, text) = admin(
        "",
        &state,
        &["admin-cert", "--out", ops.to_str().unwrap(), "--name", "ops"],
    );
    assert!(ok, "{text}");
    let output = Command::new(collector_bin())
        .args(["--server", &format!("https://{server}")])
        .arg("--ca")
        .arg(ops.join("ca.pem"))
        .arg("--cert")
        .arg(ops.join("admin.pem"))
        .arg("--key")
        .arg(ops.join("admin.key"))
        .arg("groups")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // Each launch's token was used once and is gone from the instance's agent.toml.
    let (_, tokens) = admin(&server, &state, &["token", "list"]);
    assert!(
        tokens
            .lines()
            .filter(|l| l.contains(" web-"))
            .all(|l| l.contains(" 0 ")),
        "{tokens}"
    );
    for member in ["web-1", "web-2", "web-3"] {
        let agent_config = std::fs::read_to_string(state.join("local").join(member).join("agent.toml")).unwrap();
        assert!(!agent_config.contains("token ="), "{agent_config}");
        assert!(agent_config.contains(&fingerprint), "{agent_config}");
    }

    let metrics_address = address(&config, "http_listen");
    let metrics = http_get(&metrics_address, "/metrics");
    assert!(metrics.contains("ebb_group_in_service{group=\"web\"} 3"), "{metrics}");
    assert!(metrics.contains("ebb_agents_connected 3"), "{metrics}");
    assert!(metrics.contains("ebb_enrollments_total 3"), "{metrics}");
    assert!(
        metrics.contains("ebb_activities_total{group=\"web\",kind=\"launch\",outcome=\"ok\"} 3"),
        "{metrics}"
    );
    assert!(http_get(&metrics_address, "/").starts_with("HTTP/1.1 404"));

    // A stranger with a made-up token is refused, and says so.
    let stranger_state = tempfile::tempdir().unwrap();
    let output = Command::new(agent_bin())
        .args([
            "--collector-url",
            &format!("https://{}", address(&config, "grpc_listen")),
        ])
        .args([
            "--ca-sha256",
            &fingerprint,
            "--enroll-token",
            "ebbjt_madeup",
            "--state-dir",
        ])
        .arg(stranger_state.path())
        .env("EBB_CONFIG", "/dev/null")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && log.contains("not known to this collector"),
        "{log}"
    );

    // Revoking a member closes its stream at once.
    let (ok, text) = admin(&server, &state, &["member", "revoke", "web-2"]);
    assert!(ok, "{text}");
    assert!(
        wait_for(Duration::from_secs(10), || http_get(&metrics_address, "/metrics")
            .contains("ebb_agents_connected 2")),
        "{}",
        http_get(&metrics_address, "/metrics")
    );

    let status = collector
        .terminate(Duration::from_secs(30))
        .expect("stops on SIGTERM within the grace period");
    assert!(status.success(), "{status}");
    assert!(
        wait_for(Duration::from_secs(5), || processes_mentioning("127.0.4.").is_empty()),
        "left behind: {:?}",
        processes_mentioning("127.0.4.")
    );
}

/// Members' ids and addresses, as `members` lists them.
fn members(server: &str, state_dir: &Path) -> Vec<String> {
    let (ok, text) = admin(server, state_dir, &["members", "web"]);
    assert!(ok, "{text}");
    let mut found: Vec<String> = text
        .lines()
        .skip(1)
        .map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            format!("{} {}", columns[0], columns[2])
        })
        .collect();
    found.sort();
    found
}

#[test]
fn local_instances_outlive_a_crashed_collector_and_are_adopted_by_the_next() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = local_config("127.0.9", false, &state).replace("min_size = 1", "min_size = 2");
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, &config).unwrap();
    let server = address(&config, "admin_listen");
    let serve = || {
        Running::collector(
            Command::new(collector_bin())
                .args(["serve", "--config"])
                .arg(&config_path)
                .env("EBB_LOG", "warn"),
            &state,
        )
    };

    let mut crashed = serve();
    assert!(
        wait_for(Duration::from_secs(40), || in_service(&server, &state) == 2),
        "{}",
        admin(&server, &state, &["members", "web"]).1
    );
    let before = members(&server, &state);
    let instances = ebb_tests::local_instances(&state.join("local"));
    assert_eq!(instances.len(), 2, "{before:?}");
    crashed.child.kill().unwrap();
    crashed.child.wait().unwrap();
    assert_eq!(
        ebb_tests::local_instances(&state.join("local")),
        instances,
        "the instances keep running without their collector"
    );

    let mut restarted = serve();
    assert!(
        wait_for(Duration::from_secs(40), || in_service(&server, &state) == 2),
        "{}",
        admin(&server, &state, &["members", "web"]).1
    );
    assert_eq!(
        members(&server, &state),
        before,
        "the same members, on the same instances"
    );
    assert_eq!(ebb_tests::local_instances(&state.join("local")), instances);
    let (_, activities) = admin(&server, &state, &["activities", "web"]);
    assert_eq!(
        activities.matches("launch web-").count(),
        2,
        "nothing launched after the restart:\n{activities}"
    );

    let status = restarted.terminate(Duration::from_secs(30)).expect("stops on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        ebb_tests::local_instances(&state.join("local")).is_empty(),
        "a normal stop takes the local instances with it"
    );
}

#[test]
fn user_data_renders_for_both_formats_with_a_fresh_token() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = local_config("127.0.6", false, &state).replace("min_size = 1", "min_size = 0");
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, &config).unwrap();
    let server = address(&config, "admin_listen");
    let _collector = Running::collector(
        Command::new(collector_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("EBB_LOG", "warn"),
        &state,
    );
    assert!(wait_for(Duration::from_secs(30), || admin(
        &server,
        &state,
        &["groups"]
    )
    .0));
    let (ok, cloud_config) = admin(
        &server,
        &state,
        &["user-data", "--group", "web", "--format", "cloud-config"],
    );
    assert!(ok && cloud_config.starts_with("#cloud-config\n"), "{cloud_config}");
    assert!(cloud_config.contains("token = \"ebbjt_"), "{cloud_config}");
    let (ok, shell) = admin(&server, &state, &["user-data", "--group", "web", "--format", "shell"]);
    assert!(ok && shell.starts_with("#!/bin/sh\n"), "{shell}");
    let token = |text: &str| {
        text.split("token = \"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_string()
    };
    assert_ne!(
        token(&cloud_config),
        token(&shell),
        "each rendering mints its own token"
    );
    let (_, unknown) = admin(&server, &state, &["user-data", "--group", "nope"]);
    assert!(unknown.contains("no group named `nope`"), "{unknown}");
}

/// `validate` on every example, on a machine that has what each needs (a clouds.yaml with the examples'
/// clouds, the `.idcfrc` the CloudStack example names): valid, without a warning. Without them — or with
/// the keys readable by others — `validate` refuses as `serve` would, saying what to fix.
#[test]
fn every_example_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let clouds = dir.path().join("clouds.yaml");
    let entry = |name: &str| {
        format!(
            "  {name}:\n    auth:\n      auth_url: https://identity.example.invalid/v3\n      username: ops\n      \
             password: secret\n      project_name: web\n      user_domain_name: Default\n      project_domain_name: Default\n"
        )
    };
    std::fs::write(&clouds, format!("clouds:\n{}{}", entry("k5"), entry("overcloud"))).unwrap();
    let idcfrc = dir.path().join("idcfrc");
    std::fs::write(
        &idcfrc,
        "[account]\nhost = https://compute.jp-east.idcfcloud.com/client/api\napi_key = k\nsecret_key = s\n",
    )
    .unwrap();
    let validate = |path: &Path, clouds: &Path| {
        let output = Command::new(ebb_tests::collector_bin())
            .args(["validate", "--config"])
            .arg(path)
            .env("OS_CLIENT_CONFIG_FILE", clouds)
            .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
            .env_remove("OS_CLOUD")
            .env_remove("CLOUDSTACK_ENDPOINT")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };
    // Stand-ins for the template, kernel and initrd `cargo xtask image` writes, and qemu on the PATH.
    for file in [
        "template.qcow2",
        "vmlinuz",
        "initrd.img",
        "qemu-system-x86_64",
        "qemu-img",
    ] {
        std::fs::write(dir.path().join(file), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(dir.path().join(file), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut checked = 0;
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let path = if text.contains("/root/.idcfrc") {
            let (ok, refused) = validate(&path, &clouds);
            assert!(!ok && refused.contains("cannot read /root/.idcfrc"), "{refused}");
            let here = dir.path().join(path.file_name().unwrap());
            std::fs::write(&here, text.replace("/root/.idcfrc", idcfrc.to_str().unwrap())).unwrap();
            std::fs::set_permissions(&idcfrc, std::fs::Permissions::from_mode(0o644)).unwrap();
            let (ok, refused) = validate(&here, &clouds);
            assert!(!ok && refused.contains("chmod 600"), "{refused}");
            std::fs::set_permissions(&idcfrc, std::fs::Permissions::from_mode(0o600)).unwrap();
            here
        } else {
            path
        };
        let path = if text.contains("type = \"qemu\"") {
            let (ok, refused) = validate(&path, &clouds);
            assert!(!ok && refused.contains("cargo xtask image"), "{refused}");
            let here = dir.path().join(path.file_name().unwrap());
            std::fs::write(&here, text.replace("target/images", dir.path().to_str().unwrap())).unwrap();
            here
        } else {
            path
        };
        if text.contains("type = \"openstack\"") {
            let (ok, refused) = validate(&path, Path::new("/nonexistent/clouds.yaml"));
            assert!(!ok && refused.contains("clouds.yaml"), "{refused}");
        }
        let (ok, text) = validate(&path, &clouds);
        assert!(ok, "{}: {text}", path.display());
        assert!(!text.contains("warning:"), "examples should not need a warning: {text}");
        checked += 1;
    }
    assert!(
        checked >= 5,
        "one example per seed scenario and the local one; found {checked}"
    );
}

/// `evaluate` runs the collector's engine on a snapshot: seed 003's two servers at 40% and 70%.
#[test]
fn evaluate_decides_offline_from_a_snapshot() {
    let config = examples_dir().join("k5-recovery.toml");
    let snapshot = examples_dir().join("snapshots/k5-two-servers.json");
    let args = |json: bool| {
        let mut args = vec![
            "evaluate",
            "--config",
            config.to_str().unwrap(),
            "--group",
            "web-server",
            "--snapshot",
            snapshot.to_str().unwrap(),
        ];
        if json {
            args.push("--json");
        }
        offline(&args)
    };
    let (ok, text) = args(true);
    assert!(ok, "{text}");
    let evaluation: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(evaluation["action"], "scale_out", "{text}");
    assert_eq!(evaluation["desired"], 3, "{text}");
    let explanation = evaluation["explanation"].as_str().unwrap();
    assert!(explanation.contains("cpu 55% over 60 s"), "{explanation}");
    let (ok, text) = args(false);
    assert!(
        ok && text.starts_with("scale_out 2 → 3: policy cpu_alarm_high"),
        "{text}"
    );

    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        bad.path(),
        r#"{"now": "2026-01-01T00:10:00Z", "desird": 2, "members": []}"#,
    )
    .unwrap();
    let (ok, text) = offline(&[
        "evaluate",
        "--config",
        config.to_str().unwrap(),
        "--group",
        "web-server",
        "--snapshot",
        bad.path().to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("desird"), "{text}");
}

#[test]
fn a_typo_in_the_config_is_reported_with_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(
        &path,
        local_config("127.0.5", true, dir.path()).replace("warmup_secs", "warmup_sec"),
    )
    .unwrap();
    let (ok, text) = offline(&["validate", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        text.contains(path.to_str().unwrap()) && text.contains("key `groups[0].warmup_sec`") && text.contains("line "),
        "{text}"
    );
}

/// A damaged store is never silently replaced: `serve` refuses to start and says what to do.
#[test]
fn a_damaged_store_stops_the_collector_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("collector.db"), vec![0x42; 4096]).unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, local_config("127.0.6", false, &state)).unwrap();
    let output = Command::new(collector_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("is not a usable ebb database") && stderr.contains("move it aside"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(state.join("collector.db")).unwrap(), vec![0x42; 4096]);
}

/// Issue 6's fault test: the collector killed with SIGKILL at random moments of scale-out and scale-in,
/// twenty times, against a slow cloud that outlives it. Once reconciled there are exactly as many
/// instances as desired, every one owned by a member (no orphan), no activity was lost, and a member
/// protected from scale-in stayed protected and was never terminated.
#[test]
fn kill_9_during_scaling_leaves_no_extra_instance_no_orphan_and_no_lost_activity() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (state, cloud) = (dir.path().join("state"), dir.path().join("cloud"));
    let admin_address = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"
        [server]
        grpc_listen = "127.0.0.1:{}"
        admin_listen = "{admin_address}"
        http_listen = "127.0.0.1:{}"
        state_dir = "{}"

        {}"#,
        free_port(),
        free_port(),
        state.display(),
        GroupToml::fake("web", &cloud)
            .set("max_size", 6)
            .set("drain_secs", 0)
            .set("reconcile_interval_secs", 1)
            .set("orphan_grace_secs", 0)
            .provider("latency_ms", 150)
            .to_toml()
    );
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, config).unwrap();
    let start = || {
        let collector = Running::spawn(
            Command::new(collector_bin())
                .args(["serve", "--config"])
                .arg(&config_path)
                .env("EBB_LOG", "error"),
        );
        assert!(
            wait_for(Duration::from_secs(30), || admin(&admin_address, &state, &["groups"]).0),
            "the collector answers"
        );
        collector
    };
    let activities = || {
        admin(&admin_address, &state, &["activities", "web", "--limit", "100000"])
            .1
            .lines()
            .count()
    };
    // One member protected from scale-in before the faults begin; it must stay protected and never go.
    let protected_member = || {
        admin(&admin_address, &state, &["members", "web"])
            .1
            .lines()
            .find(|l| l.split_whitespace().nth(6) == Some("yes"))
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
    };
    let mut collector = start();
    let (ok, text) = admin(&admin_address, &state, &["scale", "web", "--to", "1"]);
    assert!(ok, "{text}");
    assert!(wait_for(Duration::from_secs(10), || running_in(&cloud).len() == 1));
    let first = running_in(&cloud).remove(0);
    let (ok, text) = admin(&admin_address, &state, &["member", "protect", &first]);
    assert!(ok && text.contains("is protected from scale-in"), "{text}");
    assert_eq!(protected_member(), Some(first.clone()));
    collector.terminate(Duration::from_secs(30)).expect("stops on SIGTERM");

    let mut seed: u64 = 0x5eed;
    let mut recorded = 0;
    let mut killed_during_a_call = 0;
    for round in 0..20 {
        let collector = start();
        let now = activities();
        assert!(
            now >= recorded,
            "round {round}: {now} activities after the restart, {recorded} before"
        );
        assert_eq!(
            protected_member(),
            Some(first.clone()),
            "round {round}: still protected"
        );
        let target = if round % 2 == 0 { "5" } else { "1" };
        // The scale command returns only once its cloud calls are done; the kill must land among them. So it
        // runs in the background, and the collector dies soon after the cloud's first write for it.
        let before = cloud_writes(&cloud);
        let mut scaling = Running::spawn(
            Command::new(collector_bin())
                .args(["--server", &format!("https://{admin_address}"), "--state-dir"])
                .arg(&state)
                .args(["scale", "web", "--to", target])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        // What an operator can see now must outlive the kill.
        recorded = activities();
        // Watched closely (every 2 ms): the kill lands 0-60 ms after the cloud's first write.
        let watching = std::time::Instant::now();
        let mut wrote = false;
        while !wrote && watching.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(2));
            wrote = cloud_writes(&cloud) != before;
        }
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis((seed >> 33) % 60));
        let in_call = scaling.child.try_wait().unwrap().is_none();
        nix::sys::signal::kill(collector.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
        if wrote && in_call {
            killed_during_a_call += 1;
        }
        drop(collector);
        let _ = scaling.child.wait();
    }
    eprintln!("{killed_during_a_call} of 20 kills landed while a scale's cloud calls were under way");
    assert!(
        killed_during_a_call >= 7,
        "only {killed_during_a_call} of 20 kills landed while the cloud calls of a scale were under way"
    );
    let _collector = start();
    let (ok, text) = admin(&admin_address, &state, &["scale", "web", "--to", "3"]);
    assert!(ok, "{text}");
    let members = || {
        let mut ids: Vec<String> = admin(&admin_address, &state, &["members", "web"])
            .1
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        ids.sort();
        ids
    };
    assert!(
        wait_for(Duration::from_secs(30), || running_in(&cloud).len() == 3
            && members() == running_in(&cloud)),
        "reconciled to 3 owned instances: running {:?}, members {:?}",
        running_in(&cloud),
        members()
    );
    assert!(running_in(&cloud).contains(&first), "the protected member never went");
    // Every instance the cloud ever created belongs to a different member, and each was recorded as
    // launched or adopted: no launch was repeated, even one that orphan cleanup would have terminated.
    let history = admin(&admin_address, &state, &["activities", "web", "--limit", "100000"]).1;
    let mut created: Vec<String> = created_in(&cloud);
    let count = created.len();
    created.dedup();
    assert_eq!(
        created.len(),
        count,
        "a member's instance was created twice: {:?}",
        created_in(&cloud)
    );
    for member in &created {
        assert!(
            history
                .lines()
                .any(|l| l.contains(member.as_str()) && (l.contains("launch") || l.contains("adopt"))),
            "{member}'s instance has no launch or adopt activity:\n{history}"
        );
    }
}

/// Each instance file of the directory cloud and when it was last written.
fn cloud_writes(cloud: &Path) -> Vec<(std::ffi::OsString, std::time::SystemTime)> {
    let mut writes: Vec<_> = std::fs::read_dir(cloud)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| Some((e.file_name(), e.metadata().ok()?.modified().ok()?)))
                .collect()
        })
        .unwrap_or_default();
    writes.sort();
    writes
}

/// The member of every instance the directory cloud ever created (terminated ones included), sorted.
fn created_in(cloud: &Path) -> Vec<String> {
    let mut members: Vec<String> = std::fs::read_dir(cloud)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok()?;
            Some(record["member_id"].as_str()?.to_string())
        })
        .collect();
    members.sort();
    members
}

/// Issue 24: the demo stops every process it started and removes its state however it ends — Ctrl-C
/// (SIGINT), or its reader gone (`| tee log` stopped by the same Ctrl-C) — and its admin hint works as
/// printed.
#[test]
fn the_demo_stops_everything_however_it_ends_and_its_admin_hint_works() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, local_config("127.0.4", true, dir.path())).unwrap();
    for how in ["sigint", "reader-gone"] {
        let tmp = dir.path().join(how);
        std::fs::create_dir(&tmp).unwrap();
        let mut demo = Running::spawn(
            Command::new(collector_bin())
                .args(["demo", "--duration-secs", "120", "--config"])
                .arg(&config_path)
                .env("TMPDIR", &tmp)
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let mut lines = BufReader::new(demo.child.stdout.take().unwrap()).lines();
        let mut next = || lines.next().expect("the demo goes on").unwrap();
        let hint = std::iter::repeat_with(&mut next)
            .find(|l| l.trim_start().starts_with("admin "))
            .unwrap();
        let mut words = hint.split_whitespace().skip(1);
        let program = words.next().unwrap().to_string();
        let args: Vec<String> = words.map(String::from).collect();
        assert!(
            std::iter::repeat_with(&mut next)
                .take(60)
                .any(|l| l.contains("capacity 1")),
            "a member in service"
        );
        let output = Command::new(&program).args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success() && text.contains(" launch "), "`{hint}`: {text}");

        match how {
            "sigint" => {
                nix::sys::signal::kill(demo.pid(), nix::sys::signal::Signal::SIGINT).unwrap();
                // Keep reading, as a terminal would, until the demo closes its output.
                for line in lines.by_ref() {
                    line.unwrap();
                }
            }
            _ => drop(lines),
        }
        assert!(
            wait_for(Duration::from_secs(30), || matches!(demo.child.try_wait(), Ok(Some(_)))),
            "{how}: the demo ends"
        );
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "{how}: the demo's state is removed: {left:?}");
        assert!(
            ebb_tests::processes_mentioning(tmp.to_str().unwrap()).is_empty()
                && ebb_tests::processes_mentioning("127.0.4.").is_empty(),
            "{how}: no instance or agent left running"
        );
    }
}
