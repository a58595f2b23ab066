//! A group's state at one moment as JSON, for `ebb-collector evaluate`: the same decision offline.
//!
//! ```json
//! {"now": "2026-01-01T00:10:00Z", "desired": 2,
//!  "last_scale_out": null, "last_scale_in": "2026-01-01T00:01:00Z",
//!  "members": [{"id": "a", "state": "in_service", "launched": "2026-01-01T00:00:00Z", "protected": false,
//!               "samples": [{"t": "2026-01-01T00:09:59Z", "cpu": 40.0, "load1": 1.2, "mem": 30.0, "healthy": true}]}]}
//! ```
//! Member `state` is one of pending, warming, in_service, draining, unhealthy. Optional extras: `min_size`
//! and `max_size` (default: the group's configuration), `suspended`, a member's `in_service_since`, and a
//! sample's `load5`, `load15`, `load1_per_cpu`, `load5_per_cpu`, `load15_per_cpu` and `custom` (an object
//! of custom metrics by name).

use serde::Deserialize;

use super::{Engine, GroupInput, HealthRun, Means, MemberInput, MemberState, Metric, Millis, Reading, Rollout, mean};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    now: jiff::Timestamp,
    desired: u32,
    #[serde(default)]
    last_scale_out: Option<jiff::Timestamp>,
    #[serde(default)]
    last_scale_in: Option<jiff::Timestamp>,
    #[serde(default)]
    min_size: Option<u32>,
    #[serde(default)]
    max_size: Option<u32>,
    #[serde(default)]
    suspended: bool,
    members: Vec<SnapshotMember>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SnapshotState {
    Pending,
    Warming,
    InService,
    Draining,
    Unhealthy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotMember {
    id: String,
    state: SnapshotState,
    launched: jiff::Timestamp,
    #[serde(default)]
    in_service_since: Option<jiff::Timestamp>,
    #[serde(default)]
    protected: bool,
    #[serde(default)]
    samples: Vec<SnapshotSample>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotSample {
    t: jiff::Timestamp,
    cpu: Option<f64>,
    load1: Option<f64>,
    load5: Option<f64>,
    load15: Option<f64>,
    load1_per_cpu: Option<f64>,
    load5_per_cpu: Option<f64>,
    load15_per_cpu: Option<f64>,
    mem: Option<f64>,
    healthy: Option<bool>,
    /// Custom metrics by name.
    #[serde(default)]
    custom: std::collections::HashMap<String, f64>,
}

impl SnapshotSample {
    /// The sample as stored, with the custom metrics among `custom`.
    fn reading(&self, custom: &[Metric]) -> Reading {
        let reading = Reading::new(self.t.as_millisecond())
            .with(Metric::Cpu, self.cpu)
            .with(Metric::Load1, self.load1)
            .with(Metric::Load5, self.load5)
            .with(Metric::Load15, self.load15)
            .with(Metric::Load1PerCpu, self.load1_per_cpu)
            .with(Metric::Load5PerCpu, self.load5_per_cpu)
            .with(Metric::Load15PerCpu, self.load15_per_cpu)
            .with(Metric::Mem, self.mem)
            .with_health(self.healthy);
        custom.iter().fold(reading, |reading, metric| {
            reading.with(*metric, self.custom.get(metric.name()).copied())
        })
    }
}

impl Snapshot {
    pub fn parse(text: &str) -> Result<Self, String> {
        let deserializer = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|e| format!("key `{}`: {}", e.path(), e.inner()))
    }

    /// The engine's input, with the group's configured limits unless the snapshot gives its own.
    pub fn input(&self, engine: &Engine, min_size: u32, max_size: u32) -> GroupInput {
        let now = self.now.as_millisecond();
        let windows = engine.windows(now);
        let custom: Vec<Metric> = engine
            .policies
            .iter()
            .map(|p| p.metric())
            .filter(|m| matches!(m, Metric::Custom { .. }))
            .collect();
        let members = self
            .members
            .iter()
            .map(|m| {
                let mut readings: Vec<Reading> = m.samples.iter().map(|s| s.reading(&custom)).collect();
                readings.sort_by_key(|r| r.at);
                let launched = m.launched.as_millisecond();
                let since = m.in_service_since.map(|t| t.as_millisecond());
                let (state, in_service_since) = match m.state {
                    SnapshotState::Pending => (MemberState::Pending, None),
                    SnapshotState::Warming => (MemberState::InService, Some(since.unwrap_or(now))),
                    SnapshotState::InService | SnapshotState::Unhealthy => {
                        (MemberState::InService, Some(since.unwrap_or(launched)))
                    }
                    SnapshotState::Draining => (MemberState::Draining, since),
                };
                let means = windows
                    .iter()
                    .map(|policy| {
                        policy
                            .windows
                            .iter()
                            .map(|w| {
                                let inside = readings.iter().filter(|r| r.at >= w.start && r.at < w.end);
                                mean(inside, policy.metric)
                            })
                            .collect()
                    })
                    .collect();
                MemberInput {
                    id: m.id.clone(),
                    state,
                    launched,
                    watched_since: None,
                    in_service_since,
                    protected: m.protected,
                    unhealthy: matches!(m.state, SnapshotState::Unhealthy),
                    health: HealthRun::of(readings.iter().filter(|r| r.at <= now)),
                    means: Means::new(means),
                    load: readings.last().and_then(|r| r.value(Metric::Cpu)),
                    replacing: false,
                    leaving: false,
                    outdated: false,
                }
            })
            .collect();
        GroupInput {
            now,
            min_size: self.min_size.unwrap_or(min_size),
            max_size: self.max_size.unwrap_or(max_size),
            desired: self.desired,
            last_scale_out: self.last_scale_out.map(|t| t.as_millisecond()),
            last_scale_in: self.last_scale_in.map(|t| t.as_millisecond()),
            suspended: self.suspended,
            members,
            recommendations: Vec::new(),
            changes: Vec::new(),
            // A snapshot carries no load history: predictive policies say they have no forecast.
            predictions: Vec::new(),
            rollout: Rollout::default(),
        }
    }
}

/// Milliseconds as an RFC 3339 time, for people.
pub fn format_time(at: Millis) -> String {
    jiff::Timestamp::from_millisecond(at).map_or_else(|_| at.to_string(), |t| t.to_string())
}
