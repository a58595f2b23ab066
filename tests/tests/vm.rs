//! Real VMs (issue 25): the template `cargo xtask image` bakes, booted by the qemu provider, enrolled
//! through real cloud-init, systemd and mTLS, serving behind the built-in load balancer. Under TCG (these
//! machines' KVM fails) a VM serves about a minute after its launch; each test bounds its waits.
//!
//! The image is built on first use (`cargo xtask image`: root, Debian's mirror, ~3 minutes) and cached in
//! `target/images/`; `.ci/run` builds it before the tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use ebb_tests::{Running, admin, collector_bin, examples_dir, free_port, processes_mentioning, serial, wait_for};

/// `target/images/`, built or found up to date.
fn images() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["xtask", "image"])
            .stdout(Stdio::null())
            .status()
            .expect("run cargo xtask image");
        assert!(
            status.success(),
            "cargo xtask image failed (it needs root and Debian's mirror)"
        );
        root.join("target/images").canonicalize().unwrap()
    })
}

/// `examples/qemu.toml` with free ports, its own loopback range and state directory, and the image at
/// `image`; `launch_timeout_secs` as given.
fn qemu_config(state_dir: &Path, address_prefix: &str, image: &Path, launch_timeout_secs: u32) -> String {
    let example = std::fs::read_to_string(examples_dir().join("qemu.toml")).unwrap();
    let images = images().to_str().unwrap();
    example
        .replace("127.0.0.1:7300", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:7301", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.9", address_prefix)
        .replace("/var/lib/ebb", state_dir.to_str().unwrap())
        .replace("\"target/images/template.qcow2\"", &format!("{image:?}"))
        .replace("\"target/images/", &format!("\"{images}/"))
        .replace(
            "launch_timeout_secs = 600",
            &format!("launch_timeout_secs = {launch_timeout_secs}"),
        )
}

fn listen_address(config: &str) -> String {
    let line = config.lines().find(|l| l.starts_with("listen = ")).unwrap();
    line.split('"').nth(1).unwrap().to_string()
}

fn serve(config: &str, state: &Path) -> Running {
    let path = state.join("collector.toml");
    std::fs::create_dir_all(state).unwrap();
    std::fs::write(&path, config).unwrap();
    Running::collector(
        Command::new(collector_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .env("EBB_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(state.join("collector.log")).unwrap()),
        state,
    )
}

/// `ebb-collector members web` as (member, state) pairs.
fn members(state: &Path) -> Vec<(String, String)> {
    let (_, text) = admin("", state, &["members", "web"]);
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

fn in_service(state: &Path) -> Vec<String> {
    members(state)
        .into_iter()
        .filter(|(_, s)| s == "in_service")
        .map(|(m, _)| m)
        .collect()
}

fn activities(state: &Path) -> String {
    admin("", state, &["activities", "web"]).1
}

/// The qemu processes of VMs in `state`.
fn vms(state: &Path) -> Vec<u32> {
    processes_mentioning(&format!("{}/qemu/", state.display()))
}

/// Diagnostics for a failed wait: the activities and the collector's log.
fn story(state: &Path) -> String {
    let log = std::fs::read_to_string(state.join("collector.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    format!(
        "activities:\n{}\nlog (newest first):\n{}",
        activities(state),
        tail.join("\n")
    )
}

/// The whole path on real VMs: boot from the template, cloud-init runs ebb's part and the operator's,
/// systemd starts the packaged agent, it enrols over mTLS through NAT, the health check passes through
/// the port forward, the load balancer serves from it; load scales out, the collector is killed with
/// SIGKILL while the new VM boots and adopts it after the restart (never launching it twice), load
/// stops and scale-in drains and powers off a VM; the collector's stop leaves no VM, overlay or seed.
#[test]
fn a_group_of_real_vms_scales_out_under_load_and_in_after_it() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = qemu_config(&state, "127.0.21", &images().join("template.qcow2"), 600);
    let lb = listen_address(&config);
    let mut collector = serve(&config, &state);

    assert!(
        wait_for(Duration::from_secs(420), || in_service(&state) == ["web-1"]),
        "web-1 never served: {}",
        story(&state)
    );
    let page = ebb_tests::try_http_get(&lb, "/work").unwrap();
    assert!(
        page.starts_with("HTTP/1.0 200") && page.trim_end().lines().last().unwrap().len() == 64,
        "the operator's application (its user data) answers through the load balancer: {page}"
    );
    let seed_console = std::fs::read_to_string(state.join("qemu/web-1/console.log")).unwrap();
    assert!(
        seed_console.contains("Datasource DataSourceNoCloud"),
        "cloud-init read the NoCloud seed"
    );
    let (_, listing) = admin("", &state, &["members", "web"]);
    let cpu: f64 = listing
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(3)
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    assert!(
        (0.0..=100.0).contains(&cpu),
        "the agent in the VM reports its CPU: {listing}"
    );

    // Load through the load balancer until the scale-out launches web-2, then kill the collector as it boots.
    let lb_address: std::net::SocketAddr = lb.parse().unwrap();
    let launched = ebb_tests::load(
        || vec![lb_address],
        Duration::from_secs(300),
        || activities(&state).contains("launch web-2 ok"),
    );
    assert!(launched, "no scale-out under load: {}", story(&state));
    assert!(activities(&state).contains("policy cpu-high"), "{}", story(&state));
    let _ = nix::sys::signal::kill(collector.pid(), nix::sys::signal::Signal::SIGKILL);
    let _ = collector.child.wait();
    assert_eq!(vms(&state).len(), 2, "the VMs outlive the collector");

    let mut collector = serve(&config, &state);
    let both = ebb_tests::load(
        || vec![lb_address],
        Duration::from_secs(420),
        || in_service(&state).len() == 2,
    );
    assert!(both, "web-2 was not adopted into service: {}", story(&state));
    let told = activities(&state);
    assert!(
        !told.contains("launch web-3"),
        "the booting VM was adopted, not launched again: {told}"
    );
    assert_eq!(vms(&state).len(), 2);

    // Load stops: the group goes back to one VM, the other drained and powered off.
    assert!(
        wait_for(Duration::from_secs(300), || activities(&state)
            .contains("terminate web-")),
        "no scale-in after the load: {}",
        story(&state)
    );
    assert!(
        wait_for(Duration::from_secs(90), || vms(&state).len() == 1),
        "{}",
        story(&state)
    );
    let told = activities(&state);
    assert!(
        told.contains("policy cpu-low") && told.contains(" drain web-"),
        "{told}"
    );
    let gone = ["web-1", "web-2"]
        .into_iter()
        .find(|m| !state.join("qemu").join(m).exists())
        .unwrap();
    assert!(
        state.join(format!("qemu/consoles/{gone}.log")).exists(),
        "its console is kept"
    );

    assert!(
        collector.terminate(Duration::from_secs(120)).is_some(),
        "the collector stops within 2 minutes"
    );
    assert!(vms(&state).is_empty(), "no qemu process is left");
    let left: Vec<String> = std::fs::read_dir(state.join("qemu"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "consoles")
        .collect();
    assert!(left.is_empty(), "no overlay or seed is left: {left:?}");
}

/// A VM that never comes up (here a blank disk: the initramfs finds no root and stops at its shell) is replaced
/// after `launch_timeout_secs`, and the activity says what its console said last.
#[test]
fn a_vm_that_never_comes_up_is_replaced_with_its_console_in_the_activity() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let blank = dir.path().join("blank.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&blank)
        .arg("1G")
        .status()
        .unwrap();
    assert!(status.success());
    // A VM stuck in the initramfs ignores the ACPI power button: it is killed after stop_grace_secs.
    let config = qemu_config(&state, "127.0.22", &blank, 45).replace("stop_grace_secs = 60", "stop_grace_secs = 15");
    let mut collector = serve(&config, &state);
    assert!(
        wait_for(Duration::from_secs(240), || activities(&state).contains("launch web-2")),
        "web-1 was not replaced: {}",
        story(&state)
    );
    let told = activities(&state);
    let unhealthy = told
        .lines()
        .find(|l| l.contains(" web unhealthy web-1 "))
        .unwrap_or_else(|| panic!("no unhealthy activity: {told}"));
    assert!(unhealthy.contains("not healthy 45 s after launch"), "{unhealthy}");
    assert!(
        unhealthy.contains("its console's last lines") && unhealthy.contains("qemu/web-1/console.log"),
        "{unhealthy}"
    );
    assert!(
        unhealthy.contains("Gave up waiting for root file system device") && unhealthy.ends_with("(initramfs)]"),
        "what the initramfs said last: {unhealthy}"
    );
    assert!(collector.terminate(Duration::from_secs(120)).is_some());
    assert!(vms(&state).is_empty(), "no qemu process is left");
}
