//! One sample as the engine reads it, and the few things it computes from a member's samples.

use serde::Deserialize;

use super::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Busy CPU, percent of the member's capacity.
    Cpu,
    Load1,
    Load5,
    Load15,
    Load1PerCpu,
    Load5PerCpu,
    Load15PerCpu,
    /// Memory in use, percent.
    Mem,
    /// Share of the member's health checks that passed, percent (100 or 0 per check).
    HealthRatio,
}

impl Metric {
    pub const ALL: [Metric; 9] = [
        Metric::Cpu,
        Metric::Load1,
        Metric::Load5,
        Metric::Load15,
        Metric::Load1PerCpu,
        Metric::Load5PerCpu,
        Metric::Load15PerCpu,
        Metric::Mem,
        Metric::HealthRatio,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Load1 => "load1",
            Metric::Load5 => "load5",
            Metric::Load15 => "load15",
            Metric::Load1PerCpu => "load1_per_cpu",
            Metric::Load5PerCpu => "load5_per_cpu",
            Metric::Load15PerCpu => "load15_per_cpu",
            Metric::Mem => "mem",
            Metric::HealthRatio => "health_ratio",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Cpu | Metric::Mem | Metric::HealthRatio => "%",
            _ => "",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One sample of one member, compact (the collector keeps minutes of them per member): `NAN` marks a
/// value the sample did not carry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub at: Millis,
    values: [f32; 9],
}

impl Reading {
    pub fn new(at: Millis) -> Self {
        Self {
            at,
            values: [f32::NAN; 9],
        }
    }

    pub fn with(mut self, metric: Metric, value: Option<f64>) -> Self {
        self.values[metric.index()] = value.map_or(f32::NAN, |v| v as f32);
        self
    }

    pub fn with_health(self, healthy: Option<bool>) -> Self {
        self.with(Metric::HealthRatio, healthy.map(|h| if h { 100.0 } else { 0.0 }))
    }

    pub fn value(&self, metric: Metric) -> Option<f64> {
        let value = self.values[metric.index()];
        (!value.is_nan()).then_some(f64::from(value))
    }

    /// The health check's result, if one ran.
    pub fn healthy(&self) -> Option<bool> {
        self.value(Metric::HealthRatio).map(|v| v > 50.0)
    }
}

/// The mean of `metric` over `readings`; `None` when none of them carries it.
pub fn mean<'a>(readings: impl IntoIterator<Item = &'a Reading>, metric: Metric) -> Option<f64> {
    let (sum, count) = readings
        .into_iter()
        .filter_map(|r| r.value(metric))
        .fold((0.0, 0u32), |(sum, count), v| (sum + v, count + 1));
    (count > 0).then(|| sum / f64::from(count))
}

/// What the health judgement needs of a member's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthRun {
    /// Consecutive passed checks at the end of the samples.
    pub passes: u32,
    /// Consecutive failed checks at the end of the samples.
    pub failures: u32,
    /// The newest sample's time.
    pub last_heard: Option<Millis>,
}

impl HealthRun {
    /// From samples ordered by time, oldest first; samples without a check neither break nor extend a run.
    pub fn of<'a>(readings: impl DoubleEndedIterator<Item = &'a Reading>) -> Self {
        let mut run = HealthRun::default();
        let mut streak: Option<bool> = None;
        for reading in readings.rev() {
            run.last_heard = run.last_heard.max(Some(reading.at));
            let Some(healthy) = reading.healthy() else { continue };
            match streak {
                None => streak = Some(healthy),
                Some(s) if s != healthy => break,
                Some(_) => {}
            }
            if healthy {
                run.passes += 1;
            } else {
                run.failures += 1;
            }
        }
        run
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_values_stay_missing() {
        let r = Reading::new(5).with(Metric::Cpu, Some(12.5)).with(Metric::Mem, None);
        assert_eq!(r.value(Metric::Cpu), Some(12.5));
        assert_eq!(r.value(Metric::Mem), None);
        assert_eq!(r.healthy(), None);
        assert_eq!(mean([&r], Metric::Load1), None);
    }

    #[test]
    fn health_runs_count_from_the_newest_sample() {
        let checks = [Some(true), Some(false), None, Some(false), Some(false)];
        let readings: Vec<Reading> = checks
            .iter()
            .enumerate()
            .map(|(i, h)| Reading::new(i as Millis).with_health(*h))
            .collect();
        let run = HealthRun::of(readings.iter());
        assert_eq!(
            run,
            HealthRun {
                passes: 0,
                failures: 3,
                last_heard: Some(4)
            }
        );
        assert_eq!(HealthRun::of(readings[..1].iter()).passes, 1);
        assert_eq!(HealthRun::of([].iter()), HealthRun::default());
    }
}
