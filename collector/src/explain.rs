//! Every evaluation's explanation, kept so an operator can ask why a group did — or did not — scale at a
//! given moment (`ebb-collector explain`). Consecutive evaluations with the same outcome (action, reason,
//! capacity, policy) are kept as one record spanning their time, holding the latest one's detail; so a
//! quiet group costs one record, not one a second. Kept in the store with the activity history
//! (`server.explanation_retention_secs`); a record being extended is written at most every
//! [`WRITE_EVERY_MS`], so a crash loses at most that much of its span.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::engine::{Action, Evaluation, Millis, ReasonCode};
pub use crate::model::Explained;
use crate::store::Store;

/// How often a record still being extended is written.
pub const WRITE_EVERY_MS: Millis = 10_000;
/// How often old records are pruned.
const PRUNE_EVERY_MS: Millis = 3_600_000;

/// What makes two evaluations the same outcome.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    dry_run: bool,
    action: Action,
    reason: ReasonCode,
    desired_before: u32,
    desired: u32,
    policy: Option<String>,
    replace: Vec<String>,
}

impl Outcome {
    fn of(evaluation: &Evaluation, dry_run: bool) -> Self {
        Self {
            dry_run,
            action: evaluation.action,
            reason: evaluation.reason.code,
            desired_before: evaluation.desired_before,
            desired: evaluation.desired,
            policy: evaluation.policy.clone(),
            replace: evaluation.replace.clone(),
        }
    }
}

/// The record a group is extending.
struct Open {
    id: i64,
    outcome: Outcome,
    record: Explained,
    written_until: Millis,
}

/// Shared by every group; cheap to clone.
#[derive(Clone)]
pub struct ExplanationLog {
    store: Arc<Store>,
    retention_ms: Millis,
    open: Arc<Mutex<HashMap<String, Open>>>,
    pruned_at: Arc<Mutex<Millis>>,
}

impl ExplanationLog {
    pub fn new(store: Arc<Store>, retention_secs: u64) -> Self {
        Self {
            store,
            retention_ms: Millis::try_from(retention_secs.saturating_mul(1000)).unwrap_or(Millis::MAX),
            open: Arc::default(),
            pruned_at: Arc::default(),
        }
    }

    pub fn record(&self, group: &str, evaluation: Evaluation, dry_run: bool) {
        let at = evaluation.at;
        let outcome = Outcome::of(&evaluation, dry_run);
        // Only quiet evaluations are merged: every change and every health judgement is its own record.
        let mergeable = evaluation.action == Action::None && evaluation.health.is_empty();
        let record = Explained {
            from: at,
            until: at,
            evaluations: 1,
            dry_run,
            action: evaluation.action.as_str().to_string(),
            reason: evaluation.reason.code.as_str().to_string(),
            desired_before: evaluation.desired_before,
            desired: evaluation.desired,
            json: serde_json::to_string(&evaluation).unwrap_or_default(),
            text: evaluation.explanation,
        };
        let mut open = self.open.lock().unwrap();
        let result = match open.get_mut(group) {
            Some(current) if mergeable && current.outcome == outcome => {
                current.record.until = at;
                current.record.evaluations += 1;
                current.record.text = record.text;
                current.record.json = record.json;
                if at - current.written_until < WRITE_EVERY_MS {
                    return;
                }
                current.written_until = at;
                self.store.update_explanation(current.id, &current.record)
            }
            _ => {
                // The record being closed gets its final span first.
                if let Some(previous) = open.get(group) {
                    let _ = self.store.update_explanation(previous.id, &previous.record);
                }
                self.store.add_explanation(group, &record).map(|id| {
                    let next = Open {
                        id,
                        outcome,
                        record,
                        written_until: at,
                    };
                    open.insert(group.to_string(), next);
                })
            }
        };
        if let Err(e) = result {
            tracing::error!(group = %group, error = %e, "Cannot save an explanation.");
        }
        drop(open);
        self.prune(at);
    }

    fn prune(&self, now: Millis) {
        let mut pruned_at = self.pruned_at.lock().unwrap();
        if now - *pruned_at < PRUNE_EVERY_MS {
            return;
        }
        *pruned_at = now;
        if let Err(e) = self.store.prune_explanations(now.saturating_sub(self.retention_ms)) {
            tracing::error!(error = %e, "Cannot prune old explanations.");
        }
    }

    /// The records of `group` that end at or after `since`, oldest first, at most the newest `limit`; the
    /// record being extended as of its latest evaluation.
    pub fn since(&self, group: &str, since: Millis, limit: usize) -> Vec<Explained> {
        let mut records = self.store.explanations(group, since, limit).unwrap_or_else(|e| {
            tracing::error!(group = %group, error = %e, "Cannot read explanations.");
            Vec::new()
        });
        if let (Some(open), Some(last)) = (self.open.lock().unwrap().get(group), records.last_mut())
            && last.from == open.record.from
        {
            *last = open.record.clone();
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{MemberCounts, Reason};

    fn evaluation(at: Millis, action: Action, code: ReasonCode, desired: u32) -> Evaluation {
        let code_name = code.as_str();
        Evaluation {
            at,
            desired_before: 2,
            desired,
            action,
            reason: Reason::new(code, format!("because {code_name}")),
            policy: None,
            members: MemberCounts::default(),
            verdicts: Vec::new(),
            health: Vec::new(),
            replace: Vec::new(),
            recommendations: Vec::new(),
            explanation: format!("{code_name} at {at}"),
        }
    }

    #[test]
    fn quiet_seconds_are_one_record_and_every_change_is_its_own() {
        let log = ExplanationLog::new(Arc::new(Store::in_memory()), 3600);
        for t in 0..5 {
            log.record("web", evaluation(t * 1000, Action::None, ReasonCode::NoAlarm, 2), false);
        }
        log.record("web", evaluation(5000, Action::ScaleOut, ReasonCode::Policy, 3), false);
        log.record("web", evaluation(6000, Action::None, ReasonCode::InCooldown, 3), false);
        log.record("web", evaluation(7000, Action::None, ReasonCode::InCooldown, 3), false);
        let records = log.since("web", 0, 100);
        let spans: Vec<(Millis, Millis, u64, &str)> = records
            .iter()
            .map(|r| (r.from, r.until, r.evaluations, r.reason.as_str()))
            .collect();
        assert_eq!(
            spans,
            [
                (0, 4000, 5, "no_alarm"),
                (5000, 5000, 1, "policy"),
                (6000, 7000, 2, "in_cooldown")
            ]
        );
        assert_eq!(records[2].text, "in_cooldown at 7000", "the latest evaluation's detail");
        // "Why nothing at 14:02?" — the record covering that moment.
        assert_eq!(log.since("web", 2500, 1)[0].reason, "in_cooldown");
        assert_eq!(log.since("web", 2500, 100)[0].reason, "no_alarm");
        assert!(log.since("other", 0, 100).is_empty());
    }

    #[test]
    fn records_survive_a_restart_up_to_the_last_write() {
        let store = Arc::new(Store::in_memory());
        let log = ExplanationLog::new(store.clone(), 3600);
        for t in 0..25 {
            log.record("web", evaluation(t * 1000, Action::None, ReasonCode::NoAlarm, 2), false);
        }
        // A new collector on the same store: the span as last written (every 10 s).
        let after = ExplanationLog::new(store, 3600);
        let records = after.since("web", 0, 100);
        assert_eq!(
            (records[0].from, records[0].until, records[0].evaluations),
            (0, 20_000, 21)
        );
    }

    #[test]
    fn old_records_are_forgotten() {
        let log = ExplanationLog::new(Arc::new(Store::in_memory()), 10);
        log.record("web", evaluation(0, Action::ScaleOut, ReasonCode::Policy, 3), false);
        log.record(
            "web",
            evaluation(PRUNE_EVERY_MS, Action::None, ReasonCode::NoAlarm, 3),
            false,
        );
        assert_eq!(log.since("web", 0, 100).len(), 1);
    }
}
