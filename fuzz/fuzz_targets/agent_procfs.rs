#![no_main]

use ebb_agent::procfs;

// Every parser of the /proc and /sys text the agent reads each second.
libfuzzer_sys::fuzz_target!(|text: &str| {
    let _ = procfs::parse_loadavg(text);
    let _ = procfs::parse_proc_stat(text);
    let _ = procfs::parse_meminfo_used_percent(text);
    let _ = procfs::parse_online_cpus(text);
    let _ = procfs::parse_pid_stat(text);
    let _ = procfs::parse_own_cgroup_v2(text);
    let _ = procfs::parse_cgroup_cpu_usage_usec(text);
    let _ = procfs::parse_cgroup_cpu_max(text);
});
