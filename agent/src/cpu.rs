//! Busy CPU in percent, from cumulative kernel counters: the whole host (`/proc/stat`), the agent's own
//! cgroup (v2 `cpu.stat` and `cpu.max`), or a process tree by PID.
//!
//! Every source gives cumulative counters; [`CpuMeter`] turns two readings into a percentage. The first
//! reading (counted since boot or since the process started) is never reported, and a counter that goes
//! backwards starts a new baseline instead of producing a nonsense value.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;
use thiserror::Error;

use crate::procfs::{self, ParseError};
use crate::reread::Reread;

/// Clock ticks per second in `/proc/<pid>/stat`. `USER_HZ` is 100 on every Linux architecture that ebb
/// supports (x86_64, aarch64); the kernel converts to it whatever its internal `HZ`.
const USER_HZ: f64 = 100.0;

/// Where the CPU percentage comes from.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CpuSource {
    /// The whole machine, from `/proc/stat`, relative to all online CPUs.
    #[default]
    Host,
    /// The cgroup the agent runs in, relative to its `cpu.max` quota (or to all online CPUs without one).
    Cgroup,
    /// The process with this PID and all its descendants, relative to `cpus` CPUs (default: all online
    /// CPUs). A single-threaded service on a big host is best measured with `cpus = 1`.
    Process { pid: u32, cpus: Option<f64> },
}

/// Why a reading failed.
#[derive(Debug, Error)]
pub enum CpuError {
    /// A file could not be read (missing, permission, the process is gone).
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file had an unexpected shape.
    #[error(transparent)]
    Parse(#[from] ParseError),
}

/// Cumulative counters, in any unit as long as `busy`, `steal` and `total` share it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuReading {
    pub busy: f64,
    pub steal: f64,
    /// All the CPU time there was to use: busy, idle, stolen.
    pub total: f64,
}

/// One interval's CPU use, in percent of the source's capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUsage {
    pub busy_percent: f64,
    pub steal_percent: f64,
}

/// Turns successive [`CpuReading`]s into [`CpuUsage`].
#[derive(Debug, Default)]
pub struct CpuMeter {
    previous: Option<CpuReading>,
}

impl CpuMeter {
    /// Returns the usage since the previous reading; `None` for the first reading, and when a counter went
    /// backwards (counter reset, a process in the tree was reaped elsewhere), which starts a new baseline.
    pub fn observe(&mut self, reading: CpuReading) -> Option<CpuUsage> {
        let previous = self.previous.replace(reading)?;
        let busy = reading.busy - previous.busy;
        let steal = reading.steal - previous.steal;
        let total = reading.total - previous.total;
        if busy < 0.0 || steal < 0.0 || total <= 0.0 {
            return None;
        }
        let percent = |part: f64| (100.0 * part / total).clamp(0.0, 100.0);
        Some(CpuUsage {
            busy_percent: percent(busy),
            steal_percent: percent(steal),
        })
    }
}

/// Reads counters for one [`CpuSource`]. Paths are configurable so tests run on fixture trees.
#[derive(Debug)]
pub struct CpuReader {
    pub source: CpuSource,
    /// Normally `/proc`.
    pub proc_root: PathBuf,
    /// Normally `/sys/fs/cgroup`.
    pub cgroup_root: PathBuf,
    /// CPUs the percentage is relative to, for the cgroup and process sources.
    pub online_cpus: u32,
    /// `/proc/stat` for the host source, kept open.
    stat: Reread,
}

impl CpuReader {
    pub fn new(source: CpuSource, online_cpus: u32) -> Self {
        Self {
            source,
            proc_root: PathBuf::from("/proc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            online_cpus,
            stat: Reread::default(),
        }
    }

    /// Reads the counters now. `monotonic_secs` is the time on a monotonic clock, which the cgroup and
    /// process sources need to know how much CPU time there was.
    pub fn read(&mut self, monotonic_secs: f64) -> Result<CpuReading, CpuError> {
        match &self.source {
            CpuSource::Host => {
                let path = self.proc_root.join("stat");
                let text = self
                    .stat
                    .read(&path)
                    .map_err(|source| CpuError::Read { path, source })?;
                let times = procfs::parse_proc_stat(text)?;
                Ok(CpuReading {
                    busy: times.busy() as f64,
                    steal: times.steal as f64,
                    total: times.total() as f64,
                })
            }
            CpuSource::Cgroup => {
                let own = procfs::parse_own_cgroup_v2(&read(self.proc_root.join("self/cgroup"))?)?;
                let dir = self.cgroup_root.join(own.trim_start_matches('/'));
                let usage_usec = procfs::parse_cgroup_cpu_usage_usec(&read(dir.join("cpu.stat"))?)?;
                // The root cgroup has no cpu.max: it may use every CPU.
                let limit = match std::fs::read_to_string(dir.join("cpu.max")) {
                    Ok(text) => procfs::parse_cgroup_cpu_max(&text)?,
                    Err(_) => None,
                };
                let cpus = limit.unwrap_or(self.online_cpus as f64);
                Ok(CpuReading {
                    busy: usage_usec as f64 / 1e6,
                    steal: 0.0,
                    total: monotonic_secs * cpus,
                })
            }
            CpuSource::Process { pid, cpus } => Ok(CpuReading {
                busy: self.process_tree_ticks(*pid)? as f64 / USER_HZ,
                steal: 0.0,
                total: monotonic_secs * cpus.unwrap_or(self.online_cpus as f64),
            }),
        }
    }

    /// CPU ticks of `root` and every descendant. Follows `/proc/<pid>/task/<tid>/children`, which costs
    /// the size of the tree; kernels without it get a scan of every process.
    fn process_tree_ticks(&self, root: u32) -> Result<u64, CpuError> {
        let root_stat = procfs::parse_pid_stat(&read(self.proc_root.join(root.to_string()).join("stat"))?)?;
        let root_children = self.proc_root.join(format!("{root}/task/{root}/children"));
        if !root_children.exists() {
            return self.process_tree_ticks_by_scan(root_stat);
        }
        let mut total = 0;
        let mut stack = vec![root];
        let mut seen = std::collections::HashSet::new();
        while let Some(pid) = stack.pop() {
            if !seen.insert(pid) {
                continue;
            }
            let dir = self.proc_root.join(pid.to_string());
            // A process may exit while we walk; it simply is not counted.
            let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
                continue;
            };
            let Ok(stat) = procfs::parse_pid_stat(&stat) else {
                continue;
            };
            total += stat.cpu_ticks;
            let Ok(tasks) = std::fs::read_dir(dir.join("task")) else {
                continue;
            };
            for task in tasks.flatten() {
                if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                    stack.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
                }
            }
        }
        Ok(total)
    }

    fn process_tree_ticks_by_scan(&self, root_stat: procfs::ProcessStat) -> Result<u64, CpuError> {
        let mut children: HashMap<u32, Vec<procfs::ProcessStat>> = HashMap::new();
        let entries = std::fs::read_dir(&self.proc_root).map_err(|source| CpuError::Read {
            path: self.proc_root.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Ok(stat) = procfs::parse_pid_stat(&text)
                && stat.pid == pid
            {
                children.entry(stat.ppid).or_default().push(stat);
            }
        }
        let mut total = 0;
        let mut stack = vec![root_stat];
        while let Some(stat) = stack.pop() {
            total += stat.cpu_ticks;
            if let Some(kids) = children.remove(&stat.pid) {
                stack.extend(kids);
            }
        }
        Ok(total)
    }
}

fn read(path: PathBuf) -> Result<String, CpuError> {
    std::fs::read_to_string(&path).map_err(|source| CpuError::Read { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(busy: f64, steal: f64, total: f64) -> CpuReading {
        CpuReading { busy, steal, total }
    }

    #[test]
    fn the_first_reading_is_never_reported() {
        let mut meter = CpuMeter::default();
        assert_eq!(meter.observe(reading(5_000.0, 0.0, 10_000.0)), None);
        let usage = meter.observe(reading(5_050.0, 10.0, 10_200.0)).unwrap();
        assert_eq!(usage.busy_percent, 25.0);
        assert_eq!(usage.steal_percent, 5.0);
    }

    #[test]
    fn a_counter_going_backwards_starts_a_new_baseline() {
        let mut meter = CpuMeter::default();
        meter.observe(reading(500.0, 0.0, 1_000.0));
        assert_eq!(meter.observe(reading(400.0, 0.0, 1_100.0)), None, "busy went backwards");
        let usage = meter.observe(reading(450.0, 0.0, 1_200.0)).unwrap();
        assert_eq!(usage.busy_percent, 50.0, "measured from the new baseline");
        assert_eq!(meter.observe(reading(460.0, 0.0, 1_200.0)), None, "no time passed");
    }

    #[test]
    fn usage_is_clamped_to_the_capacity() {
        let mut meter = CpuMeter::default();
        meter.observe(reading(0.0, 0.0, 0.0));
        assert_eq!(meter.observe(reading(1.01, 0.0, 1.0)).unwrap().busy_percent, 100.0);
    }

    fn write(root: &std::path::Path, path: &str, text: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn pid_stat(pid: u32, ppid: u32, utime: u64) -> String {
        format!("{pid} (w) S {ppid} 1 1 0 -1 0 0 0 0 0 {utime} 0 0 0 20 0 1 0 1 1 1")
    }

    #[test]
    fn process_tree_sums_descendants_only() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        write(&proc_root, "10/stat", &pid_stat(10, 1, 100)); // the root
        write(&proc_root, "11/stat", &pid_stat(11, 10, 50)); // child
        write(&proc_root, "12/stat", &pid_stat(12, 11, 25)); // grandchild
        write(&proc_root, "13/stat", &pid_stat(13, 1, 1_000)); // a sibling: not counted
        write(&proc_root, "self/cgroup", "0::/\n");
        let mut reader = CpuReader::new(CpuSource::Process { pid: 10, cpus: None }, 2);
        reader.proc_root = proc_root;
        let reading = reader.read(7.0).unwrap();
        assert_eq!(reading.busy, 1.75);
        assert_eq!(reading.total, 14.0);

        reader.source = CpuSource::Process {
            pid: 10,
            cpus: Some(0.5),
        };
        assert_eq!(reader.read(7.0).unwrap().total, 3.5, "relative to the given CPUs");

        reader.source = CpuSource::Process { pid: 99, cpus: None };
        let error = reader.read(7.0).unwrap_err().to_string();
        assert!(error.contains("99/stat"), "{error}");
    }

    #[test]
    fn process_tree_follows_children_files_when_the_kernel_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        write(&proc_root, "10/stat", &pid_stat(10, 1, 100));
        write(&proc_root, "10/task/10/children", "11 ");
        write(&proc_root, "10/task/15/children", "12\n"); // a second thread's child
        write(&proc_root, "11/stat", &pid_stat(11, 10, 50));
        write(&proc_root, "11/task/11/children", "");
        write(&proc_root, "12/stat", &pid_stat(12, 10, 25));
        // Not reachable through children files, so not counted even though its ppid says 10: the
        // children files are the kernel's truth.
        write(&proc_root, "13/stat", &pid_stat(13, 10, 1_000));
        let mut reader = CpuReader::new(CpuSource::Process { pid: 10, cpus: None }, 1);
        reader.proc_root = proc_root;
        assert_eq!(reader.read(1.0).unwrap().busy, 1.75);
    }

    #[test]
    fn cgroup_is_relative_to_its_quota() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "proc/self/cgroup", "0::/ebb.slice\n");
        write(dir.path(), "cgroup/ebb.slice/cpu.stat", "usage_usec 3000000\n");
        write(dir.path(), "cgroup/ebb.slice/cpu.max", "50000 100000\n");
        let mut reader = CpuReader::new(CpuSource::Cgroup, 8);
        reader.proc_root = dir.path().join("proc");
        reader.cgroup_root = dir.path().join("cgroup");
        assert_eq!(reader.read(10.0).unwrap(), reading(3.0, 0.0, 5.0));

        std::fs::write(dir.path().join("cgroup/ebb.slice/cpu.max"), "max 100000\n").unwrap();
        assert_eq!(reader.read(10.0).unwrap().total, 80.0, "unlimited: all online CPUs");
    }

    #[test]
    fn host_reads_proc_stat() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "stat", "cpu  100 0 50 800 40 0 0 10 0 0\n");
        let mut reader = CpuReader::new(CpuSource::Host, 1);
        reader.proc_root = dir.path().to_path_buf();
        assert_eq!(reader.read(0.0).unwrap(), reading(150.0, 10.0, 1_000.0));
    }
}
