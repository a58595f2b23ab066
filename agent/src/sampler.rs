//! Takes one sample per interval and puts it in the outbox. The HTTP health check runs in its own task at
//! the same interval; the sampler reports its latest result, so a check that takes its whole timeout never
//! delays the other measurements.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ebb_proto::v1::{HealthCheck, Sample};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::Settings;
use crate::config::AgentConfig;
use crate::cpu::{CpuMeter, CpuReader};
use crate::outbox::Outbox;
use crate::procfs;

pub struct Sampler {
    proc_root: PathBuf,
    online_cpus: u32,
    cpu: CpuReader,
    meter: CpuMeter,
    started: Instant,
}

impl Sampler {
    pub fn new(config: &AgentConfig) -> anyhow::Result<Self> {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
        let online_cpus = procfs::parse_online_cpus(&online)?;
        Ok(Self {
            proc_root: PathBuf::from("/proc"),
            online_cpus,
            cpu: CpuReader::new(config.cpu.clone(), online_cpus),
            meter: CpuMeter::default(),
            started: Instant::now(),
        })
    }

    /// Samples until the settings channel closes.
    pub async fn run(
        mut self,
        mut settings: watch::Receiver<Settings>,
        health: watch::Receiver<HealthCheck>,
        outbox: Arc<Mutex<Outbox>>,
        latest_seq: watch::Sender<u64>,
    ) -> anyhow::Result<()> {
        let mut seq = 0u64;
        // A reading now sets the CPU baseline; the first sample reports usage since this moment.
        self.read_cpu();
        loop {
            let mut ticker = tokio::time::interval(settings.borrow_and_update().interval);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    changed = settings.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                        break;
                    }
                }
                let sample = match self.sample(seq + 1, health.borrow().clone()) {
                    Ok(sample) => sample,
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot take a sample; skipping this interval.");
                        continue;
                    }
                };
                seq += 1;
                let dropped = {
                    let mut outbox = outbox.lock().expect("outbox lock");
                    let before = outbox.dropped;
                    outbox.push(sample);
                    outbox.dropped - before
                };
                if dropped > 0 {
                    tracing::warn!(
                        seq,
                        "The collector has not acknowledged samples for a long time; dropped the oldest."
                    );
                }
                latest_seq.send_replace(seq);
            }
        }
    }

    fn read_cpu(&mut self) -> Option<crate::cpu::CpuUsage> {
        match self.cpu.read(self.started.elapsed().as_secs_f64()) {
            Ok(reading) => self.meter.observe(reading),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read CPU counters.");
                None
            }
        }
    }

    fn sample(&mut self, seq: u64, health: HealthCheck) -> anyhow::Result<Sample> {
        let load = procfs::parse_loadavg(&std::fs::read_to_string(self.proc_root.join("loadavg"))?)?;
        let mem_used_percent =
            procfs::parse_meminfo_used_percent(&std::fs::read_to_string(self.proc_root.join("meminfo"))?)?;
        let cpu = self.read_cpu();
        let cpus = f64::from(self.online_cpus);
        Ok(Sample {
            seq,
            timestamp_ms: crate::now_ms(),
            load1: load.one,
            load5: load.five,
            load15: load.fifteen,
            load1_per_cpu: load.one / cpus,
            load5_per_cpu: load.five / cpus,
            load15_per_cpu: load.fifteen / cpus,
            cpu_busy_percent: cpu.map(|c| c.busy_percent),
            cpu_steal_percent: cpu.map(|c| c.steal_percent),
            mem_used_percent,
            health: Some(health),
        })
    }
}

/// Runs the configured HTTP check once per interval; publishes the latest result.
pub fn spawn_health_checker(mut settings: watch::Receiver<Settings>) -> watch::Receiver<HealthCheck> {
    let (result_tx, result_rx) = watch::channel(crate::health::not_configured());
    tokio::spawn(async move {
        loop {
            let current = settings.borrow_and_update().clone();
            let mut ticker = tokio::time::interval(current.interval);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    changed = settings.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                }
                let result = match &current.health {
                    Some(target) => target.check().await,
                    None => crate::health::not_configured(),
                };
                if result_tx.send(result).is_err() {
                    return;
                }
            }
        }
    });
    result_rx
}
