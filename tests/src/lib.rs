//! Helpers for the end-to-end tests: build and find the real binaries, run them as children that are
//! always stopped, find processes left behind.

#![forbid(unsafe_code)]

pub mod aws;
pub mod cloudstack;
mod http;
pub mod openstack;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The directory with this profile's binaries (`target/debug` when testing in debug).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// A `cargo` run in the workspace with the environment a shell's `cargo` has: without the variables cargo
/// sets for a test it runs (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...), which build scripts watching one
/// (ring's does) would take for a change, rebuilding for the nested build and again for the next `cargo
/// test`.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_for_a_test = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix));
        if set_for_a_test {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// Builds `ebb-collector` (with the fake clouds, as this crate links it) and `ebb-agent` once per test
/// process, in this test's profile, and returns the directory holding them.
pub fn binaries() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = bin_dir();
        let mut build = cargo();
        build.args(["build", "--quiet", "--bins", "-p", "ebb-agent", "-p", "ebb-collector"]);
        build.args(["--features", "fake-cloud"]); // ebb-collector's; ebb-agent has none
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
        dir
    })
}

pub fn collector_bin() -> PathBuf {
    binaries().join("ebb-collector")
}

pub fn agent_bin() -> PathBuf {
    binaries().join("ebb-agent")
}

/// End-to-end tests each load the machine; one at a time keeps them honest on two cores.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, whatever the test did.
pub struct Running {
    pub child: Child,
    /// A collector's state directory: its local instances and qemu VMs are killed after it when dropped.
    instances_in: Option<PathBuf>,
}

impl Running {
    pub fn spawn(command: &mut Command) -> Self {
        let child = command.stdin(Stdio::piped()).spawn().expect("spawn");
        Self {
            child,
            instances_in: None,
        }
    }

    /// A collector with the local or qemu provider and this state directory: the instances and VMs it
    /// leaves behind (as a collector killed with SIGKILL does, like a cloud's) are killed when this is
    /// dropped.
    pub fn collector(command: &mut Command, state_dir: &Path) -> Self {
        let mut running = Self::spawn(command);
        running.instances_in = Some(state_dir.to_path_buf());
        running
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// SIGTERM and wait up to `grace` for the exit; `None` if it had to be killed.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let _ = kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate(Duration::from_secs(10));
        }
        if let Some(dir) = &self.instances_in {
            kill_local_instances(&dir.join("local"));
            kill_local_instances(&dir.join("qemu"));
        }
    }
}

/// The process groups of the local instances (or qemu VMs) recorded in `dir` that are still running, as
/// `(pgid, start time)`.
pub fn local_instances(dir: &Path) -> Vec<(i32, u64)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(bytes) = std::fs::read(entry.path().join("instance.json")) else {
            continue;
        };
        let record: serde_json::Value = serde_json::from_slice(&bytes).expect("an instance record");
        let (Some(pid), Some(started)) = (record["pid"].as_i64(), record["started"].as_u64()) else {
            panic!("an instance record without pid and start time: {record}");
        };
        let pid = pid as i32;
        if ebb_collector::providers::local::start_time(pid) == Some(started) {
            found.push((pid, started));
        }
    }
    found
}

fn kill_local_instances(dir: &Path) {
    for (pid, _) in local_instances(dir) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// PIDs of processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// Waits until `condition` holds or `timeout` passes; true if it held.
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    condition()
}

/// One `GET path` to `address` over HTTP/1.1 (`/metrics`, the built-in load balancer): the whole answer,
/// or the error if nothing answers within 10 s.
pub fn try_http_get(address: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// A free loopback port (bound and released; good enough on a test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The repository's `examples/` directory.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A third-party tool from `scripts/test-tools`, installing it on first use.
pub fn test_tool(name: &str) -> PathBuf {
    installed(&Path::new("bin").join(name))
}

/// Apache libcloud's recorded CloudStack answers: `compute/` and `loadbalancer/` hold `<command>_<case>.json`.
pub fn libcloud_fixtures() -> PathBuf {
    let fixtures = installed(Path::new("libcloud-fixtures"));
    assert!(fixtures.join("compute/deployVirtualMachine_default.json").exists());
    fixtures
}

/// `relative` under `target/test-tools`, running `scripts/test-tools` first if it is missing.
fn installed(relative: &Path) -> PathBuf {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("target/test-tools").join(relative);
    if !path.exists() {
        INSTALLED.get_or_init(|| {
            let status = Command::new(root.join("scripts/test-tools"))
                .status()
                .expect("run scripts/test-tools");
            assert!(
                status.success(),
                "scripts/test-tools failed; it needs PyPI and Debian's package mirror"
            );
        });
    }
    assert!(path.exists(), "{} is missing after scripts/test-tools", path.display());
    path
}

/// An operator command against the Admin API at `server` (if empty: its Unix socket in `state_dir`), with
/// the admin certificate in `state_dir`.
pub fn admin(server: &str, state_dir: &Path, args: &[&str]) -> (bool, String) {
    let mut command = Command::new(collector_bin());
    if !server.is_empty() {
        command.args(["--server", &format!("https://{server}")]);
    }
    let output = command.arg("--state-dir").arg(state_dir).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// Running instances in the directory-backed fake cloud, by member id.
pub fn running_in(cloud: &Path) -> Vec<String> {
    let mut running: Vec<String> = std::fs::read_dir(cloud)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter_map(|e| {
                    serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(e.path()).ok()?).ok()
                })
                .filter(|r| r["running"] == true)
                .map(|r| r["member_id"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    running.sort();
    running
}

/// What stands in for a fake cloud's VMs: local instances running the built-in workload on
/// `<prefix>.N:8080`, each with its own agent, kept in `dir`.
pub fn stand_ins(prefix: &str, dir: &Path) -> ebb_collector::providers::local::LocalProvider {
    let config = format!(
        r#"
        command = ["{}", "workload", "--listen", "{{address}}:{{port}}", "--member-id", "{{member_id}}"]
        address_prefix = "{prefix}"
        agent_path = "{}"
        instance_cpus = 1.0
        stop_grace_secs = 2
        "#,
        collector_bin().display(),
        agent_bin().display()
    );
    ebb_collector::providers::local::LocalProvider::new(toml::from_str(&config).unwrap(), dir.to_path_buf()).unwrap()
}

/// Plays a load balancer under load: `GET /work` to each address `targets` gives (loopback only), 20 a
/// round each, until `done` holds or `limit` passes, and never more than 200,000 requests; whether `done`
/// held.
pub fn load(targets: impl Fn() -> Vec<std::net::SocketAddr>, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < limit && sent < 200_000 {
        if done() {
            return true;
        }
        let threads: Vec<_> = targets()
            .into_iter()
            .map(|target| {
                assert!(target.ip().is_loopback(), "load only ever goes to loopback: {target}");
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        if let Ok(mut stream) = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                            let _ = write!(stream, "GET /work HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                            let _ = stream.read_to_end(&mut Vec::new());
                        }
                    }
                })
            })
            .collect();
        sent += 20 * threads.len().max(1) as u64;
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
    done()
}

/// What cloud-init makes of `user_data` at first boot, read by cloud-init's own code
/// (`scripts/cloud-init-userdata.py`): `parts` (content types), `cloud_config` (merged), `scripts` (by
/// file name) and `schema_error` (null when the merged cloud-config passes cloud-init's schema).
pub fn cloud_init_reads(user_data: &[u8]) -> serde_json::Value {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), user_data).unwrap();
    let output = Command::new(test_tool("cloud-init-userdata"))
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "cloud-init could not read the user data: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// User data as a cloud's fake received it, as text: gunzipped when ebb gzipped it.
pub fn user_data_text(bytes: &[u8]) -> String {
    let mut text = Vec::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut text).unwrap();
    } else {
        text = bytes.to_vec();
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// A collector configuration with one local group `web` (min 0, max 3) that launches nothing: the agents'
/// listener at `grpc`, the Admin API also on `admin`, `/metrics` on a free port, state in `state_dir`.
pub fn idle_collector_config(grpc: &str, admin: &str, state_dir: &Path) -> String {
    format!(
        r#"
        [server]
        grpc_listen = "{grpc}"
        admin_listen = "{admin}"
        http_listen = "127.0.0.1:{http}"
        state_dir = "{state}"

        {group}"#,
        http = free_port(),
        state = state_dir.display(),
        group = ebb_collector::testing::GroupToml::local("web").to_toml()
    )
}
