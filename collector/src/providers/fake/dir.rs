//! A fake cloud kept in a directory (`type = "fake"`), for fault tests and benchmarks that kill the
//! collector: its instances outlive the collector process, as a cloud's do. Each instance is a small file
//! written atomically; a launch with a launch id it has seen returns the same instance (like EC2's
//! ClientToken); every call waits `latency_ms`, a launch `launch_latency_ms` more.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::providers::{CloudError, Instance, InstanceState, LaunchSpec, Provider};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirCloudConfig {
    /// Where the fake cloud keeps its instances.
    pub dir: PathBuf,
    #[serde(default)]
    pub latency_ms: u32,
    /// Launches wait this long more (a cloud's boot of an instance), for the fan-out benchmark.
    #[serde(default)]
    pub launch_latency_ms: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    id: String,
    group: String,
    member_id: String,
    launch_id: String,
    running: bool,
    /// When the launch call began (ms since the epoch): benchmarks see which calls overlapped.
    #[serde(default)]
    called_at_ms: i64,
}

pub struct DirCloud {
    config: DirCloudConfig,
}

impl DirCloud {
    pub fn new(config: DirCloudConfig) -> Result<Self, CloudError> {
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| CloudError::permanent(format!("cannot create {}: {e}", config.dir.display())).caused_by(e))?;
        Ok(Self { config })
    }

    async fn delay(&self) {
        tokio::time::sleep(Duration::from_millis(self.config.latency_ms.into())).await;
    }

    fn records(&self) -> Result<Vec<Record>, CloudError> {
        let entries = std::fs::read_dir(&self.config.dir).map_err(|e| CloudError::retryable(e.to_string()))?;
        let mut records = Vec::new();
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "json")
                && let Ok(text) = std::fs::read_to_string(entry.path())
                && let Ok(record) = serde_json::from_str::<Record>(&text)
            {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    fn write(&self, record: &Record) -> Result<(), CloudError> {
        let path = self.config.dir.join(format!("{}.json", record.id));
        let temporary = path.with_extension("tmp");
        let text = serde_json::to_string(record).expect("a record serializes");
        std::fs::write(&temporary, text)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|e| CloudError::retryable(e.to_string()))
    }

    fn instance(record: &Record) -> Instance {
        let n: u8 = record.id.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        Instance {
            id: record.id.clone(),
            member_id: record.member_id.clone(),
            address: Some(IpAddr::V4(Ipv4Addr::new(10, 9, 0, n))),
            state: if record.running {
                InstanceState::Running
            } else {
                InstanceState::Terminated {
                    reason: "terminated".into(),
                }
            },
        }
    }
}

#[async_trait]
impl Provider for DirCloud {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        let called_at_ms = crate::clock::now_ms();
        self.delay().await;
        tokio::time::sleep(Duration::from_millis(self.config.launch_latency_ms.into())).await;
        if let Some(known) = self.records()?.into_iter().find(|r| r.launch_id == spec.launch_id) {
            return Ok(Self::instance(&known));
        }
        let record = Record {
            id: format!("i-{}", spec.launch_id),
            group: spec.group.clone(),
            member_id: spec.member_id.clone(),
            launch_id: spec.launch_id.clone(),
            running: true,
            called_at_ms,
        };
        self.write(&record)?;
        Ok(Self::instance(&record))
    }

    async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceState>, CloudError> {
        self.delay().await;
        let records = self.records()?;
        Ok(ids
            .iter()
            .map(|id| {
                records.iter().find(|r| &r.id == id).map_or(
                    InstanceState::Terminated {
                        reason: "unknown instance".into(),
                    },
                    |r| Self::instance(r).state,
                )
            })
            .collect())
    }

    async fn terminate(&self, id: &str) -> Result<(), CloudError> {
        self.delay().await;
        if let Some(mut record) = self.records()?.into_iter().find(|r| r.id == id) {
            record.running = false;
            self.write(&record)?;
        }
        Ok(())
    }

    async fn list(&self, group: &str) -> Result<Vec<Instance>, CloudError> {
        self.delay().await;
        Ok(self
            .records()?
            .iter()
            .filter(|r| r.group == group)
            .map(Self::instance)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(member: &str, launch: &str) -> LaunchSpec {
        LaunchSpec {
            group: "web".into(),
            member_id: member.into(),
            cluster_id: "c".into(),
            launch_id: launch.into(),
            service_port: 80,
            agent_config: String::new(),
            user_data: Vec::new(),
        }
    }

    #[tokio::test]
    async fn instances_outlive_the_provider_and_launch_ids_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let config = DirCloudConfig {
            dir: dir.path().to_path_buf(),
            latency_ms: 0,
            launch_latency_ms: 0,
        };
        let cloud = DirCloud::new(config.clone()).unwrap();
        let first = cloud.launch(&spec("web-1", "web-1-5")).await.unwrap();
        assert_eq!(
            cloud.launch(&spec("web-1", "web-1-5")).await.unwrap(),
            first,
            "same launch id, same instance"
        );
        cloud.launch(&spec("web-2", "web-2-6")).await.unwrap();
        cloud.terminate(&first.id).await.unwrap();
        drop(cloud);
        let again = DirCloud::new(config).unwrap();
        let listed = again.list("web").await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(matches!(listed[0].state, InstanceState::Terminated { .. }));
        assert_eq!(listed[1].state, InstanceState::Running);
        assert!(again.list("db").await.unwrap().is_empty());
    }
}
