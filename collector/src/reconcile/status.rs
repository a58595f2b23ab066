//! What a group tells operators: the status it publishes (Admin API, demo, metrics), the activity it
//! records for each thing it does, and cloud failures that repeat every step, said once.

use std::collections::HashMap;

use super::GroupController;
use crate::activity::{Activity, ActivityKind};
use crate::engine::MemberState;
use crate::engine::Millis;
use crate::ingest::LatestSample;
use crate::metrics::GroupGauges;
use crate::model::Member;
use crate::providers::CloudError;

/// A member with what was last heard from it and from the load balancer.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberStatus {
    pub member: Member,
    pub latest: Option<LatestSample>,
    pub lb_connections: u64,
}

/// What the Admin API and the demo see of a group.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupStatus {
    pub name: String,
    pub min_size: u32,
    pub max_size: u32,
    pub desired: u32,
    pub members: Vec<MemberStatus>,
    /// Average CPU of in-service members over the last 10 s.
    pub cpu_avg: Option<f64>,
    /// The latest evaluation's outcome in words.
    pub last_evaluation: String,
    /// The CPU figure the first CPU policy decided on in the latest evaluation: its name, its period and
    /// the group's aggregate over that period (what the demo shows, so that it agrees with the decisions).
    pub policy_cpu: Option<PolicyFigure>,
}

/// One policy's aggregate of its metric over its latest period.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyFigure {
    pub policy: String,
    pub period_secs: u32,
    pub value: f64,
}

impl GroupStatus {
    pub fn in_service(&self) -> u32 {
        self.members
            .iter()
            .filter(|m| m.member.state == MemberState::InService)
            .count() as u32
    }

    pub fn pending(&self) -> u32 {
        self.members
            .iter()
            .filter(|m| m.member.state == MemberState::Pending)
            .count() as u32
    }
}

impl GroupController {
    pub(super) async fn refresh_status(&self) {
        let connections = self.load_balancer_connections().await;
        self.publish(connections);
    }

    pub(super) async fn load_balancer_connections(&self) -> Vec<(String, u64)> {
        self.deps.load_balancer.connections()
    }

    pub(super) fn record(
        &self,
        kind: ActivityKind,
        cause: String,
        result: Result<String, CloudError>,
        member: &str,
        capacity: (u32, u32),
    ) {
        let (outcome, detail) = match result {
            Ok(detail) => ("ok", detail),
            Err(e) => ("failed", e.to_string()),
        };
        self.deps.services.activities.record(Activity {
            id: 0,
            group: self.config.name.clone(),
            kind,
            cause,
            outcome,
            detail,
            at: self.clocks.now,
            from_capacity: capacity.0,
            to_capacity: capacity.1,
            member_id: member.to_string(),
        });
    }

    pub(super) fn publish(&self, connections: Vec<(String, u64)>) {
        let connections: HashMap<String, u64> = connections.into_iter().collect();
        let members = self
            .members
            .iter()
            .map(|m| MemberStatus {
                member: m.clone(),
                latest: self.latest(&m.id).cloned(),
                lb_connections: connections.get(&m.id).copied().unwrap_or(0),
            })
            .collect();
        let status = GroupStatus {
            name: self.config.name.clone(),
            min_size: self.capacity.min_size,
            max_size: self.capacity.max_size,
            desired: self.capacity.desired,
            members,
            cpu_avg: self.cpu_avg,
            last_evaluation: self.last_evaluation.clone(),
            policy_cpu: self.policy_cpu.clone(),
        };
        let mut values = std::collections::BTreeMap::new();
        if let Some(cpu) = status.cpu_avg {
            values.insert("cpu_avg_percent", cpu);
        }
        self.deps.services.metrics.set_group(
            &status.name,
            GroupGauges {
                desired: status.desired,
                in_service: status.in_service(),
                pending: status.pending(),
                values,
            },
        );
        self.status.send_replace(status);
    }
}

/// Warnings that would repeat every step while a cloud is unreachable: the first is logged, repeats of the
/// same text are counted and summarised once a minute, and the end of the run is logged.
#[derive(Debug, Default)]
pub(super) struct RepeatedWarnings {
    runs: std::collections::HashMap<&'static str, WarningRun>,
}

#[derive(Debug)]
struct WarningRun {
    error: String,
    repeats: u64,
    said_at: Millis,
}

/// How often a warning that keeps repeating is said again, with its count.
const REPEAT_SUMMARY_MS: Millis = 60_000;

impl RepeatedWarnings {
    /// `what` failed with `error`; true if it was logged now.
    pub(super) fn failed(&mut self, group: &str, what: &'static str, error: &str, now: Millis) -> bool {
        match self.runs.get_mut(what) {
            Some(run) if run.error == error => {
                run.repeats += 1;
                if now - run.said_at < REPEAT_SUMMARY_MS {
                    return false;
                }
                tracing::warn!(
                    group,
                    error,
                    repeats = run.repeats,
                    "{what} (the same failure, {} times now)",
                    run.repeats + 1
                );
                run.said_at = now;
            }
            _ => {
                tracing::warn!(group, error, "{what}");
                let run = WarningRun {
                    error: error.to_string(),
                    repeats: 0,
                    said_at: now,
                };
                self.runs.insert(what, run);
            }
        }
        true
    }

    /// `what` worked; true if that ends a run of failures worth saying.
    pub(super) fn succeeded(&mut self, group: &str, what: &'static str) -> bool {
        let Some(run) = self.runs.remove(what) else {
            return false;
        };
        tracing::info!(group, failures = run.repeats + 1, "{what}: works again");
        true
    }
}
