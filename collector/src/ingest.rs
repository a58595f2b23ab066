//! Ingest: validates samples, drops duplicates by sequence number, and keeps a sliding window of samples
//! per member. One task owns all of it; the gRPC handlers and the group controllers talk to it through an
//! [`IngestHandle`]. Samples live only in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use ebb_proto::v1::health_check::Status as HealthStatus;
use ebb_proto::v1::{AgentSettings, Hello, Rejection, Sample};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::{HealthRun, Metric, Millis, Reading, Window};
use crate::metrics::Metrics;

/// Custom values one sample may carry (the collector stores only those its policies use).
pub const MAX_CUSTOM_VALUES: usize = 32;

/// How far ahead of the collector's clock a sample's timestamp may be.
pub const MAX_CLOCK_AHEAD_MS: Millis = 60_000;

/// Why an agent's stream was refused.
#[derive(Debug, Error, PartialEq)]
pub enum IngestError {
    /// The member is not part of any group: it was never launched by ebb, or it has been terminated.
    #[error("member `{0}` is not part of any group; only members launched or enrolled by this collector may report")]
    UnknownMember(String),
    /// The collector is shutting down.
    #[error("the collector is shutting down")]
    Closed,
    /// Another run of the member's agent said Hello since this stream's: its samples would number from 1
    /// again, so this stream's are not stored (nor acknowledged).
    #[error("member `{member}`: another agent run (run id {current}) took over its stream; reconnect to report")]
    Superseded { member: String, current: u64 },
}

/// Why the collector closes a member's open stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CloseReason {
    /// The certificate was revoked or the member removed (terminated, or its stream closed by an operator).
    Revoked,
    /// Another run of the member's agent took the member over (a restarted agent, or a copy of its identity).
    Superseded { current_run: u64 },
}

/// The most samples one batch may hold; the agent sends at most 100.
pub const MAX_SAMPLES_PER_BATCH: usize = 500;

/// Why one sample was refused; it is counted and never stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRejection {
    /// Metric label: `not_finite`, `negative`, `above_100_percent`, `timestamp_in_future`, `no_sequence`,
    /// `bad_custom_metric`.
    pub reason: &'static str,
    pub message: String,
}

/// Checks one sample's values. `now` is the collector's clock.
pub fn validate_sample(sample: &Sample, now: Millis) -> Result<(), SampleRejection> {
    let reject = |reason, message: String| Err(SampleRejection { reason, message });
    if sample.seq == 0 {
        return reject("no_sequence", "sequence numbers start at 1".into());
    }
    if sample.timestamp_ms > now + MAX_CLOCK_AHEAD_MS {
        return reject(
            "timestamp_in_future",
            format!(
                "timestamp is {} s ahead of the collector's clock; fix the agent's clock (NTP)",
                (sample.timestamp_ms - now) / 1000
            ),
        );
    }
    let values = [
        ("load1", Some(sample.load1), false),
        ("load5", Some(sample.load5), false),
        ("load15", Some(sample.load15), false),
        ("load1_per_cpu", Some(sample.load1_per_cpu), false),
        ("load5_per_cpu", Some(sample.load5_per_cpu), false),
        ("load15_per_cpu", Some(sample.load15_per_cpu), false),
        ("cpu_busy_percent", sample.cpu_busy_percent, true),
        ("cpu_steal_percent", sample.cpu_steal_percent, true),
        ("mem_used_percent", Some(sample.mem_used_percent), true),
    ];
    for (name, value, is_percent) in values {
        let Some(value) = value else { continue };
        if !value.is_finite() {
            return reject("not_finite", format!("{name} is {value}"));
        }
        if value < 0.0 {
            return reject("negative", format!("{name} is {value}, below 0"));
        }
        if is_percent && value > 100.0 {
            return reject("above_100_percent", format!("{name} is {value}, above 100%"));
        }
    }
    if sample.custom.len() > MAX_CUSTOM_VALUES {
        return reject(
            "bad_custom_metric",
            format!(
                "{} custom metrics; at most {MAX_CUSTOM_VALUES} per sample",
                sample.custom.len()
            ),
        );
    }
    for (name, value) in &sample.custom {
        if !ebb_proto::is_custom_metric_name(name) {
            return reject(
                "bad_custom_metric",
                format!("custom metric name `{name}` is not a valid name"),
            );
        }
        if !value.is_finite() {
            return reject("bad_custom_metric", format!("custom metric {name} is {value}"));
        }
    }
    Ok(())
}

/// What the group controller learns about one member.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// `means[p][k]`: mean of the p-th requested metric over its k-th window.
    pub means: Vec<Vec<Option<f64>>>,
    pub latest: Option<LatestSample>,
    /// The health checks at the end of its samples.
    pub health: HealthRun,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LatestSample {
    pub at: Millis,
    pub cpu_busy_percent: Option<f64>,
    pub load1: f64,
    pub health: ebb_proto::v1::HealthCheck,
    /// Told to drain, the agent has finished its pre-stop command.
    pub drained: bool,
}

struct MemberRecord {
    settings: AgentSettings,
    /// Set to close the member's open stream, and why.
    closed: watch::Sender<Option<CloseReason>>,
    run_id: Option<u64>,
    highest_seq: u64,
    /// Ordered by timestamp.
    window: VecDeque<Reading>,
    latest: Option<LatestSample>,
    /// The health checks at the end of `window`, kept as samples arrive.
    health: HealthRun,
}

impl MemberRecord {
    fn mean(&self, metric: Metric, window: Window) -> Option<f64> {
        let start = self.window.partition_point(|s| s.at < window.start);
        crate::engine::mean(self.window.range(start..).take_while(|s| s.at < window.end), metric)
    }

    /// Stores a sample's values, and of its custom metrics those in `custom` (the policies' ones).
    fn store(&mut self, sample: &Sample, custom: &[Metric]) {
        let healthy = match HealthStatus::try_from(sample.health.as_ref().map_or(0, |h| h.status)) {
            Ok(HealthStatus::Healthy) => Some(true),
            Ok(HealthStatus::Unhealthy) => Some(false),
            _ => None,
        };
        let stored = Reading::new(sample.timestamp_ms)
            .with(Metric::Cpu, sample.cpu_busy_percent)
            .with(Metric::Load1, Some(sample.load1))
            .with(Metric::Load5, Some(sample.load5))
            .with(Metric::Load15, Some(sample.load15))
            .with(Metric::Load1PerCpu, Some(sample.load1_per_cpu))
            .with(Metric::Load5PerCpu, Some(sample.load5_per_cpu))
            .with(Metric::Load15PerCpu, Some(sample.load15_per_cpu))
            .with(Metric::Mem, Some(sample.mem_used_percent))
            .with_health(healthy);
        let stored = custom.iter().fold(stored, |reading, metric| {
            reading.with(*metric, sample.custom.get(metric.name()).copied())
        });
        let at = self.window.partition_point(|s| s.at <= stored.at);
        self.window.insert(at, stored);
        if at + 1 == self.window.len() {
            self.health.push(&stored);
        } else {
            // A replayed sample older than the newest: count the runs again.
            self.health = HealthRun::of(self.window.iter());
        }
        if self.latest.as_ref().is_none_or(|l| l.at <= stored.at) {
            self.latest = Some(LatestSample {
                at: stored.at,
                cpu_busy_percent: sample.cpu_busy_percent,
                load1: sample.load1,
                health: sample.health.clone().unwrap_or_default(),
                drained: sample.drained,
            });
        }
    }
}

/// The result of a batch: what to acknowledge and what was refused.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchOutcome {
    pub highest_seq: u64,
    pub rejected: Vec<Rejection>,
    /// What the member's agent should be doing now; `None` once the member is gone.
    pub settings: Option<AgentSettings>,
}

enum Command {
    Register {
        member: String,
        settings: AgentSettings,
    },
    Unregister {
        member: String,
    },
    Disconnect {
        member: String,
    },
    Hello {
        hello: Hello,
        reply: oneshot::Sender<Result<Accepted, IngestError>>,
    },
    Batch {
        member: String,
        run_id: u64,
        samples: Vec<Sample>,
        now: Millis,
        reply: oneshot::Sender<Result<BatchOutcome, IngestError>>,
    },
    Observe {
        members: Vec<String>,
        windows: Vec<(Metric, Vec<Window>)>,
        reply: oneshot::Sender<Vec<Observation>>,
    },
    Configure {
        retention_ms: Millis,
        custom: Vec<Metric>,
    },
}

/// An agent's hello, accepted.
#[derive(Debug)]
pub struct Accepted {
    /// The highest sequence already stored for this agent run.
    pub highest_seq: u64,
    pub settings: AgentSettings,
    /// Set when the stream must close (the member was revoked or removed, or another run took over).
    pub closed: watch::Receiver<Option<CloseReason>>,
}

/// Cheap to clone; every clone talks to the one ingest task.
#[derive(Clone)]
pub struct IngestHandle {
    commands: mpsc::Sender<Command>,
}

impl IngestHandle {
    /// Starts the ingest task. Samples older than `retention_ms` are forgotten; of the custom metrics only
    /// `custom` are kept.
    pub fn spawn(metrics: Arc<Metrics>, retention_ms: Millis, custom: Vec<Metric>) -> Self {
        let (commands, receiver) = mpsc::channel(1024);
        tokio::spawn(run(receiver, metrics, retention_ms, custom));
        Self { commands }
    }

    /// Sets how long samples are kept and which custom metrics are (a reload's new policies): samples
    /// stored before keep what they had.
    pub async fn configure(&self, retention_ms: Millis, custom: Vec<Metric>) {
        let _ = self.commands.send(Command::Configure { retention_ms, custom }).await;
    }

    /// Allows `member` to report, and sets what its agent should do.
    pub async fn register(&self, member: &str, settings: AgentSettings) {
        let _ = self
            .commands
            .send(Command::Register {
                member: member.to_string(),
                settings,
            })
            .await;
    }

    /// Forgets `member`: its samples and its right to report.
    pub async fn unregister(&self, member: &str) {
        let _ = self
            .commands
            .send(Command::Unregister {
                member: member.to_string(),
            })
            .await;
    }

    /// Closes `member`'s open stream, if any, keeping its registration and samples.
    pub async fn disconnect(&self, member: &str) {
        let _ = self
            .commands
            .send(Command::Disconnect {
                member: member.to_string(),
            })
            .await;
    }

    /// Accepts an agent's hello.
    pub async fn hello(&self, hello: Hello) -> Result<Accepted, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Hello { hello, reply })
            .await
            .map_err(|_| IngestError::Closed)?;
        answer.await.map_err(|_| IngestError::Closed)?
    }

    pub async fn batch(
        &self,
        member: &str,
        run_id: u64,
        samples: Vec<Sample>,
        now: Millis,
    ) -> Result<BatchOutcome, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Batch {
                member: member.to_string(),
                run_id,
                samples,
                now,
                reply,
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        answer.await.map_err(|_| IngestError::Closed)?
    }

    /// For each member, the mean of each metric over each of its windows, and its latest sample.
    pub async fn observe(&self, members: Vec<String>, windows: Vec<(Metric, Vec<Window>)>) -> Vec<Observation> {
        let count = members.len();
        let (reply, answer) = oneshot::channel();
        let sent = self
            .commands
            .send(Command::Observe {
                members,
                windows,
                reply,
            })
            .await;
        match sent {
            Ok(()) => answer.await.unwrap_or_else(|_| vec![Observation::default(); count]),
            Err(_) => vec![Observation::default(); count],
        }
    }
}

/// Members one observation step reads before the ingest task turns back to its queue: observing a group of
/// 10,000 members then delays a sample by a fraction of a millisecond, not by the whole observation.
const OBSERVE_CHUNK: usize = 250;

/// An observation under way: the members still to read, and what was read so far.
struct Observing {
    wanted: std::vec::IntoIter<String>,
    windows: Vec<(Metric, Vec<Window>)>,
    observations: Vec<Observation>,
    reply: oneshot::Sender<Vec<Observation>>,
}

impl Observing {
    /// Reads up to `count` more members; true when all are read.
    fn advance(&mut self, members: &HashMap<String, MemberRecord>, count: usize) -> bool {
        for id in self.wanted.by_ref().take(count) {
            let observation = match members.get(&id) {
                None => Observation {
                    means: self.windows.iter().map(|(_, w)| vec![None; w.len()]).collect(),
                    latest: None,
                    health: HealthRun::default(),
                },
                Some(record) => Observation {
                    means: self
                        .windows
                        .iter()
                        .map(|(metric, ws)| ws.iter().map(|w| record.mean(*metric, *w)).collect())
                        .collect(),
                    latest: record.latest.clone(),
                    health: record.health,
                },
            };
            self.observations.push(observation);
        }
        self.wanted.len() == 0
    }
}

/// The ingest task's state: every registered member's record.
struct Ingest {
    members: HashMap<String, MemberRecord>,
    metrics: Arc<Metrics>,
    retention_ms: Millis,
    custom: Vec<Metric>,
}

/// Handles commands in arrival order. An observation (a group controller's read of all its members) goes in
/// chunks, with the commands that queued meanwhile handled between them, so that a large group's read
/// does not hold up its members' samples.
async fn run(mut commands: mpsc::Receiver<Command>, metrics: Arc<Metrics>, retention_ms: Millis, custom: Vec<Metric>) {
    let mut ingest = Ingest {
        members: HashMap::new(),
        metrics,
        retention_ms,
        custom,
    };
    let mut observing: VecDeque<Observing> = VecDeque::new();
    loop {
        if observing.is_empty() {
            let Some(command) = commands.recv().await else { return };
            ingest.handle(command, &mut observing);
            continue;
        }
        for _ in 0..commands.len() {
            let Ok(command) = commands.try_recv() else { break };
            ingest.handle(command, &mut observing);
        }
        if let Some(observation) = observing.front_mut()
            && observation.advance(&ingest.members, OBSERVE_CHUNK)
            && let Some(done) = observing.pop_front()
        {
            let _ = done.reply.send(done.observations);
        }
        tokio::task::yield_now().await;
    }
}

impl Ingest {
    /// Carries out one command; an observation joins `observing`, to be read in chunks.
    fn handle(&mut self, command: Command, observing: &mut VecDeque<Observing>) {
        let Self {
            members,
            metrics,
            retention_ms,
            custom,
        } = self;
        match command {
            Command::Register { member, settings } => {
                members
                    .entry(member)
                    .and_modify(|record| record.settings = settings.clone())
                    .or_insert_with(|| MemberRecord {
                        settings,
                        closed: watch::channel(None).0,
                        run_id: None,
                        highest_seq: 0,
                        window: VecDeque::new(),
                        latest: None,
                        health: HealthRun::default(),
                    });
            }
            Command::Unregister { member } => {
                if let Some(record) = members.remove(&member) {
                    record.closed.send_replace(Some(CloseReason::Revoked));
                }
            }
            Command::Disconnect { member } => {
                if let Some(record) = members.get_mut(&member) {
                    record.closed.send_replace(Some(CloseReason::Revoked));
                    // A fresh flag for the next stream, should the member come back.
                    record.closed = watch::channel(None).0;
                }
            }
            Command::Hello { hello, reply } => {
                let answer = match members.get_mut(&hello.member_id) {
                    None => Err(IngestError::UnknownMember(hello.member_id)),
                    Some(record) => {
                        if record.run_id != Some(hello.run_id) {
                            // A new agent process numbers its samples from 1 again. The stream of the run
                            // before, if still open, is told so and closed: its samples can no longer be
                            // stored, and acknowledging them unstored would lose them.
                            record.closed.send_replace(Some(CloseReason::Superseded {
                                current_run: hello.run_id,
                            }));
                            record.closed = watch::channel(None).0;
                            record.run_id = Some(hello.run_id);
                            record.highest_seq = 0;
                        }
                        Ok(Accepted {
                            highest_seq: record.highest_seq,
                            settings: record.settings.clone(),
                            closed: record.closed.subscribe(),
                        })
                    }
                };
                let _ = reply.send(answer);
            }
            Command::Batch {
                member,
                run_id,
                samples,
                now,
                reply,
            } => {
                let mut outcome = BatchOutcome::default();
                match members.get_mut(&member) {
                    // Unregistered since its hello (terminated): its stream closes.
                    None => {
                        let _ = reply.send(Err(IngestError::UnknownMember(member)));
                        return;
                    }
                    Some(record) if record.run_id != Some(run_id) => {
                        let current = record.run_id.unwrap_or_default();
                        let _ = reply.send(Err(IngestError::Superseded { member, current }));
                        return;
                    }
                    Some(record) => {
                        for sample in &samples {
                            if sample.seq != 0 && sample.seq <= record.highest_seq {
                                metrics.sample_duplicate();
                                continue;
                            }
                            match validate_sample(sample, now) {
                                Ok(()) => {
                                    if record.latest.is_none() {
                                        tracing::debug!(member = %member, seq = sample.seq, "First sample of a member.");
                                    }
                                    record.store(sample, custom);
                                    metrics.sample_ingested();
                                }
                                Err(rejection) => {
                                    metrics.sample_rejected(rejection.reason);
                                    tracing::debug!(member = %member, seq = sample.seq, reason = %rejection.message, "Rejected a sample.");
                                    outcome.rejected.push(Rejection {
                                        seq: sample.seq,
                                        code: tonic::Code::InvalidArgument as i32,
                                        message: rejection.message,
                                    });
                                }
                            }
                            record.highest_seq = record.highest_seq.max(sample.seq);
                        }
                        let horizon = now - *retention_ms;
                        while record.window.front().is_some_and(|s| s.at < horizon) {
                            record.window.pop_front();
                        }
                        outcome.highest_seq = record.highest_seq;
                        outcome.settings = Some(record.settings.clone());
                    }
                }
                let _ = reply.send(Ok(outcome));
            }
            Command::Observe {
                members: wanted,
                windows,
                reply,
            } => observing.push_back(Observing {
                observations: Vec::with_capacity(wanted.len()),
                wanted: wanted.into_iter(),
                windows,
                reply,
            }),
            Command::Configure {
                retention_ms: retention,
                custom: kept,
            } => {
                *retention_ms = retention;
                *custom = kept;
            }
        }
    }
}

/// Whether the latest health check says the member is ready for traffic. Without a configured check,
/// any sample at all means ready.
pub fn is_healthy(latest: &LatestSample) -> bool {
    matches!(
        HealthStatus::try_from(latest.health.status),
        Ok(HealthStatus::Healthy | HealthStatus::NotConfigured)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_700_000_000_000;

    fn sample(seq: u64, at: Millis, cpu: f64) -> Sample {
        Sample {
            seq,
            timestamp_ms: at,
            cpu_busy_percent: Some(cpu),
            load1: 0.5,
            mem_used_percent: 40.0,
            ..Sample::default()
        }
    }

    fn rejected(sample: Sample) -> &'static str {
        validate_sample(&sample, NOW).unwrap_err().reason
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        assert!(validate_sample(&sample(1, NOW, 50.0), NOW).is_ok());
        assert_eq!(rejected(sample(1, NOW, f64::NAN)), "not_finite");
        assert_eq!(rejected(sample(1, NOW, f64::INFINITY)), "not_finite");
        assert_eq!(rejected(sample(1, NOW, -1.0)), "negative");
        assert_eq!(rejected(sample(1, NOW, 100.5)), "above_100_percent");
        assert_eq!(
            rejected(Sample {
                load5: f64::NEG_INFINITY,
                ..sample(1, NOW, 1.0)
            }),
            "not_finite"
        );
        assert_eq!(rejected(sample(1, NOW + 61_000, 1.0)), "timestamp_in_future");
        assert!(
            validate_sample(&sample(1, NOW + 59_000, 1.0), NOW).is_ok(),
            "a little clock skew is fine"
        );
        assert_eq!(rejected(sample(0, NOW, 1.0)), "no_sequence");
        // Load may exceed 100; it is not a percentage.
        assert!(
            validate_sample(
                &Sample {
                    load1: 250.0,
                    ..sample(1, NOW, 1.0)
                },
                NOW
            )
            .is_ok()
        );
    }

    fn hello(member: &str, run_id: u64) -> Hello {
        Hello {
            member_id: member.into(),
            run_id,
            ..Hello::default()
        }
    }

    #[tokio::test]
    async fn unknown_members_are_refused() {
        let ingest = IngestHandle::spawn(Arc::new(Metrics::default()), 600_000, Vec::new());
        assert_eq!(
            ingest.hello(hello("stranger", 1)).await.unwrap_err(),
            IngestError::UnknownMember("stranger".into())
        );
        ingest.register("web-1", AgentSettings::default()).await;
        assert!(ingest.hello(hello("web-1", 1)).await.is_ok());
        ingest.unregister("web-1").await;
        assert!(
            ingest.hello(hello("web-1", 1)).await.is_err(),
            "a terminated member may not report"
        );
    }

    #[tokio::test]
    async fn duplicates_are_dropped_and_bad_samples_rejected_not_stored() {
        let metrics = Arc::new(Metrics::default());
        let ingest = IngestHandle::spawn(metrics.clone(), 600_000, Vec::new());
        ingest.register("web-1", AgentSettings::default()).await;
        ingest.hello(hello("web-1", 7)).await.unwrap();

        let first = ingest
            .batch(
                "web-1",
                7,
                vec![sample(1, NOW - 3000, 10.0), sample(2, NOW - 2000, f64::NAN)],
                NOW,
            )
            .await
            .unwrap();
        assert_eq!(first.highest_seq, 2);
        assert_eq!(first.rejected.len(), 1);
        assert_eq!(first.rejected[0].seq, 2);
        assert_eq!(first.rejected[0].code, tonic::Code::InvalidArgument as i32);

        // A replay after reconnect: 1 and 2 again, then 3.
        assert_eq!(ingest.hello(hello("web-1", 7)).await.unwrap().highest_seq, 2);
        let replay = ingest
            .batch(
                "web-1",
                7,
                vec![
                    sample(1, NOW - 3000, 10.0),
                    sample(2, NOW - 2000, 99.0),
                    sample(3, NOW - 1000, 30.0),
                ],
                NOW,
            )
            .await
            .unwrap();
        assert_eq!(replay.highest_seq, 3);
        assert!(replay.rejected.is_empty());

        let observed = ingest
            .observe(
                vec!["web-1".into()],
                vec![(
                    Metric::Cpu,
                    vec![Window {
                        start: NOW - 10_000,
                        end: NOW,
                    }],
                )],
            )
            .await;
        assert_eq!(
            observed[0].means[0][0],
            Some(20.0),
            "only samples 1 and 3 are stored, each once"
        );
        let text = metrics.render();
        assert!(text.contains("ebb_samples_ingested_total 2"), "{text}");
        assert!(text.contains("ebb_samples_duplicate_total 2"), "{text}");
        assert!(
            text.contains("ebb_samples_rejected_total{reason=\"not_finite\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_superseded_run_is_told_why_and_its_samples_are_neither_stored_nor_acknowledged() {
        let metrics = Arc::new(Metrics::default());
        let ingest = IngestHandle::spawn(metrics.clone(), 600_000, Vec::new());
        ingest.register("web-1", AgentSettings::default()).await;
        let mut first = ingest.hello(hello("web-1", 1)).await.unwrap();
        ingest.hello(hello("web-1", 2)).await.unwrap();
        assert_eq!(
            *first.closed.borrow_and_update(),
            Some(CloseReason::Superseded { current_run: 2 })
        );
        let late = ingest.batch("web-1", 1, vec![sample(1, NOW - 1000, 10.0)], NOW).await;
        assert_eq!(
            late,
            Err(IngestError::Superseded {
                member: "web-1".into(),
                current: 2
            })
        );
        assert!(metrics.render().contains("ebb_samples_ingested_total 0"));
        // A removed member's late batch is refused too, not acknowledged.
        ingest.unregister("web-1").await;
        assert_eq!(
            ingest.batch("web-1", 2, vec![sample(1, NOW - 1000, 10.0)], NOW).await,
            Err(IngestError::UnknownMember("web-1".into()))
        );
    }

    #[tokio::test]
    async fn a_new_agent_run_numbers_from_one_again() {
        let ingest = IngestHandle::spawn(Arc::new(Metrics::default()), 600_000, Vec::new());
        ingest.register("web-1", AgentSettings::default()).await;
        ingest.hello(hello("web-1", 1)).await.unwrap();
        ingest
            .batch("web-1", 1, vec![sample(5, NOW - 5000, 10.0)], NOW)
            .await
            .unwrap();
        assert_eq!(ingest.hello(hello("web-1", 2)).await.unwrap().highest_seq, 0);
        let outcome = ingest
            .batch("web-1", 2, vec![sample(1, NOW - 1000, 30.0)], NOW)
            .await
            .unwrap();
        assert_eq!(outcome.highest_seq, 1);
        let observed = ingest
            .observe(
                vec!["web-1".into()],
                vec![(
                    Metric::Cpu,
                    vec![Window {
                        start: NOW - 10_000,
                        end: NOW,
                    }],
                )],
            )
            .await;
        assert_eq!(observed[0].means[0][0], Some(20.0));
    }

    #[tokio::test]
    async fn samples_queued_behind_a_large_groups_observation_are_not_held_up_by_it() {
        let ingest = IngestHandle::spawn(Arc::new(Metrics::default()), 600_000, Vec::new());
        let ids: Vec<String> = (0..4 * OBSERVE_CHUNK).map(|i| format!("web-{i}")).collect();
        for id in &ids {
            ingest.register(id, AgentSettings::default()).await;
        }
        let last = ids.last().unwrap().clone();
        ingest.hello(hello(&last, 1)).await.unwrap();
        let window = Window {
            start: NOW - 10_000,
            end: NOW,
        };
        // The observation is queued first; the sample is stored before it is done, so its member, read
        // last, is observed with it.
        let (observed, outcome) = tokio::join!(
            ingest.observe(ids.clone(), vec![(Metric::Cpu, vec![window])]),
            ingest.batch(&last, 1, vec![sample(1, NOW - 1000, 70.0)], NOW),
        );
        assert_eq!(outcome.unwrap().highest_seq, 1);
        assert_eq!(observed.len(), ids.len());
        assert_eq!(observed[ids.len() - 1].means[0][0], Some(70.0));
        assert_eq!(observed[0].means[0][0], None);
    }

    #[tokio::test]
    async fn windows_select_by_sample_time_and_old_samples_are_forgotten() {
        let ingest = IngestHandle::spawn(Arc::new(Metrics::default()), 60_000, Vec::new());
        ingest.register("a", AgentSettings::default()).await;
        ingest.hello(hello("a", 1)).await.unwrap();
        let samples = vec![
            sample(1, NOW - 120_000, 90.0),
            sample(2, NOW - 15_000, 80.0),
            sample(3, NOW - 4_000, 10.0),
        ];
        ingest.batch("a", 1, samples, NOW).await.unwrap();
        let windows = vec![
            (
                Metric::Cpu,
                vec![
                    Window {
                        start: NOW - 10_000,
                        end: NOW,
                    },
                    Window {
                        start: NOW - 20_000,
                        end: NOW - 10_000,
                    },
                ],
            ),
            (
                Metric::Cpu,
                vec![Window {
                    start: NOW - 200_000,
                    end: NOW - 100_000,
                }],
            ),
        ];
        let observed = ingest.observe(vec!["a".into(), "unknown".into()], windows).await;
        assert_eq!(observed[0].means, vec![vec![Some(10.0), Some(80.0)], vec![None]]);
        assert_eq!(observed[0].latest.as_ref().unwrap().at, NOW - 4_000);
        assert_eq!(observed[1].means, vec![vec![None, None], vec![None]]);
    }

    #[tokio::test]
    async fn custom_metrics_are_stored_when_a_policy_uses_them_and_bad_ones_refused() {
        let queue = Metric::Custom {
            slot: 0,
            name: "queue_depth",
        };
        let ingest = IngestHandle::spawn(Arc::new(Metrics::default()), 600_000, vec![queue]);
        ingest.register("a", AgentSettings::default()).await;
        ingest.hello(hello("a", 1)).await.unwrap();
        let mut good = sample(1, 1_000, 10.0);
        good.custom = [("queue_depth".to_string(), 12.0), ("other".to_string(), 1.0)].into();
        let mut bad = sample(2, 2_000, 10.0);
        bad.custom = [("queue_depth".to_string(), f64::NAN)].into();
        let outcome = ingest.batch("a", 1, vec![good, bad], 5_000).await.unwrap();
        assert_eq!(outcome.rejected.len(), 1);
        assert!(
            outcome.rejected[0].message.contains("custom metric queue_depth is NaN"),
            "{:?}",
            outcome.rejected
        );
        let window = Window { start: 0, end: 5_000 };
        let observed = ingest.observe(vec!["a".into()], vec![(queue, vec![window])]).await;
        assert_eq!(observed[0].means[0][0], Some(12.0));
    }

    #[tokio::test]
    async fn a_reload_starts_keeping_a_new_custom_metric_and_a_longer_history() {
        let queue = Metric::Custom {
            slot: 0,
            name: "queue_depth",
        };
        let ingest = IngestHandle::spawn(Arc::new(Metrics::default()), 120_000, Vec::new());
        ingest.register("a", AgentSettings::default()).await;
        ingest.hello(hello("a", 1)).await.unwrap();
        let with_queue = |seq: u64, at: Millis, depth: f64| Sample {
            custom: [("queue_depth".to_string(), depth)].into(),
            ..sample(seq, at, 10.0)
        };
        ingest
            .batch("a", 1, vec![with_queue(1, 1_000, 5.0)], 2_000)
            .await
            .unwrap();
        ingest.configure(600_000, vec![queue]).await;
        ingest
            .batch("a", 1, vec![with_queue(2, 2_000, 12.0)], 3_000)
            .await
            .unwrap();
        // 200 s later: kept under the new 10-minute retention, forgotten under the old 2 minutes.
        ingest
            .batch("a", 1, vec![with_queue(3, 200_000, 14.0)], 201_000)
            .await
            .unwrap();
        let early = Window { start: 0, end: 3_000 };
        let observed = ingest.observe(vec!["a".into()], vec![(queue, vec![early])]).await;
        assert_eq!(
            observed[0].means[0][0],
            Some(12.0),
            "only the sample stored after the reload has the metric"
        );
        let cpu = ingest.observe(vec!["a".into()], vec![(Metric::Cpu, vec![early])]).await;
        assert_eq!(
            cpu[0].means[0][0],
            Some(10.0),
            "the longer retention kept the early samples"
        );
    }

    #[tokio::test]
    async fn health_runs_follow_sample_time_even_when_replayed_out_of_order() {
        let ingest = IngestHandle::spawn(Arc::new(Metrics::default()), 600_000, Vec::new());
        ingest.register("a", AgentSettings::default()).await;
        ingest.hello(hello("a", 1)).await.unwrap();
        let checked = |seq: u64, at: Millis, healthy: bool| Sample {
            health: Some(ebb_proto::v1::HealthCheck {
                status: if healthy {
                    HealthStatus::Healthy
                } else {
                    HealthStatus::Unhealthy
                } as i32,
                ..Default::default()
            }),
            ..sample(seq, at, 10.0)
        };
        // Newest last: a pass, then two failures; then an older pass arrives late.
        let batch = vec![
            checked(1, 1_000, true),
            checked(2, 3_000, false),
            checked(3, 4_000, false),
        ];
        ingest.batch("a", 1, batch, 5_000).await.unwrap();
        ingest
            .batch("a", 1, vec![checked(4, 2_000, true)], 5_000)
            .await
            .unwrap();
        let observed = ingest.observe(vec!["a".into()], Vec::new()).await;
        assert_eq!(
            observed[0].health,
            HealthRun {
                passes: 0,
                failures: 2,
                last_heard: Some(4_000)
            }
        );
    }
}
