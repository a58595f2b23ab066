//! Real VMs (issue 25): the template `cargo xtask image` bakes, booted by the qemu provider, enrolled
//! through real cloud-init, systemd and mTLS, serving behind the built-in load balancer. Under TCG (these
//! machines' KVM fails) a VM serves about a minute after its launch; each test bounds its waits.
//!
//! The image is built on first use (`cargo xtask image`: root, Debian's mirror, ~3 minutes) and cached in
//! `target/images/`; `.ci/run` builds it before the tests. The collector's .deb (`cargo xtask package --deb`)
//! is built on first use too.

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
        let status = ebb_tests::cargo()
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
    // The member serves as soon as the operator's application answers, a moment before cloud-init's final
    // message (which names the data source) reaches the console.
    let console = state.join("qemu/web-1/console.log");
    assert!(
        wait_for(Duration::from_secs(60), || std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("Datasource DataSourceNoCloud")),
        "cloud-init read the NoCloud seed: {}",
        std::fs::read_to_string(&console).unwrap_or_default()
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

/// The template with its agent taken out (as a template baked without the package would be): a copy of
/// `template.qcow2` whose `/usr/bin/ebb-agent` is removed with debugfs, without booting it.
fn template_without_agent(dir: &Path) -> PathBuf {
    let raw = dir.join("agentless.raw");
    let agentless = dir.join("agentless.qcow2");
    let run = |command: &mut Command| {
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(images().join("template.qcow2"))
        .arg(&raw));
    // The template is one ext4 file system on the whole disk (root=/dev/vda).
    run(Command::new("debugfs")
        .args(["-w", "-R", "rm /usr/bin/ebb-agent"])
        .arg(&raw));
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&agentless));
    std::fs::remove_file(&raw).unwrap();
    agentless
}

/// A VM that boots but never reports (a template without the agent: cloud-init runs, the operator's web
/// application answers, nothing enrols) is replaced after `launch_timeout_secs`, and the activity says what
/// its console said last.
#[test]
fn a_vm_without_the_agent_is_replaced_with_its_console_in_the_activity() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let image = template_without_agent(dir.path());
    let config = qemu_config(&state, "127.0.22", &image, 100).replace("stop_grace_secs = 60", "stop_grace_secs = 15");
    let mut collector = serve(&config, &state);
    assert!(
        wait_for(Duration::from_secs(300), || activities(&state).contains("launch web-2")),
        "web-1 was not replaced: {}",
        story(&state)
    );
    let told = activities(&state);
    let unhealthy = told
        .lines()
        .find(|l| l.contains(" web unhealthy web-1 "))
        .unwrap_or_else(|| panic!("no unhealthy activity: {told}"));
    assert!(unhealthy.contains("not healthy 100 s after launch"), "{unhealthy}");
    assert!(
        unhealthy.contains("its console's last lines") && unhealthy.contains("qemu/web-1/console.log"),
        "{unhealthy}"
    );
    let console = std::fs::read_to_string(state.join("qemu/web-1/console.log"))
        .or_else(|_| std::fs::read_to_string(state.join("qemu/consoles/web-1.log")))
        .unwrap();
    assert!(
        console.contains("ebb-agent.service"),
        "systemd said on the console that the agent did not start: {console}"
    );
    assert!(collector.terminate(Duration::from_secs(120)).is_some());
    assert!(vms(&state).is_empty(), "no qemu process is left");
}

/// `target/packages/ebb-collector_*.deb`, built (`cargo xtask package --deb`) or found up to date.
fn collector_deb() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = ebb_tests::cargo()
            .args(["xtask", "package", "--deb"])
            .stdout(Stdio::null())
            .status()
            .expect("run cargo xtask package --deb");
        assert!(status.success(), "cargo xtask package --deb failed");
        let version = env!("CARGO_PKG_VERSION");
        root.join(format!("target/packages/ebb-collector_{version}-1_amd64.deb"))
            .canonicalize()
            .unwrap()
    })
}

/// What the VM runs after boot (cloud-init's runcmd, as root), its output on the serial console: the agent
/// out (this host runs the collector only), the collector's package in, its service as systemd runs it, the
/// Admin API over its socket, then a group added to the packaged config and `systemctl reload`.
const COLLECTOR_HOST_CHECKS: &str = r#"#!/bin/sh
check() { echo "EBB-CHECK $1=$2"; }
show() { sed "s/^/EBB-$1 /"; }
systemctl disable --now ebb-agent.service
dpkg --purge ebb-agent > /dev/null
check agent "$(dpkg-query -W -f='${Status}' ebb-agent 2>/dev/null || echo absent)"
dpkg -i /mnt/host/ebb-collector.deb > /tmp/dpkg.log 2>&1
check dpkg "$?"
show DPKG < /tmp/dpkg.log
# Long enough for a service that fails at start to be restarted a few times.
sleep 15
check active "$(systemctl is-active ebb-collector)"
check enabled "$(systemctl is-enabled ebb-collector)"
check restarts "$(systemctl show -p NRestarts --value ebb-collector)"
pid="$(systemctl show -p MainPID --value ebb-collector)"
ebb-collector groups 2>&1 | show GROUPS-BEFORE
cat >> /etc/ebb/collector.toml <<'END'

[[groups]]
name = "api"
min_size = 1
max_size = 2
member_port = 8081   # the service's user ebb cannot bind port 80
[groups.provider]
type = "local"
agent_path = "/bin/true"
[groups.load_balancer]
type = "builtin"
listen = "127.0.0.1:8000"
END
ebb-collector validate --config /etc/ebb/collector.toml 2>&1 | show VALIDATE
systemctl reload ebb-collector
check reload "$?"
for i in $(seq 60); do ls /var/lib/ebb/local/*/instance.json > /dev/null 2>&1 && break; sleep 1; done
check launched "$(ls /var/lib/ebb/local/*/instance.json 2>/dev/null | wc -l)"
# The shipped build has no fake cloud: a group on it is refused.
sed 's/type = "local"/type = "fake"/; s|agent_path = .*|dir = "/tmp/cloud"|' /etc/ebb/collector.toml > /tmp/fake.toml
ebb-collector validate --config /tmp/fake.toml 2>&1 | show FAKE
ebb-collector groups 2>&1 | show GROUPS-AFTER
check same_process "$([ "$pid" = "$(systemctl show -p MainPID --value ebb-collector)" ] && echo yes || echo no)"
check active_after "$(systemctl is-active ebb-collector)"
journalctl -u ebb-collector -o cat --no-pager | show JOURNAL
check done yes
systemctl poweroff
"#;

/// Item 6 of issue 25: the collector's .deb on a fresh Debian 12 (a VM from the template, its agent
/// removed) under a real systemd: installed, enabled and started cleanly with the packaged config (no
/// group, no restart loop), answering `ebb-collector groups` over the Admin API's socket, and picking up a
/// group added to /etc/ebb/collector.toml at `systemctl reload` without a restart.
#[test]
fn the_collector_package_runs_under_systemd_in_a_vm() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let images = images();
    let host = dir.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::copy(collector_deb(), host.join("ebb-collector.deb")).unwrap();
    std::fs::write(host.join("checks.sh"), COLLECTOR_HOST_CHECKS).unwrap();
    let user_data = "#cloud-config\nruncmd:\n  - [sh, -c, 'mkdir -p /mnt/host && (mount -o ro /dev/vdc1 /mnt/host || \
                     mount -o ro /dev/vdc /mnt/host) && sh /mnt/host/checks.sh > /dev/ttyS0 2>&1']\n";
    let seed = dir.path().join("seed.img");
    ebb_collector::providers::qemu::seed::write(&seed, "collector-host", user_data.as_bytes()).unwrap();
    let disk = dir.path().join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(images.join("template.qcow2"))
        .arg(&disk)
        .status()
        .unwrap();
    assert!(status.success());
    let console = dir.path().join("console.log");
    let drive = |file: &Path, options: &str| format!("file={},if=virtio,{options}", file.display());
    let mut vm = Running::spawn(
        Command::new("qemu-system-x86_64")
            .args([
                "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1",
            ])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .args(["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"])
            .args(["-device", "virtio-rng-pci"])
            .arg("-kernel")
            .arg(images.join("vmlinuz"))
            .arg("-initrd")
            .arg(images.join("initrd.img"))
            .args(["-append", "root=/dev/vda rw console=ttyS0"])
            .args(["-drive", &drive(&disk, "format=qcow2")])
            .args(["-drive", &drive(&seed, "format=raw,readonly=on")])
            .args([
                "-drive",
                &format!("file=fat:{},if=virtio,format=raw,readonly=on", host.display()),
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let read_console = || std::fs::read_to_string(&console).unwrap_or_default();
    let powered_off = wait_for(Duration::from_secs(480), || matches!(vm.child.try_wait(), Ok(Some(_))));
    let text = read_console();
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    assert!(
        powered_off,
        "the VM did not finish its checks and power off: {}",
        tail.join("\n")
    );
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let check = |name: &str| {
        let prefix = format!("EBB-CHECK {name}=");
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no check {name} on the console: {}", tail.join("\n")))
            .to_string()
    };
    let shown = |what: &str| {
        let prefix = format!("EBB-{what} ");
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(check("done"), "yes");
    assert_eq!(check("agent"), "absent", "a host without the agent");
    assert_eq!(check("dpkg"), "0", "{}", shown("DPKG"));
    assert_eq!(check("enabled"), "enabled");
    assert_eq!(
        check("active"),
        "active",
        "dpkg said:\n{}\njournal:\n{}",
        shown("DPKG"),
        shown("JOURNAL")
    );
    assert_eq!(check("restarts"), "0", "no restart loop: {}", shown("JOURNAL"));
    let journal = shown("JOURNAL");
    assert!(journal.contains("No groups yet: add a [[groups]] table"), "{journal}");
    assert!(!journal.contains("Scheduled restart job"), "{journal}");
    let before = shown("GROUPS-BEFORE");
    assert!(before.contains("no groups: add a [[groups]] table"), "{before}");
    assert!(shown("VALIDATE").contains("valid, 1 group(s)"), "{}", shown("VALIDATE"));
    assert_eq!(check("reload"), "0");
    assert_eq!(
        check("launched"),
        "1",
        "the added group launched its minimum: {journal}"
    );
    let after = shown("GROUPS-AFTER");
    assert!(after.lines().any(|l| l.starts_with("api ")), "{after}");
    let fake = shown("FAKE");
    assert!(
        fake.contains("unknown variant `fake`"),
        "the shipped collector has no fake cloud: {fake}"
    );
    assert_eq!(check("same_process"), "yes", "a reload, not a restart");
    assert_eq!(check("active_after"), "active");
    assert!(
        journal.contains("Started a group the configuration gained"),
        "{journal}"
    );
    assert!(vm.terminate(Duration::from_secs(5)).is_some());
}
