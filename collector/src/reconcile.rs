//! One controller task per group: every second it notices instances that died, puts members that pass
//! their health check behind the load balancer, asks the [engine](crate::engine) for a decision, and turns
//! desired capacity into provider and load-balancer calls, recording each as an activity with its cause.
//!
//! The task owns the group's state and makes its calls one at a time, so there are never two operations
//! on the same group at once. Operators' commands arrive on a channel; the latest state is published on a
//! watch channel for the Admin API and the demo.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ebb_proto::v1::AgentSettings;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;

use crate::activity::{Activity, ActivityKind, ActivityLog};
use crate::config::GroupConfig;
pub use crate::engine::MemberState;
use crate::engine::schedule::ScheduledAction;
use crate::engine::{
    Action, Change, Engine, Evaluation, GroupInput, HealthRun, MemberInput, Metric, Millis, Recommendation, Window,
};
use crate::explain::ExplanationLog;
use crate::hooks::{HookResult, Hooks, Transition};
use crate::ingest::{self, IngestHandle, LatestSample};
use crate::lb::LoadBalancer;
use crate::metrics::{GroupGauges, Metrics};
use crate::pki::Authority;
use crate::providers::{CloudError, Instance, InstanceState, LaunchSpec, Provider};
use crate::store::{GroupRecord, Intent, IntentKind, Store};
use crate::userdata::{self, UserDataFormat};

/// How often a group is evaluated.
pub const TICK: Duration = Duration::from_secs(1);
/// The window behind the status's CPU average.
const STATUS_WINDOW_MS: Millis = 10_000;
/// After a failed launch, the next attempt waits this long.
const LAUNCH_RETRY_MS: Millis = 10_000;

/// What an operator can suspend in a group, each on its own (EC2's scaling processes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// Scaling decisions (the engine holds with `suspended`).
    Decide,
    Launch,
    /// Scale-in: draining and terminating.
    Terminate,
    ReplaceUnhealthy,
    ScheduledActions,
    /// Putting healthy new members behind the load balancer.
    AddToLoadBalancer,
}

impl Process {
    pub const ALL: [Process; 6] = [
        Process::Decide,
        Process::Launch,
        Process::Terminate,
        Process::ReplaceUnhealthy,
        Process::ScheduledActions,
        Process::AddToLoadBalancer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Process::Decide => "decide",
            Process::Launch => "launch",
            Process::Terminate => "terminate",
            Process::ReplaceUnhealthy => "replace_unhealthy",
            Process::ScheduledActions => "scheduled_actions",
            Process::AddToLoadBalancer => "add_to_load_balancer",
        }
    }

    pub fn parse(name: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|p| p.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
            format!("no process named `{name}`; the processes are: {}", names.join(", "))
        })
    }
}

/// A set of suspended processes, kept in the store as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Suspended(pub u32);

impl Suspended {
    pub const ALL: Suspended = Suspended((1 << Process::ALL.len()) - 1);

    pub fn of(processes: &[Process]) -> Self {
        Suspended(processes.iter().fold(0, |bits, p| bits | 1 << *p as u32))
    }

    pub fn has(self, process: Process) -> bool {
        self.0 & (1 << process as u32) != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        Process::ALL
            .into_iter()
            .filter(|p| self.has(*p))
            .map(Process::name)
            .collect()
    }
}

/// A member of a group, as its controller keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: String,
    pub instance_id: String,
    pub address: Option<SocketAddr>,
    pub state: MemberState,
    pub launched_at: Millis,
    pub in_service_since: Option<Millis>,
    /// Never chosen for scale-in.
    pub protected: bool,
    /// Joined with an operator's token; ebb did not launch it and never terminates it.
    pub external: bool,
    /// Judged unhealthy by the engine; out of the load balancer.
    pub unhealthy: bool,
    /// Unhealthy and being replaced: it goes once enough healthy members serve.
    pub replacing: bool,
    /// Draining: terminated at this time, or sooner once its agent reports drained.
    pub drain_until: Option<Millis>,
    /// The fingerprint of the provider settings it was launched with (empty for hand-made members).
    pub launch_spec: String,
}

impl Member {
    /// What operators see: `pending`, `in_service`, `draining`, or `unhealthy` / `replacing` when judged so.
    pub fn state_name(&self) -> &'static str {
        match (self.replacing, self.unhealthy) {
            (true, _) => "replacing",
            (false, true) => "unhealthy",
            _ => self.state.as_str(),
        }
    }

    /// Launched or joined at `now`, not in service yet; launched by ebb and not protected.
    pub fn pending(id: &str, instance_id: &str, address: Option<SocketAddr>, now: Millis) -> Self {
        Self {
            id: id.to_string(),
            instance_id: instance_id.to_string(),
            address,
            state: MemberState::Pending,
            launched_at: now,
            in_service_since: None,
            protected: false,
            external: false,
            unhealthy: false,
            replacing: false,
            drain_until: None,
            launch_spec: String::new(),
        }
    }
}

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

/// What operators and enrolling VMs ask of a group's controller.
pub enum Command {
    SetDesired {
        desired: u32,
        reply: oneshot::Sender<Result<GroupStatus, String>>,
    },
    /// A VM ebb did not launch enrols with an operator's token.
    JoinExternal {
        facts: ebb_proto::v1::InstanceFacts,
        protected: bool,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Its enrolment failed after joining.
    LeaveExternal { member_id: String },
    /// An operator suspends (or resumes) some of the group's processes; replies with those suspended now.
    SetSuspended {
        processes: Suspended,
        suspend: bool,
        reply: oneshot::Sender<Suspended>,
    },
    /// Replace members launched from an older launch specification, keeping `min_healthy_percent`.
    Refresh {
        min_healthy_percent: u32,
        reply: oneshot::Sender<u32>,
    },
    /// The group's new settings from a reloaded configuration (same provider and load balancer).
    Reconfigure {
        config: Box<GroupConfig>,
        reply: oneshot::Sender<()>,
    },
}

/// The handle the rest of the collector keeps for a group.
#[derive(Clone)]
pub struct GroupHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<GroupStatus>,
}

impl GroupHandle {
    pub fn status(&self) -> GroupStatus {
        self.status.borrow().clone()
    }

    /// Sends the command `make` builds and waits for its answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, String> {
        const STOPPED: &str = "the group's controller has stopped";
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| STOPPED.to_string())?;
        answer.await.map_err(|_| STOPPED.to_string())
    }

    /// Sets desired capacity as an operator; refused outside min..max.
    pub async fn set_desired(&self, desired: u32) -> Result<GroupStatus, String> {
        self.ask(|reply| Command::SetDesired { desired, reply }).await?
    }

    /// Adds a VM that enrolled with an operator's token; returns its member id.
    pub async fn join_external(&self, facts: ebb_proto::v1::InstanceFacts, protected: bool) -> Result<String, String> {
        self.ask(|reply| Command::JoinExternal {
            facts,
            protected,
            reply,
        })
        .await?
    }

    /// Suspends or resumes `processes`; the processes suspended afterwards.
    pub async fn set_suspended(&self, processes: Suspended, suspend: bool) -> Result<Suspended, String> {
        self.ask(|reply| Command::SetSuspended {
            processes,
            suspend,
            reply,
        })
        .await
    }

    /// Starts an instance refresh; how many members are outdated.
    pub async fn refresh(&self, min_healthy_percent: u32) -> Result<u32, String> {
        self.ask(|reply| Command::Refresh {
            min_healthy_percent,
            reply,
        })
        .await
    }

    /// Applies a reloaded configuration's settings for this group; its members are not touched.
    pub async fn reconfigure(&self, config: GroupConfig) -> Result<(), String> {
        self.ask(|reply| Command::Reconfigure {
            config: Box::new(config),
            reply,
        })
        .await
    }

    pub async fn leave_external(&self, member_id: &str) {
        let _ = self
            .commands
            .send(Command::LeaveExternal {
                member_id: member_id.to_string(),
            })
            .await;
    }
}

/// Everything a controller needs from the rest of the collector.
pub struct Dependencies {
    pub provider: Arc<dyn Provider>,
    pub load_balancer: Arc<dyn LoadBalancer>,
    pub ingest: IngestHandle,
    pub activities: ActivityLog,
    pub metrics: Arc<Metrics>,
    pub authority: Arc<Authority>,
    pub explanations: ExplanationLog,
    pub store: Arc<Store>,
    /// This collector's identity, tagged on every instance it launches.
    pub cluster_id: String,
    /// The URL agents use to reach the collector.
    pub collector_url: String,
}

pub struct GroupController {
    config: GroupConfig,
    engine: Engine,
    deps: Dependencies,
    /// The limits in force: the configuration's, until a scheduled action changes them.
    min_size: u32,
    max_size: u32,
    desired: u32,
    last_scale_out: Option<Millis>,
    last_scale_in: Option<Millis>,
    /// Target tracking's recent recommendations and the policies' recent changes, for the engine.
    recommendations: Vec<Recommendation>,
    changes: Vec<Change>,
    schedules: Vec<ScheduledAction>,
    /// Scheduled actions due up to this time have run.
    schedules_checked: Option<Millis>,
    suspended: Suspended,
    /// Settings already warned about as shorter than the group's boot time.
    warned: std::collections::HashSet<&'static str>,
    members: Vec<Member>,
    launches: u64,
    next_launch_at: Millis,
    last_evaluation: String,
    cpu_avg: Option<f64>,
    latest: Vec<Option<LatestSample>>,
    health: Vec<HealthRun>,
    /// What the store last accepted.
    saved: Option<(GroupRecord, Vec<Member>)>,
    /// The last write failed: decisions pause until one succeeds.
    store_failing: bool,
    /// The provider's instances have been compared with the store since start.
    recovered: bool,
    /// When this controller started: members restored from the store are judged from then.
    started_at: Millis,
    hooks: Hooks,
    /// The fingerprint of the provider settings new members are launched with.
    launch_spec: String,
    /// An instance refresh under way: the healthy percentage of desired it keeps.
    refresh: Option<u32>,
    /// When the provider's instances were last listed.
    last_inventory: Millis,
    /// Instances tagged for this group that no member owns: instance id → (member id, first seen).
    orphans: std::collections::HashMap<String, (String, Millis)>,
    status: watch::Sender<GroupStatus>,
}

impl GroupController {
    /// A controller for `config`, with the state and members the store kept from an earlier run: desired
    /// capacity (within the configuration's limits, which win), cooldown clocks, suspension, the launch
    /// counter, and every member with its flags, whose agents may carry on reporting.
    pub async fn new(
        config: GroupConfig,
        deps: Dependencies,
    ) -> Result<(Self, GroupHandle, mpsc::Receiver<Command>), crate::store::StoreError> {
        let engine = config.engine();
        let schedules = config.scheduled_actions();
        let (min_size, max_size) = (config.min_size, config.max_size);
        let hooks = Hooks::new(&config.name, config.lifecycle_hooks.clone());
        let spec = launch_spec(&config);
        let (saved, members) = deps.store.load_group(&config.name)?.unwrap_or_else(|| {
            let desired = config.desired_capacity.unwrap_or(config.min_size);
            (
                GroupRecord {
                    desired,
                    ..GroupRecord::default()
                },
                Vec::new(),
            )
        });
        let (status, status_rx) = watch::channel(GroupStatus::default());
        let (commands, commands_rx) = mpsc::channel(16);
        let mut controller = Self {
            config,
            engine,
            deps,
            min_size,
            max_size,
            desired: saved.desired.clamp(min_size, max_size),
            last_scale_out: saved.last_scale_out,
            last_scale_in: saved.last_scale_in,
            recommendations: Vec::new(),
            changes: Vec::new(),
            schedules,
            schedules_checked: None,
            suspended: Suspended(saved.suspended),
            warned: Default::default(),
            members,
            launches: saved.launches,
            next_launch_at: 0,
            last_evaluation: "not evaluated yet".into(),
            cpu_avg: None,
            latest: Vec::new(),
            health: Vec::new(),
            saved: None,
            store_failing: false,
            recovered: false,
            started_at: now_ms(),
            hooks,
            launch_spec: spec,
            refresh: None,
            last_inventory: 0,
            orphans: Default::default(),
            status,
        };
        for member in &controller.members {
            let settings = controller.agent_settings(member);
            controller.deps.ingest.register(&member.id, settings).await;
        }
        controller.save();
        controller.publish(Vec::new());
        let handle = GroupHandle {
            commands,
            status: status_rx,
        };
        Ok((controller, handle, commands_rx))
    }

    /// What the store keeps of this group.
    fn record_to_save(&self) -> (GroupRecord, Vec<Member>) {
        let record = GroupRecord {
            min_size: self.min_size,
            max_size: self.max_size,
            desired: self.desired,
            suspended: self.suspended.0,
            last_scale_out: self.last_scale_out,
            last_scale_in: self.last_scale_in,
            launches: self.launches,
        };
        (record, self.members.clone())
    }

    /// Writes the group's state to the store if it changed; false if the store refused (disk full,
    /// unwritable), which is logged and counted, and pauses decisions until a write succeeds.
    fn save(&mut self) -> bool {
        let current = self.record_to_save();
        if self.saved.as_ref() == Some(&current) {
            return true;
        }
        match self.deps.store.save_group(&self.config.name, &current.0, &current.1) {
            Ok(()) => {
                if self.store_failing {
                    tracing::info!(group = %self.config.name, "The store accepts writes again; decisions resume.");
                }
                self.saved = Some(current);
                self.store_failing = false;
                true
            }
            Err(e) => {
                if !self.store_failing {
                    tracing::error!(group = %self.config.name, error = %e, "Cannot save the group's state; decisions pause until the store accepts writes.");
                }
                self.deps.metrics.store_error();
                self.store_failing = true;
                false
            }
        }
    }

    /// Runs until `stop` fires, then closes the provider.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.step(now_ms()).await,
                Some(command) = commands.recv() => self.handle(command, now_ms()).await,
                _ = stop.changed() => break,
            }
        }
        self.deps.provider.close().await;
    }

    /// Carries out an operator's or an enrolling VM's request, then publishes the new state before answering.
    async fn handle(&mut self, command: Command, now: Millis) {
        self.carry_out(command, now).await;
        self.save();
    }

    async fn carry_out(&mut self, command: Command, now: Millis) {
        match command {
            Command::SetDesired { desired, reply } => {
                let result = self.set_desired(desired, now).await;
                self.refresh_status().await;
                let _ = reply.send(result.map(|()| self.status.borrow().clone()));
            }
            Command::JoinExternal {
                facts,
                protected,
                reply,
            } => {
                let result = self.join_external(facts, protected, now).await;
                self.refresh_status().await;
                let _ = reply.send(result);
            }
            Command::LeaveExternal { member_id } => {
                if let Some(index) = self.members.iter().position(|m| m.id == member_id) {
                    let member = self.members.remove(index);
                    self.deps.ingest.unregister(&member.id).await;
                }
                self.refresh_status().await;
            }
            Command::Refresh {
                min_healthy_percent,
                reply,
            } => {
                let outdated = self.outdated().len() as u32;
                self.refresh = Some(min_healthy_percent.min(100));
                self.record(
                    ActivityKind::Refresh,
                    format!("an operator started an instance refresh keeping {min_healthy_percent}% healthy"),
                    Ok(format!(
                        "{outdated} member(s) launched from an older launch specification"
                    )),
                    "",
                    (self.desired, self.desired),
                );
                let _ = reply.send(outdated);
            }
            Command::Reconfigure { config, reply } => {
                self.reconfigure(*config).await;
                self.refresh_status().await;
                let _ = reply.send(());
            }
            Command::SetSuspended {
                processes,
                suspend,
                reply,
            } => {
                let next = if suspend {
                    Suspended(self.suspended.0 | processes.0)
                } else {
                    Suspended(self.suspended.0 & !processes.0)
                };
                if next != self.suspended {
                    self.suspended = next;
                    let verb = if suspend { "suspended" } else { "resumed" };
                    let now_suspended = match next.names() {
                        names if names.is_empty() => "none".to_string(),
                        names => names.join(", "),
                    };
                    self.record(
                        ActivityKind::Suspension,
                        format!("an operator {verb} {}", processes.names().join(", ")),
                        Ok(format!("suspended now: {now_suspended}")),
                        "",
                        (self.desired, self.desired),
                    );
                }
                let _ = reply.send(self.suspended);
            }
        }
    }

    async fn set_desired(&mut self, desired: u32, now: Millis) -> Result<(), String> {
        if !(self.min_size..=self.max_size).contains(&desired) {
            return Err(format!(
                "desired capacity {desired} is outside group {}'s min_size..max_size ({}..{}); change the group's limits in the configuration first",
                self.config.name, self.min_size, self.max_size
            ));
        }
        let from = self.desired;
        self.record(
            ActivityKind::SetDesired,
            format!("an operator set desired capacity {from} → {desired}"),
            Ok(String::new()),
            "",
            (from, desired),
        );
        self.desired = desired;
        // Policies wait their cooldowns after an operator's change too.
        (self.last_scale_out, self.last_scale_in) = (Some(now), Some(now));
        self.reconcile(now, "an operator set desired capacity").await;
        Ok(())
    }

    async fn refresh_status(&self) {
        let connections = self.load_balancer_connections().await;
        self.publish(connections);
    }

    async fn join_external(
        &mut self,
        facts: ebb_proto::v1::InstanceFacts,
        protected: bool,
        now: Millis,
    ) -> Result<String, String> {
        if self.members.len() as u32 >= self.max_size {
            return Err(format!(
                "group {} is at max_size {}; raise it before adding VMs by hand",
                self.config.name, self.max_size
            ));
        }
        self.launches += 1;
        let member_id = format!("{}-{}", self.config.name, self.launches);
        let address = facts
            .addresses
            .iter()
            .find_map(|a| a.parse::<std::net::IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, self.config.member_port));
        self.add_pending(Member {
            protected,
            external: true,
            ..Member::pending(&member_id, &facts.instance_id, address, now)
        })
        .await;
        // It counts toward capacity like any member.
        let from = self.desired;
        self.desired = self.desired.max(self.live()).clamp(self.min_size, self.max_size);
        let detail = format!("host {} instance {}", facts.hostname, facts.instance_id);
        let cause = if protected {
            "a VM enrolled with an operator's token (protected from scale-in)"
        } else {
            "a VM enrolled with an operator's token"
        };
        self.record(
            ActivityKind::Join,
            cause.into(),
            Ok(detail),
            &member_id,
            (from, self.desired),
        );
        Ok(member_id)
    }

    /// New limits, policies, schedules and health rules at once; members stay as they are, their agents
    /// get the new interval and health check.
    async fn reconfigure(&mut self, config: GroupConfig) {
        self.engine = config.engine();
        self.schedules = config.scheduled_actions();
        self.hooks = Hooks::new(&config.name, config.lifecycle_hooks.clone());
        (self.min_size, self.max_size) = (config.min_size, config.max_size);
        let from = self.desired;
        self.desired = self.desired.clamp(self.min_size, self.max_size);
        self.config = config;
        for member in &self.members {
            let settings = self.agent_settings(member);
            self.deps.ingest.register(&member.id, settings).await;
        }
        self.record(
            ActivityKind::Reconfigure,
            "the configuration was reloaded".into(),
            Ok(format!("min_size..max_size {}..{}", self.min_size, self.max_size)),
            "",
            (from, self.desired),
        );
    }

    /// One evaluation: schedules, lost instances, health, decision, reconciliation, status.
    pub async fn step(&mut self, now: Millis) {
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
            (self.recovered, self.last_inventory) = (true, now);
        } else if now - self.last_inventory >= Millis::from(self.config.reconcile_interval_secs) * 1000 {
            self.take_inventory(now).await;
            self.last_inventory = now;
        }
        self.run_schedules(now);
        self.forget_lost_instances().await;
        let means = self.observe(now).await;
        self.admit_healthy_members(now).await;
        let input = GroupInput {
            now,
            min_size: self.min_size,
            max_size: self.max_size,
            desired: self.desired,
            last_scale_out: self.last_scale_out,
            last_scale_in: self.last_scale_in,
            suspended: self.suspended.has(Process::Decide),
            members: self.member_inputs(means),
            recommendations: self.recommendations.clone(),
            changes: self.changes.clone(),
        };
        let evaluation = self.engine.evaluate(&input);
        self.apply_health(&evaluation).await;
        let cause = self.apply_decision(&evaluation, now);
        self.deps
            .explanations
            .record(&self.config.name, evaluation, self.config.dry_run);
        if !self.config.dry_run {
            self.reconcile(now, &cause).await;
        }
        self.save();
        self.refresh_status().await;
    }

    /// The members as the engine sees them; `means` per member (empty: none).
    fn member_inputs(&self, means: Vec<Vec<Vec<Option<f64>>>>) -> Vec<MemberInput> {
        let mut means = means.into_iter();
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| MemberInput {
                id: m.id.clone(),
                state: m.state,
                launched: m.launched_at,
                watched_since: Some(self.started_at),
                in_service_since: m.in_service_since,
                protected: m.protected,
                unhealthy: m.unhealthy,
                health: self.health.get(i).copied().unwrap_or_default(),
                means: means.next().unwrap_or_default(),
                load: self.latest.get(i).cloned().flatten().and_then(|l| l.cpu_busy_percent),
            })
            .collect()
    }

    /// Members neither being replaced nor leaving: the ones that count toward desired capacity.
    fn live(&self) -> u32 {
        self.members
            .iter()
            .filter(|m| !m.replacing && m.drain_until.is_none())
            .count() as u32
    }

    /// Marks health changes; an unhealthy member leaves the load balancer and, if the group replaces
    /// unhealthy members, is marked for replacement.
    async fn apply_health(&mut self, evaluation: &Evaluation) {
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
            let detail = if dry_run {
                "dry run: load balancer unchanged"
            } else {
                detail
            };
            self.record(
                kind,
                change.why.clone(),
                Ok(detail.into()),
                &change.member,
                (self.desired, self.desired),
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
                let result = self.deps.load_balancer.deregister(&member.id).await;
                self.record(
                    ActivityKind::Deregister,
                    format!("unhealthy: {}", change.why),
                    result.map(|()| String::new()),
                    &member.id,
                    (self.desired, self.desired),
                );
            } else {
                self.members[index].replacing = false;
                if let Some(address) = member.address {
                    let result = self.deps.load_balancer.register(&member.id, address).await;
                    self.record(
                        ActivityKind::Register,
                        format!("healthy again: {}", change.why),
                        result.map(|()| address.to_string()),
                        &member.id,
                        (self.desired, self.desired),
                    );
                }
            }
        }
        if dry_run {
            return;
        }
        if self.suspended.has(Process::ReplaceUnhealthy) {
            return;
        }
        for id in &evaluation.replace {
            if let Some(member) = self.members.iter_mut().find(|m| &m.id == id && !m.replacing) {
                member.replacing = true;
            }
        }
    }

    /// Takes the engine's decision (unless in dry run) and returns the cause for the calls that follow.
    fn apply_decision(&mut self, evaluation: &Evaluation, now: Millis) -> String {
        let summary = evaluation.explanation.lines().next().unwrap_or_default();
        let verdicts: Vec<&str> = evaluation.verdicts.iter().map(|v| v.explanation.as_str()).collect();
        self.last_evaluation = match (self.config.dry_run, evaluation.action) {
            (true, _) => format!("dry run: {summary}"),
            (false, Action::None) if !verdicts.is_empty() => format!("{summary}; {}", verdicts.join("; ")),
            _ => summary.to_string(),
        };
        // Recommendations older than any stabilization window are of no further use.
        let horizon = now - 3_600_000;
        self.recommendations.retain(|r| r.at > horizon);
        self.recommendations.extend(evaluation.recommendations.iter().cloned());
        self.changes.retain(|c| c.at > horizon);
        let (from, to) = (evaluation.desired_before, evaluation.desired);
        if self.config.dry_run || from == to {
            return if evaluation.action == Action::Replace {
                format!("replacing unhealthy {}", evaluation.replace.join(", "))
            } else {
                format!("the group has {} of its desired {} members", self.live(), self.desired)
            };
        }
        let kind = if to > from {
            self.last_scale_out = Some(now);
            ActivityKind::ScaleOut
        } else {
            self.last_scale_in = Some(now);
            ActivityKind::ScaleIn
        };
        if evaluation.reason.code == "policy" {
            self.changes.push(Change { at: now, from, to });
        }
        self.record(kind, evaluation.reason.text.clone(), Ok(String::new()), "", (from, to));
        self.desired = to;
        evaluation.reason.text.clone()
    }

    /// Runs the scheduled actions that came due since the last evaluation.
    fn run_schedules(&mut self, now: Millis) {
        let Some(checked) = self.schedules_checked.replace(now) else {
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
            let before = (self.min_size, self.max_size, self.desired);
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
            let detail = format!(
                "min_size {} → {}, max_size {} → {}, desired {} → {}",
                before.0, self.min_size, before.1, self.max_size, before.2, self.desired
            );
            self.record(
                ActivityKind::Scheduled,
                format!("scheduled action {}", action.name),
                Ok(detail),
                "",
                (before.2, self.desired),
            );
        }
    }

    /// Warns once per setting when members take longer from launch to healthy than the setting allows.
    fn check_boot_time(&mut self, took_ms: Millis) {
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
                    (self.desired, self.desired),
                );
            }
        }
    }

    /// After a start: finishes what the intent log says was under way, then looks for orphans. A launch
    /// found running is adopted, one not found did not happen; an interrupted termination is finished.
    /// False if the provider cannot list its instances yet (nothing is decided until it can).
    async fn recover(&mut self, now: Millis) -> bool {
        let instances = match self.deps.provider.list(&self.config.name).await {
            Ok(instances) => instances,
            Err(e) => {
                tracing::warn!(group = %self.config.name, error = %e, "Cannot list the group's instances; retrying before deciding anything.");
                return false;
            }
        };
        let intents = match self.deps.store.open_intents(&self.config.name) {
            Ok(intents) => intents,
            Err(e) => {
                tracing::error!(group = %self.config.name, error = %e, "Cannot read the intent log.");
                self.deps.metrics.store_error();
                return false;
            }
        };
        for intent in intents {
            let outcome = match intent.kind {
                IntentKind::Launch => self.recover_launch(&intent, &instances, now).await,
                IntentKind::Terminate => self.recover_termination(&intent, &instances).await,
            };
            self.finish_intent(&intent.key, now, &outcome);
        }
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
            self.deps.authority.revoke_member(&intent.member_id);
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

    async fn recover_termination(&mut self, intent: &Intent, instances: &[Instance]) -> String {
        if let Some(index) = self.members.iter().position(|m| m.id == intent.member_id) {
            return if self
                .remove(index, "finishing a termination interrupted by a restart")
                .await
            {
                "finished after a restart".into()
            } else {
                "failed after a restart; the member stays and is tried again".into()
            };
        }
        let running = instances
            .iter()
            .any(|i| i.id == intent.instance_id && !matches!(i.state, InstanceState::Terminated { .. }));
        if running {
            let result = self.deps.provider.terminate(&intent.instance_id).await;
            let outcome = format!("{result:?}");
            self.record(
                ActivityKind::Terminate,
                "finishing a termination interrupted by a restart".into(),
                result.map(|()| format!("instance {}", intent.instance_id)),
                &intent.member_id,
                (self.desired, self.desired),
            );
            return outcome;
        }
        "already done".into()
    }

    /// Every `reconcile_interval_secs`: orphans, and load-balancer memberships changed outside ebb.
    async fn take_inventory(&mut self, now: Millis) {
        match self.deps.provider.list(&self.config.name).await {
            Ok(instances) => self.check_orphans(&instances, now).await,
            Err(e) => tracing::warn!(group = %self.config.name, error = %e, "Cannot list the group's instances."),
        }
        if self.config.dry_run {
            return;
        }
        let Ok(backends) = self.deps.load_balancer.members().await else {
            return;
        };
        let serving: Vec<(String, SocketAddr)> = self
            .members
            .iter()
            .filter(|m| m.state == MemberState::InService && !m.unhealthy && !m.replacing)
            .filter_map(|m| Some((m.id.clone(), m.address?)))
            .collect();
        for (id, address) in serving {
            if backends.iter().any(|b| b.member_id == id) {
                continue;
            }
            let result = self.deps.load_balancer.register(&id, address).await;
            self.record(
                ActivityKind::Register,
                "its load-balancer membership was removed outside ebb; restored".into(),
                result.map(|()| address.to_string()),
                &id,
                (self.desired, self.desired),
            );
        }
    }

    /// Instances tagged for this group that no member owns are reported once, and terminated after
    /// `orphan_grace_secs` unless `terminate_orphans = false`.
    async fn check_orphans(&mut self, instances: &[Instance], now: Millis) {
        let running: Vec<&Instance> = instances
            .iter()
            .filter(|i| !matches!(i.state, InstanceState::Terminated { .. }))
            .filter(|i| !self.members.iter().any(|m| m.instance_id == i.id))
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
                    (self.desired, self.desired),
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
                    (self.desired, self.desired),
                );
            }
        }
    }

    /// Members whose instance died on its own leave the group; the reconciler replaces them.
    async fn forget_lost_instances(&mut self) {
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
        let states = match self.deps.provider.describe(&ids).await {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(group = %self.config.name, error = %e, "Cannot describe the group's instances.");
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
            let member = self.members.remove(index);
            if member.state == MemberState::InService {
                let result = self.deps.load_balancer.deregister(&member.id).await;
                self.record(
                    ActivityKind::Deregister,
                    "its instance is gone".into(),
                    result.map(|()| String::new()),
                    &member.id,
                    (self.desired, self.desired),
                );
            }
            self.deps.ingest.unregister(&member.id).await;
            self.deps.authority.revoke_member(&member.id);
            let size = self.members.len() as u32;
            self.record(
                ActivityKind::InstanceLost,
                reason,
                Ok(format!("instance {id}")),
                &member.id,
                (size + 1, size),
            );
        }
    }

    /// Per member and policy, the means over the engine's windows; also refreshes the latest samples and
    /// the status's CPU average.
    async fn observe(&mut self, now: Millis) -> Vec<Vec<Vec<Option<f64>>>> {
        let mut windows: Vec<(Metric, Vec<Window>)> = self
            .engine
            .policies
            .iter()
            .map(|p| p.metric())
            .zip(self.engine.windows(now))
            .collect();
        windows.push((
            Metric::Cpu,
            vec![Window {
                start: now - STATUS_WINDOW_MS,
                end: now,
            }],
        ));
        let ids = self.members.iter().map(|m| m.id.clone()).collect();
        let observations = self.deps.ingest.observe(ids, windows).await;
        let status_cpu: Vec<f64> = self
            .members
            .iter()
            .zip(&observations)
            .filter(|(m, _)| m.state == MemberState::InService && !m.unhealthy)
            .filter_map(|(_, o)| o.means.last()?.first().copied().flatten())
            .collect();
        self.cpu_avg = (!status_cpu.is_empty()).then(|| status_cpu.iter().sum::<f64>() / status_cpu.len() as f64);
        self.latest = observations.iter().map(|o| o.latest.clone()).collect();
        self.health = observations.iter().map(|o| o.health).collect();
        observations
            .into_iter()
            .map(|mut o| {
                o.means.pop();
                o.means
            })
            .collect()
    }

    /// Pending members whose latest health check passed go behind the load balancer.
    async fn admit_healthy_members(&mut self, now: Millis) {
        let mut abandoned = Vec::new();
        for index in 0..self.members.len() {
            let member = &self.members[index];
            let healthy = self
                .latest
                .get(index)
                .cloned()
                .flatten()
                .filter(|latest| latest.at >= member.launched_at && ingest::is_healthy(latest));
            let (Some(latest), MemberState::Pending, Some(address), false) =
                (healthy, member.state, member.address, member.unhealthy)
            else {
                continue;
            };
            if self.suspended.has(Process::AddToLoadBalancer) {
                continue;
            }
            let Some(verdict) = self.hooks.check(member, Transition::Launching, now) else {
                continue;
            };
            if verdict.result == HookResult::Abandon {
                abandoned.push((member.id.clone(), verdict.why));
                continue;
            }
            if !verdict.why.is_empty() {
                let id = member.id.clone();
                self.record(
                    ActivityKind::Hook,
                    verdict.why,
                    Ok("continue".into()),
                    &id,
                    (self.desired, self.desired),
                );
            }
            let member = &self.members[index];
            let (took, external) = (now - member.launched_at, member.external);
            let id = member.id.clone();
            // A dry run counts the member in service but leaves the load balancer alone.
            let result = if self.config.dry_run {
                Ok(())
            } else {
                self.deps.load_balancer.register(&id, address).await
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
                (self.desired, self.desired),
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
                (self.desired, self.desired),
            );
            if let Some(index) = self.members.iter().position(|m| m.id == id) {
                self.remove(index, &why).await;
            }
        }
    }

    /// Members ebb launched from another launch specification than the current one, not already leaving.
    fn outdated(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| {
                let m = &self.members[i];
                !m.external && m.launch_spec != self.launch_spec && !m.replacing && m.drain_until.is_none()
            })
            .collect()
    }

    /// An instance refresh's next step: mark outdated members for replacement (a new member serves before
    /// each leaves), at most as many at once as the healthy percentage allows; done when none is left.
    fn roll_refresh(&mut self) {
        let Some(percent) = self.refresh else {
            return;
        };
        let outdated = self.outdated();
        let in_flight = self.members.iter().filter(|m| m.replacing).count();
        if outdated.is_empty() && in_flight == 0 {
            self.refresh = None;
            self.record(
                ActivityKind::Refresh,
                "the instance refresh finished".into(),
                Ok("every member runs the current launch specification".into()),
                "",
                (self.desired, self.desired),
            );
            return;
        }
        let batch = ((self.desired * (100 - percent)) / 100).max(1) as usize;
        for index in outdated.into_iter().take(batch.saturating_sub(in_flight)) {
            self.members[index].replacing = true;
            let id = self.members[index].id.clone();
            self.record(
                ActivityKind::Refresh,
                "launched from an older launch specification".into(),
                Ok("a replacement launches first".into()),
                &id,
                (self.desired, self.desired),
            );
        }
    }

    /// Launches or drains until the group has `desired` members (not counting those being replaced or
    /// leaving), at most `max_surge` launches in flight; replaced members go once enough healthy members
    /// serve; drained members are terminated.
    async fn reconcile(&mut self, now: Millis, cause: &str) {
        self.roll_refresh();
        while self.live() < self.desired && now >= self.next_launch_at && !self.suspended.has(Process::Launch) {
            let in_flight = self
                .members
                .iter()
                .filter(|m| m.state == MemberState::Pending && !m.replacing)
                .count() as u32;
            if in_flight >= self.config.max_surge {
                break;
            }
            if self.launch(now, cause).await.is_err() {
                self.next_launch_at = now + LAUNCH_RETRY_MS;
                break;
            }
        }
        let serving = self
            .members
            .iter()
            .filter(|m| m.state == MemberState::InService && !m.unhealthy && !m.replacing)
            .count() as u32;
        if self.suspended.has(Process::Terminate) {
            return;
        }
        if serving >= self.desired {
            while let Some(index) = self.members.iter().position(|m| m.replacing && m.drain_until.is_none()) {
                self.start_drain(index, "unhealthy, and its replacement is in service", now)
                    .await;
            }
        }
        while self.live() > self.desired {
            let candidates: Vec<MemberInput> = self
                .member_inputs(Vec::new())
                .into_iter()
                .zip(&self.members)
                .filter(|(_, m)| !m.replacing && m.drain_until.is_none())
                .map(|(input, _)| input)
                .collect();
            let Some(victim) = self.engine.victims(&candidates, 1, now).pop() else {
                tracing::warn!(group = %self.config.name, desired = self.desired, "Only protected members are left; not scaling in further.");
                break;
            };
            let index = self
                .members
                .iter()
                .position(|m| m.id == victim)
                .expect("a victim is a member");
            self.start_drain(index, cause, now).await;
        }
        self.finish_drains(now).await;
    }

    async fn launch(&mut self, now: Millis, cause: &str) -> Result<(), CloudError> {
        self.launches += 1;
        let member_id = format!("{}-{}", self.config.name, self.launches);
        let launch_id = format!("{member_id}-{now}");
        // The counter and the intent are on disk before the cloud hears of the launch: after a crash the
        // instance is adopted, or the launch known not to have happened; its member id is never reused.
        let intent = Intent {
            key: launch_id.clone(),
            group: self.config.name.clone(),
            kind: IntentKind::Launch,
            member_id: member_id.clone(),
            instance_id: String::new(),
            created_at: now,
        };
        if !self.save() || !self.write_intent(&intent) {
            return Err(CloudError::Retryable("the store refuses writes; not launching".into()));
        }
        let size = self.members.len() as u32;
        // Allowed to report before the instance exists: its agent may be quicker than the launch call.
        let settings = self.agent_settings(&Member::pending(&member_id, "", None, now));
        self.deps.ingest.register(&member_id, settings).await;
        // This launch's own token: single use, bound to this member id.
        let authority = &self.deps.authority;
        let (token, _) = authority.tokens.create(
            &self.config.name,
            now,
            authority.launch_token_ttl_secs,
            1,
            false,
            Some(member_id.clone()),
        );
        let agent_config = userdata::agent_config(
            &self.deps.collector_url,
            &authority.pki.fingerprint(),
            &token,
            &self.config.name,
        );
        let spec = LaunchSpec {
            group: self.config.name.clone(),
            member_id: member_id.clone(),
            cluster_id: self.deps.cluster_id.clone(),
            launch_id,
            service_port: self.config.member_port,
            user_data: userdata::render(UserDataFormat::CloudConfig, &agent_config),
            agent_config,
        };
        let result = self.deps.provider.launch(&spec).await;
        match &result {
            Ok(instance) => {
                let address = instance.address.map(|ip| SocketAddr::new(ip, self.config.member_port));
                let member = Member {
                    launch_spec: self.launch_spec.clone(),
                    ..Member::pending(&member_id, &instance.id, address, now)
                };
                self.add_pending(member).await;
            }
            Err(_) => {
                self.deps.ingest.unregister(&member_id).await;
                self.deps.authority.revoke_member(&member_id);
            }
        }
        let detail = result
            .as_ref()
            .map(|i| format!("instance {}", i.id))
            .map_err(Clone::clone);
        let new_size = self.members.len() as u32;
        let outcome = match &detail {
            Ok(instance) => format!("launched {instance}"),
            Err(e) => format!("failed: {e}"),
        };
        self.record(
            ActivityKind::Launch,
            cause.to_string(),
            detail,
            &member_id,
            (size, new_size),
        );
        // The member is saved before its intent is marked done.
        if self.save() {
            self.finish_intent(&intent.key, now, &outcome);
        }
        result.map(|_| ())
    }

    /// Writes an intent; false (logged, counted, decisions paused) if the store refuses.
    fn write_intent(&mut self, intent: &Intent) -> bool {
        match self.deps.store.begin_intent(intent) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(group = %self.config.name, error = %e, "Cannot write an intent; not calling the cloud.");
                self.deps.metrics.store_error();
                self.store_failing = true;
                false
            }
        }
    }

    fn finish_intent(&mut self, key: &str, now: Millis, outcome: &str) {
        if let Err(e) = self.deps.store.finish_intent(key, now, outcome) {
            tracing::error!(group = %self.config.name, error = %e, "Cannot mark an intent done.");
            self.deps.metrics.store_error();
            self.store_failing = true;
        }
    }

    /// Adds a member that waits for its first healthy check, telling ingest what its agent should check.
    async fn add_pending(&mut self, member: Member) {
        self.deps
            .ingest
            .register(&member.id, self.agent_settings(&member))
            .await;
        self.members.push(member);
    }

    /// Out of the load balancer first, then terminated; `false` if the termination failed (the member
    /// stays, and a later pass tries again).
    async fn remove(&mut self, index: usize, cause: &str) -> bool {
        let now = now_ms();
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
            self.leave_load_balancer(&member.id, cause, (size + 1, size)).await;
        }
        if member.external {
            // ebb did not launch it and does not terminate it; it only leaves the group, and its
            // certificate is denied at once (its stream closes).
            self.deps.authority.revoke_member(&member.id);
            self.deps.ingest.unregister(&member.id).await;
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
        self.deps.authority.revoke_member(&member.id);
        self.deps.ingest.unregister(&member.id).await;
        if self.save() {
            self.finish_intent(&intent.key, now, "terminated");
        }
        true
    }

    /// What `member`'s agent is told: its interval, its health check, and whether it is leaving.
    fn agent_settings(&self, member: &Member) -> AgentSettings {
        AgentSettings {
            interval_secs: self.config.agent_interval_secs,
            health_check_url: member
                .address
                .map(|a| format!("http://{a}{}", self.config.health_check.path))
                .unwrap_or_default(),
            health_check_timeout_ms: self.config.health_check.timeout_ms,
            drain: member.state == MemberState::Draining,
        }
    }

    /// Takes a member out of the load balancer, recording why.
    async fn leave_load_balancer(&self, member_id: &str, cause: &str, capacity: (u32, u32)) {
        let result = self.deps.load_balancer.deregister(member_id).await;
        self.record(
            ActivityKind::Deregister,
            cause.to_string(),
            result.map(|()| String::new()),
            member_id,
            capacity,
        );
    }

    /// The first step of leaving: out of the load balancer, the agent told to drain, terminated later by
    /// [`Self::finish_drains`] at `drain_secs` or when the agent reports drained.
    async fn start_drain(&mut self, index: usize, cause: &str, now: Millis) {
        let member = self.members[index].clone();
        if member.state == MemberState::InService {
            self.leave_load_balancer(&member.id, cause, (self.desired, self.desired))
                .await;
        }
        let until = now + Millis::from(self.config.drain_secs) * 1000;
        self.members[index].state = MemberState::Draining;
        self.members[index].drain_until = Some(until);
        let settings = self.agent_settings(&self.members[index]);
        self.deps.ingest.register(&member.id, settings).await;
        self.record(
            ActivityKind::Drain,
            cause.to_string(),
            Ok(format!("terminated within {} s", self.config.drain_secs)),
            &member.id,
            (self.desired, self.desired),
        );
        self.save();
    }

    /// Draining members whose agent reported drained, or whose time is up, go.
    async fn finish_drains(&mut self, now: Millis) {
        let drained = |c: &Self, i: usize| c.latest.get(i).cloned().flatten().is_some_and(|l| l.drained);
        let ready: Vec<(String, &'static str)> = (0..self.members.len())
            .filter_map(|i| {
                let until = self.members[i].drain_until?;
                match (drained(self, i), now >= until) {
                    (true, _) => Some((self.members[i].id.clone(), "drained: its agent finished")),
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
            let Some(verdict) = self.hooks.check(&self.members[index], Transition::Terminating, now) else {
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
                    (self.desired, self.desired),
                );
            }
            if !self.remove(index, cause).await {
                continue;
            }
            if index < self.latest.len() {
                self.latest.remove(index);
            }
        }
    }

    async fn load_balancer_connections(&self) -> Vec<(String, u64)> {
        match self.deps.load_balancer.members().await {
            Ok(backends) => backends.into_iter().map(|b| (b.member_id, b.connections)).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn record(
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
        self.deps.activities.record(Activity {
            id: 0,
            group: self.config.name.clone(),
            kind,
            cause,
            outcome,
            detail,
            at: now_ms(),
            from_capacity: capacity.0,
            to_capacity: capacity.1,
            member_id: member.to_string(),
        });
    }

    fn publish(&self, connections: Vec<(String, u64)>) {
        let members = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| MemberStatus {
                member: m.clone(),
                latest: self.latest.get(i).cloned().flatten(),
                lb_connections: connections.iter().find(|(id, _)| id == &m.id).map_or(0, |(_, c)| *c),
            })
            .collect();
        let status = GroupStatus {
            name: self.config.name.clone(),
            min_size: self.min_size,
            max_size: self.max_size,
            desired: self.desired,
            members,
            cpu_avg: self.cpu_avg,
            last_evaluation: self.last_evaluation.clone(),
        };
        let mut values = std::collections::BTreeMap::new();
        if let Some(cpu) = status.cpu_avg {
            values.insert("cpu_avg_percent", cpu);
        }
        self.deps.metrics.set_group(
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

/// A short fingerprint of the provider settings members are launched with.
fn launch_spec(config: &GroupConfig) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{:?}", config.provider).as_bytes());
    crate::pki::hex(&digest.as_ref()[..6])
}

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::fake::FakeLoadBalancer;
    use crate::providers::fake::FakeProvider;
    use ebb_proto::v1::health_check::Status as HealthStatus;
    use ebb_proto::v1::{HealthCheck, Hello, Sample};

    const GROUP: &str = r#"
        [[groups]]
        name = "web"
        min_size = 1
        max_size = 3
        cooldown_secs = 0
        warmup_secs = 0
        drain_secs = 0
        member_port = 8080
        [groups.provider]
        type = "local"
        [groups.load_balancer]
        type = "builtin"
        listen = "127.0.0.1:0"
        [[groups.policies]]
        name = "cpu-low"
        metric = "cpu"
        period_secs = 10
        comparison = "lt"
        threshold = 20.0
        adjustment = -1
    "#;

    struct Harness {
        controller: GroupController,
        handle: GroupHandle,
        provider: FakeProvider,
        lb: FakeLoadBalancer,
        ingest: IngestHandle,
        activities: ActivityLog,
        seq: u64,
    }

    async fn harness() -> Harness {
        harness_with(|group| group).await
    }

    /// A harness for the test group with its TOML changed by `edit`.
    async fn harness_with(edit: impl FnOnce(String) -> String) -> Harness {
        let store = Arc::new(Store::in_memory());
        harness_on(edit, store, FakeProvider::default(), FakeLoadBalancer::default()).await
    }

    /// A harness whose state lives in `store`, with these cloud fakes (a restart keeps all three).
    async fn harness_on(
        edit: impl FnOnce(String) -> String,
        store: Arc<Store>,
        provider: FakeProvider,
        lb: FakeLoadBalancer,
    ) -> Harness {
        let config = crate::config::parse(std::path::Path::new("test.toml"), &edit(GROUP.to_string())).unwrap();
        let metrics = Arc::new(Metrics::default());
        let ingest = IngestHandle::spawn(metrics.clone(), 600_000, Vec::new());
        let activities = ActivityLog::new(metrics.clone(), store.clone());
        let pki_dir = tempfile::tempdir().unwrap();
        let deps = Dependencies {
            provider: Arc::new(provider.clone()),
            load_balancer: Arc::new(lb.clone()),
            ingest: ingest.clone(),
            activities: activities.clone(),
            metrics,
            authority: Arc::new(
                Authority::new(crate::pki::tests::pki(pki_dir.path()), 1800, 600, store.clone()).unwrap(),
            ),
            explanations: ExplanationLog::new(store.clone(), 3600),
            store: store.clone(),
            cluster_id: "test".into(),
            collector_url: "https://127.0.0.1:7300".into(),
        };
        let (controller, handle, _commands) = GroupController::new(config.groups[0].clone(), deps).await.unwrap();
        Harness {
            controller,
            handle,
            provider,
            lb,
            ingest,
            activities,
            seq: 0,
        }
    }

    impl Harness {
        /// One sample from `member` at `at` with this CPU and health.
        async fn report(&mut self, member: &str, at: Millis, cpu: f64, healthy: bool) {
            self.report_sample(member, at, cpu, healthy, false).await;
        }

        /// A sample that may say the agent has drained; returns the settings the agent is sent back.
        async fn report_sample(
            &mut self,
            member: &str,
            at: Millis,
            cpu: f64,
            healthy: bool,
            drained: bool,
        ) -> Option<AgentSettings> {
            self.seq += 1;
            let hello = Hello {
                member_id: member.into(),
                run_id: 1,
                ..Hello::default()
            };
            self.ingest.hello(hello).await.unwrap();
            let status = if healthy {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            };
            let sample = Sample {
                seq: self.seq,
                timestamp_ms: at,
                cpu_busy_percent: Some(cpu),
                health: Some(HealthCheck {
                    status: status as i32,
                    ..HealthCheck::default()
                }),
                drained,
                ..Sample::default()
            };
            self.ingest.batch(member, 1, vec![sample], at).await.unwrap().settings
        }

        fn kinds(&self) -> Vec<String> {
            self.activities
                .since(0, "")
                .iter()
                .map(|a| format!("{} {}", a.kind.as_str(), a.member_id).trim().to_string())
                .collect()
        }
    }

    #[tokio::test]
    async fn a_member_joins_the_load_balancer_only_once_healthy() {
        let mut h = harness().await;
        let now = now_ms();
        h.controller.step(now).await;
        assert_eq!(h.provider.running(), ["web-1"]);
        assert!(h.lb.registered().is_empty());

        h.report("web-1", now + 500, 50.0, false).await;
        h.controller.step(now + 1000).await;
        assert!(h.lb.registered().is_empty(), "unhealthy: not registered");

        h.report("web-1", now + 1500, 50.0, true).await;
        h.controller.step(now + 2000).await;
        assert_eq!(h.lb.registered(), ["web-1"]);
        assert_eq!(h.handle.status().in_service(), 1);
        // The test group's cooldown of 0 s is shorter than this member's 2 s boot: said once.
        assert_eq!(h.kinds(), ["launch web-1", "register web-1", "warning"]);
        let warning = h.activities.newest("web", 1).remove(0);
        assert!(
            warning.cause.contains("longer than scale_out_cooldown_secs (0 s)"),
            "{}",
            warning.cause
        );
    }

    #[tokio::test]
    async fn scale_in_deregisters_before_it_terminates() {
        let mut h = harness().await;
        let now = now_ms();
        h.controller.desired = 2;
        h.controller.step(now).await;
        for member in ["web-1", "web-2"] {
            h.report(member, now + 100, 50.0, true).await;
        }
        h.controller.step(now + 200).await;
        assert_eq!(h.lb.registered(), ["web-1", "web-2"]);
        // Ten idle seconds from both.
        for at in (1..=10).map(|s| now + 200 + s * 1000) {
            h.report("web-1", at, 2.0, true).await;
            h.report("web-2", at, 4.0, true).await;
        }
        h.controller.step(now + 10_300).await;
        assert_eq!(h.handle.status().desired, 1);
        let activities = h.activities.since(0, "web");
        let kinds: Vec<&str> = activities.iter().map(|a| a.kind.as_str()).collect();
        let deregister = kinds.iter().position(|k| *k == "deregister").unwrap();
        let terminate = kinds.iter().position(|k| *k == "terminate").unwrap();
        assert!(deregister < terminate, "{kinds:?}");
        assert_eq!(
            activities[deregister].member_id, "web-2",
            "the newest member goes first"
        );
        let scale_in = activities.iter().find(|a| a.kind == ActivityKind::ScaleIn).unwrap();
        assert!(
            scale_in
                .cause
                .contains("policy cpu-low: avg cpu < 20%: cpu 3% over 10 s"),
            "{}",
            scale_in.cause
        );
        assert_eq!(h.lb.registered(), ["web-1"]);
        assert_eq!(h.provider.running(), ["web-1"]);
    }

    #[tokio::test]
    async fn a_failed_launch_is_recorded_and_retried_later_not_every_second() {
        let mut h = harness().await;
        h.provider
            .fail_next_launch(CloudError::Permanent("quota exceeded: 20 instances".into()));
        let now = now_ms();
        h.controller.step(now).await;
        let failed = h.activities.since(0, "web");
        assert_eq!(failed[0].outcome, "failed");
        assert!(failed[0].detail.contains("quota exceeded"), "{:?}", failed[0]);
        h.controller.step(now + 1000).await;
        assert_eq!(h.provider.calls(), ["launch web-1"], "no retry within the retry delay");
        h.controller.step(now + LAUNCH_RETRY_MS).await;
        assert_eq!(h.provider.calls(), ["launch web-1", "launch web-2"]);
        assert_eq!(h.provider.running(), ["web-2"]);
    }

    #[tokio::test]
    async fn a_lost_instance_leaves_the_load_balancer_and_is_replaced() {
        let mut h = harness().await;
        let now = now_ms();
        h.controller.step(now).await;
        h.report("web-1", now + 100, 50.0, true).await;
        h.controller.step(now + 200).await;
        h.provider.kill("web-1", "the hypervisor failed");
        h.controller.step(now + 1200).await;
        assert_eq!(
            h.kinds(),
            [
                "launch web-1",
                "register web-1",
                "deregister web-1",
                "instance_lost web-1",
                "launch web-2"
            ]
        );
        let lost = h
            .activities
            .since(0, "web")
            .into_iter()
            .find(|a| a.kind == ActivityKind::InstanceLost)
            .unwrap();
        assert_eq!(lost.cause, "the hypervisor failed");
        assert!(h.lb.registered().is_empty());
    }

    async fn send(
        h: &mut Harness,
        command: impl FnOnce(oneshot::Sender<Result<GroupStatus, String>>) -> Command,
    ) -> GroupStatus {
        let (reply, answer) = oneshot::channel();
        h.controller.handle(command(reply), now_ms()).await;
        answer.await.unwrap().unwrap()
    }

    async fn join(h: &mut Harness, protected: bool) -> String {
        let (reply, answer) = oneshot::channel();
        let facts = ebb_proto::v1::InstanceFacts {
            hostname: "monitored".into(),
            addresses: vec!["10.1.1.1".into()],
            instance_id: "i-hand-made".into(),
        };
        h.controller
            .handle(
                Command::JoinExternal {
                    facts,
                    protected,
                    reply,
                },
                now_ms(),
            )
            .await;
        answer.await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn protected_members_are_never_scaled_in_and_hand_made_ones_are_never_terminated() {
        let mut h = harness().await;
        h.controller.step(now_ms()).await;
        let monitored = join(&mut h, true).await;
        let extra = join(&mut h, false).await;
        assert_eq!(h.handle.status().members.len(), 3);
        assert_eq!(h.controller.desired, 3, "joined members count toward capacity");

        // Down to 1: the unprotected hand-made member leaves (and keeps running), then ebb's own is terminated.
        send(&mut h, |reply| Command::SetDesired { desired: 1, reply }).await;
        let members: Vec<String> = h.handle.status().members.iter().map(|m| m.member.id.clone()).collect();
        assert_eq!(
            members,
            std::slice::from_ref(&monitored),
            "only the protected member is left"
        );
        assert_eq!(
            h.provider.calls(),
            ["launch web-1", "terminate fake-1"],
            "the provider never hears of hand-made VMs"
        );
        let kinds = h.kinds();
        assert!(kinds.contains(&format!("leave {extra}")), "{kinds:?}");

        // The protected member stays even when desired is below what protection allows.
        h.controller.config.min_size = 0;
        h.controller.min_size = 0;
        send(&mut h, |reply| Command::SetDesired { desired: 0, reply }).await;
        assert_eq!(h.handle.status().members.len(), 1);
        assert!(h.handle.status().members[0].member.protected);
    }

    #[tokio::test]
    async fn operators_set_desired_within_the_limits_only() {
        let mut h = harness().await;
        let now = now_ms();
        let (reply, answer) = oneshot::channel();
        h.controller
            .handle(Command::SetDesired { desired: 5, reply }, now)
            .await;
        let error = answer.await.unwrap().unwrap_err();
        assert!(
            error.contains("outside group web's min_size..max_size (1..3)"),
            "{error}"
        );

        let (reply, answer) = oneshot::channel();
        h.controller
            .handle(Command::SetDesired { desired: 3, reply }, now)
            .await;
        let status = answer.await.unwrap().unwrap();
        assert_eq!(
            (status.desired, status.pending()),
            (3, 3),
            "the answer shows the new state"
        );
        assert_eq!(h.provider.running(), ["web-1", "web-2", "web-3"]);
        assert_eq!(h.kinds()[0], "set_desired");
    }

    /// Reports from each of `members` every second from `from` up to `to` (exclusive), healthy or not.
    async fn report_span(h: &mut Harness, members: &[(&str, bool)], from: Millis, to: Millis) {
        for at in (from..to).step_by(1000) {
            for (member, healthy) in members {
                h.report(member, at, 50.0, *healthy).await;
            }
        }
    }

    #[tokio::test]
    async fn an_unhealthy_member_is_replaced_new_one_first() {
        let mut h = harness_with(|g| {
            g.replace("min_size = 1", "min_size = 2")
                + "[groups.health_check]\ngrace_period_secs = 0\nunhealthy_threshold = 3\n"
        })
        .await;
        let now = now_ms();
        h.controller.desired = 2;
        h.controller.step(now).await;
        report_span(&mut h, &[("web-1", true), ("web-2", true)], now + 100, now + 1100).await;
        h.controller.step(now + 1200).await;
        assert_eq!(h.lb.registered(), ["web-1", "web-2"]);

        // web-2 fails three checks in a row.
        report_span(&mut h, &[("web-1", true), ("web-2", false)], now + 2000, now + 5000).await;
        h.controller.step(now + 5100).await;
        assert_eq!(h.lb.registered(), ["web-1"], "out of the load balancer at once");
        assert_eq!(
            h.provider.running(),
            ["web-1", "web-2", "web-3"],
            "the replacement launches first"
        );
        let states: Vec<&str> = h
            .handle
            .status()
            .members
            .iter()
            .map(|m| m.member.state_name())
            .collect();
        assert_eq!(states, ["in_service", "replacing", "pending"]);

        // Once the replacement serves, the unhealthy one goes.
        report_span(&mut h, &[("web-1", true), ("web-3", true)], now + 5200, now + 6200).await;
        h.controller.step(now + 6300).await;
        assert_eq!(h.lb.registered(), ["web-1", "web-3"]);
        assert_eq!(h.provider.running(), ["web-1", "web-3"]);
        let kinds = h.kinds();
        let position = |k: &str| {
            kinds
                .iter()
                .position(|x| x == k)
                .unwrap_or_else(|| panic!("{k} in {kinds:?}"))
        };
        assert!(position("unhealthy web-2") < position("launch web-3"), "{kinds:?}");
        assert!(position("launch web-3") < position("terminate web-2"), "{kinds:?}");
        assert_eq!(h.handle.status().desired, 2);
    }

    #[tokio::test]
    async fn dry_run_decides_and_explains_but_never_calls_the_cloud() {
        let mut h = harness_with(|g| g.replace("cooldown_secs = 0", "cooldown_secs = 0\ndry_run = true")).await;
        let now = now_ms();
        h.controller.step(now).await;
        assert!(h.provider.running().is_empty());
        assert_eq!(h.handle.status().desired, 1);
        let records = h.controller.deps.explanations.since("web", 0, 10);
        assert!(records.iter().all(|r| r.dry_run), "{records:?}");
        assert!(h.handle.status().last_evaluation.starts_with("dry run: "));
    }

    #[tokio::test]
    async fn in_dry_run_an_unhealthy_member_is_judged_once_and_the_load_balancer_left_alone() {
        let mut h = harness_with(|g| {
            g.replace("cooldown_secs = 0", "cooldown_secs = 0\ndry_run = true")
                + "[groups.health_check]\ngrace_period_secs = 0\n"
        })
        .await;
        // A hand-made member, healthy, then failing.
        let id = join(&mut h, false).await;
        let now = now_ms();
        report_span(&mut h, &[(id.as_str(), true)], now, now + 1000).await;
        h.controller.step(now + 1000).await;
        assert_eq!(h.handle.status().members[0].member.state_name(), "in_service");
        report_span(&mut h, &[(id.as_str(), false)], now + 2000, now + 6000).await;
        for t in 0..3 {
            h.controller.step(now + 6000 + t * 1000).await;
        }
        let unhealthy = h.kinds().iter().filter(|k| k.starts_with("unhealthy")).count();
        assert_eq!(unhealthy, 1, "{:?}", h.kinds());
        assert!(h.lb.registered().is_empty(), "a dry run leaves the load balancer alone");
        assert_eq!(h.handle.status().members[0].member.state_name(), "unhealthy");
        assert!(h.provider.running().is_empty());
    }

    #[tokio::test]
    async fn max_surge_bounds_launches_in_flight() {
        let mut h = harness_with(|g| {
            g.replace("max_size = 3", "max_size = 10")
                .replace("cooldown_secs = 0", "cooldown_secs = 0\nmax_surge = 2")
        })
        .await;
        let now = now_ms();
        h.controller.desired = 5;
        h.controller.step(now).await;
        assert_eq!(h.provider.running().len(), 2);
        h.controller.step(now + 1000).await;
        assert_eq!(h.provider.running().len(), 2, "both still launching");
        report_span(&mut h, &[("web-1", true), ("web-2", true)], now + 1100, now + 2100).await;
        h.controller.step(now + 2200).await;
        assert_eq!(h.provider.running().len(), 4);
    }

    /// ssh_scale.py (seed 001) adds one VM per run while the group is below min_size; with max_surge = 1
    /// ebb does the same, one launch at a time, until min_size.
    #[tokio::test]
    async fn below_min_one_launch_at_a_time_with_max_surge_one() {
        let mut h = harness_with(|g| {
            g.replace("min_size = 1", "min_size = 2")
                .replace("cooldown_secs = 0", "cooldown_secs = 0\nmax_surge = 1")
        })
        .await;
        let now = now_ms();
        h.controller.desired = 2;
        h.controller.step(now).await;
        assert_eq!(h.provider.running(), ["web-1"]);
        report_span(&mut h, &[("web-1", true)], now + 100, now + 1100).await;
        h.controller.step(now + 1200).await;
        assert_eq!(h.provider.running(), ["web-1", "web-2"]);
        report_span(&mut h, &[("web-1", true), ("web-2", true)], now + 1300, now + 2300).await;
        h.controller.step(now + 2400).await;
        assert_eq!(h.provider.running(), ["web-1", "web-2"], "no further than min_size");
    }

    #[tokio::test]
    async fn a_scheduled_action_sets_the_limits_and_desired() {
        let mut h = harness_with(|g| {
            g.replace("max_size = 3", "max_size = 10")
                + "[[groups.schedules]]\nname = \"every-minute\"\ncron = \"* * * * *\"\ntime_zone = \"Asia/Tokyo\"\nmin_size = 3\n"
        }).await;
        let minute = 60_000;
        let start = (now_ms() / minute) * minute + 100;
        h.controller.step(start).await;
        assert_eq!(
            h.handle.status().min_size,
            1,
            "the first evaluation only starts the clock"
        );
        h.controller.step(start + minute).await;
        let status = h.handle.status();
        assert_eq!((status.min_size, status.max_size, status.desired), (3, 10, 3));
        assert!(h.kinds().contains(&"scheduled".to_string()), "{:?}", h.kinds());
    }

    #[tokio::test]
    async fn a_suspended_group_launches_nothing() {
        let mut h = harness().await;
        let now = now_ms();
        suspend(&mut h, Suspended::ALL, true, now).await;
        h.controller.step(now).await;
        assert!(h.provider.running().is_empty());
        let records = h.controller.deps.explanations.since("web", 0, 1);
        assert_eq!(records[0].reason, "suspended");
        suspend(&mut h, Suspended::ALL, false, now).await;
        h.controller.step(now + 1000).await;
        assert_eq!(h.provider.running(), ["web-1"]);
    }

    #[tokio::test]
    async fn a_restart_keeps_members_flags_capacity_and_the_launch_counter() {
        let store = Arc::new(Store::in_memory());
        let (provider, lb) = (FakeProvider::default(), FakeLoadBalancer::default());
        let four = |g: String| g.replace("max_size = 3", "max_size = 4");
        let mut h = harness_on(four, store.clone(), provider.clone(), lb.clone()).await;
        let now = now_ms();
        h.controller.desired = 2;
        h.controller.step(now).await;
        report_span(&mut h, &[("web-1", true), ("web-2", true)], now + 100, now + 1100).await;
        h.controller.step(now + 1200).await;
        let hand_made = join(&mut h, true).await;
        suspend(&mut h, Suspended::ALL, true, now + 1300).await;
        let before = h.handle.status();
        drop(h);

        let mut h = harness_on(four, store, provider, lb).await;
        let after = h.handle.status();
        assert_eq!(after.desired, before.desired);
        let members = |s: &GroupStatus| s.members.iter().map(|m| m.member.clone()).collect::<Vec<_>>();
        assert_eq!(members(&after), members(&before));
        assert!(
            after
                .members
                .iter()
                .any(|m| m.member.id == hand_made && m.member.protected)
        );
        // Still suspended: nothing launches.
        h.controller.desired = 4;
        h.controller.step(now + 2000).await;
        assert_eq!(h.provider.running().len(), 2);
        suspend(&mut h, Suspended::ALL, false, now + 2100).await;
        h.controller.step(now + 2200).await;
        // The next member id follows the ones before the restart.
        assert_eq!(h.provider.running(), ["web-1", "web-2", "web-4"]);
        // The members' agents are known to ingest again, so they carry on reporting.
        report_span(&mut h, &[("web-1", true)], now + 2300, now + 2400).await;
    }

    #[tokio::test]
    async fn decisions_pause_while_the_store_refuses_writes() {
        let mut h = harness().await;
        let now = now_ms();
        h.controller.deps.store.refuse_writes(true);
        h.controller.desired = 3;
        for t in 0..3 {
            h.controller.step(now + t * 1000).await;
        }
        // No launch without its intent on disk.
        assert!(h.provider.calls().is_empty(), "{:?}", h.provider.calls());
        assert!(
            h.handle
                .status()
                .last_evaluation
                .starts_with("paused: the store refuses writes")
        );
        h.controller.deps.store.refuse_writes(false);
        // Resumed once the store accepts writes (after the failed launch's retry delay).
        h.controller.step(now + LAUNCH_RETRY_MS + 3000).await;
        assert_eq!(h.provider.running().len(), 3);
    }

    /// The intent a launch of `member_id` writes at `at`; returns its key.
    fn launch_intent(store: &Store, member_id: &str, at: Millis) -> String {
        let key = format!("{member_id}-{at}");
        let intent = Intent {
            key: key.clone(),
            group: "web".into(),
            kind: IntentKind::Launch,
            member_id: member_id.into(),
            instance_id: String::new(),
            created_at: at,
        };
        store.begin_intent(&intent).unwrap();
        key
    }

    /// The stored group had launched once and wanted one member.
    fn one_launch_before_the_crash(store: &Store) {
        let record = GroupRecord {
            desired: 1,
            launches: 1,
            ..GroupRecord::default()
        };
        store.save_group("web", &record, &[]).unwrap();
    }

    /// A launch the cloud carried out but the collector never recorded, as a crash between the two leaves it.
    async fn interrupted_launch(store: &Store, provider: &FakeProvider, member_id: &str, now: Millis) {
        let key = launch_intent(store, member_id, now);
        let spec = LaunchSpec {
            group: "web".into(),
            member_id: member_id.into(),
            cluster_id: "test".into(),
            launch_id: key,
            service_port: 8080,
            agent_config: String::new(),
            user_data: String::new(),
        };
        provider.launch(&spec).await.unwrap();
    }

    #[tokio::test]
    async fn after_a_crash_a_launch_that_happened_is_adopted_not_repeated() {
        let (store, provider) = (Arc::new(Store::in_memory()), FakeProvider::default());
        let now = now_ms();
        // The group's counter reached 1 before the crash; the cloud has web-1, the store does not.
        one_launch_before_the_crash(&store);
        interrupted_launch(&store, &provider, "web-1", now - 5000).await;
        let mut h = harness_on(|g| g, store.clone(), provider.clone(), FakeLoadBalancer::default()).await;
        h.controller.step(now).await;
        assert_eq!(provider.calls(), ["launch web-1"], "no second launch");
        assert_eq!(h.handle.status().members[0].member.id, "web-1");
        assert!(h.kinds().contains(&"adopt web-1".to_string()), "{:?}", h.kinds());
        assert!(store.open_intents("web").unwrap().is_empty());
        // The next launch takes a new id.
        h.controller.desired = 2;
        h.controller.step(now + 1000).await;
        assert_eq!(provider.running(), ["web-1", "web-2"]);
    }

    #[tokio::test]
    async fn after_a_crash_a_launch_that_did_not_happen_is_dropped_and_capacity_reconciled() {
        let (store, provider) = (Arc::new(Store::in_memory()), FakeProvider::default());
        let now = now_ms();
        one_launch_before_the_crash(&store);
        launch_intent(&store, "web-1", now - 5000);
        let mut h = harness_on(|g| g, store.clone(), provider.clone(), FakeLoadBalancer::default()).await;
        h.controller.step(now).await;
        assert_eq!(
            provider.running(),
            ["web-2"],
            "one launch for desired 1, under a new id"
        );
        assert!(store.open_intents("web").unwrap().is_empty());
    }

    #[tokio::test]
    async fn after_a_crash_an_interrupted_termination_is_finished() {
        let (store, provider, lb) = (
            Arc::new(Store::in_memory()),
            FakeProvider::default(),
            FakeLoadBalancer::default(),
        );
        let mut h = harness_on(|g| g, store.clone(), provider.clone(), lb.clone()).await;
        let now = now_ms();
        h.controller.desired = 2;
        h.controller.step(now).await;
        let member = h.controller.members[1].clone();
        drop(h);
        // The collector decided web-2 goes, wrote its intent, and died before the call.
        // Desired stays 2: only the intent, not a scale-in, can make web-2 go.
        store
            .save_group(
                "web",
                &GroupRecord {
                    desired: 2,
                    launches: 2,
                    ..GroupRecord::default()
                },
                &[h_member(&store, "web-1"), member.clone()],
            )
            .unwrap();
        store
            .begin_intent(&Intent {
                key: "terminate-web-2".into(),
                group: "web".into(),
                kind: IntentKind::Terminate,
                member_id: member.id.clone(),
                instance_id: member.instance_id.clone(),
                created_at: now,
            })
            .unwrap();
        let mut h = harness_on(|g| g, store.clone(), provider.clone(), lb).await;
        h.controller.step(now + 1000).await;
        assert!(
            provider.calls().contains(&format!("terminate {}", member.instance_id)),
            "{:?}",
            provider.calls()
        );
        assert_eq!(
            provider.running(),
            ["web-1", "web-3"],
            "finished, then refilled to desired"
        );
        assert!(store.open_intents("web").unwrap().is_empty());
    }

    /// The stored record of `id`, as the previous run saved it.
    fn h_member(store: &Store, id: &str) -> Member {
        store
            .load_group("web")
            .unwrap()
            .unwrap()
            .1
            .into_iter()
            .find(|m| m.id == id)
            .unwrap()
    }

    #[tokio::test]
    async fn orphans_are_reported_then_terminated_after_their_grace() {
        let (store, provider) = (Arc::new(Store::in_memory()), FakeProvider::default());
        let now = now_ms();
        // Tagged for the group, launched by nobody the store knows (no intent either).
        let spec = LaunchSpec {
            group: "web".into(),
            member_id: "web-77".into(),
            cluster_id: "test".into(),
            launch_id: "web-77-1".into(),
            service_port: 8080,
            agent_config: String::new(),
            user_data: String::new(),
        };
        provider.launch(&spec).await.unwrap();
        let edit = |g: String| {
            g.replace(
                "cooldown_secs = 0",
                "cooldown_secs = 0\norphan_grace_secs = 30\nreconcile_interval_secs = 10",
            )
        };
        let mut h = harness_on(edit, store, provider.clone(), FakeLoadBalancer::default()).await;
        h.controller.step(now).await;
        assert!(h.kinds().contains(&"orphan web-77".to_string()), "{:?}", h.kinds());
        assert!(
            provider.running().contains(&"web-77".to_string()),
            "not before its grace"
        );
        h.controller.step(now + 20_000).await;
        assert!(provider.running().contains(&"web-77".to_string()));
        h.controller.step(now + 31_000).await;
        assert!(
            !provider.running().contains(&"web-77".to_string()),
            "{:?}",
            provider.running()
        );
        assert_eq!(
            h.kinds().iter().filter(|k| k.as_str() == "orphan web-77").count(),
            1,
            "reported once"
        );
    }

    #[tokio::test]
    async fn orphans_are_only_reported_when_so_configured() {
        let (store, provider) = (Arc::new(Store::in_memory()), FakeProvider::default());
        interrupted_launch(&store, &provider, "stray-1", 0).await;
        store.finish_intent("stray-1-0", 1, "test").unwrap();
        let edit = |g: String| {
            g.replace(
                "cooldown_secs = 0",
                "cooldown_secs = 0\norphan_grace_secs = 0\nterminate_orphans = false",
            )
        };
        let mut h = harness_on(edit, store, provider.clone(), FakeLoadBalancer::default()).await;
        h.controller.step(now_ms()).await;
        assert!(provider.running().contains(&"stray-1".to_string()));
        assert!(h.kinds().contains(&"orphan stray-1".to_string()), "{:?}", h.kinds());
    }

    #[tokio::test]
    async fn a_load_balancer_membership_removed_by_hand_is_restored() {
        let edit = |g: String| g.replace("cooldown_secs = 0", "cooldown_secs = 0\nreconcile_interval_secs = 10");
        let mut h = harness_with(edit).await;
        let now = now_ms();
        h.controller.step(now).await;
        report_span(&mut h, &[("web-1", true)], now + 100, now + 1100).await;
        h.controller.step(now + 1200).await;
        assert_eq!(h.lb.registered(), ["web-1"]);
        h.lb.deregister("web-1").await.unwrap();
        h.controller.step(now + 11_000).await;
        assert_eq!(h.lb.registered(), ["web-1"]);
        let restored = h.activities.newest("web", 1).remove(0);
        assert!(
            restored.cause.contains("removed outside ebb; restored"),
            "{}",
            restored.cause
        );
    }

    /// Two members in service, then an operator scales to one: web-2 starts leaving.
    async fn two_in_service_then_one(h: &mut Harness, now: Millis) {
        h.controller.desired = 2;
        h.controller.step(now).await;
        report_span(h, &[("web-1", true), ("web-2", true)], now + 100, now + 1100).await;
        h.controller.step(now + 1200).await;
        send(h, |reply| Command::SetDesired { desired: 1, reply }).await;
    }

    #[tokio::test]
    async fn scale_in_drains_before_it_terminates_and_the_agent_is_told() {
        let mut h = harness_with(|g| g.replace("drain_secs = 0", "drain_secs = 30")).await;
        let now = now_ms();
        two_in_service_then_one(&mut h, now).await;
        // Out of the load balancer at once, still running.
        assert_eq!(h.lb.registered(), ["web-1"]);
        assert_eq!(h.provider.running(), ["web-1", "web-2"]);
        assert_eq!(h.handle.status().members[1].member.state_name(), "draining");
        let settings = h.report_sample("web-2", now + 1300, 1.0, true, false).await.unwrap();
        assert!(settings.drain, "the agent is told to drain");
        // It does not count toward capacity: nothing is launched in its place.
        h.controller.step(now + 2000).await;
        assert_eq!(h.provider.running(), ["web-1", "web-2"]);
        // Its identity still works while it drains (its agent must hear "drain" and report back)...
        let bound = |h: &Harness| {
            let tokens = h.controller.deps.authority.tokens.list(now);
            tokens.iter().any(|t| t.bound_member.as_deref() == Some("web-2"))
        };
        assert!(bound(&h));
        // At the deadline it goes, and only then is it revoked.
        h.controller.step(now + 1300 + 30_000).await;
        assert_eq!(h.provider.running(), ["web-1"]);
        assert!(!bound(&h), "revoked once terminated");
        let terminate = h.activities.newest("web", 1).remove(0);
        assert_eq!(
            (terminate.kind, terminate.cause.as_str()),
            (ActivityKind::Terminate, "drain time is up")
        );
    }

    #[tokio::test]
    async fn a_drained_agent_lets_its_member_go_before_the_deadline() {
        let mut h = harness_with(|g| g.replace("drain_secs = 0", "drain_secs = 300")).await;
        let now = now_ms();
        two_in_service_then_one(&mut h, now).await;
        h.report_sample("web-2", now + 2000, 1.0, true, true).await;
        h.controller.step(now + 2100).await;
        assert_eq!(h.provider.running(), ["web-1"]);
        let terminate = h.activities.newest("web", 1).remove(0);
        assert_eq!(terminate.cause, "drained: its agent finished");
    }

    /// Suspends (or resumes) `processes` as an operator would; the processes suspended afterwards.
    async fn suspend(h: &mut Harness, processes: Suspended, suspend: bool, now: Millis) -> Suspended {
        let (reply, answer) = oneshot::channel();
        let command = Command::SetSuspended {
            processes,
            suspend,
            reply,
        };
        h.controller.handle(command, now).await;
        answer.await.unwrap()
    }

    #[tokio::test]
    async fn processes_are_suspended_one_by_one() {
        let mut h = harness().await;
        let now = now_ms();
        let now_suspended = suspend(&mut h, Suspended::of(&[Process::AddToLoadBalancer]), true, now).await;
        assert_eq!(now_suspended.names(), ["add_to_load_balancer"]);
        // Launching still works; the healthy member is kept out of the load balancer.
        h.controller.step(now).await;
        report_span(&mut h, &[("web-1", true)], now + 100, now + 1100).await;
        h.controller.step(now + 1200).await;
        assert_eq!(h.provider.running(), ["web-1"]);
        assert!(h.lb.registered().is_empty());
        // Launch suspended too: a higher desired capacity waits.
        suspend(&mut h, Suspended::of(&[Process::Launch]), true, now + 1300).await;
        h.controller.desired = 2;
        h.controller.step(now + 2000).await;
        assert_eq!(h.provider.running(), ["web-1"]);
        // Resumed: both happen.
        let left = suspend(&mut h, Suspended::ALL, false, now + 2100).await;
        assert!(left.names().is_empty());
        h.controller.step(now + 3000).await;
        assert_eq!(h.lb.registered(), ["web-1"]);
        assert_eq!(h.provider.running(), ["web-1", "web-2"]);
        // Terminate suspended: scale-in waits.
        suspend(&mut h, Suspended::of(&[Process::Terminate]), true, now + 3100).await;
        h.controller.desired = 1;
        h.controller.step(now + 4000).await;
        assert_eq!(h.provider.running(), ["web-1", "web-2"]);
        assert!(
            Process::parse("launches")
                .unwrap_err()
                .contains("the processes are: decide, launch")
        );
    }

    #[tokio::test]
    async fn after_a_restart_members_get_time_to_reconnect_before_they_are_judged() {
        let (store, provider) = (Arc::new(Store::in_memory()), FakeProvider::default());
        let now = now_ms();
        let mut saved = Vec::new();
        for id in ["web-1", "web-2"] {
            interrupted_launch(&store, &provider, id, now).await;
            store.finish_intent(&format!("{id}-{now}"), now, "test").unwrap();
            let instance = provider.list("web").await.unwrap().pop().unwrap();
            saved.push(Member {
                state: MemberState::InService,
                in_service_since: Some(now - 3_600_000),
                ..Member::pending(
                    id,
                    &instance.id,
                    Some("10.0.0.1:8080".parse().unwrap()),
                    now - 3_700_000,
                )
            });
        }
        let record = GroupRecord {
            desired: 2,
            launches: 2,
            ..GroupRecord::default()
        };
        store.save_group("web", &record, &saved).unwrap();
        let edit = |g: String| g + "[groups.health_check]\ngrace_period_secs = 0\nsilent_secs = 30\n";
        let mut h = harness_on(edit, store, provider.clone(), FakeLoadBalancer::default()).await;
        // web-1's agent is back at once; web-2's takes 20 s, within silent_secs of the restart.
        report_span(&mut h, &[("web-1", true)], now, now + 20_000).await;
        h.controller.step(now + 20_000).await;
        assert!(!h.kinds().iter().any(|k| k.starts_with("unhealthy")), "{:?}", h.kinds());
        // Still silent 31 s after the restart: now it is judged.
        report_span(&mut h, &[("web-1", true)], now + 20_000, now + 32_000).await;
        h.controller.step(now + 32_000).await;
        assert!(h.kinds().contains(&"unhealthy web-2".to_string()), "{:?}", h.kinds());
    }

    /// Steps until `done` holds, a little real time apart, for hooks that run as processes (bounded).
    async fn step_until(h: &mut Harness, now: Millis, done: impl Fn(&Harness) -> bool) {
        for k in 0..200 {
            h.report("web-1", now + k, 50.0, true).await;
            h.controller.step(now + k).await;
            if done(h) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("not done within 4 s: {:?}", h.kinds());
    }

    #[tokio::test]
    async fn a_launching_hook_holds_the_member_out_of_the_load_balancer_until_it_confirms() {
        let dir = tempfile::tempdir().unwrap();
        let gate = dir.path().join("gate");
        let script = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
        let edit = move |g: String| {
            g + &format!(
                "[[groups.lifecycle_hooks]]\nname = \"warm-cache\"\ntransition = \"launching\"\ncommand = [\"sh\", \"-c\", \"{script}\"]\ntimeout_secs = 60\n"
            )
        };
        let mut h = harness_with(edit).await;
        let now = now_ms();
        h.controller.step(now).await;
        for k in 1..5 {
            h.report("web-1", now + k * 100, 50.0, true).await;
            h.controller.step(now + k * 100).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(h.lb.registered().is_empty(), "healthy, but held by its hook");
        std::fs::write(&gate, "").unwrap();
        step_until(&mut h, now + 1000, |h| !h.lb.registered().is_empty()).await;
        assert!(h.kinds().contains(&"hook web-1".to_string()), "{:?}", h.kinds());
    }

    #[tokio::test]
    async fn an_abandoning_launching_hook_terminates_the_member() {
        let edit = |g: String| {
            g + "[[groups.lifecycle_hooks]]\nname = \"check\"\ntransition = \"launching\"\ncommand = [\"false\"]\n"
        };
        let mut h = harness_with(edit).await;
        let now = now_ms();
        h.controller.step(now).await;
        step_until(&mut h, now + 100, |h| h.kinds().iter().any(|k| k == "terminate web-1")).await;
        assert!(h.lb.registered().is_empty());
        let hook = h
            .activities
            .since(0, "web")
            .into_iter()
            .find(|a| a.kind == ActivityKind::Hook)
            .unwrap();
        assert_eq!(hook.cause, "lifecycle hook check abandoned (non-zero exit)");
    }

    #[tokio::test]
    async fn a_terminating_hook_runs_before_the_member_is_terminated() {
        let dir = tempfile::tempdir().unwrap();
        let flushed = dir.path().join("flushed");
        let script = format!("sleep 0.2; echo {{member_id}} > {}", flushed.display());
        let edit = move |g: String| {
            g + &format!(
                "[[groups.lifecycle_hooks]]\nname = \"flush-logs\"\ntransition = \"terminating\"\ncommand = [\"sh\", \"-c\", \"{script}\"]\n"
            )
        };
        let mut h = harness_with(edit).await;
        let now = now_ms();
        two_in_service_then_one(&mut h, now).await;
        assert_eq!(h.provider.running(), ["web-1", "web-2"], "held by its hook");
        step_until(&mut h, now + 2000, |h| h.provider.running() == ["web-1"]).await;
        assert_eq!(std::fs::read_to_string(&flushed).unwrap(), "web-2\n");
        let kinds = h.kinds();
        let hook = kinds.iter().position(|k| k == "hook web-2").unwrap();
        let terminate = kinds.iter().position(|k| k == "terminate web-2").unwrap();
        assert!(hook < terminate, "{kinds:?}");
    }

    #[tokio::test]
    async fn an_instance_refresh_replaces_old_members_one_by_one_never_below_desired() {
        let mut h = harness().await;
        let now = now_ms();
        h.controller.desired = 2;
        h.controller.step(now).await;
        report_span(&mut h, &[("web-1", true), ("web-2", true)], now + 100, now + 1100).await;
        h.controller.step(now + 1200).await;
        // The provider settings changed (a restart with a new template, say).
        h.controller.launch_spec = "new-template".into();
        let (reply, answer) = oneshot::channel();
        let command = Command::Refresh {
            min_healthy_percent: 50,
            reply,
        };
        h.controller.handle(command, now + 1300).await;
        assert_eq!(answer.await.unwrap(), 2);
        let mut t = now + 2000;
        for _ in 0..10 {
            h.controller.step(t).await;
            assert!(
                h.lb.registered().len() >= 2,
                "healthy capacity never drops: {:?}",
                h.lb.registered()
            );
            let running = h.provider.running();
            let running: Vec<(&str, bool)> = running.iter().map(|m| (m.as_str(), true)).collect();
            report_span(&mut h, &running, t + 100, t + 1100).await;
            t += 2000;
        }
        assert_eq!(h.provider.running(), ["web-3", "web-4"]);
        assert!(h.controller.refresh.is_none(), "finished");
        let refreshes = h.kinds().iter().filter(|k| k.starts_with("refresh")).count();
        assert_eq!(refreshes, 4, "started, two replaced, finished: {:?}", h.kinds());
    }
}
