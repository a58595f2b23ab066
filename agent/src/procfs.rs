//! Parsers for the `/proc` and `/sys` files the agent reads. Pure functions over text, so that they are
//! tested on fixture files and never on the live machine.

use thiserror::Error;

/// A file that did not have the shape the kernel documents.
#[derive(Debug, Error, PartialEq)]
#[error("cannot parse {file}: {reason}")]
pub struct ParseError {
    /// Which file (for the operator: `/proc/stat`, `cpu.max`, ...).
    pub file: &'static str,
    /// What was wrong with it.
    pub reason: String,
}

fn parse_error(file: &'static str, reason: impl Into<String>) -> ParseError {
    ParseError {
        file,
        reason: reason.into(),
    }
}

/// `/proc/loadavg`: the 1, 5 and 15 minute load averages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadAverage {
    pub one: f64,
    pub five: f64,
    pub fifteen: f64,
}

pub fn parse_loadavg(text: &str) -> Result<LoadAverage, ParseError> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>());
    let mut next = |name: &str| match fields.next() {
        Some(Ok(value)) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err(parse_error("/proc/loadavg", format!("no valid {name} minute value"))),
    };
    Ok(LoadAverage {
        one: next("1")?,
        five: next("5")?,
        fifteen: next("15")?,
    })
}

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HostCpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
    pub guest: u64,
    pub guest_nice: u64,
}

impl HostCpuTimes {
    /// Time the CPUs did work. `user` and `nice` already include `guest` and `guest_nice`, so those are
    /// not added again; `iowait` is idle time waiting for a disk, not work.
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }

    /// All the time the CPUs had: busy, idle, waiting for I/O, or stolen by the hypervisor.
    pub fn total(&self) -> u64 {
        self.busy() + self.idle + self.iowait + self.steal
    }
}

pub fn parse_proc_stat(text: &str) -> Result<HostCpuTimes, ParseError> {
    const FILE: &str = "/proc/stat";
    let line = text
        .lines()
        .find(|line| line.split_whitespace().next() == Some("cpu"))
        .ok_or_else(|| parse_error(FILE, "no aggregate `cpu` line"))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| parse_error(FILE, format!("`cpu` line has a non-numeric field: {e}")))?;
    if values.len() < 4 {
        return Err(parse_error(FILE, "`cpu` line has fewer than 4 fields"));
    }
    // Fields after `idle` appeared in later kernels; a missing one is zero.
    let field = |i: usize| values.get(i).copied().unwrap_or(0);
    Ok(HostCpuTimes {
        user: field(0),
        nice: field(1),
        system: field(2),
        idle: field(3),
        iowait: field(4),
        irq: field(5),
        softirq: field(6),
        steal: field(7),
        guest: field(8),
        guest_nice: field(9),
    })
}

/// `/proc/meminfo`: memory in use, in percent of `MemTotal`. "In use" is what cannot be reclaimed:
/// `MemTotal - MemAvailable`, so page cache does not count as used.
pub fn parse_meminfo_used_percent(text: &str) -> Result<f64, ParseError> {
    const FILE: &str = "/proc/meminfo";
    let field = |name: &str| -> Result<u64, ParseError> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| parse_error(FILE, format!("no `{name}` line")))
    };
    let total = field("MemTotal")?;
    let available = field("MemAvailable")?;
    if total == 0 {
        return Err(parse_error(FILE, "MemTotal is 0"));
    }
    Ok(100.0 * total.saturating_sub(available) as f64 / total as f64)
}

/// `/sys/devices/system/cpu/online`: a list of ranges such as `0-3,8,10-11`.
pub fn parse_online_cpus(text: &str) -> Result<u32, ParseError> {
    const FILE: &str = "/sys/devices/system/cpu/online";
    let mut count = 0;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || parse_error(FILE, format!("bad range `{part}`"));
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (
                a.parse::<u32>().map_err(|_| bad())?,
                b.parse::<u32>().map_err(|_| bad())?,
            ),
            None => {
                let cpu = part.parse::<u32>().map_err(|_| bad())?;
                (cpu, cpu)
            }
        };
        if last < first {
            return Err(bad());
        }
        // A damaged file must not overflow the count (found by fuzzing: `42-04000000043,44-420000043`).
        count = (last - first)
            .checked_add(1)
            .and_then(|cpus| cpus.checked_add(count))
            .ok_or_else(|| parse_error(FILE, format!("more CPUs than can be counted at `{part}`")))?;
    }
    if count == 0 {
        return Err(parse_error(FILE, "no CPU is online"));
    }
    Ok(count)
}

/// The fields of `/proc/<pid>/stat` the agent needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStat {
    pub pid: u32,
    pub ppid: u32,
    /// User plus system time of the process itself and of its children it has waited for, in clock ticks.
    pub cpu_ticks: u64,
}

pub fn parse_pid_stat(text: &str) -> Result<ProcessStat, ParseError> {
    const FILE: &str = "/proc/<pid>/stat";
    // The command name is in parentheses and may itself contain spaces and parentheses: split at the last `)`.
    let (head, tail) = text
        .rsplit_once(')')
        .ok_or_else(|| parse_error(FILE, "no `)` after the command name"))?;
    let pid = head
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| parse_error(FILE, "no pid"))?;
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17), numbered as in proc(5).
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let number = |field_no: usize| -> Result<u64, ParseError> {
        fields
            .get(field_no - 3)
            .and_then(|f| f.parse::<i64>().ok())
            .map(|v| v.max(0) as u64)
            .ok_or_else(|| parse_error(FILE, format!("field {field_no} missing or not a number")))
    };
    Ok(ProcessStat {
        pid,
        ppid: number(4)? as u32,
        cpu_ticks: number(14)? + number(15)? + number(16)? + number(17)?,
    })
}

/// `/proc/self/cgroup` on a cgroup v2 host: the line `0::/path`.
pub fn parse_own_cgroup_v2(text: &str) -> Result<String, ParseError> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim().to_string())
        .ok_or_else(|| {
            parse_error(
                "/proc/self/cgroup",
                "no cgroup v2 (`0::`) line; is this a cgroup v1 host?",
            )
        })
}

/// `usage_usec` from a cgroup v2 `cpu.stat`: CPU time used by the cgroup, in microseconds.
pub fn parse_cgroup_cpu_usage_usec(text: &str) -> Result<u64, ParseError> {
    text.lines()
        .find_map(|line| line.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| parse_error("cpu.stat", "no `usage_usec` line"))
}

/// A cgroup v2 `cpu.max` (`max 100000` or `50000 100000`): the CPUs the cgroup may use, `None` if unlimited.
pub fn parse_cgroup_cpu_max(text: &str) -> Result<Option<f64>, ParseError> {
    const FILE: &str = "cpu.max";
    let mut fields = text.split_whitespace();
    let quota = fields.next().ok_or_else(|| parse_error(FILE, "empty"))?;
    let period: u64 = fields
        .next()
        .and_then(|p| p.parse().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| parse_error(FILE, "no valid period"))?;
    if quota == "max" {
        return Ok(None);
    }
    let quota: u64 = quota
        .parse()
        .map_err(|_| parse_error(FILE, format!("quota `{quota}` is neither `max` nor a number")))?;
    Ok(Some(quota as f64 / period as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn loadavg() {
        let load = parse_loadavg(&fixture("loadavg")).unwrap();
        assert_eq!(
            load,
            LoadAverage {
                one: 1.52,
                five: 0.87,
                fifteen: 0.41
            }
        );
        assert!(parse_loadavg("1.0 nan 2").is_err());
        assert!(parse_loadavg("").is_err());
    }

    #[test]
    fn proc_stat_busy_excludes_iowait_and_counts_guest_once() {
        let times = parse_proc_stat(&fixture("stat")).unwrap();
        assert_eq!(times.user, 10_000);
        assert_eq!(times.guest, 500);
        // user + nice + system + irq + softirq; guest (inside user) and iowait are not added.
        assert_eq!(times.busy(), 10_000 + 200 + 3_000 + 100 + 50);
        assert_eq!(times.total(), times.busy() + 80_000 + 4_000 + 300);
    }

    #[test]
    fn proc_stat_of_an_old_kernel_has_fewer_fields() {
        let times = parse_proc_stat("cpu  1 2 3 4\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(times.busy(), 6);
        assert_eq!(times.steal, 0);
        assert!(parse_proc_stat("cpu0 1 2 3 4\n").is_err());
        assert!(parse_proc_stat("cpu 1 x 3 4\n").is_err());
    }

    #[test]
    fn meminfo() {
        let used = parse_meminfo_used_percent(&fixture("meminfo")).unwrap();
        // MemTotal 8000000 kB, MemAvailable 6000000 kB.
        assert!((used - 25.0).abs() < 1e-9, "{used}");
        assert!(parse_meminfo_used_percent("MemTotal: 10 kB\n").is_err());
    }

    #[test]
    fn online_cpus() {
        assert_eq!(parse_online_cpus("0-3,8,10-11\n").unwrap(), 7);
        assert_eq!(parse_online_cpus("0\n").unwrap(), 1);
        assert!(parse_online_cpus("3-1").is_err());
        assert!(parse_online_cpus("").is_err());
        // Found by `scripts/fuzz agent_procfs`: the count overflowed (a panic in a debug build, a wrong count
        // in the shipped one).
        assert!(parse_online_cpus("42-04000000043,44-420000043").is_err());
        assert!(parse_online_cpus("0-4294967295").is_err());
    }

    #[test]
    fn pid_stat_with_a_hostile_command_name() {
        let stat = parse_pid_stat(&fixture("pid_stat")).unwrap();
        assert_eq!(stat.pid, 4242);
        assert_eq!(stat.ppid, 1);
        assert_eq!(stat.cpu_ticks, 120 + 30 + 7 + 3);
        assert!(parse_pid_stat("12 (x) S").is_err());
    }

    #[test]
    fn cgroup_files() {
        assert_eq!(
            parse_own_cgroup_v2(&fixture("self_cgroup")).unwrap(),
            "/system.slice/web.service"
        );
        assert!(parse_own_cgroup_v2("12:cpu,cpuacct:/foo\n").is_err());
        assert_eq!(parse_cgroup_cpu_usage_usec(&fixture("cpu.stat")).unwrap(), 5_123_456);
        assert_eq!(parse_cgroup_cpu_max("max 100000\n").unwrap(), None);
        assert_eq!(parse_cgroup_cpu_max("50000 100000\n").unwrap(), Some(0.5));
        assert!(parse_cgroup_cpu_max("50000 0").is_err());
        assert!(parse_cgroup_cpu_max("lots 100000").is_err());
    }
}
