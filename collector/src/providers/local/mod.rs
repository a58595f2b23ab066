//! The local provider, the embedded default: an instance is a process group on this machine, bound to its
//! own loopback address (`<address_prefix>.N`, so instances never collide on a port), with its own
//! `ebb-agent` measuring that instance's process tree. No cloud, no root.
//!
//! Like a cloud's, its instances outlive a collector that crashes: each one is recorded in
//! `<instances_dir>/<member_id>/instance.json` (its process group and that process's start time, so a
//! reused PID is never mistaken for it), and listing reads those records, so a restarted collector finds
//! and adopts them. A collector that stops normally stops its instances with it, so nothing keeps running
//! on the machine after the demo.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;

use super::process::{ProcessRecord, ProcessRecords};
use super::{CloudError, Instance, InstanceState, LaunchSpec, Provider};
use crate::config::LocalProviderConfig;

/// When a running (not zombie) process started, in clock ticks since boot; `None` if it is gone.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may itself hold spaces and parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // fields[0] is the state (field 3), so field 22 is fields[19].
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

pub struct LocalProvider {
    config: LocalProviderConfig,
    /// The instances, each in `<instances_dir>/<member_id>/`.
    records: ProcessRecords,
    agent_path: PathBuf,
    collector_exe: PathBuf,
    /// Held while a launch picks its address and writes its record, so two launches never share one.
    launching: Mutex<()>,
}

fn this_executable() -> Result<PathBuf, CloudError> {
    std::env::current_exe()
        .map_err(|e| CloudError::permanent(format!("cannot find this executable's path: {e}")).caused_by(e))
}

/// The agent the instances run: `provider.agent_path`, else `ebb-agent` beside this executable; an error
/// saying what to do when it is not there (`serve` refuses to start, and `validate` says so first).
pub fn agent_path(config: &LocalProviderConfig) -> Result<PathBuf, CloudError> {
    let agent_path = match &config.agent_path {
        Some(path) => path.clone(),
        None => this_executable()?.with_file_name("ebb-agent"),
    };
    if !agent_path.is_file() {
        return Err(CloudError::permanent(format!(
            "the local provider needs ebb-agent, and {} does not exist: install the ebb-agent package, build it \
             with `cargo build --release -p ebb-agent`, or set provider.agent_path",
            agent_path.display()
        )));
    }
    Ok(agent_path)
}

impl LocalProvider {
    /// Checks that the agent binary exists; its absence is the operator's to fix. Each instance keeps its
    /// record and its agent's configuration and state in `<instances_dir>/<member_id>/`.
    pub fn new(config: LocalProviderConfig, instances_dir: PathBuf) -> Result<Self, CloudError> {
        let collector_exe = this_executable()?;
        let agent_path = agent_path(&config)?;
        Ok(Self {
            config,
            records: ProcessRecords {
                dir: instances_dir,
                kind: "local",
                exited: "the instance's process exited",
            },
            agent_path,
            collector_exe,
            launching: Mutex::new(()),
        })
    }

    /// The first `<prefix>.N` that no running instance uses and where `port` is free.
    fn free_address(&self, port: u16) -> Result<IpAddr, CloudError> {
        let taken: Vec<IpAddr> = self
            .records
            .all()
            .into_iter()
            .filter(ProcessRecord::running)
            .map(|r| r.address)
            .collect();
        free_loopback_address(&self.config.address_prefix, port, &taken)
    }

    fn expand(&self, template: &str, spec: &LaunchSpec, address: IpAddr) -> String {
        template
            .replace("{address}", &address.to_string())
            .replace("{port}", &spec.service_port.to_string())
            .replace("{member_id}", &spec.member_id)
            .replace("{ebb_collector}", &self.collector_exe.to_string_lossy())
    }

    fn log_file(&self, member_id: &str, process: &str) -> Stdio {
        let Some(dir) = &self.config.log_dir else {
            return Stdio::null();
        };
        let path = dir.join(format!("{member_id}.{process}.log"));
        match std::fs::create_dir_all(dir).and_then(|()| std::fs::File::create(&path)) {
            Ok(file) => Stdio::from(file),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Cannot create the instance's log file.");
                Stdio::null()
            }
        }
    }

    /// Starts the workload and its agent in one new process group and records them; all of it undone if
    /// any step fails.
    fn start(&self, spec: &LaunchSpec, dir: &Path) -> Result<ProcessRecord, CloudError> {
        let address = self.free_address(spec.service_port)?;
        // The VM's "user data": the agent's configuration with this launch's join token, in the instance's
        // own owner-only directory, which is also the agent's state directory. A directory left by an
        // earlier attempt of this member holds nothing worth keeping.
        let _ = std::fs::remove_dir_all(dir);
        write_private(dir, "agent.toml", spec.agent_config.as_bytes())
            .map_err(|e| CloudError::permanent(format!("cannot write {}: {e}", dir.display())).caused_by(e))?;
        let argv: Vec<String> = self
            .config
            .command
            .iter()
            .map(|arg| self.expand(arg, spec, address))
            .collect();
        let workload = Command::new(&argv[0])
            .args(&argv[1..])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_file(&spec.member_id, "workload"))
            .spawn()
            .map_err(|e| CloudError::permanent(format!("cannot start `{}`: {e}", argv[0])).caused_by(e))?;
        let pid = workload.id().expect("a process that was just spawned has a pid") as i32;
        let started = start_time(pid).ok_or_else(|| {
            CloudError::permanent(format!(
                "`{}` exited as soon as it started; set provider.log_dir to see why",
                argv[0]
            ))
        })?;
        let record = ProcessRecord {
            group: spec.group.clone(),
            member_id: spec.member_id.clone(),
            launch_id: spec.launch_id.clone(),
            cluster_id: spec.cluster_id.clone(),
            address,
            pid,
            started,
        };
        let undo = |error: CloudError| {
            record.signal(Signal::SIGKILL);
            let _ = std::fs::remove_dir_all(dir);
            error
        };
        Command::new(&self.agent_path)
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .arg("--state-dir")
            .arg(dir)
            .args([
                "--cpu-pid",
                &pid.to_string(),
                "--cpu-capacity",
                &self.config.instance_cpus.to_string(),
            ])
            .env("EBB_LOG", "warn")
            .process_group(pid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_file(&spec.member_id, "agent"))
            .spawn()
            .map_err(|e| {
                undo(CloudError::permanent(format!(
                    "cannot start {}: {e}",
                    self.agent_path.display()
                )))
            })?;
        let json = serde_json::to_vec_pretty(&record).expect("a record serializes");
        write_private(dir, ProcessRecord::FILE, &json)
            .map_err(|e| undo(CloudError::permanent(format!("cannot write {}: {e}", dir.display()))))?;
        Ok(record)
    }

    /// SIGTERM to the process group, SIGKILL after the grace period, then the record goes.
    async fn stop(&self, record: ProcessRecord) {
        record.signal(Signal::SIGTERM);
        let grace = Duration::from_secs(self.config.stop_grace_secs.into());
        if !exits_within(&record, grace).await {
            tracing::warn!(member = %record.member_id, "The instance ignored SIGTERM; sending SIGKILL.");
            record.signal(Signal::SIGKILL);
            exits_within(&record, Duration::from_secs(2)).await;
        }
        // Anything else left in the group: its id is not reused while any member is alive.
        let _ = killpg(Pid::from_raw(record.pid), Signal::SIGKILL);
        let _ = std::fs::remove_dir_all(self.records.dir.join(&record.member_id));
    }
}

async fn exits_within(record: &ProcessRecord, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while record.running() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// An instance record (`instance.json`) as a provider that keeps its instances on disk wrote it; `None`
/// if it is missing, and a warning if it is unreadable.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::warn!(path = %path.display(), error = %e, "Ignoring an unreadable instance record."))
        .ok()
}

/// The first `<prefix>.N` (N from 1 to 254) not in `taken` where `port` is free to bind.
pub(crate) fn free_loopback_address(prefix: &str, port: u16, taken: &[IpAddr]) -> Result<IpAddr, CloudError> {
    (1..=254)
        .filter_map(|n| format!("{prefix}.{n}").parse::<IpAddr>().ok())
        .filter(|ip| !taken.contains(ip))
        .find(|ip| std::net::TcpListener::bind(SocketAddr::new(*ip, port)).is_ok())
        .ok_or_else(|| CloudError::retryable(format!("no free address in {prefix}.1-254 with port {port} free")))
}

#[async_trait]
impl Provider for LocalProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        let _launching = self.launching.lock().unwrap();
        let dir = self.records.dir.join(&spec.member_id);
        // A launch retried after it already happened finds its instance instead of starting a second one.
        if let Some(record) = ProcessRecord::read(&dir).filter(|r| r.launch_id == spec.launch_id && r.running()) {
            return Ok(self.records.instance(&record));
        }
        Ok(self.records.instance(&self.start(spec, &dir)?))
    }

    async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceState>, CloudError> {
        Ok(ids
            .iter()
            .map(|id| match self.records.find(id) {
                Some(record) => self.records.state(&record),
                None => InstanceState::Terminated {
                    reason: "no such local instance".into(),
                },
            })
            .collect())
    }

    async fn terminate(&self, id: &str) -> Result<(), CloudError> {
        if let Some(record) = self.records.find(id) {
            self.stop(record).await;
        }
        Ok(())
    }

    async fn list(&self, group: &str) -> Result<Vec<Instance>, CloudError> {
        Ok(self
            .records
            .all()
            .iter()
            .filter(|r| r.group == group)
            .map(|record| self.records.instance(record))
            .collect())
    }

    async fn close(&self) {
        let all = self.records.all();
        // Signal them all first, so their grace periods run at the same time.
        all.iter().for_each(|record| record.signal(Signal::SIGTERM));
        for record in all {
            self.stop(record).await;
        }
    }
}

/// Writes an owner-only file into `dir`, creating it owner-only if needed; the file appears whole or not
/// at all.
pub(crate) fn write_private(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let partial = dir.join(format!(".{name}.partial"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(partial, dir.join(name))
}

impl Drop for LocalProvider {
    /// A provider dropped without `close` (a panic, an early return) still leaves no process behind; only a
    /// collector that dies without unwinding (SIGKILL, a power cut) leaves its instances for the next one.
    fn drop(&mut self) {
        for record in self.records.all() {
            record.signal(Signal::SIGKILL);
            let _ = std::fs::remove_dir_all(self.records.dir.join(&record.member_id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider whose instances live in a temporary directory, removed with the returned guard.
    fn provider(command: &[&str], prefix: &str) -> (LocalProvider, tempfile::TempDir) {
        let instances = tempfile::tempdir().unwrap();
        (provider_in(command, prefix, instances.path()), instances)
    }

    fn provider_in(command: &[&str], prefix: &str, instances: &Path) -> LocalProvider {
        LocalProvider::new(
            LocalProviderConfig {
                command: command.iter().map(|s| s.to_string()).collect(),
                address_prefix: prefix.into(),
                // Stands in for ebb-agent: takes any arguments and exits.
                agent_path: Some(PathBuf::from("/bin/true")),
                instance_cpus: 1.0,
                stop_grace_secs: 1,
                log_dir: None,
            },
            instances.to_path_buf(),
        )
        .unwrap()
    }

    fn spec(member_id: &str) -> LaunchSpec {
        LaunchSpec {
            cluster_id: "test".into(),
            group: "web".into(),
            member_id: member_id.into(),
            launch_id: format!("{member_id}-1"),
            service_port: 8080,
            agent_config: "token = \"secret\"\n".into(),
            user_data: Vec::new(),
        }
    }

    fn alive(pid: i32) -> bool {
        start_time(pid).is_some()
    }

    fn pid_of(provider: &LocalProvider, instance: &Instance) -> i32 {
        provider.records.find(&instance.id).expect("a recorded instance").pid
    }

    #[tokio::test]
    async fn instances_get_their_own_addresses_and_are_described() {
        let (provider, _instances) = provider(&["sleep", "30"], "127.0.6");
        let a = provider.launch(&spec("web-1")).await.unwrap();
        let b = provider.launch(&spec("web-2")).await.unwrap();
        assert_eq!(a.address, Some("127.0.6.1".parse().unwrap()));
        assert_eq!(b.address, Some("127.0.6.2".parse().unwrap()));
        assert_eq!(provider.list("web").await.unwrap().len(), 2);
        assert!(provider.list("other").await.unwrap().is_empty());

        let _ = killpg(Pid::from_raw(pid_of(&provider, &a)), Signal::SIGKILL);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b_pid = pid_of(&provider, &b);
        let states = provider
            .describe(&[
                a.id.clone(),
                b.id.clone(),
                "local-web-0".into(),
                "local-../web-2".into(),
            ])
            .await
            .unwrap();
        assert!(
            matches!(&states[0], InstanceState::Terminated { reason } if reason.contains("exited")),
            "{states:?}"
        );
        assert_eq!(states[1], InstanceState::Running);
        assert!(matches!(states[2], InstanceState::Terminated { .. }));
        assert!(matches!(states[3], InstanceState::Terminated { .. }));
        provider.close().await;
        assert!(!alive(b_pid), "close stops every instance");
    }

    #[tokio::test]
    async fn an_instance_that_ignores_sigterm_is_killed_after_the_grace_period() {
        let (provider, _instances) = provider(&["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"], "127.0.7");
        let instance = provider.launch(&spec("web-1")).await.unwrap();
        let pid = pid_of(&provider, &instance);
        let config = provider.records.dir.join("web-1/agent.toml");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
            0o600,
            "the token is owner-only"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(alive(pid));
        provider.terminate(&instance.id).await.unwrap();
        assert!(!alive(pid), "SIGKILL after the grace period");
        assert!(!config.exists(), "the instance's directory goes with it");
        provider
            .terminate(&instance.id)
            .await
            .expect("terminating twice succeeds");
    }

    #[tokio::test]
    async fn instances_outlive_a_crashed_provider_and_the_next_one_finds_and_stops_them() {
        let (crashed, instances) = provider(&["sleep", "30"], "127.0.8");
        let spec = spec("web-1");
        let launched = crashed.launch(&spec).await.unwrap();
        let pid = pid_of(&crashed, &launched);
        // A crash runs no destructor.
        std::mem::forget(crashed);
        assert!(alive(pid));

        let restarted = provider_in(&["sleep", "30"], "127.0.8", instances.path());
        let listed = restarted.list("web").await.unwrap();
        assert_eq!(listed, vec![launched.clone()], "found again by listing");
        assert_eq!(
            restarted.launch(&spec).await.unwrap(),
            launched,
            "a retried launch finds its instance instead of starting another"
        );
        let second = restarted.launch(&self::spec("web-2")).await.unwrap();
        assert_ne!(second.address, launched.address, "a recorded address stays taken");
        restarted.terminate(&launched.id).await.unwrap();
        assert!(!alive(pid));
        assert_eq!(
            restarted.describe(std::slice::from_ref(&launched.id)).await.unwrap(),
            vec![InstanceState::Terminated {
                reason: "no such local instance".into()
            }]
        );
        drop(restarted);
        assert!(
            std::fs::read_dir(instances.path()).unwrap().next().is_none(),
            "a dropped provider stops what is left"
        );
    }

    #[test]
    fn a_reused_pid_is_not_taken_for_the_instance() {
        let record = ProcessRecord {
            group: "web".into(),
            member_id: "web-1".into(),
            launch_id: "web-1-1".into(),
            cluster_id: "test".into(),
            address: "127.0.8.1".parse().unwrap(),
            pid: std::process::id() as i32,
            started: start_time(std::process::id() as i32).unwrap() + 1,
        };
        assert!(!record.running());
        // And signalling it does nothing to this process.
        record.signal(Signal::SIGTERM);
    }

    #[test]
    fn a_missing_agent_is_an_error_that_says_what_to_do() {
        let error = LocalProvider::new(
            LocalProviderConfig {
                agent_path: Some(PathBuf::from("/nonexistent/ebb-agent")),
                ..provider(&["true"], "127.0.6").0.config.clone()
            },
            std::env::temp_dir(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(error.contains("cargo build --release -p ebb-agent"), "{error}");
    }
}
