//! What a group carries from one evaluation to the next: its limits and desired capacity (which scheduled
//! actions change) and what the engine is told of earlier decisions. The live controller and the
//! simulator keep these the same way, through these functions.

use crate::schedule::ScheduledAction;
use crate::{Change, Evaluation, GroupInput, MemberInput, Millis, Prediction, ReasonCode, Recommendation, Rollout};

/// How long recommendations and changes are kept: longer than any stabilization or rate-limit window.
const MEMORY_MS: Millis = 3_600_000;

/// The limits in force (the configuration's, until a scheduled action changes them) and desired capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub min_size: u32,
    pub max_size: u32,
    pub desired: u32,
}

impl Capacity {
    /// Applies a scheduled action: a new minimum raises the maximum if need be, a new maximum lowers the
    /// minimum, and desired capacity (the action's, or the current one) is kept within the new limits.
    pub fn schedule(&mut self, action: &ScheduledAction) {
        if let Some(min) = action.min_size {
            self.min_size = min;
            self.max_size = self.max_size.max(min);
        }
        if let Some(max) = action.max_size {
            self.max_size = max;
            self.min_size = self.min_size.min(max);
        }
        if let Some(desired) = action.desired_capacity {
            self.desired = desired;
        }
        self.desired = self.desired.clamp(self.min_size, self.max_size);
    }
}

/// What the engine remembers between evaluations: when the group last scaled, target tracking's recent
/// recommendations and the policies' recent changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScalingMemory {
    pub last_scale_out: Option<Millis>,
    pub last_scale_in: Option<Millis>,
    pub recommendations: Vec<Recommendation>,
    pub changes: Vec<Change>,
}

impl ScalingMemory {
    /// Remembers `evaluation`: its recommendations always; when its change of desired capacity is `taken`
    /// (not a dry run), when the group scaled and, for a policy's change, by how much.
    ///
    /// A recommendation equal to the policy's previous one only moves that one's time forward: a window
    /// holds one of them exactly when it holds the latest, so stabilization decides the same, and a steady
    /// group remembers a handful of recommendations instead of one per evaluation for an hour.
    pub fn remember(&mut self, evaluation: &Evaluation, taken: bool) {
        let now = evaluation.at;
        let horizon = now - MEMORY_MS;
        self.recommendations.retain(|r| r.at > horizon);
        for recommendation in &evaluation.recommendations {
            let previous = self
                .recommendations
                .iter_mut()
                .rev()
                .find(|r| r.policy == recommendation.policy);
            match previous {
                Some(previous) if previous.capacity == recommendation.capacity => previous.at = recommendation.at,
                _ => self.recommendations.push(recommendation.clone()),
            }
        }
        self.changes.retain(|c| c.at > horizon);
        let (from, to) = (evaluation.desired_before, evaluation.desired);
        if !taken || from == to {
            return;
        }
        if to > from {
            self.last_scale_out = Some(now);
        } else {
            self.last_scale_in = Some(now);
        }
        if evaluation.reason.code == ReasonCode::Policy {
            self.changes.push(Change { at: now, from, to });
        }
    }
}

impl GroupInput {
    /// The group as the engine sees it at `now`: its capacity and limits, what it remembers of earlier
    /// evaluations, its members, its predictive policies' forecasts, and what carrying out the decision
    /// may do.
    pub fn new(
        now: Millis,
        capacity: &Capacity,
        memory: &ScalingMemory,
        suspended: bool,
        members: Vec<MemberInput>,
        predictions: Vec<Prediction>,
        rollout: Rollout,
    ) -> Self {
        GroupInput {
            now,
            min_size: capacity.min_size,
            max_size: capacity.max_size,
            desired: capacity.desired,
            last_scale_out: memory.last_scale_out,
            last_scale_in: memory.last_scale_in,
            suspended,
            members,
            recommendations: memory.recommendations.clone(),
            changes: memory.changes.clone(),
            predictions,
            rollout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Cron;

    fn action(min: Option<u32>, max: Option<u32>, desired: Option<u32>) -> ScheduledAction {
        ScheduledAction {
            name: "a".into(),
            cron: Cron::parse("@daily").unwrap(),
            zone: jiff::tz::TimeZone::UTC,
            min_size: min,
            max_size: max,
            desired_capacity: desired,
        }
    }

    #[test]
    fn a_scheduled_minimum_raises_the_maximum_and_desired() {
        let mut capacity = Capacity {
            min_size: 1,
            max_size: 3,
            desired: 2,
        };
        capacity.schedule(&action(Some(5), None, None));
        assert_eq!((capacity.min_size, capacity.max_size, capacity.desired), (5, 5, 5));
        capacity.schedule(&action(None, Some(2), Some(4)));
        assert_eq!((capacity.min_size, capacity.max_size, capacity.desired), (2, 2, 2));
    }

    #[test]
    fn a_dry_run_remembers_recommendations_but_not_the_change() {
        let mut evaluation = Evaluation {
            at: 10_000,
            desired_before: 2,
            desired: 3,
            action: crate::Action::ScaleOut,
            reason: crate::Reason::new(ReasonCode::Policy, "cpu above target"),
            policy: Some("cpu".into()),
            members: crate::MemberCounts::default(),
            verdicts: Vec::new(),
            health: Vec::new(),
            replace: Vec::new(),
            recommendations: vec![Recommendation {
                policy: "cpu".into(),
                at: 10_000,
                capacity: 3,
            }],
            explanation: String::new(),
        };
        let mut memory = ScalingMemory::default();
        memory.remember(&evaluation, false);
        assert_eq!(memory.recommendations.len(), 1);
        assert_eq!((memory.last_scale_out, memory.changes.len()), (None, 0));
        memory.remember(&evaluation, true);
        assert_eq!(memory.last_scale_out, Some(10_000));
        assert_eq!(
            memory.changes,
            [Change {
                at: 10_000,
                from: 2,
                to: 3
            }]
        );
        // The same recommendation again moves the remembered one's time; a different one is added.
        evaluation.at = 20_000;
        evaluation.recommendations[0].at = 20_000;
        memory.remember(&evaluation, false);
        assert_eq!(memory.recommendations.len(), 1);
        assert_eq!(memory.recommendations[0].at, 20_000);
        evaluation.recommendations[0].capacity = 4;
        memory.remember(&evaluation, false);
        assert_eq!(memory.recommendations.len(), 2);
        // An hour on, what was remembered is forgotten.
        evaluation.at += MEMORY_MS;
        evaluation.recommendations.clear();
        memory.remember(&evaluation, false);
        assert!(memory.recommendations.is_empty() && memory.changes.is_empty());
    }
}
