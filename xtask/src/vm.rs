//! `bench vm [--members N]`: real VMs from the template (`cargo xtask image`), launched together by a
//! collector (release build) running `examples/qemu.toml` with N members (2). For each member, from its
//! power-on (qemu opens its serial console): the agent enrolled, its first sample, cloud-init done (its
//! final message on the console), in service (health check passed, in the load balancer). Then the agent's
//! footprint inside each VM under systemd, measured by a script the bench adds to the operator's user
//! data: VmRSS and VmHWM, and CPU over 60 s while the VM idles, printed on the serial console.
//!
//! Events are timed as the bench sees them appear (the collector's log and each console, read every
//! 100 ms), so each figure is good to about 0.1 s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::fleet::flag;
use crate::report::{Report, figure, text};
use crate::{Guard, TempDir, USER_HZ, build_release, free_port, image, root};

/// How long the agent's CPU is measured inside the VM, in seconds.
const USAGE_SECS: u32 = 60;

/// Added to the operator's user data: once the agent runs, its RSS now and its CPU ticks over
/// `USAGE_SECS`, on the serial console as one `EBB-BENCH` line.
const USAGE_SCRIPT: &str = r#"  - path: /opt/ebb-bench/usage.sh
    permissions: '0755'
    content: |
      #!/bin/sh
      pid=0
      while [ "$pid" = 0 ]; do sleep 1; pid=$(systemctl show -p MainPID --value ebb-agent); done
      ticks() { set -- $(cut -d' ' -f14,15 /proc/$pid/stat); echo $(($1 + $2)); }
      before=$(ticks)
      sleep SECS
      after=$(ticks)
      rss=$(awk '/^VmRSS/ {print $2}' /proc/$pid/status)
      hwm=$(awk '/^VmHWM/ {print $2}' /proc/$pid/status)
      echo "EBB-BENCH ticks=$((after - before)) rss_kib=$rss hwm_kib=$hwm" > /dev/ttyS0
"#;

/// What the bench saw of one member, in seconds after its power-on.
#[derive(Default, Debug)]
struct Timeline {
    power_on: Option<Instant>,
    enrolled: Option<Instant>,
    first_sample: Option<Instant>,
    cloud_init_done: Option<Instant>,
    in_service: Option<Instant>,
    /// CPU ticks over `USAGE_SECS`, VmRSS and VmHWM in KiB.
    usage: Option<(f64, f64, f64)>,
}

impl Timeline {
    fn complete(&self) -> bool {
        self.in_service.is_some() && self.cloud_init_done.is_some() && self.usage.is_some()
    }

    fn secs_after_power_on(&self, at: Option<Instant>) -> anyhow::Result<f64> {
        let (on, at) = (
            self.power_on.context("no power-on seen")?,
            at.context("an event never seen")?,
        );
        Ok(at.saturating_duration_since(on).as_secs_f64())
    }
}

/// A file read as it grows: the lines completed since the last read, reading only what was added.
struct Tail {
    path: PathBuf,
    offset: usize,
}

impl Tail {
    fn new(path: PathBuf) -> Self {
        Self { path, offset: 0 }
    }

    fn new_lines(&mut self) -> Vec<String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut bytes = Vec::new();
        let read = std::fs::File::open(&self.path).and_then(|mut file| {
            file.seek(SeekFrom::Start(self.offset as u64))?;
            file.read_to_end(&mut bytes)
        });
        if read.is_err() {
            return Vec::new();
        }
        let Some(end) = bytes.iter().rposition(|b| *b == b'\n').map(|i| i + 1) else {
            return Vec::new();
        };
        self.offset += end;
        let text = String::from_utf8_lossy(&bytes[..end]);
        text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect()
    }
}

/// `examples/qemu.toml` with `members` VMs launched at once, free ports, state in `state`, the images in
/// `target/images`, and the usage script beside the operator's application.
fn config(state: &Path, members: u32) -> anyhow::Result<String> {
    let example = std::fs::read_to_string(root().join("examples/qemu.toml"))?;
    let images = image::images_dir();
    let usage = USAGE_SCRIPT.replace("SECS", &USAGE_SECS.to_string());
    let replacements = [
        ("127.0.0.1:7300", format!("127.0.0.1:{}", free_port()?)),
        ("127.0.0.1:7301", format!("127.0.0.1:{}", free_port()?)),
        ("127.0.0.1:8000", format!("127.0.0.1:{}", free_port()?)),
        ("127.0.9", "127.0.24".to_string()),
        ("/var/lib/ebb", state.display().to_string()),
        ("\"target/images", format!("\"{}", images.display())),
        (
            "min_size = 1\nmax_size = 2",
            format!("min_size = {members}\nmax_size = {members}"),
        ),
        ("write_files:\n", format!("write_files:\n{usage}")),
        (
            "runcmd:\n",
            "runcmd:\n  - [systemd-run, --unit=ebb-agent-usage, /opt/ebb-bench/usage.sh]\n".to_string(),
        ),
    ];
    let mut config = example;
    for (from, to) in replacements {
        ensure!(config.contains(from), "examples/qemu.toml no longer has {from:?}");
        config = config.replace(from, &to);
    }
    Ok(config)
}

pub fn bench_vm(args: &[String]) -> anyhow::Result<bool> {
    let members = flag(args, "--members", 2)?;
    ensure!((1..=8).contains(&members), "--members is 1 to 8");
    image::image(&[])?;
    let bin = build_release()?;
    let dir = TempDir::new("ebb-bench-vm")?;
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state)?;
    let config_path = dir.0.join("collector.toml");
    std::fs::write(&config_path, config(&state, members)?)?;
    let log = state.join("collector.log");
    let collector = Guard(
        Command::new(bin.join("ebb-collector"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("EBB_LOG", "info,ebb_collector::ingest=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let ids: Vec<String> = (1..=members).map(|n| format!("web-{n}")).collect();
    let mut timelines: BTreeMap<String, Timeline> = ids.iter().map(|id| (id.clone(), Timeline::default())).collect();
    let mut consoles: BTreeMap<String, Tail> = ids
        .iter()
        .map(|id| (id.clone(), Tail::new(state.join("qemu").join(id).join("console.log"))))
        .collect();
    let mut collector_log = Tail::new(log.clone());
    let deadline = Instant::now() + Duration::from_secs(900);
    println!("booting {members} VM(s) under qemu; each is followed until its agent's usage is in (a few minutes)");
    while !timelines.values().all(Timeline::complete) {
        if Instant::now() > deadline {
            bail!(
                "not every VM came up within 15 minutes: {timelines:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        for line in collector_log.new_lines() {
            let Some(id) = ids.iter().find(|id| line.contains(&format!("member={id} "))) else {
                continue;
            };
            let timeline = timelines.get_mut(id).expect("a timeline per member");
            let event = if line.contains("Enrolled a member.") {
                &mut timeline.enrolled
            } else if line.contains("First sample of a member.") {
                &mut timeline.first_sample
            } else if line.contains("kind=\"register\"") {
                &mut timeline.in_service
            } else {
                continue;
            };
            event.get_or_insert(now);
        }
        for (id, console) in &mut consoles {
            let timeline = timelines.get_mut(id).expect("a timeline per member");
            if timeline.power_on.is_none() && console.path.exists() {
                timeline.power_on = Some(now);
            }
            for line in console.new_lines() {
                if line.contains("Cloud-init v.") && line.contains("finished at") {
                    timeline.cloud_init_done.get_or_insert(now);
                }
                if let Some(usage) = line.split("EBB-BENCH ").nth(1) {
                    timeline.usage = Some(parse_usage(usage)?);
                }
            }
        }
    }
    drop(collector);

    let mut report = Report::new(
        "vm",
        args,
        &[
            ("member", ""),
            ("enrolled", "s after power-on"),
            ("first_sample", "s after power-on"),
            ("cloud_init_done", "s after power-on"),
            ("in_service", "s after power-on"),
            ("agent_rss", "MiB"),
            ("agent_rss_peak", "MiB"),
            ("agent_cpu", "% of the VM's vCPU"),
        ],
    );
    let mut worst_peak: f64 = 0.0;
    let mut worst_in_service: f64 = 0.0;
    for (id, t) in &timelines {
        let (ticks, rss_kib, hwm_kib) = t.usage.context("usage seen")?;
        let in_service = t.secs_after_power_on(t.in_service)?;
        worst_peak = worst_peak.max(hwm_kib / 1024.0);
        worst_in_service = worst_in_service.max(in_service);
        report.row(vec![
            text(id.clone()),
            figure(t.secs_after_power_on(t.enrolled)?, 1),
            figure(t.secs_after_power_on(t.first_sample)?, 1),
            figure(t.secs_after_power_on(t.cloud_init_done)?, 1),
            figure(in_service, 1),
            figure(rss_kib / 1024.0, 2),
            figure(hwm_kib / 1024.0, 2),
            figure(ticks / USER_HZ / f64::from(USAGE_SECS) * 100.0, 2),
        ]);
    }
    report.at_most(
        "ebb-agent RSS peak inside a VM, worst member",
        worst_peak * 1.048_576,
        5.0,
        "MB",
    );
    report.at_most(
        "power-on to in service, worst member (the example's launch_timeout_secs)",
        worst_in_service,
        600.0,
        "s",
    );
    report.note(format!(
        "{members} VM(s) launched at once, 1 vCPU and 512 MiB each, under {}; power-on is when qemu opened the \
         serial console; agent CPU is utime+stime over {USAGE_SECS} s once cloud-init is done, the VM idle",
        accelerator_used(&log)
    ));
    report.finish()
}

/// `ticks=N rss_kib=N hwm_kib=N` as (ticks, rss, hwm).
fn parse_usage(text: &str) -> anyhow::Result<(f64, f64, f64)> {
    let value = |key: &str| -> anyhow::Result<f64> {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .with_context(|| format!("{key} in the usage line {text:?}"))?
            .parse::<f64>()
            .with_context(|| format!("{key} in the usage line {text:?}"))
    };
    Ok((value("ticks=")?, value("rss_kib=")?, value("hwm_kib=")?))
}

/// What the qemu provider said it uses (KVM or TCG), from the collector's log.
fn accelerator_used(log: &Path) -> &'static str {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if text.contains("VMs run under KVM.") {
        "KVM"
    } else {
        "TCG"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_returns_each_completed_line_once() {
        let dir = TempDir::new("ebb-tail-test").unwrap();
        let path = dir.0.join("console.log");
        let mut tail = Tail::new(path.clone());
        assert!(tail.new_lines().is_empty(), "no file yet");
        std::fs::write(&path, "a\r\nb").unwrap();
        assert_eq!(tail.new_lines(), ["a"]);
        std::fs::write(&path, "a\r\nbc\nd\n").unwrap();
        assert_eq!(tail.new_lines(), ["bc", "d"]);
        assert!(tail.new_lines().is_empty());
    }
}
