//! After a restart, and every `reconcile_interval_secs`: the group compared with what the cloud and the
//! load balancer hold. Open intents are settled (a launch found running is adopted, one not found did not
//! happen, an interrupted termination is finished), orphans are reported and terminated after their grace,
//! and load-balancer memberships removed by hand are restored.

use std::collections::HashSet;
use std::net::SocketAddr;

use super::{GroupController, Member, MemberState};
use crate::activity::ActivityKind;
use crate::engine::Millis;
use crate::providers::{Instance, InstanceState};
use crate::store::{Intent, IntentKind};

impl GroupController {
    /// After a start: finishes what the intent log says was under way, then looks for orphans. A launch
    /// found running is adopted, one not found did not happen; an interrupted termination is finished.
    /// False if the provider cannot list its instances yet (nothing is decided until it can).
    pub(super) async fn recover(&mut self, now: Millis) -> bool {
        const LIST: &str = "Cannot list the group's instances; retrying before deciding anything.";
        let instances = match self.deps.provider.list(&self.config.name).await {
            Ok(instances) => {
                self.repeated.succeeded(&self.config.name, LIST);
                instances
            }
            Err(e) => {
                self.repeated.failed(&self.config.name, LIST, &e.to_string(), now);
                return false;
            }
        };
        let intents = match self.deps.services.store.open_intents(&self.config.name) {
            Ok(intents) => intents,
            Err(e) => {
                tracing::error!(group = %self.config.name, error = %e, "Cannot read the intent log.");
                self.deps.services.metrics.store_error();
                return false;
            }
        };
        // Instances whose termination is settled here: the list above was taken before, so it may still show
        // them running, and they are no orphans.
        let mut terminated = HashSet::new();
        for intent in intents {
            let outcome = match intent.kind {
                IntentKind::Launch => self.recover_launch(&intent, &instances, now).await,
                IntentKind::Terminate => {
                    let (outcome, gone) = self.recover_termination(&intent, &instances).await;
                    if gone {
                        terminated.insert(intent.instance_id.clone());
                    }
                    outcome
                }
            };
            self.finish_intent(&intent.key, now, &outcome);
        }
        let instances: Vec<Instance> = instances.into_iter().filter(|i| !terminated.contains(&i.id)).collect();
        self.check_orphans(&instances, now).await;
        self.save();
        true
    }

    async fn recover_launch(&mut self, intent: &Intent, instances: &[Instance], now: Millis) -> String {
        // The member id is never given out again.
        let number = intent.member_id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok());
        self.launches = self.launches.max(number.unwrap_or(0));
        if self.members.iter().any(|m| m.id == intent.member_id) {
            return "recorded before the restart".into();
        }
        let running = instances
            .iter()
            .find(|i| i.member_id == intent.member_id && !matches!(i.state, InstanceState::Terminated { .. }));
        let Some(instance) = running else {
            self.deps.services.authority.revoke_member(&intent.member_id);
            return "did not happen; capacity is reconciled against desired".into();
        };
        let address = instance.address.map(|ip| SocketAddr::new(ip, self.config.member_port));
        let launched_at = intent.created_at.min(now);
        self.add_pending(Member::pending(&intent.member_id, &instance.id, address, launched_at))
            .await;
        let size = self.members.len() as u32;
        self.record(
            ActivityKind::Adopt,
            "a launch interrupted by a restart found running".into(),
            Ok(format!("instance {}", instance.id)),
            &intent.member_id,
            (size - 1, size),
        );
        format!("adopted instance {}", instance.id)
    }

    /// Finishes an interrupted termination; what happened, and whether the instance is gone now. One the cloud
    /// carried out before the restart is not asked for again (a collector killed at each restart would
    /// otherwise terminate the same instance, with an activity, every time).
    async fn recover_termination(&mut self, intent: &Intent, instances: &[Instance]) -> (String, bool) {
        let running = instances
            .iter()
            .any(|i| i.id == intent.instance_id && !matches!(i.state, InstanceState::Terminated { .. }));
        if let Some(index) = self.members.iter().position(|m| m.id == intent.member_id) {
            if !running && !self.members[index].external {
                let member = self.members.remove(index);
                self.hooks.forget(&member.id);
                self.deps.services.authority.revoke_member(&member.id);
                self.deps.services.ingest.unregister(&member.id).await;
                self.save();
                return (
                    "the cloud had terminated it before the restart; its record is removed".into(),
                    true,
                );
            }
            return if self
                .remove(index, "finishing a termination interrupted by a restart")
                .await
            {
                ("finished after a restart".into(), true)
            } else {
                (
                    "failed after a restart; the member stays and is tried again".into(),
                    false,
                )
            };
        }
        if running {
            let result = self.deps.provider.terminate(&intent.instance_id).await;
            let outcome = match &result {
                Ok(()) => "finished after a restart".to_string(),
                Err(e) => format!("failed after a restart: {e}"),
            };
            let gone = result.is_ok();
            self.record(
                ActivityKind::Terminate,
                "finishing a termination interrupted by a restart".into(),
                result.map(|()| format!("instance {}", intent.instance_id)),
                &intent.member_id,
                (self.capacity.desired, self.capacity.desired),
            );
            return (outcome, gone);
        }
        ("already done".into(), true)
    }

    /// Every `reconcile_interval_secs`: orphans, and load-balancer memberships changed outside ebb.
    pub(super) async fn take_inventory(&mut self, now: Millis) {
        match self.deps.provider.list(&self.config.name).await {
            Ok(instances) => self.check_orphans(&instances, now).await,
            Err(e) => {
                self.repeated.failed(
                    &self.config.name,
                    "Cannot list the group's instances.",
                    &e.to_string(),
                    now,
                );
            }
        }
        if self.config.dry_run {
            return;
        }
        let Ok(backends) = self.deps.load_balancer.members().await else {
            return;
        };
        // Looked up, not searched: a group of thousands would otherwise compare every member with every
        // backend, and hold its worker thread for a quarter of a second.
        let registered: HashSet<&str> = backends.iter().map(|b| b.member_id.as_str()).collect();
        let registered_instances: HashSet<&str> = backends
            .iter()
            .map(|b| b.instance_id.as_str())
            .filter(|id| !id.is_empty())
            .collect();
        let missing: Vec<(Member, SocketAddr)> = self
            .members
            .iter()
            .filter(|m| m.state == MemberState::InService && !m.unhealthy && !m.replacing)
            .filter(|m| !registered.contains(m.id.as_str()) && !registered_instances.contains(m.instance_id.as_str()))
            .filter_map(|m| Some((m.clone(), m.address?)))
            .collect();
        for (member, address) in missing {
            let id = member.id.clone();
            let result = self.deps.load_balancer.register(&member.registration(address)).await;
            self.record(
                ActivityKind::Register,
                "its load-balancer membership was removed outside ebb; restored".into(),
                result.map(|()| address.to_string()),
                &id,
                (self.capacity.desired, self.capacity.desired),
            );
        }
    }

    /// Instances tagged for this group that no member owns are reported once, and terminated after
    /// `orphan_grace_secs` unless `terminate_orphans = false`.
    async fn check_orphans(&mut self, instances: &[Instance], now: Millis) {
        let owned: HashSet<&str> = self.members.iter().map(|m| m.instance_id.as_str()).collect();
        let running: Vec<&Instance> = instances
            .iter()
            .filter(|i| !matches!(i.state, InstanceState::Terminated { .. }))
            .filter(|i| !owned.contains(i.id.as_str()))
            .collect();
        self.orphans.retain(|id, _| running.iter().any(|i| &i.id == id));
        let grace_ms = Millis::from(self.config.orphan_grace_secs) * 1000;
        for instance in running {
            if !self.orphans.contains_key(&instance.id) {
                self.orphans
                    .insert(instance.id.clone(), (instance.member_id.clone(), now));
                let fate = if self.config.terminate_orphans {
                    format!("terminated after {} s unless claimed", self.config.orphan_grace_secs)
                } else {
                    "reported only (terminate_orphans = false)".into()
                };
                self.record(
                    ActivityKind::Orphan,
                    format!(
                        "instance {} is tagged for this group but no member owns it",
                        instance.id
                    ),
                    Ok(fate),
                    &instance.member_id,
                    (self.capacity.desired, self.capacity.desired),
                );
            }
            let (_, first_seen) = self.orphans[&instance.id];
            if self.config.terminate_orphans && !self.config.dry_run && now - first_seen >= grace_ms {
                let result = self.deps.provider.terminate(&instance.id).await;
                if result.is_ok() {
                    self.orphans.remove(&instance.id);
                }
                self.record(
                    ActivityKind::Terminate,
                    format!("an orphan for more than {} s", self.config.orphan_grace_secs),
                    result.map(|()| format!("instance {}", instance.id)),
                    &instance.member_id,
                    (self.capacity.desired, self.capacity.desired),
                );
            }
        }
    }
}
