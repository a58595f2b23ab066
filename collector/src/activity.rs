//! The activity history: every scaling decision and every cloud call, with its cause and outcome, newest
//! last. Bounded in memory for now; counted in the metrics by kind and outcome.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::engine::Millis;
use crate::metrics::Metrics;

/// Activities kept in memory.
const CAPACITY: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivityKind {
    /// A policy raised desired capacity.
    ScaleOut,
    /// A policy lowered desired capacity.
    ScaleIn,
    /// An operator set desired capacity.
    SetDesired,
    Launch,
    Terminate,
    /// Put behind the load balancer after passing its health check.
    Register,
    /// Taken out of the load balancer.
    Deregister,
    /// An instance disappeared without ebb terminating it.
    InstanceLost,
    /// A VM ebb did not launch joined with an operator's token.
    Join,
    /// Such a VM left the group (scale-in); it keeps running.
    Leave,
    /// Judged unhealthy: out of the load balancer, replaced if the group replaces unhealthy members.
    Unhealthy,
    /// Judged healthy again.
    Healthy,
    /// A scheduled action changed the group's limits or desired capacity.
    Scheduled,
    /// Something an operator should look at, like a setting shorter than the group's boot time.
    Warning,
    /// An operator suspended or resumed scaling.
    Suspension,
}

impl ActivityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActivityKind::ScaleOut => "scale_out",
            ActivityKind::ScaleIn => "scale_in",
            ActivityKind::SetDesired => "set_desired",
            ActivityKind::Launch => "launch",
            ActivityKind::Terminate => "terminate",
            ActivityKind::Register => "register",
            ActivityKind::Deregister => "deregister",
            ActivityKind::InstanceLost => "instance_lost",
            ActivityKind::Join => "join",
            ActivityKind::Leave => "leave",
            ActivityKind::Unhealthy => "unhealthy",
            ActivityKind::Healthy => "healthy",
            ActivityKind::Scheduled => "scheduled",
            ActivityKind::Warning => "warning",
            ActivityKind::Suspension => "suspension",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Activity {
    pub id: u64,
    pub group: String,
    pub kind: ActivityKind,
    pub cause: String,
    /// `ok` or `failed`.
    pub outcome: &'static str,
    /// What happened: the error on failure, the instance id on launch, ...
    pub detail: String,
    pub at: Millis,
    pub from_capacity: u32,
    pub to_capacity: u32,
    pub member_id: String,
}

/// Shared by every group; cheap to clone.
#[derive(Clone)]
pub struct ActivityLog {
    inner: Arc<Mutex<(u64, VecDeque<Activity>)>>,
    metrics: Arc<Metrics>,
}

impl ActivityLog {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::default(),
            metrics,
        }
    }

    /// Records an activity; its `id` is assigned here.
    pub fn record(&self, mut activity: Activity) -> Activity {
        self.metrics
            .activity(&activity.group, activity.kind.as_str(), activity.outcome);
        let level_ok = activity.outcome == "ok";
        if level_ok {
            tracing::info!(group = %activity.group, kind = activity.kind.as_str(), member = %activity.member_id, cause = %activity.cause, detail = %activity.detail, "Activity.");
        } else {
            tracing::warn!(group = %activity.group, kind = activity.kind.as_str(), member = %activity.member_id, cause = %activity.cause, error = %activity.detail, "Activity failed.");
        }
        let mut inner = self.inner.lock().unwrap();
        inner.0 += 1;
        activity.id = inner.0;
        if inner.1.len() == CAPACITY {
            inner.1.pop_front();
        }
        inner.1.push_back(activity.clone());
        activity
    }

    /// Activities with an id greater than `after`, of `group` (all groups if empty), oldest first.
    pub fn since(&self, after: u64, group: &str) -> Vec<Activity> {
        let inner = self.inner.lock().unwrap();
        let start = inner.1.partition_point(|a| a.id <= after);
        inner
            .1
            .range(start..)
            .filter(|a| group.is_empty() || a.group == group)
            .cloned()
            .collect()
    }

    /// The newest `limit` activities of `group` (all groups if empty), newest first.
    pub fn newest(&self, group: &str, limit: usize) -> Vec<Activity> {
        let inner = self.inner.lock().unwrap();
        inner
            .1
            .iter()
            .rev()
            .filter(|a| group.is_empty() || a.group == group)
            .take(limit)
            .cloned()
            .collect()
    }
}
