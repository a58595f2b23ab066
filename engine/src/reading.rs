//! One sample as the engine reads it, and the few things it computes from a member's samples.

use serde::{Deserialize, Serialize};

use super::Millis;

/// Distinct custom metrics one collector can use (each takes a slot in every stored sample).
pub const MAX_CUSTOM_METRICS: usize = 4;
const BUILT_IN: usize = 9;

/// In configuration and JSON, a metric is its name (`cpu`, `custom:queue_depth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// `custom:NAME`: a value the agent reads from a file (its `[custom_metrics]`). `slot` is where samples
    /// keep it, assigned by the collector's configuration (`config::parse`).
    Custom {
        slot: u8,
        name: &'static str,
    },
}

impl Metric {
    const NAMED: [(Metric, &'static str); BUILT_IN] = [
        (Metric::Cpu, "cpu"),
        (Metric::Load1, "load1"),
        (Metric::Load5, "load5"),
        (Metric::Load15, "load15"),
        (Metric::Load1PerCpu, "load1_per_cpu"),
        (Metric::Load5PerCpu, "load5_per_cpu"),
        (Metric::Load15PerCpu, "load15_per_cpu"),
        (Metric::Mem, "mem"),
        (Metric::HealthRatio, "health_ratio"),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Custom { name, .. } => name,
            built_in => Self::NAMED[built_in.index()].1,
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Cpu | Metric::Mem | Metric::HealthRatio => "%",
            _ => "",
        }
    }

    fn index(self) -> usize {
        match self {
            Metric::Cpu => 0,
            Metric::Load1 => 1,
            Metric::Load5 => 2,
            Metric::Load15 => 3,
            Metric::Load1PerCpu => 4,
            Metric::Load5PerCpu => 5,
            Metric::Load15PerCpu => 6,
            Metric::Mem => 7,
            Metric::HealthRatio => 8,
            Metric::Custom { slot, .. } => BUILT_IN + usize::from(slot),
        }
    }
}

impl TryFrom<String> for Metric {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if let Some(name) = text.strip_prefix("custom:") {
            if !ebb_proto::is_custom_metric_name(name) {
                return Err(format!(
                    "`{name}` is not a custom metric name: a lowercase letter, then lowercase letters, digits and `_`"
                ));
            }
            // Unassigned until the configuration gives every custom metric its slot.
            return Ok(Metric::Custom {
                slot: u8::MAX,
                name: intern(name),
            });
        }
        Self::NAMED
            .iter()
            .find(|(_, name)| *name == text)
            .map(|(metric, _)| *metric)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::NAMED.iter().map(|(_, n)| *n).collect();
                format!(
                    "unknown metric `{text}`; expected one of {}, or custom:NAME",
                    names.join(", ")
                )
            })
    }
}

impl From<Metric> for String {
    fn from(metric: Metric) -> String {
        match metric {
            Metric::Custom { name, .. } => format!("custom:{name}"),
            built_in => built_in.name().to_string(),
        }
    }
}

impl<'de> Deserialize<'de> for Metric {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Metric::try_from(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Metric {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&String::from(*self))
    }
}

/// One `&'static str` per distinct custom metric name, however often configurations are parsed.
fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut names = NAMES.lock().unwrap();
    if let Some(known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// One sample of one member, compact (the collector keeps minutes of them per member): `NAN` marks a
/// value the sample did not carry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub at: Millis,
    values: [f32; BUILT_IN + MAX_CUSTOM_METRICS],
}

impl Reading {
    pub fn new(at: Millis) -> Self {
        Self {
            at,
            values: [f32::NAN; BUILT_IN + MAX_CUSTOM_METRICS],
        }
    }

    /// Sets a value; a custom metric without a slot is ignored.
    pub fn with(mut self, metric: Metric, value: Option<f64>) -> Self {
        if let Some(slot) = self.values.get_mut(metric.index()) {
            *slot = value.map_or(f32::NAN, |v| v as f32);
        }
        self
    }

    pub fn with_health(self, healthy: Option<bool>) -> Self {
        self.with(Metric::HealthRatio, healthy.map(|h| if h { 100.0 } else { 0.0 }))
    }

    pub fn value(&self, metric: Metric) -> Option<f64> {
        let value = *self.values.get(metric.index())?;
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
    /// From samples ordered by time, oldest first.
    pub fn of<'a>(readings: impl IntoIterator<Item = &'a Reading>) -> Self {
        readings.into_iter().fold(HealthRun::default(), |mut run, reading| {
            run.push(reading);
            run
        })
    }

    /// Extends the runs with the next sample in time; one without a check neither breaks nor extends a run.
    pub fn push(&mut self, reading: &Reading) {
        self.last_heard = self.last_heard.max(Some(reading.at));
        match reading.healthy() {
            Some(true) => {
                self.failures = 0;
                self.passes += 1;
            }
            Some(false) => {
                self.passes = 0;
                self.failures += 1;
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_by_name_and_custom_ones_in_their_slots() {
        assert_eq!(Metric::try_from("load5_per_cpu".to_string()), Ok(Metric::Load5PerCpu));
        let error = Metric::try_from("cpu_percent".to_string()).unwrap_err();
        assert!(
            error.contains("unknown metric `cpu_percent`") && error.contains("custom:NAME"),
            "{error}"
        );
        assert!(Metric::try_from("custom:Queue".to_string()).is_err());
        let Metric::Custom { name, .. } = Metric::try_from("custom:queue_depth".to_string()).unwrap() else {
            panic!()
        };
        let queue = Metric::Custom { slot: 1, name };
        assert_eq!(
            (queue.name(), String::from(queue)),
            ("queue_depth", "custom:queue_depth".to_string())
        );
        let r = Reading::new(0)
            .with(queue, Some(3.0))
            .with(Metric::Custom { slot: u8::MAX, name }, Some(9.0));
        assert_eq!(r.value(queue), Some(3.0));
        assert_eq!(r.value(Metric::Custom { slot: 0, name }), None);
        assert_eq!(r.value(Metric::Custom { slot: u8::MAX, name }), None);
    }

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
