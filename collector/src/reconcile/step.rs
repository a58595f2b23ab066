//! One evaluation, every tick: schedules, lost instances, what the members reported, the healthy ones
//! admitted, the engine's plan, then the plan carried out (health, decision, launches, drains).

use super::launch::user_data_holds;
use super::{DESCRIBE_INTERVAL_MS, GroupController, LAUNCH_RETRY_MS, PolicyFigure, Process, STATUS_WINDOW_MS};
use crate::activity::ActivityKind;
use crate::engine::MemberState;
use crate::engine::schedule::ScheduledAction;
use crate::engine::{
    Action, Convergence, Evaluation, GroupInput, Means, MemberInput, Metric, Millis, Plan, Rollout, Window,
};
use crate::hooks::{HookResult, Transition};
use crate::ingest::{self, LatestSample};
use crate::providers::InstanceState;

impl GroupController {
    /// One evaluation: schedules, lost instances, health, decision, reconciliation, status.
    ///
    /// The phases that walk every member yield to the runtime between them: in a group of thousands each
    /// takes milliseconds, and the Report streams sharing this worker thread should wait for one phase,
    /// not for the whole step.
    pub async fn step(&mut self, now: Millis) {
        self.clocks.now = now;
        if self.store_failing && !self.save() {
            self.last_evaluation = "paused: the store refuses writes (disk full or unwritable); see the log".into();
            self.refresh_status().await;
            return;
        }
        if !self.recovered {
            if !self.recover(now).await {
                self.last_evaluation = "waiting to compare the provider's instances with the store; see the log".into();
                self.refresh_status().await;
                return;
            }
            (self.recovered, self.clocks.last_inventory) = (true, now);
        } else if now - self.clocks.last_inventory >= Millis::from(self.config.reconcile_interval_secs) * 1000 {
            self.take_inventory(now).await;
            self.clocks.last_inventory = now;
        }
        self.run_schedules(now);
        if now - self.clocks.last_describe >= DESCRIBE_INTERVAL_MS {
            self.forget_lost_instances().await;
            self.clocks.last_describe = now;
        }
        self.observe(now).await;
        self.admit_healthy_members(now).await;
        tokio::task::yield_now().await;
        let Plan {
            mut evaluation,
            convergence,
        } = {
            let input = self.group_input(now);
            self.engine.plan(&input)
        };
        // A scale-out's record says what the new members boot with (an EC2 template's user data is read
        // here, and the launches use what was read).
        if evaluation.action == Action::ScaleOut && self.config.user_data_rules().is_some() {
            let holds = match self.operator_user_data().await {
                Ok(operator) => user_data_holds(operator.as_ref()),
                Err(e) => format!("cannot be made: {e}"),
            };
            evaluation
                .explanation
                .push_str(&format!("\nThe new members' user data: {holds}."));
        }
        self.apply_health(&evaluation).await;
        let cause = self.apply_decision(&evaluation);
        self.deps
            .services
            .explanations
            .record(&self.config.name, evaluation, self.config.dry_run);
        if !self.config.dry_run {
            self.converge(convergence, now, &cause).await;
        }
        tokio::task::yield_now().await;
        self.save();
        tokio::task::yield_now().await;
        self.refresh_status().await;
    }

    /// The group as the engine sees it now (its predictive policies' history and forecasts brought up to
    /// date on the way).
    pub(super) fn group_input(&mut self, now: Millis) -> GroupInput {
        let rollout = Rollout {
            max_surge: self.config.max_surge,
            launch: now >= self.clocks.next_launch_at && !self.suspended.has(Process::Launch),
            terminate: !self.suspended.has(Process::Terminate),
            replace_unhealthy: !self.suspended.has(Process::ReplaceUnhealthy),
            refresh: self.refresh,
        };
        let suspended = self.suspended.has(Process::Decide);
        let members = self.member_inputs();
        self.predictor.observe(&self.engine, now, &members);
        let predictions = self.predictor.predictions();
        GroupInput::new(
            now,
            &self.capacity,
            &self.memory,
            suspended,
            members,
            predictions,
            rollout,
        )
    }

    /// The members as the engine sees them, each with what the latest observation saw of it.
    pub(super) fn member_inputs(&self) -> Vec<MemberInput> {
        self.members
            .iter()
            .map(|m| {
                let observed = self.observed.get(&m.id);
                MemberInput {
                    id: m.id.clone(),
                    state: m.state,
                    launched: m.launched_at,
                    watched_since: Some(self.clocks.started_at),
                    in_service_since: m.in_service_since,
                    protected: m.protected,
                    unhealthy: m.unhealthy,
                    health: observed.map(|o| o.health).unwrap_or_default(),
                    means: observed.map(|o| Means::new(o.means.clone())).unwrap_or_default(),
                    load: observed
                        .and_then(|o| o.latest.as_ref())
                        .and_then(|l| l.cpu_busy_percent),
                    replacing: m.replacing,
                    leaving: m.drain_until.is_some(),
                    outdated: self.is_outdated(m),
                }
            })
            .collect()
    }

    /// The latest sample of `member_id`, if it has reported.
    pub(super) fn latest(&self, member_id: &str) -> Option<&LatestSample> {
        self.observed.get(member_id).and_then(|o| o.latest.as_ref())
    }

    /// Members neither being replaced nor leaving: the ones that count toward desired capacity.
    pub(super) fn live(&self) -> u32 {
        self.members
            .iter()
            .filter(|m| !m.replacing && m.drain_until.is_none())
            .count() as u32
    }

    /// Marks health changes; an unhealthy member leaves the load balancer and, if the group replaces
    /// unhealthy members, is marked for replacement.
    pub(super) async fn apply_health(&mut self, evaluation: &Evaluation) {
        let dry_run = self.config.dry_run;
        for change in &evaluation.health {
            let Some(index) = self.members.iter().position(|m| m.id == change.member) else {
                continue;
            };
            let (kind, detail) = if change.unhealthy {
                (ActivityKind::Unhealthy, "out of the load balancer")
            } else {
                (ActivityKind::Healthy, "back behind the load balancer")
            };
            let mut detail = if dry_run {
                "dry run: load balancer unchanged".to_string()
            } else {
                detail.to_string()
            };
            // A member that never came up: what its console said is the first thing an operator needs.
            let member = &self.members[index];
            if change.unhealthy && member.state == MemberState::Pending && !member.external {
                let instance_id = member.instance_id.clone();
                if let Some(console) = self.deps.provider.console_tail(&instance_id).await {
                    detail = format!("{detail}; {console}");
                }
            }
            self.record(
                kind,
                change.why.clone(),
                Ok(detail),
                &change.member,
                (self.capacity.desired, self.capacity.desired),
            );
            // The judgement is kept even in a dry run, so that it is made (and recorded) once.
            self.members[index].unhealthy = change.unhealthy;
            if dry_run {
                continue;
            }
            let member = self.members[index].clone();
            if member.state != MemberState::InService {
                continue;
            }
            if change.unhealthy {
                let cause = format!("unhealthy: {}", change.why);
                self.leave_load_balancer(&member, &cause, (self.capacity.desired, self.capacity.desired))
                    .await;
            } else if let Some(address) = member.address {
                let result = self.deps.load_balancer.register(&member.registration(address)).await;
                self.record(
                    ActivityKind::Register,
                    format!("healthy again: {}", change.why),
                    result.map(|()| address.to_string()),
                    &member.id,
                    (self.capacity.desired, self.capacity.desired),
                );
            }
        }
    }

    /// Takes the engine's decision (unless in dry run) and returns the cause for the calls that follow.
    pub(super) fn apply_decision(&mut self, evaluation: &Evaluation) -> String {
        let summary = evaluation.explanation.lines().next().unwrap_or_default();
        let verdicts: Vec<&str> = evaluation.verdicts.iter().map(|v| v.explanation.as_str()).collect();
        self.last_evaluation = match (self.config.dry_run, evaluation.action) {
            (true, _) => format!("dry run: {summary}"),
            (false, Action::None) if !verdicts.is_empty() => format!("{summary}; {}", verdicts.join("; ")),
            _ => summary.to_string(),
        };
        self.policy_cpu = self
            .engine
            .policies
            .iter()
            .zip(&evaluation.verdicts)
            .find(|(policy, _)| policy.metric() == Metric::Cpu)
            .and_then(|(policy, verdict)| {
                Some(PolicyFigure {
                    policy: verdict.policy.clone(),
                    period_secs: policy.period_secs(),
                    value: verdict.values.first().copied().flatten()?,
                })
            });
        self.memory.remember(evaluation, !self.config.dry_run);
        let (from, to) = (evaluation.desired_before, evaluation.desired);
        if self.config.dry_run || from == to {
            return if evaluation.action == Action::Replace {
                format!("replacing unhealthy {}", evaluation.replace.join(", "))
            } else {
                format!(
                    "the group has {} of its desired {} members",
                    self.live(),
                    self.capacity.desired
                )
            };
        }
        let kind = if to > from {
            ActivityKind::ScaleOut
        } else {
            ActivityKind::ScaleIn
        };
        self.record(kind, evaluation.reason.text.clone(), Ok(String::new()), "", (from, to));
        self.capacity.desired = to;
        evaluation.reason.text.clone()
    }

    /// Runs the scheduled actions that came due since the last evaluation.
    pub(super) fn run_schedules(&mut self, now: Millis) {
        let Some(checked) = self.clocks.schedules_checked.replace(now) else {
            return;
        };
        if self.suspended.has(Process::ScheduledActions) {
            return;
        }
        let due: Vec<ScheduledAction> = self
            .schedules
            .iter()
            .filter(|a| a.cron.latest_between(checked, now, &a.zone).is_some())
            .cloned()
            .collect();
        for action in due {
            let before = (self.capacity.min_size, self.capacity.max_size, self.capacity.desired);
            self.capacity.schedule(&action);
            let detail = format!(
                "min_size {} → {}, max_size {} → {}, desired {} → {}",
                before.0, self.capacity.min_size, before.1, self.capacity.max_size, before.2, self.capacity.desired
            );
            self.record(
                ActivityKind::Scheduled,
                format!("scheduled action {}", action.name),
                Ok(detail),
                "",
                (before.2, self.capacity.desired),
            );
        }
    }

    /// Warns once per setting when members take longer from launch to healthy than the setting allows.
    pub(super) fn check_boot_time(&mut self, took_ms: Millis) {
        self.predictor.boot_measured(took_ms);
        let took = took_ms / 1000;
        let settings = [
            ("scale_out_cooldown_secs", self.engine.scale_out_cooldown_secs),
            ("health_check.grace_period_secs", self.engine.health.grace_period_secs),
            (
                "health_check.launch_timeout_secs",
                self.engine.health.launch_timeout_secs,
            ),
        ];
        for (key, secs) in settings {
            if took > i64::from(secs) && self.warned.insert(key) {
                self.record(
                    ActivityKind::Warning,
                    format!("a member took {took} s from launch to healthy, longer than {key} ({secs} s)"),
                    Ok(format!("raise {key} above {took} s for group {}", self.config.name)),
                    "",
                    (self.capacity.desired, self.capacity.desired),
                );
            }
        }
    }

    /// Members whose instance died or stopped on its own leave the group, and the reconciler replaces them.
    /// The instance is terminated on the way out: a stopped or failed VM still holds its disk and quota, and
    /// could be started again outside the group (terminating one that is already gone changes nothing).
    pub(super) async fn forget_lost_instances(&mut self) {
        if self.members.is_empty() {
            return;
        }
        let ids: Vec<String> = self
            .members
            .iter()
            .filter(|m| !m.external)
            .map(|m| m.instance_id.clone())
            .collect();
        if ids.is_empty() {
            return;
        }
        const DESCRIBE: &str = "Cannot describe the group's instances.";
        let states = match self.deps.provider.describe(&ids).await {
            Ok(states) => {
                self.repeated.succeeded(&self.config.name, DESCRIBE);
                states
            }
            Err(e) => {
                self.repeated
                    .failed(&self.config.name, DESCRIBE, &e.to_string(), self.clocks.now);
                return;
            }
        };
        for (id, state) in ids.iter().zip(states) {
            let InstanceState::Terminated { reason } = state else {
                continue;
            };
            let Some(index) = self.members.iter().position(|m| &m.instance_id == id && !m.external) else {
                continue;
            };
            let size = self.members.len() as u32;
            let member_id = self.members[index].id.clone();
            self.record(
                ActivityKind::InstanceLost,
                reason,
                Ok(format!("instance {id}")),
                &member_id,
                (size, size - 1),
            );
            self.remove(index, "its instance is lost").await;
        }
    }

    /// Per member and policy, the means over the engine's windows; also refreshes the latest samples and
    /// the status's CPU average.
    pub(super) async fn observe(&mut self, now: Millis) {
        let mut windows: Vec<(Metric, Vec<Window>)> = self
            .engine
            .windows(now)
            .into_iter()
            .map(|policy| (policy.metric, policy.windows))
            .collect();
        windows.push((
            Metric::Cpu,
            vec![Window {
                start: now - STATUS_WINDOW_MS,
                end: now,
            }],
        ));
        let ids: Vec<String> = self.members.iter().map(|m| m.id.clone()).collect();
        let observations = self.deps.services.ingest.observe(ids.clone(), windows).await;
        let status_cpu: Vec<f64> = self
            .members
            .iter()
            .zip(&observations)
            .filter(|(m, _)| m.state == MemberState::InService && !m.unhealthy)
            .filter_map(|(_, o)| o.means.last()?.first().copied().flatten())
            .collect();
        self.cpu_avg = (!status_cpu.is_empty()).then(|| status_cpu.iter().sum::<f64>() / status_cpu.len() as f64);
        // Paired with the ids asked for, in the order the ingest answers them; from here on only by id.
        self.observed = ids
            .into_iter()
            .zip(observations)
            .map(|(id, mut o)| {
                o.means.pop();
                (id, o)
            })
            .collect();
    }

    /// Pending members whose latest health check passed go behind the load balancer.
    pub(super) async fn admit_healthy_members(&mut self, now: Millis) {
        let mut abandoned = Vec::new();
        for index in 0..self.members.len() {
            let member = &self.members[index];
            // Checked before the latest sample is copied: in a large group almost every member is in service.
            let (MemberState::Pending, Some(address), false) = (member.state, member.address, member.unhealthy) else {
                continue;
            };
            let Some(latest) = self
                .latest(&member.id)
                .filter(|latest| latest.at >= member.launched_at && ingest::is_healthy(latest))
                .cloned()
            else {
                continue;
            };
            if self.suspended.has(Process::AddToLoadBalancer) {
                continue;
            }
            let id = member.id.clone();
            let (subject, wait) = self.members[index].hook_state();
            let Some(verdict) = self.hooks.check(subject, wait, Transition::Launching, now) else {
                continue;
            };
            if verdict.result == HookResult::Abandon {
                abandoned.push((id, verdict.why));
                continue;
            }
            if !verdict.why.is_empty() {
                self.record(
                    ActivityKind::Hook,
                    verdict.why,
                    Ok("continue".into()),
                    &id,
                    (self.capacity.desired, self.capacity.desired),
                );
            }
            let member = &self.members[index];
            let (took, external) = (now - member.launched_at, member.external);
            // A dry run counts the member in service but leaves the load balancer alone.
            let result = if self.config.dry_run {
                Ok(())
            } else {
                self.deps
                    .load_balancer
                    .register(&self.members[index].registration(address))
                    .await
            };
            let ok = result.is_ok();
            let detail = if self.config.dry_run {
                format!("dry run: load balancer unchanged ({address})")
            } else {
                address.to_string()
            };
            self.record(
                ActivityKind::Register,
                format!("health check passed in {} ms", latest.health.latency_ms),
                result.map(|()| detail),
                &id,
                (self.capacity.desired, self.capacity.desired),
            );
            if ok {
                self.members[index].state = MemberState::InService;
                self.members[index].in_service_since = Some(now);
                if !external {
                    self.check_boot_time(took);
                }
            }
        }
        for (id, why) in abandoned {
            self.record(
                ActivityKind::Hook,
                why.clone(),
                Ok("abandon: the member goes".into()),
                &id,
                (self.capacity.desired, self.capacity.desired),
            );
            if let Some(index) = self.members.iter().position(|m| m.id == id) {
                self.remove(index, &why).await;
            }
        }
    }

    /// Carries out the engine's plan for reaching desired capacity: members marked for replacement (a
    /// refresh's batch recorded), launches, replaced members and a scale-in's victims drained, drained
    /// members terminated.
    pub(super) async fn converge(&mut self, plan: Convergence, now: Millis, cause: &str) {
        for member in &mut self.members {
            member.replacing = plan.replacing.contains(&member.id);
        }
        for id in &plan.refreshed {
            self.record(
                ActivityKind::Refresh,
                "launched from an older launch specification".into(),
                Ok("a replacement launches first".into()),
                id,
                (self.capacity.desired, self.capacity.desired),
            );
        }
        if plan.refresh_finished {
            self.refresh = None;
            self.record(
                ActivityKind::Refresh,
                "the instance refresh finished".into(),
                Ok("every member runs the current launch specification".into()),
                "",
                (self.capacity.desired, self.capacity.desired),
            );
        }
        if plan.launch > 0 && !self.launch(plan.launch, now, cause).await {
            self.clocks.next_launch_at = now + LAUNCH_RETRY_MS;
        }
        if self.suspended.has(Process::Terminate) {
            return;
        }
        for id in &plan.retire {
            self.start_drain(id, "unhealthy, and its replacement is in service", now)
                .await;
        }
        if plan.only_protected_left {
            tracing::warn!(group = %self.config.name, desired = self.capacity.desired, "Only protected members are left; not scaling in further.");
        }
        for id in &plan.victims {
            self.start_drain(id, cause, now).await;
        }
        self.finish_drains(now).await;
    }
}
