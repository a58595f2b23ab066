//! The activity history: every scaling decision and every cloud call, with its cause and outcome. Kept
//! in the store (`server.activity_retention_days`, six weeks by default, like EC2's activity history);
//! counted in the metrics by kind and outcome.

use std::sync::Arc;

use crate::engine::Millis;
use crate::metrics::Metrics;
pub use crate::model::{Activity, ActivityKind};
use crate::store::Store;

/// At most this many activities per read.
const READ_LIMIT: usize = 10_000;

/// Shared by every group; cheap to clone. Kept in the store, so the history survives restarts.
#[derive(Clone)]
pub struct ActivityLog {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    retention_ms: Millis,
    /// When old activities were last pruned.
    pruned_at: Arc<std::sync::Mutex<Millis>>,
    /// Activities the store refused (a full disk), oldest first, saved in order once it accepts writes.
    unsaved: Arc<std::sync::Mutex<std::collections::VecDeque<Activity>>>,
}

/// How often activities older than the retention are pruned.
const PRUNE_EVERY_MS: Millis = 3_600_000;
/// Activities held in memory while the store refuses writes; beyond this the oldest are dropped.
const MAX_UNSAVED: usize = 10_000;

impl ActivityLog {
    /// Activities older than `retention_days` are pruned as new ones are recorded, at most hourly.
    pub fn new(metrics: Arc<Metrics>, store: Arc<Store>, retention_days: u32) -> Self {
        Self {
            store,
            metrics,
            retention_ms: Millis::from(retention_days) * 86_400_000,
            pruned_at: Arc::default(),
            unsaved: Arc::default(),
        }
    }

    /// Records an activity; its `id` is assigned by the store. If the store refuses the write (a full
    /// disk), the activity is kept in memory with id 0, counted, and saved, in order, with the first
    /// activity recorded after the store accepts writes again.
    pub fn record(&self, mut activity: Activity) -> Activity {
        self.metrics
            .activity(&activity.group, activity.kind.as_str(), activity.outcome);
        if activity.outcome == "ok" {
            tracing::info!(group = %activity.group, kind = activity.kind.as_str(), member = %activity.member_id, cause = %activity.cause, detail = %activity.detail, "Activity.");
        } else {
            tracing::warn!(group = %activity.group, kind = activity.kind.as_str(), member = %activity.member_id, cause = %activity.cause, error = %activity.detail, "Activity failed.");
        }
        self.prune_if_due(activity.at);
        let mut unsaved = self.unsaved.lock().unwrap();
        let held = unsaved.len();
        unsaved.push_back(activity.clone());
        let mut last_id = 0;
        while let Some(next) = unsaved.front() {
            match self.store.add_activity(next) {
                Ok(id) => {
                    unsaved.pop_front();
                    last_id = id;
                }
                Err(e) => {
                    self.metrics.store_error();
                    if held == 0 {
                        tracing::error!(error = %e, "Cannot save activities; holding them in memory until the store accepts writes.");
                    }
                    if unsaved.len() > MAX_UNSAVED {
                        unsaved.pop_front();
                    }
                    return activity;
                }
            }
        }
        if held > 0 {
            tracing::info!(
                activities = held,
                "Saved the activities held while the store refused writes."
            );
        }
        activity.id = last_id;
        activity
    }

    /// Activities with an id greater than `after`, of `group` (all groups if empty), oldest first.
    pub fn since(&self, after: u64, group: &str) -> Vec<Activity> {
        self.read(self.store.activities_after(after, group, READ_LIMIT))
    }

    /// The newest `limit` activities of `group` (all groups if empty), newest first.
    pub fn newest(&self, group: &str, limit: usize) -> Vec<Activity> {
        self.read(self.store.newest_activities(group, limit))
    }

    fn prune_if_due(&self, now: Millis) {
        let mut pruned_at = self.pruned_at.lock().unwrap();
        if now - *pruned_at < PRUNE_EVERY_MS {
            return;
        }
        *pruned_at = now;
        if let Err(e) = self.store.prune_activities(now - self.retention_ms) {
            self.metrics.store_error();
            tracing::error!(error = %e, "Cannot prune old activities.");
        }
    }

    fn read(&self, result: Result<Vec<Activity>, crate::store::StoreError>) -> Vec<Activity> {
        result.unwrap_or_else(|e| {
            self.metrics.store_error();
            tracing::error!(error = %e, "Cannot read activities.");
            Vec::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at: Millis) -> Activity {
        Activity {
            id: 0,
            group: "web".into(),
            kind: ActivityKind::Launch,
            cause: "test".into(),
            outcome: "ok",
            detail: String::new(),
            at,
            from_capacity: 0,
            to_capacity: 1,
            member_id: "web-1".into(),
        }
    }

    #[test]
    fn a_long_running_collector_forgets_activities_past_their_retention() {
        let log = ActivityLog::new(Arc::default(), Arc::new(Store::in_memory()), 1);
        let hour = 3_600_000;
        log.record(at(0));
        log.record(at(20 * hour));
        assert_eq!(log.newest("web", 10).len(), 2, "within a day");
        // At 30 h the one from 0 h is past the day; the one from 20 h is not.
        log.record(at(30 * hour));
        let left: Vec<Millis> = log.newest("web", 10).iter().map(|a| a.at).collect();
        assert_eq!(left, [30 * hour, 20 * hour]);
    }

    #[test]
    fn activities_the_store_refuses_are_saved_in_order_once_it_accepts_writes() {
        let store = Arc::new(Store::in_memory());
        let metrics = Arc::new(Metrics::default());
        let log = ActivityLog::new(metrics.clone(), store.clone(), 42);
        log.record(at(1));
        store.refuse_writes(true);
        assert_eq!(log.record(at(2)).id, 0, "not saved yet");
        log.record(at(3));
        assert_eq!(log.newest("web", 10).len(), 1);
        store.refuse_writes(false);
        let fourth = log.record(at(4));
        let saved: Vec<Millis> = log.since(0, "web").iter().map(|a| a.at).collect();
        assert_eq!(saved, [1, 2, 3, 4], "nothing lost, in order");
        assert_eq!(fourth.id, log.newest("web", 1)[0].id);
    }
}
