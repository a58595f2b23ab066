//! Every evaluation's explanation, kept so an operator can ask why a group did — or did not — scale at a
//! given moment (`ebb-collector explain`). Consecutive evaluations with the same outcome (action, reason,
//! capacity, policy) are kept as one record spanning their time, holding the latest one's detail; so a
//! quiet group costs one record, not one a second. In memory, bounded by age and count.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::engine::{Evaluation, Millis};

/// Records kept per group at most, whatever the retention.
const MAX_RECORDS: usize = 100_000;

/// One outcome and the span of evaluations that had it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explained {
    pub from: Millis,
    pub until: Millis,
    pub evaluations: u64,
    /// `true` when the group decides but never acts (`dry_run`).
    pub dry_run: bool,
    /// The latest evaluation of the span.
    pub evaluation: Evaluation,
}

impl Explained {
    fn continues(&self, evaluation: &Evaluation, dry_run: bool) -> bool {
        let (a, b) = (&self.evaluation, evaluation);
        self.dry_run == dry_run
            && a.action == b.action
            && a.reason.code == b.reason.code
            && a.desired_before == b.desired_before
            && a.desired == b.desired
            && a.policy == b.policy
            && a.replace == b.replace
            && b.health.is_empty()
            && a.action == crate::engine::Action::None
    }
}

/// Shared by every group; cheap to clone.
#[derive(Clone)]
pub struct ExplanationLog {
    inner: Arc<Mutex<HashMap<String, VecDeque<Explained>>>>,
    retention_ms: Millis,
}

impl ExplanationLog {
    pub fn new(retention_secs: u64) -> Self {
        Self {
            inner: Arc::default(),
            retention_ms: Millis::try_from(retention_secs.saturating_mul(1000)).unwrap_or(Millis::MAX),
        }
    }

    pub fn record(&self, group: &str, evaluation: Evaluation, dry_run: bool) {
        let mut inner = self.inner.lock().unwrap();
        let records = inner.entry(group.to_string()).or_default();
        let at = evaluation.at;
        match records.back_mut() {
            Some(last) if last.continues(&evaluation, dry_run) => {
                last.until = at;
                last.evaluations += 1;
                last.evaluation = evaluation;
            }
            _ => records.push_back(Explained {
                from: at,
                until: at,
                evaluations: 1,
                dry_run,
                evaluation,
            }),
        }
        let horizon = at.saturating_sub(self.retention_ms);
        while records.len() > MAX_RECORDS || records.front().is_some_and(|r| r.until < horizon) {
            records.pop_front();
        }
    }

    /// The records of `group` that end at or after `since`, oldest first, at most the newest `limit`.
    pub fn since(&self, group: &str, since: Millis, limit: usize) -> Vec<Explained> {
        let inner = self.inner.lock().unwrap();
        let Some(records) = inner.get(group) else {
            return Vec::new();
        };
        let start = records.partition_point(|r| r.until < since);
        let skip = (records.len() - start).saturating_sub(limit);
        records.range(start + skip..).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Action, MemberCounts, Reason};

    fn evaluation(at: Millis, action: Action, code: &'static str, desired: u32) -> Evaluation {
        Evaluation {
            at,
            desired_before: 2,
            desired,
            action,
            reason: Reason {
                code,
                text: format!("because {code}"),
            },
            policy: None,
            members: MemberCounts::default(),
            verdicts: Vec::new(),
            health: Vec::new(),
            replace: Vec::new(),
            recommendations: Vec::new(),
            explanation: String::new(),
        }
    }

    #[test]
    fn quiet_seconds_are_one_record_and_every_change_is_its_own() {
        let log = ExplanationLog::new(3600);
        for t in 0..5 {
            log.record("web", evaluation(t * 1000, Action::None, "no_alarm", 2), false);
        }
        log.record("web", evaluation(5000, Action::ScaleOut, "policy", 3), false);
        log.record("web", evaluation(6000, Action::None, "in_cooldown", 3), false);
        log.record("web", evaluation(7000, Action::None, "in_cooldown", 3), false);
        let records = log.since("web", 0, 100);
        let spans: Vec<(Millis, Millis, u64, &str)> = records
            .iter()
            .map(|r| (r.from, r.until, r.evaluations, r.evaluation.reason.code))
            .collect();
        assert_eq!(
            spans,
            [
                (0, 4000, 5, "no_alarm"),
                (5000, 5000, 1, "policy"),
                (6000, 7000, 2, "in_cooldown")
            ]
        );
        // "Why nothing at 14:02?" — the record covering that moment.
        assert_eq!(log.since("web", 2500, 1)[0].evaluation.reason.code, "in_cooldown");
        assert_eq!(log.since("web", 2500, 100)[0].evaluation.reason.code, "no_alarm");
        assert!(log.since("other", 0, 100).is_empty());
    }

    #[test]
    fn old_records_are_forgotten() {
        let log = ExplanationLog::new(10);
        log.record("web", evaluation(0, Action::ScaleOut, "policy", 3), false);
        log.record("web", evaluation(20_000, Action::None, "no_alarm", 3), false);
        assert_eq!(log.since("web", 0, 100).len(), 1);
    }
}
