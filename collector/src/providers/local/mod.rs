//! The local provider, the embedded default: an instance is a process group on this machine, bound to its
//! own loopback address (`<address_prefix>.N`, so instances never collide on a port), with its own
//! `ebb-agent` measuring that instance's process tree. No cloud, no root.
//!
//! Both processes get a pipe on standard input that only the collector holds; the built-in workload and the
//! agent exit when it closes, so even a collector killed with SIGKILL leaves nothing behind.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::{CloudError, Instance, InstanceState, LaunchSpec, Provider};
use crate::config::LocalProviderConfig;

struct LocalInstance {
    member_id: String,
    /// The instance's agent configuration and state.
    dir: PathBuf,
    group: String,
    address: IpAddr,
    /// The instance's process; its PID is the process group's id.
    workload: Child,
    agent: Child,
}

impl LocalInstance {
    fn process_group(&self) -> Option<Pid> {
        self.workload.id().map(|pid| Pid::from_raw(pid as i32))
    }

    fn signal(&self, signal: Signal) {
        if let Some(group) = self.process_group() {
            let _ = killpg(group, signal);
        }
    }
}

pub struct LocalProvider {
    config: LocalProviderConfig,
    instances_dir: PathBuf,
    agent_path: PathBuf,
    collector_exe: PathBuf,
    instances: Mutex<HashMap<String, LocalInstance>>,
}

impl LocalProvider {
    /// Checks that the agent binary exists; its absence is the operator's to fix. Each instance keeps its
    /// agent's configuration and state in `<instances_dir>/<member_id>/`.
    pub fn new(config: LocalProviderConfig, instances_dir: PathBuf) -> Result<Self, CloudError> {
        let collector_exe = std::env::current_exe()
            .map_err(|e| CloudError::Permanent(format!("cannot find this executable's path: {e}")))?;
        let agent_path = match &config.agent_path {
            Some(path) => path.clone(),
            None => collector_exe.with_file_name("ebb-agent"),
        };
        if !agent_path.is_file() {
            return Err(CloudError::Permanent(format!(
                "the local provider needs ebb-agent, and {} does not exist: build it with `cargo build --release -p ebb-agent` or set provider.agent_path",
                agent_path.display()
            )));
        }
        Ok(Self {
            config,
            instances_dir,
            agent_path,
            collector_exe,
            instances: Mutex::new(HashMap::new()),
        })
    }

    /// The first `<prefix>.N` that no instance of ours uses and where `port` is free.
    fn free_address(&self, port: u16) -> Result<IpAddr, CloudError> {
        let taken: Vec<IpAddr> = self.instances.lock().unwrap().values().map(|i| i.address).collect();
        (1..=254)
            .filter_map(|n| format!("{}.{n}", self.config.address_prefix).parse::<IpAddr>().ok())
            .filter(|ip| !taken.contains(ip))
            .find(|ip| std::net::TcpListener::bind(SocketAddr::new(*ip, port)).is_ok())
            .ok_or_else(|| {
                CloudError::Retryable(format!(
                    "no free address in {}.1-254 with port {port} free",
                    self.config.address_prefix
                ))
            })
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

    /// SIGTERM to the process group, SIGKILL after the grace period, and wait for both processes.
    async fn stop(&self, mut instance: LocalInstance) {
        instance.signal(Signal::SIGTERM);
        let grace = Duration::from_secs(self.config.stop_grace_secs.into());
        if tokio::time::timeout(grace, instance.workload.wait()).await.is_err() {
            tracing::warn!(member = %instance.member_id, "The instance ignored SIGTERM; sending SIGKILL.");
            instance.signal(Signal::SIGKILL);
            let _ = instance.workload.wait().await;
        }
        if tokio::time::timeout(Duration::from_secs(2), instance.agent.wait())
            .await
            .is_err()
        {
            let _ = instance.agent.kill().await;
        }
        // Anything else left in the group.
        instance.signal(Signal::SIGKILL);
        let _ = std::fs::remove_dir_all(&instance.dir);
    }
}

#[async_trait]
impl Provider for LocalProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        let address = self.free_address(spec.service_port)?;
        let argv: Vec<String> = self
            .config
            .command
            .iter()
            .map(|arg| self.expand(arg, spec, address))
            .collect();
        let mut workload = Command::new(&argv[0]);
        workload
            .args(&argv[1..])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(self.log_file(&spec.member_id, "workload"))
            .kill_on_drop(true);
        let workload = workload
            .spawn()
            .map_err(|e| CloudError::Permanent(format!("cannot start `{}`: {e}", argv[0])))?;
        let pid = workload.id().expect("a process that was just spawned has a pid");
        // The VM's "user data": the agent's configuration with this launch's join token, in the instance's
        // own owner-only directory, which is also the agent's state directory.
        let dir = self.instances_dir.join(&spec.member_id);
        if let Err(e) = write_agent_config(&dir, &spec.agent_config) {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(CloudError::Permanent(format!("cannot write {}: {e}", dir.display())));
        }
        let agent = Command::new(&self.agent_path)
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .arg("--state-dir")
            .arg(&dir)
            .args([
                "--cpu-pid",
                &pid.to_string(),
                "--cpu-capacity",
                &self.config.instance_cpus.to_string(),
            ])
            .arg("--exit-on-stdin-eof")
            .env("EBB_LOG", "warn")
            .process_group(pid as i32)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(self.log_file(&spec.member_id, "agent"))
            .kill_on_drop(true)
            .spawn();
        let instance = LocalInstance {
            member_id: spec.member_id.clone(),
            dir,
            group: spec.group.clone(),
            address,
            workload,
            agent: match agent {
                Ok(agent) => agent,
                Err(e) => {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    return Err(CloudError::Permanent(format!(
                        "cannot start {}: {e}",
                        self.agent_path.display()
                    )));
                }
            },
        };
        let id = format!("local-{pid}");
        self.instances.lock().unwrap().insert(id.clone(), instance);
        Ok(Instance {
            id,
            member_id: spec.member_id.clone(),
            address: Some(address),
            state: InstanceState::Running,
        })
    }

    async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceState>, CloudError> {
        let mut instances = self.instances.lock().unwrap();
        Ok(ids
            .iter()
            .map(|id| match instances.get_mut(id) {
                None => InstanceState::Terminated {
                    reason: "no such local instance".into(),
                },
                Some(instance) => match instance.workload.try_wait() {
                    Ok(None) => InstanceState::Running,
                    Ok(Some(status)) => InstanceState::Terminated {
                        reason: format!("the instance's process exited ({status})"),
                    },
                    Err(e) => InstanceState::Terminated {
                        reason: format!("cannot check the instance's process: {e}"),
                    },
                },
            })
            .collect())
    }

    async fn terminate(&self, id: &str) -> Result<(), CloudError> {
        let instance = self.instances.lock().unwrap().remove(id);
        if let Some(instance) = instance {
            self.stop(instance).await;
        }
        Ok(())
    }

    async fn list(&self, group: &str) -> Result<Vec<Instance>, CloudError> {
        let ids: Vec<(String, String, IpAddr)> = self
            .instances
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, i)| i.group == group)
            .map(|(id, i)| (id.clone(), i.member_id.clone(), i.address))
            .collect();
        let states = self
            .describe(&ids.iter().map(|(id, _, _)| id.clone()).collect::<Vec<_>>())
            .await?;
        Ok(ids
            .into_iter()
            .zip(states)
            .map(|((id, member_id, address), state)| Instance {
                id,
                member_id,
                address: Some(address),
                state,
            })
            .collect())
    }

    async fn close(&self) {
        let all: Vec<LocalInstance> = self.instances.lock().unwrap().drain().map(|(_, i)| i).collect();
        // Signal them all first, so their grace periods run at the same time.
        all.iter().for_each(|instance| instance.signal(Signal::SIGTERM));
        for instance in all {
            self.stop(instance).await;
        }
    }
}

/// Writes `agent.toml` into a new owner-only directory.
fn write_agent_config(dir: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("agent.toml"))?
        .write_all(contents.as_bytes())
}

impl Drop for LocalProvider {
    /// A provider dropped without `close` (a panic, an early return) still leaves no process behind.
    fn drop(&mut self) {
        for instance in self.instances.get_mut().unwrap().values() {
            instance.signal(Signal::SIGKILL);
            let _ = std::fs::remove_dir_all(&instance.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider whose instances live in a temporary directory, removed with the returned guard.
    fn provider(command: &[&str], prefix: &str) -> (LocalProvider, tempfile::TempDir) {
        let instances = tempfile::tempdir().unwrap();
        let provider = LocalProvider::new(
            LocalProviderConfig {
                command: command.iter().map(|s| s.to_string()).collect(),
                address_prefix: prefix.into(),
                // Stands in for ebb-agent: takes any arguments and exits.
                agent_path: Some(PathBuf::from("/bin/true")),
                instance_cpus: 1.0,
                stop_grace_secs: 1,
                log_dir: None,
            },
            instances.path().to_path_buf(),
        )
        .unwrap();
        (provider, instances)
    }

    fn spec(member_id: &str) -> LaunchSpec {
        LaunchSpec {
            cluster_id: "test".into(),
            group: "web".into(),
            member_id: member_id.into(),
            launch_id: format!("{member_id}-1"),
            service_port: 8080,
            agent_config: "token = \"secret\"\n".into(),
            user_data: String::new(),
        }
    }

    fn alive(pid: u32) -> bool {
        // A zombie has exited; only a running or sleeping process counts.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }

    fn pid_of(instance: &Instance) -> u32 {
        instance.id.strip_prefix("local-").unwrap().parse().unwrap()
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

        let _ = killpg(Pid::from_raw(pid_of(&a) as i32), Signal::SIGKILL);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let states = provider
            .describe(&[a.id.clone(), b.id.clone(), "local-0".into()])
            .await
            .unwrap();
        assert!(
            matches!(&states[0], InstanceState::Terminated { reason } if reason.contains("exited")),
            "{states:?}"
        );
        assert_eq!(states[1], InstanceState::Running);
        assert!(matches!(states[2], InstanceState::Terminated { .. }));
        provider.close().await;
        assert!(!alive(pid_of(&b)), "close stops every instance");
    }

    #[tokio::test]
    async fn an_instance_that_ignores_sigterm_is_killed_after_the_grace_period() {
        let (provider, _instances) = provider(&["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"], "127.0.7");
        let instance = provider.launch(&spec("web-1")).await.unwrap();
        let pid = pid_of(&instance);
        let config = provider.instances_dir.join("web-1/agent.toml");
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
