//! Takes one sample per interval and puts it in the outbox. The HTTP health check runs in its own task, started
//! by the sampler right after each sample (one timer for both: one wake-up a second); each sample reports the
//! latest result, so a check that takes its whole timeout never delays the other measurements.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ebb_proto::v1::{HealthCheck, Sample};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::Settings;
use crate::config::AgentConfig;
use crate::cpu::{CpuMeter, CpuReader};
use crate::outbox::Outbox;
use crate::procfs;
use crate::reread::Reread;
use crate::ticker::Ticker;

pub struct Sampler {
    online_cpus: u32,
    cpu: CpuReader,
    meter: CpuMeter,
    started: Instant,
    custom_metrics: Vec<(String, PathBuf)>,
    drained: Arc<std::sync::atomic::AtomicBool>,
    loadavg: Reread,
    meminfo: Reread,
}

impl Sampler {
    pub fn new(config: &AgentConfig) -> anyhow::Result<Self> {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
        let online_cpus = procfs::parse_online_cpus(&online)?;
        Ok(Self {
            online_cpus,
            cpu: CpuReader::new(config.cpu.clone(), online_cpus),
            meter: CpuMeter::default(),
            started: Instant::now(),
            custom_metrics: config.custom_metrics.clone().into_iter().collect(),
            drained: Arc::default(),
            loadavg: Reread::default(),
            meminfo: Reread::default(),
        })
    }

    /// Samples report this flag as `drained` (see [`crate::drain`]).
    pub fn reporting_drained(self, drained: Arc<std::sync::atomic::AtomicBool>) -> Self {
        Self { drained, ..self }
    }

    /// Samples until the settings channel closes.
    pub async fn run(
        mut self,
        mut settings: watch::Receiver<Settings>,
        health: watch::Receiver<HealthCheck>,
        health_due: Arc<Notify>,
        outbox: Arc<Mutex<Outbox>>,
        latest_seq: watch::Sender<u64>,
    ) -> anyhow::Result<()> {
        let mut seq = 0u64;
        // A reading now sets the CPU baseline; the first sample reports usage since this moment.
        self.read_cpu();
        loop {
            let mut ticker = Ticker::new(settings.borrow_and_update().interval)?;
            loop {
                tokio::select! {
                    ticked = ticker.tick() => ticked?,
                    changed = settings.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                        break;
                    }
                }
                let sample = self.sample(seq + 1, health.borrow().clone());
                health_due.notify_one();
                let sample = match sample {
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
        let load = procfs::parse_loadavg(self.loadavg.read(Path::new("/proc/loadavg"))?)?;
        let mem_used_percent = procfs::parse_meminfo_used_percent(self.meminfo.read(Path::new("/proc/meminfo"))?)?;
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
            custom: self.read_custom_metrics(),
            drained: self.drained.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Each custom metric's file read now; one that cannot be read or is not a number is left out (and
    /// logged), so a policy on it sees no data from this member rather than a wrong value.
    fn read_custom_metrics(&self) -> std::collections::HashMap<String, f64> {
        self.custom_metrics
            .iter()
            .filter_map(|(name, path)| match read_number(path) {
                Ok(value) => Some((name.clone(), value)),
                Err(e) => {
                    tracing::debug!(metric = %name, path = %path.display(), error = %e, "Cannot read a custom metric.");
                    None
                }
            })
            .collect()
    }
}

/// The first whitespace-separated word of a small file, as a finite number.
fn read_number(path: &std::path::Path) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(path)?;
    let word = text.split_whitespace().next().unwrap_or_default();
    let value: f64 = word.parse().map_err(|_| anyhow::anyhow!("`{word}` is not a number"))?;
    anyhow::ensure!(value.is_finite(), "`{word}` is not a finite number");
    Ok(value)
}

/// Runs the configured HTTP check now, then each time `due` is notified (by the sampler, once per sample) and
/// whenever the settings change; publishes each result. Ends when either channel closes.
pub async fn check_health(
    mut settings: watch::Receiver<Settings>,
    due: Arc<Notify>,
    results: watch::Sender<HealthCheck>,
) -> anyhow::Result<()> {
    let mut target = settings.borrow_and_update().health.clone();
    loop {
        let result = match &target {
            Some(target) => target.check().await,
            None => crate::health::not_configured(),
        };
        if results.send(result).is_err() {
            return Ok(());
        }
        tokio::select! {
            () = due.notified() => {}
            changed = settings.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                target = settings.borrow_and_update().health.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A web server on loopback answering 200 to every request; counts them.
    async fn counting_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            }
        });
        (url, hits)
    }

    #[tokio::test]
    async fn the_health_check_runs_at_start_when_the_sampler_asks_and_when_the_settings_change() {
        use ebb_proto::v1::health_check::Status;
        let (url, hits) = counting_server().await;
        let settings = Settings {
            interval: std::time::Duration::from_secs(3600),
            health: None,
            drain: false,
        };
        let (settings_tx, settings_rx) = watch::channel(settings.clone());
        let (results_tx, mut results) = watch::channel(HealthCheck::default());
        let due = Arc::new(Notify::new());
        let checker = tokio::spawn(check_health(settings_rx, due.clone(), results_tx));
        let mut next = async || {
            tokio::time::timeout(std::time::Duration::from_secs(10), results.changed())
                .await
                .expect("a result within 10 s")
                .unwrap();
            results.borrow_and_update().status
        };
        assert_eq!(next().await, Status::NotConfigured as i32, "at start");

        let target = crate::health::HealthTarget::parse(&url, std::time::Duration::from_secs(5), (200, 399)).unwrap();
        settings_tx.send_replace(Settings {
            health: Some(target),
            ..settings
        });
        assert_eq!(
            next().await,
            Status::Healthy as i32,
            "on the new settings, without waiting"
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);

        due.notify_one();
        assert_eq!(next().await, Status::Healthy as i32, "when the sampler asks");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);

        drop(settings_tx);
        checker.await.unwrap().unwrap();
    }

    #[test]
    fn custom_metrics_are_read_each_sample_and_bad_ones_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let config = AgentConfig {
            custom_metrics: [
                ("queue_depth".to_string(), write("queue", "42 jobs\n")),
                ("not_a_number".to_string(), write("bad", "many")),
                ("infinite".to_string(), write("inf", "inf")),
                ("missing".to_string(), dir.path().join("nope")),
            ]
            .into_iter()
            .collect(),
            ..AgentConfig::default()
        };
        let mut sampler = Sampler::new(&config).unwrap();
        let sample = sampler.sample(1, crate::health::not_configured()).unwrap();
        assert_eq!(sample.custom.len(), 1, "{:?}", sample.custom);
        assert_eq!(sample.custom["queue_depth"], 42.0);
        write("queue", "7");
        assert_eq!(
            sampler.sample(2, crate::health::not_configured()).unwrap().custom["queue_depth"],
            7.0
        );
    }

    #[test]
    fn custom_metric_names_are_checked() {
        let mut config = AgentConfig::default();
        config.custom_metrics.insert("Queue-Depth".into(), PathBuf::from("/x"));
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("custom_metrics.Queue-Depth"), "{error}");
    }
}
