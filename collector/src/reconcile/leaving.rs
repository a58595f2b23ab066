//! How members leave: out of the load balancer, drained (the agent's pre-stop, `drain_secs`), held by
//! terminating hooks, then terminated with an intent written first and the certificate revoked; and the
//! members an instance refresh replaces (launched from an older launch specification).

use super::{GroupController, Member, MemberState};
use crate::activity::ActivityKind;
use crate::engine::Millis;
use crate::hooks::{HookResult, Transition};
use crate::store::{Intent, IntentKind};

impl GroupController {
    /// Takes a member out of the load balancer, recording why.
    pub(super) async fn leave_load_balancer(&self, member: &Member, cause: &str, capacity: (u32, u32)) {
        let result = self
            .deps
            .load_balancer
            .deregister(&member.id, &member.instance_id)
            .await;
        self.record(
            ActivityKind::Deregister,
            cause.to_string(),
            result.map(|()| String::new()),
            &member.id,
            capacity,
        );
    }

    /// The first step of leaving: out of the load balancer, the agent told to drain, terminated later by
    /// [`Self::finish_drains`] at `drain_secs` or when the agent reports drained.
    /// A member that never served (pending: never registered with the load balancer) has nothing to drain
    /// and no deregistration delay to wait out: it goes at once, as EC2 terminates pending instances.
    pub(super) async fn start_drain(&mut self, member_id: &str, cause: &str, now: Millis) {
        let Some(index) = self.members.iter().position(|m| m.id == member_id) else {
            return;
        };
        let member = self.members[index].clone();
        if member.state == MemberState::InService {
            self.leave_load_balancer(&member, cause, (self.capacity.desired, self.capacity.desired))
                .await;
        }
        let (drain_secs, outcome) = if member.in_service_since.is_none() {
            (0, "never in service: terminated at once".to_string())
        } else {
            (self.drain_secs(), format!("terminated within {} s", self.drain_secs()))
        };
        self.members[index].state = MemberState::Draining;
        self.members[index].drain_until = Some(now + Millis::from(drain_secs) * 1000);
        let settings = self.agent_settings(&self.members[index]);
        self.deps.services.ingest.register(&member.id, settings).await;
        self.record(
            ActivityKind::Drain,
            cause.to_string(),
            Ok(outcome),
            &member.id,
            (self.capacity.desired, self.capacity.desired),
        );
        self.save();
    }

    /// `drain_secs`, or the load balancer's deregistration delay if that is longer.
    fn drain_secs(&self) -> u32 {
        self.config
            .drain_secs
            .max(self.deps.load_balancer.deregistration_delay_secs())
    }

    /// Draining members whose agent reported drained, or whose time is up, go; never before the load
    /// balancer's deregistration delay has passed, while it may still send them requests.
    pub(super) async fn finish_drains(&mut self, now: Millis) {
        let lb_delay_ms = Millis::from(self.deps.load_balancer.deregistration_delay_secs()) * 1000;
        let drain_ms = Millis::from(self.drain_secs()) * 1000;
        let drained = |c: &Self, i: usize| {
            let lb_done = c.members[i]
                .drain_until
                .is_some_and(|until| now >= until - drain_ms + lb_delay_ms);
            lb_done && c.latest(&c.members[i].id).is_some_and(|l| l.drained)
        };
        let ready: Vec<(String, &'static str)> = (0..self.members.len())
            .filter_map(|i| {
                let until = self.members[i].drain_until?;
                let never_served = self.members[i].in_service_since.is_none();
                match (drained(self, i), now >= until) {
                    (true, _) => Some((self.members[i].id.clone(), "drained: its agent finished")),
                    (false, true) if never_served => Some((self.members[i].id.clone(), "never in service")),
                    (false, true) => Some((self.members[i].id.clone(), "drain time is up")),
                    _ => None,
                }
            })
            .collect();
        for (id, cause) in ready {
            let Some(index) = self.members.iter().position(|m| m.id == id) else {
                continue;
            };
            // Terminating hooks hold it; either answer lets it go.
            let (subject, wait) = self.members[index].hook_state();
            let Some(verdict) = self.hooks.check(subject, wait, Transition::Terminating, now) else {
                continue;
            };
            if !verdict.why.is_empty() {
                let result = if verdict.result == HookResult::Continue {
                    "continue"
                } else {
                    "abandon"
                };
                self.record(
                    ActivityKind::Hook,
                    verdict.why,
                    Ok(result.into()),
                    &id,
                    (self.capacity.desired, self.capacity.desired),
                );
            }
            self.remove(index, cause).await;
        }
    }

    /// Out of the load balancer first, then terminated; `false` if the termination failed (the member
    /// stays, and a later pass tries again).
    pub(super) async fn remove(&mut self, index: usize, cause: &str) -> bool {
        let now = self.clocks.now;
        let intent = Intent {
            key: format!("terminate-{}-{now}", self.members[index].id),
            group: self.config.name.clone(),
            kind: IntentKind::Terminate,
            member_id: self.members[index].id.clone(),
            instance_id: self.members[index].instance_id.clone(),
            created_at: now,
        };
        // ebb terminates only what it launched; the intent is on disk before anything changes.
        if !self.members[index].external && !self.write_intent(&intent) {
            return false;
        }
        let member = self.members.remove(index);
        self.hooks.forget(&member.id);
        let size = self.members.len() as u32;
        if member.state == MemberState::InService {
            self.leave_load_balancer(&member, cause, (size + 1, size)).await;
        }
        if member.external {
            // ebb did not launch it and does not terminate it; it only leaves the group, and its
            // certificate is denied at once (its stream closes).
            self.deps.services.authority.revoke_member(&member.id);
            self.deps.services.ingest.unregister(&member.id).await;
            self.record(
                ActivityKind::Leave,
                cause.to_string(),
                Ok("left running: ebb did not launch it".into()),
                &member.id,
                (size + 1, size),
            );
            return true;
        }
        let result = self.deps.provider.terminate(&member.instance_id).await;
        let failed = result.is_err();
        self.record(
            ActivityKind::Terminate,
            cause.to_string(),
            result.map(|()| format!("instance {}", member.instance_id)),
            &member.id,
            (size + 1, size),
        );
        if failed {
            // Keep it: it may still be running, and the next pass tries again.
            self.members.insert(
                index,
                Member {
                    state: MemberState::Pending,
                    ..member
                },
            );
            self.finish_intent(&intent.key, now, "failed; kept, to try again");
            return false;
        }
        // Terminated: its certificate is denied from now on and its stream closed.
        self.deps.services.authority.revoke_member(&member.id);
        self.deps.services.ingest.unregister(&member.id).await;
        if self.save() {
            self.finish_intent(&intent.key, now, "terminated");
        }
        true
    }

    /// Launched by ebb from another launch specification than the current one.
    pub(super) fn is_outdated(&self, member: &Member) -> bool {
        !member.external && member.launch_spec != self.launch_spec
    }

    /// Members an instance refresh would replace: outdated, not already being replaced or leaving.
    pub(super) fn outdated(&self) -> usize {
        self.members
            .iter()
            .filter(|m| self.is_outdated(m) && !m.replacing && m.drain_until.is_none())
            .count()
    }
}
