//! Members that are process groups on this machine — the local provider's instances, the qemu provider's
//! VMs — each recorded in `<instances_dir>/<member_id>/instance.json` (its process group and that process's
//! start time, so a reused PID is never taken for it). Listing reads the records, so a collector restarted
//! after a crash finds, describes and stops what the one before it started.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::local::{read_json, start_time};
use super::{Instance, InstanceState};

/// What a launch leaves on disk, enough to find, describe and stop the process group from any later
/// collector.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProcessRecord {
    pub group: String,
    pub member_id: String,
    pub launch_id: String,
    pub cluster_id: String,
    pub address: IpAddr,
    /// The first process (the workload, or qemu), also its process group's id.
    pub pid: i32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat`, field 22).
    pub started: u64,
}

impl ProcessRecord {
    pub const FILE: &str = "instance.json";

    /// Still ours: the process is alive and started when recorded.
    pub fn running(&self) -> bool {
        start_time(self.pid) == Some(self.started)
    }

    /// `signal` to the process group, only while it is ours: after it exits, its id may be another's.
    pub fn signal(&self, signal: Signal) {
        if self.running() {
            let _ = killpg(Pid::from_raw(self.pid), signal);
        }
    }

    pub fn read(dir: &Path) -> Option<Self> {
        read_json(&dir.join(Self::FILE))
    }
}

/// One provider's records: where they are kept and how its instance ids and exits read.
pub(crate) struct ProcessRecords {
    pub dir: PathBuf,
    /// `local` or `qemu`: instance ids are `<kind>-<member_id>`.
    pub kind: &'static str,
    /// Why a recorded member whose process is gone is terminated.
    pub exited: &'static str,
}

impl ProcessRecords {
    /// Every member recorded, running or not.
    pub fn all(&self) -> Vec<ProcessRecord> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| ProcessRecord::read(&entry.path()))
            .collect()
    }

    /// The member an instance id names, if it is one of this provider's ids (and a plain directory name).
    pub fn member_of<'a>(&self, id: &'a str) -> Option<&'a str> {
        let member_id = id.strip_prefix(self.kind)?.strip_prefix('-')?;
        let plain = !member_id.is_empty() && !member_id.contains('/') && !member_id.starts_with('.');
        plain.then_some(member_id)
    }

    pub fn find(&self, id: &str) -> Option<ProcessRecord> {
        let record = ProcessRecord::read(&self.dir.join(self.member_of(id)?))?;
        (self.id(&record) == id).then_some(record)
    }

    pub fn id(&self, record: &ProcessRecord) -> String {
        format!("{}-{}", self.kind, record.member_id)
    }

    pub fn state(&self, record: &ProcessRecord) -> InstanceState {
        if record.running() {
            InstanceState::Running
        } else {
            InstanceState::Terminated {
                reason: self.exited.into(),
            }
        }
    }

    pub fn instance(&self, record: &ProcessRecord) -> Instance {
        Instance {
            id: self.id(record),
            member_id: record.member_id.clone(),
            address: Some(record.address),
            state: self.state(record),
        }
    }
}
