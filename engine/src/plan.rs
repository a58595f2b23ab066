//! From a decision to what the controller does this step: which members are being replaced, how many to
//! launch, which replaced members may go now that their replacements serve, and which members a scale-in
//! removes. [`Engine::plan`] is one step's whole answer; [`Engine::converge`] alone answers an operator who
//! set desired capacity.

use serde::Serialize;

use crate::{Engine, Evaluation, GroupInput, MemberInput, MemberState, Millis, Termination};

/// What the controller may do this step, besides deciding (operators suspend each on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollout {
    /// Launches in flight at most (`max_surge`).
    pub max_surge: u32,
    /// Launching allowed now: not suspended, and not waiting after a failed launch.
    pub launch: bool,
    /// Draining and terminating allowed (not suspended).
    pub terminate: bool,
    /// Unhealthy members may be marked for replacement (not suspended).
    pub replace_unhealthy: bool,
    /// An instance refresh under way: the percentage of desired capacity it keeps healthy.
    pub refresh: Option<u32>,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_surge: u32::MAX,
            launch: true,
            terminate: true,
            replace_unhealthy: true,
            refresh: None,
        }
    }
}

/// What carrying out desired capacity takes at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Convergence {
    /// Every member being replaced after this step: earlier ones, unhealthy ones, a refresh's batch.
    pub replacing: Vec<String>,
    /// Members an instance refresh marks for replacement now (outdated, within its healthy percentage).
    pub refreshed: Vec<String>,
    /// The instance refresh has nothing left to replace.
    pub refresh_finished: bool,
    /// Members to launch now.
    pub launch: u32,
    /// Replaced members that go now: enough healthy members serve.
    pub retire: Vec<String>,
    /// Members a scale-in removes, in order.
    pub victims: Vec<String>,
    /// The group is above desired capacity but only protected members are left to remove.
    pub only_protected_left: bool,
}

/// One step's whole answer: the decision and how to carry it out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub evaluation: Evaluation,
    pub convergence: Convergence,
}

/// A member as the plan sees it: its input, with what this step's judgements make of it.
#[derive(Clone, Copy)]
struct View<'a> {
    member: &'a MemberInput,
    unhealthy: bool,
    replacing: bool,
}

impl Engine {
    /// Evaluates, then carries the outcome through: the health judgements and the new desired capacity
    /// applied to the members, and what reaching that capacity takes ([`Engine::converge`]).
    pub fn plan(&self, input: &GroupInput) -> Plan {
        let evaluation = self.evaluate(input);
        let views = input
            .members
            .iter()
            .map(|member| {
                let (mut unhealthy, mut replacing) = (member.unhealthy, member.replacing);
                if let Some(change) = evaluation.health.iter().find(|c| c.member == member.id) {
                    unhealthy = change.unhealthy;
                    // Healthy again and serving: its replacement is no longer needed.
                    if !change.unhealthy && member.state == MemberState::InService {
                        replacing = false;
                    }
                }
                if input.rollout.replace_unhealthy && evaluation.replace.contains(&member.id) {
                    replacing = true;
                }
                View {
                    member,
                    unhealthy,
                    replacing,
                }
            })
            .collect();
        Plan {
            convergence: self.converge_views(input, evaluation.desired, views),
            evaluation,
        }
    }

    /// What reaching `input.desired` takes now: a refresh's next batch marked for replacement, launches up
    /// to desired (not counting members being replaced or leaving) with at most `max_surge` in flight,
    /// replaced members retired once enough healthy members serve, and the victims of a scale-in.
    pub fn converge(&self, input: &GroupInput) -> Convergence {
        let views = input
            .members
            .iter()
            .map(|member| View {
                member,
                unhealthy: member.unhealthy,
                replacing: member.replacing,
            })
            .collect();
        self.converge_views(input, input.desired, views)
    }

    fn converge_views(&self, input: &GroupInput, desired: u32, mut members: Vec<View<'_>>) -> Convergence {
        let rollout = input.rollout;
        let mut convergence = Convergence::default();
        if let Some(percent) = rollout.refresh {
            let outdated: Vec<usize> = (0..members.len())
                .filter(|&i| members[i].member.outdated && !members[i].replacing && !members[i].member.leaving)
                .collect();
            let in_flight = members.iter().filter(|m| m.replacing).count();
            if outdated.is_empty() && in_flight == 0 {
                convergence.refresh_finished = true;
            }
            let batch = ((desired * (100 - percent.min(100))) / 100).max(1) as usize;
            for index in outdated.into_iter().take(batch.saturating_sub(in_flight)) {
                members[index].replacing = true;
                convergence.refreshed.push(members[index].member.id.clone());
            }
        }
        convergence.replacing = members
            .iter()
            .filter(|m| m.replacing)
            .map(|m| m.member.id.clone())
            .collect();
        let is_live = |m: &View| !m.replacing && !m.member.leaving;
        let live = members.iter().filter(|m| is_live(m)).count() as u32;
        if rollout.launch {
            let in_flight = members
                .iter()
                .filter(|m| m.member.state == MemberState::Pending && !m.replacing)
                .count() as u32;
            convergence.launch = desired
                .saturating_sub(live)
                .min(rollout.max_surge.saturating_sub(in_flight));
        }
        if !rollout.terminate {
            return convergence;
        }
        let serving = members
            .iter()
            .filter(|m| m.member.state == MemberState::InService && !m.unhealthy && !m.replacing)
            .count() as u32;
        if serving >= desired {
            convergence.retire = members
                .iter()
                .filter(|m| m.replacing && !m.member.leaving)
                .map(|m| m.member.id.clone())
                .collect();
        }
        let excess = live.saturating_sub(desired) as usize;
        if excess > 0 {
            let candidates: Vec<&MemberInput> = members.iter().filter(|m| is_live(m)).map(|m| m.member).collect();
            convergence.victims = self.choose_victims(candidates, excess, input.now);
            convergence.only_protected_left = convergence.victims.len() < excess;
        }
        convergence
    }

    /// The members a scale-in removes, in order: those still launching first (cancelled), then by the
    /// group's termination policy; protected members never. `count` at most.
    pub fn victims(&self, members: &[MemberInput], count: usize, now: Millis) -> Vec<String> {
        self.choose_victims(members.iter().collect(), count, now)
    }

    fn choose_victims(&self, members: Vec<&MemberInput>, count: usize, now: Millis) -> Vec<String> {
        let billing = Millis::from(self.billing_period_secs.max(1)) * 1000;
        // Members are in launch order, so a tie in launch time goes by position.
        let mut candidates: Vec<(usize, &MemberInput)> =
            members.into_iter().enumerate().filter(|(_, m)| !m.protected).collect();
        candidates.sort_by(|(i, a), (j, b)| {
            let pending = |m: &MemberInput| m.state != MemberState::Pending;
            pending(a)
                .cmp(&pending(b))
                .then_with(|| match self.termination {
                    Termination::Newest => b.launched.cmp(&a.launched),
                    Termination::Oldest => a.launched.cmp(&b.launched),
                    Termination::LeastLoaded => {
                        let load = |m: &MemberInput| m.load.unwrap_or(f64::INFINITY);
                        load(a).total_cmp(&load(b))
                    }
                    Termination::ClosestToBillingHour => {
                        let left = |m: &MemberInput| billing - (now - m.launched).rem_euclid(billing);
                        left(a).cmp(&left(b))
                    }
                })
                .then_with(|| match self.termination {
                    Termination::Newest => j.cmp(i),
                    _ => i.cmp(j),
                })
        });
        candidates.into_iter().take(count).map(|(_, m)| m.id.clone()).collect()
    }
}
