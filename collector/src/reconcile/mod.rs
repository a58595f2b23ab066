//! One controller task per group: every second it notices instances that died, puts members that pass
//! their health check behind the load balancer, asks the [engine](crate::engine) for a decision, and turns
//! desired capacity into provider and load-balancer calls, recording each as an activity with its cause.
//!
//! The task owns the group's state and makes its calls one at a time, so there are never two operations
//! on the same group at once. Operators' commands arrive on a channel; the latest state is published on a
//! watch channel for the Admin API and the demo.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ebb_proto::v1::AgentSettings;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;

use crate::activity::{Activity, ActivityKind, ActivityLog};
use crate::clock::Clock;
use crate::config::GroupConfig;
pub use crate::engine::MemberState;
use crate::engine::schedule::ScheduledAction;
use crate::engine::{
    Action, Change, Engine, Evaluation, GroupInput, MemberInput, Metric, Millis, Recommendation, Window,
};
use crate::explain::ExplanationLog;
use crate::hooks::{HookResult, Hooks, Transition};
use crate::ingest::{self, IngestHandle, LatestSample, Observation};
use crate::lb::LoadBalancer;
use crate::metrics::{GroupGauges, Metrics};
pub use crate::model::Member;
use crate::pki::Authority;
use crate::providers::{CloudError, Instance, InstanceState, LaunchSpec, Provider};
use crate::store::{GroupRecord, Intent, IntentKind, Store};
use crate::userdata::{self, OperatorUserData};

/// How often a group is evaluated.
pub const TICK: Duration = Duration::from_secs(1);
/// The window behind the status's CPU average.
const STATUS_WINDOW_MS: Millis = 10_000;
/// After a failed launch, the next attempt waits this long.
const LAUNCH_RETRY_MS: Millis = 10_000;
/// How often the cloud is asked about the group's instances between inventories, to notice one that died.
/// Not every tick: clouds rate-limit these calls per account (EC2's describe actions, CloudStack's
/// management server, Nova), and a member whose instance died also stops reporting, which the health
/// judgement sees first.
const DESCRIBE_INTERVAL_MS: Millis = 10_000;

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

impl Member {
    /// How a load balancer is told of this member, serving at `address`.
    pub fn registration(&self, address: SocketAddr) -> crate::lb::Registration<'_> {
        crate::lb::Registration {
            member_id: &self.id,
            instance_id: &self.instance_id,
            address,
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
    /// The CPU figure the first CPU policy decided on in the latest evaluation: its name, its period and
    /// the group's aggregate over that period (what the demo shows, so that it agrees with the decisions).
    pub policy_cpu: Option<PolicyFigure>,
}

/// One policy's aggregate of its metric over its latest period.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyFigure {
    pub policy: String,
    pub period_secs: u32,
    pub value: f64,
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

/// At most this many queued joins are answered together, so the first waits for a bounded batch.
const JOINS_AT_ONCE: usize = 100;

/// A VM's join as the controller carries it out: its facts, whether it is protected, where the answer goes.
type Join = (
    ebb_proto::v1::InstanceFacts,
    bool,
    oneshot::Sender<Result<String, ControlError>>,
);

/// What operators and enrolling VMs ask of a group's controller.
pub enum Command {
    SetDesired {
        desired: u32,
        reply: oneshot::Sender<Result<GroupStatus, ControlError>>,
    },
    /// A VM ebb did not launch enrols with an operator's token.
    JoinExternal {
        facts: ebb_proto::v1::InstanceFacts,
        protected: bool,
        reply: oneshot::Sender<Result<String, ControlError>>,
    },
    /// Its enrolment failed after joining.
    LeaveExternal { member_id: String },
    /// An operator suspends (or resumes) some of the group's processes; replies with those suspended now.
    SetSuspended {
        processes: Suspended,
        suspend: bool,
        reply: oneshot::Sender<Suspended>,
    },
    /// An operator protects a member from scale-in, or lifts the protection; saved before the reply.
    SetProtected {
        member_id: String,
        protected: bool,
        reply: oneshot::Sender<Result<(), ControlError>>,
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

/// Why a command to a group's controller was not carried out; the gRPC edge gives each its status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The controller has stopped (the collector is shutting down).
    #[error("the group's controller has stopped")]
    Stopped,
    /// What the command names is not in the group.
    #[error("{0}")]
    NotFound(String),
    /// The group's limits or state refuse it.
    #[error("{0}")]
    Refused(String),
    /// The store would not record it; nothing changed.
    #[error("{0}")]
    Unavailable(String),
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
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| ControlError::Stopped)?;
        answer.await.map_err(|_| ControlError::Stopped)
    }

    /// Sets desired capacity as an operator; refused outside min..max.
    pub async fn set_desired(&self, desired: u32) -> Result<GroupStatus, ControlError> {
        self.ask(|reply| Command::SetDesired { desired, reply }).await?
    }

    /// Adds a VM that enrolled with an operator's token; returns its member id.
    pub async fn join_external(
        &self,
        facts: ebb_proto::v1::InstanceFacts,
        protected: bool,
    ) -> Result<String, ControlError> {
        self.ask(|reply| Command::JoinExternal {
            facts,
            protected,
            reply,
        })
        .await?
    }

    /// Suspends or resumes `processes`; the processes suspended afterwards.
    pub async fn set_suspended(&self, processes: Suspended, suspend: bool) -> Result<Suspended, ControlError> {
        self.ask(|reply| Command::SetSuspended {
            processes,
            suspend,
            reply,
        })
        .await
    }

    /// Protects `member_id`, one of this group's members, from scale-in (or lifts the protection).
    pub async fn set_protected(&self, member_id: &str, protected: bool) -> Result<(), ControlError> {
        self.ask(|reply| Command::SetProtected {
            member_id: member_id.to_string(),
            protected,
            reply,
        })
        .await?
    }

    /// Starts an instance refresh; how many members are outdated.
    pub async fn refresh(&self, min_healthy_percent: u32) -> Result<u32, ControlError> {
        self.ask(|reply| Command::Refresh {
            min_healthy_percent,
            reply,
        })
        .await
    }

    /// Applies a reloaded configuration's settings for this group; its members are not touched.
    pub async fn reconfigure(&self, config: GroupConfig) -> Result<(), ControlError> {
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
    /// Read at the start of each step and command; nothing inside them reads the time again.
    pub clock: Arc<dyn Clock>,
    /// The URL agents use to reach the collector.
    pub collector_url: String,
}

/// What the store holds of a group, as of the last successful save.
#[derive(Debug, Default)]
struct Saved {
    record: GroupRecord,
    members: HashMap<String, Member>,
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
    /// Cloud calls failing again and again, said once and then summarised.
    repeated: RepeatedWarnings,
    members: Vec<Member>,
    launches: u64,
    next_launch_at: Millis,
    last_evaluation: String,
    policy_cpu: Option<PolicyFigure>,
    cpu_avg: Option<f64>,
    /// What the latest observation saw of each member, by member id: never by position, so a member
    /// that leaves mid-step cannot hand its figures to another.
    observed: HashMap<String, Observation>,
    /// What the store last accepted.
    saved: Option<Saved>,
    /// The last write failed: decisions pause until one succeeds.
    store_failing: bool,
    /// The provider's instances have been compared with the store since start.
    recovered: bool,
    /// When this controller started: members restored from the store are judged from then.
    started_at: Millis,
    /// The time of the step or command being carried out: activities, intents and warnings use it.
    now: Millis,
    hooks: Hooks,
    /// The fingerprint of the provider settings new members are launched with.
    launch_spec: String,
    /// An instance refresh under way: the healthy percentage of desired it keeps.
    refresh: Option<u32>,
    /// When the provider's instances were last listed.
    last_inventory: Millis,
    /// When the cloud was last asked about the group's instances (see [`DESCRIBE_INTERVAL_MS`]).
    last_describe: Millis,
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
        let (saved, mut members) = deps.store.load_group(&config.name)?.unwrap_or_else(|| {
            let desired = config.desired_capacity.unwrap_or(config.min_size);
            (
                GroupRecord {
                    desired,
                    ..GroupRecord::default()
                },
                Vec::new(),
            )
        });
        migrate_launch_specs(&config, &mut members, &spec);
        let started_at = deps.clock.now_ms();
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
            repeated: RepeatedWarnings::default(),
            members,
            launches: saved.launches,
            next_launch_at: 0,
            last_evaluation: "not evaluated yet".into(),
            cpu_avg: None,
            policy_cpu: None,
            observed: HashMap::new(),
            saved: None,
            store_failing: false,
            recovered: false,
            started_at,
            now: started_at,
            hooks,
            launch_spec: spec,
            refresh: None,
            last_inventory: 0,
            last_describe: 0,
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
    fn group_record(&self) -> GroupRecord {
        GroupRecord {
            min_size: self.min_size,
            max_size: self.max_size,
            desired: self.desired,
            suspended: self.suspended.0,
            last_scale_out: self.last_scale_out,
            last_scale_in: self.last_scale_in,
            launches: self.launches,
        }
    }

    /// Writes the group's state to the store if it changed (the first time all of it, then the members
    /// that changed or left); false if the store refused (disk full, unwritable), which is logged and
    /// counted, and pauses decisions until a write succeeds.
    fn save(&mut self) -> bool {
        let record = self.group_record();
        let (result, changed, removed) = match &self.saved {
            None => (
                self.deps.store.save_group(&self.config.name, &record, &self.members),
                self.members.clone(),
                Vec::new(),
            ),
            Some(saved) => {
                let changed: Vec<Member> = self
                    .members
                    .iter()
                    .filter(|m| saved.members.get(&m.id) != Some(m))
                    .cloned()
                    .collect();
                let current: HashSet<&str> = self.members.iter().map(|m| m.id.as_str()).collect();
                let removed: Vec<String> = saved
                    .members
                    .keys()
                    .filter(|id| !current.contains(id.as_str()))
                    .cloned()
                    .collect();
                if saved.record == record && changed.is_empty() && removed.is_empty() {
                    return true;
                }
                let result = self
                    .deps
                    .store
                    .save_group_changes(&self.config.name, &record, &changed, &removed);
                (result, changed, removed)
            }
        };
        match result {
            Ok(()) => {
                if self.store_failing {
                    tracing::info!(group = %self.config.name, "The store accepts writes again; decisions resume.");
                }
                // What the store now holds: only what changed is copied, as only that was written.
                let saved = self.saved.get_or_insert_with(Saved::default);
                saved.record = record;
                for id in &removed {
                    saved.members.remove(id);
                }
                saved.members.extend(changed.into_iter().map(|m| (m.id.clone(), m)));
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
                _ = ticker.tick() => self.step(self.deps.clock.now_ms()).await,
                Some(command) = commands.recv() => self.handle_queued(command, &mut commands).await,
                _ = stop.changed() => break,
            }
        }
        self.deps.provider.close().await;
    }

    /// Handles `first`; if it is an enrolling VM's join, the joins queued behind it as well, together. Each
    /// answer waits for the group's status to be published, a copy of every member: one copy per join made
    /// a boot storm into a group of thousands cost thousands times thousands.
    async fn handle_queued(&mut self, first: Command, commands: &mut mpsc::Receiver<Command>) {
        let mut joins = Vec::new();
        let mut next = Some(first);
        while let Some(Command::JoinExternal {
            facts,
            protected,
            reply,
        }) = next
        {
            joins.push((facts, protected, reply));
            next = if joins.len() < JOINS_AT_ONCE {
                commands.try_recv().ok()
            } else {
                None
            };
        }
        if !joins.is_empty() {
            self.join_all(joins, self.deps.clock.now_ms()).await;
            self.save();
        }
        if let Some(command) = next {
            self.handle(command, self.deps.clock.now_ms()).await;
        }
    }

    /// Joins each VM, then publishes the new state once and answers them all.
    async fn join_all(&mut self, joins: Vec<Join>, now: Millis) {
        self.now = now;
        let mut answers = Vec::with_capacity(joins.len());
        for (facts, protected, reply) in joins {
            answers.push((self.join_external(facts, protected, now).await, reply));
        }
        self.refresh_status().await;
        for (result, reply) in answers {
            let _ = reply.send(result);
        }
    }

    /// Carries out an operator's or an enrolling VM's request, then publishes the new state before answering.
    async fn handle(&mut self, command: Command, now: Millis) {
        self.now = now;
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
            } => self.join_all(vec![(facts, protected, reply)], now).await,
            Command::SetProtected {
                member_id,
                protected,
                reply,
            } => {
                let result = self.set_protected(&member_id, protected);
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

    fn set_protected(&mut self, member_id: &str, protected: bool) -> Result<(), ControlError> {
        let Some(member) = self.members.iter_mut().find(|m| m.id == member_id) else {
            return Err(ControlError::NotFound(format!(
                "group {} has no member {member_id}",
                self.config.name
            )));
        };
        if member.protected == protected {
            return Ok(());
        }
        member.protected = protected;
        if !self.save() {
            if let Some(member) = self.members.iter_mut().find(|m| m.id == member_id) {
                member.protected = !protected;
            }
            return Err(ControlError::Unavailable(
                "the store refuses writes (is the disk full?); nothing changed".into(),
            ));
        }
        let cause = if protected {
            "an operator protected the member from scale-in"
        } else {
            "an operator lifted the member's scale-in protection"
        };
        self.record(
            ActivityKind::Protection,
            cause.into(),
            Ok(String::new()),
            member_id,
            (self.desired, self.desired),
        );
        Ok(())
    }

    async fn set_desired(&mut self, desired: u32, now: Millis) -> Result<(), ControlError> {
        if !(self.min_size..=self.max_size).contains(&desired) {
            return Err(ControlError::Refused(format!(
                "desired capacity {desired} is outside group {}'s min_size..max_size ({}..{}); change the group's limits in the configuration first",
                self.config.name, self.min_size, self.max_size
            )));
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
    ) -> Result<String, ControlError> {
        if self.members.len() as u32 >= self.max_size {
            return Err(ControlError::Refused(format!(
                "group {} is at max_size {}; raise it before adding VMs by hand",
                self.config.name, self.max_size
            )));
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
        // New user data (a changed user_data_file) makes the members launched with the old outdated.
        self.launch_spec = launch_spec(&config);
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
    ///
    /// The phases that walk every member yield to the runtime between them: in a group of thousands each
    /// takes milliseconds, and the Report streams sharing this worker thread should wait for one phase,
    /// not for the whole step.
    pub async fn step(&mut self, now: Millis) {
        self.now = now;
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
        if now - self.last_describe >= DESCRIBE_INTERVAL_MS {
            self.forget_lost_instances().await;
            self.last_describe = now;
        }
        self.observe(now).await;
        self.admit_healthy_members(now).await;
        tokio::task::yield_now().await;
        let input = GroupInput {
            now,
            min_size: self.min_size,
            max_size: self.max_size,
            desired: self.desired,
            last_scale_out: self.last_scale_out,
            last_scale_in: self.last_scale_in,
            suspended: self.suspended.has(Process::Decide),
            members: self.member_inputs(),
            recommendations: self.recommendations.clone(),
            changes: self.changes.clone(),
        };
        let mut evaluation = self.engine.evaluate(&input);
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
        let cause = self.apply_decision(&evaluation, now);
        self.deps
            .explanations
            .record(&self.config.name, evaluation, self.config.dry_run);
        if !self.config.dry_run {
            self.reconcile(now, &cause).await;
        }
        tokio::task::yield_now().await;
        self.save();
        tokio::task::yield_now().await;
        self.refresh_status().await;
    }

    /// The members as the engine sees them, each with what the latest observation saw of it.
    fn member_inputs(&self) -> Vec<MemberInput> {
        self.members
            .iter()
            .map(|m| {
                let observed = self.observed.get(&m.id);
                MemberInput {
                    id: m.id.clone(),
                    state: m.state,
                    launched: m.launched_at,
                    watched_since: Some(self.started_at),
                    in_service_since: m.in_service_since,
                    protected: m.protected,
                    unhealthy: m.unhealthy,
                    health: observed.map(|o| o.health).unwrap_or_default(),
                    means: observed.map(|o| o.means.clone()).unwrap_or_default(),
                    load: observed
                        .and_then(|o| o.latest.as_ref())
                        .and_then(|l| l.cpu_busy_percent),
                }
            })
            .collect()
    }

    /// The latest sample of `member_id`, if it has reported.
    fn latest(&self, member_id: &str) -> Option<&LatestSample> {
        self.observed.get(member_id).and_then(|o| o.latest.as_ref())
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
                let cause = format!("unhealthy: {}", change.why);
                self.leave_load_balancer(&member, &cause, (self.desired, self.desired))
                    .await;
            } else {
                self.members[index].replacing = false;
                if let Some(address) = member.address {
                    let result = self.deps.load_balancer.register(&member.registration(address)).await;
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
        if evaluation.reason.code == crate::engine::ReasonCode::Policy {
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

    /// Members whose instance died or stopped on its own leave the group, and the reconciler replaces them.
    /// The instance is terminated on the way out: a stopped or failed VM still holds its disk and quota, and
    /// could be started again outside the group (terminating one that is already gone changes nothing).
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
        const DESCRIBE: &str = "Cannot describe the group's instances.";
        let states = match self.deps.provider.describe(&ids).await {
            Ok(states) => {
                self.repeated.succeeded(&self.config.name, DESCRIBE);
                states
            }
            Err(e) => {
                self.repeated
                    .failed(&self.config.name, DESCRIBE, &e.to_string(), self.now);
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
    async fn observe(&mut self, now: Millis) {
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
        let ids: Vec<String> = self.members.iter().map(|m| m.id.clone()).collect();
        let observations = self.deps.ingest.observe(ids.clone(), windows).await;
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
    async fn admit_healthy_members(&mut self, now: Millis) {
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
            let Some(verdict) = self.hooks.check(&mut self.members[index], Transition::Launching, now) else {
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
                    (self.desired, self.desired),
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

    /// Launches or drains until the group has `desired` members (not counting those being replaced or
    /// leaving), at most `max_surge` launches in flight; replaced members go once enough healthy members
    /// serve; drained members are terminated.
    async fn reconcile(&mut self, now: Millis, cause: &str) {
        self.roll_refresh();
        if now >= self.next_launch_at && !self.suspended.has(Process::Launch) {
            let in_flight = self
                .members
                .iter()
                .filter(|m| m.state == MemberState::Pending && !m.replacing)
                .count() as u32;
            let wanted = self
                .desired
                .saturating_sub(self.live())
                .min(self.config.max_surge.saturating_sub(in_flight));
            if wanted > 0 && !self.launch(wanted, now, cause).await {
                self.next_launch_at = now + LAUNCH_RETRY_MS;
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
        let excess = self.live().saturating_sub(self.desired) as usize;
        if excess > 0 {
            let candidates: Vec<MemberInput> = self
                .member_inputs()
                .into_iter()
                .zip(&self.members)
                .filter(|(_, m)| !m.replacing && m.drain_until.is_none())
                .map(|(input, _)| input)
                .collect();
            let victims = self.engine.victims(&candidates, excess, now);
            if victims.len() < excess {
                tracing::warn!(group = %self.config.name, desired = self.desired, "Only protected members are left; not scaling in further.");
            }
            for victim in victims {
                let index = self
                    .members
                    .iter()
                    .position(|m| m.id == victim)
                    .expect("a victim is a member");
                self.start_drain(index, cause, now).await;
            }
        }
        self.finish_drains(now).await;
    }

    /// Launches `count` members at once: each one's intent is on disk first, then every launch call is in
    /// flight together (a scale-out of ten takes one call's time, not ten). False if any failed.
    async fn launch(&mut self, count: u32, now: Millis, cause: &str) -> bool {
        let mut calls = tokio::task::JoinSet::new();
        let mut launches = Vec::new();
        for _ in 0..count {
            let Some((intent, spec)) = self.prepare_launch(now).await else {
                break;
            };
            let index = launches.len();
            match spec {
                Ok((spec, user_data)) => {
                    let provider = self.deps.provider.clone();
                    calls.spawn(async move { (index, provider.launch(&spec).await) });
                    launches.push((intent, user_data, None));
                }
                // The user data could not be made: the cloud never hears of this launch.
                Err(e) => launches.push((intent, String::new(), Some(Err(e)))),
            }
        }
        let prepared = launches.len() as u32;
        while let Some(call) = calls.join_next().await {
            let (index, result) = call.expect("a launch call does not panic");
            launches[index].2 = Some(result);
        }
        let mut all_launched = prepared == count;
        for (intent, user_data, result) in launches {
            let result = result.expect("every launch call was awaited");
            all_launched &= result.is_ok();
            self.finish_launch(&intent, result, &user_data, now, cause).await;
        }
        all_launched
    }

    /// Takes the next member id and writes the launch's intent, registers the member with ingest and mints
    /// its token, then makes the launch's user data (with what it holds, for the activity); `None` if the
    /// store refuses writes (nothing is launched without its intent).
    #[allow(clippy::type_complexity)]
    async fn prepare_launch(&mut self, now: Millis) -> Option<(Intent, Result<(LaunchSpec, String), CloudError>)> {
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
            return None;
        }
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
        let spec = self.user_data(&agent_config).await.map(|(user_data, holds)| {
            let spec = LaunchSpec {
                group: self.config.name.clone(),
                member_id,
                cluster_id: self.deps.cluster_id.clone(),
                launch_id,
                service_port: self.config.member_port,
                user_data,
                agent_config,
            };
            (spec, holds)
        });
        Some((intent, spec))
    }

    /// One launch's user data: ebb's enrolment beside the operator's (the group's, else what the cloud's
    /// launch settings hold, such as an EC2 launch template's), and what it holds, said for the activity.
    async fn user_data(&self, agent_config: &str) -> Result<(Vec<u8>, String), CloudError> {
        let Some((format, limit)) = self.config.user_data_rules() else {
            // The local and fake providers hand the agent its configuration directly.
            return Ok((Vec::new(), String::new()));
        };
        let operator = self.operator_user_data().await?;
        let text = userdata::compose(format, agent_config, operator.as_ref().map(|(o, _)| o))
            .map_err(CloudError::Permanent)?;
        let bytes = userdata::fit(text, format, limit).map_err(CloudError::Permanent)?;
        Ok((bytes, user_data_holds(operator.as_ref())))
    }

    /// The operator's part of launches' user data and where it comes from: the group's `user_data`, else
    /// the provider's launch settings (an EC2 launch template's).
    async fn operator_user_data(&self) -> Result<Option<(OperatorUserData, String)>, CloudError> {
        if let Some(operator) = &self.config.operator_user_data {
            return Ok(Some((operator.clone(), "the group's user data".into())));
        }
        let Some(found) = self.deps.provider.template_user_data().await? else {
            return Ok(None);
        };
        let operator = OperatorUserData::parse(&found.bytes).map_err(|e| {
            CloudError::Permanent(format!(
                "the user data of {} {e}; ebb would have sent it beside its enrolment",
                found.source
            ))
        })?;
        Ok(Some((operator, format!("the user data of {}", found.source))))
    }

    /// Takes in the launched member (or forgets it, if the call failed), records the activity, and marks the
    /// intent done once the member is saved.
    async fn finish_launch(
        &mut self,
        intent: &Intent,
        result: Result<Instance, CloudError>,
        user_data: &str,
        now: Millis,
        cause: &str,
    ) {
        let member_id = &intent.member_id;
        let size = self.members.len() as u32;
        match &result {
            Ok(instance) => {
                let address = instance.address.map(|ip| SocketAddr::new(ip, self.config.member_port));
                let member = Member {
                    launch_spec: self.launch_spec.clone(),
                    ..Member::pending(member_id, &instance.id, address, now)
                };
                self.add_pending(member).await;
            }
            Err(_) => {
                self.deps.ingest.unregister(member_id).await;
                self.deps.authority.revoke_member(member_id);
            }
        }
        let detail = result
            .as_ref()
            .map(|i| match user_data {
                "" => format!("instance {}", i.id),
                holds => format!("instance {}, user data: {holds}", i.id),
            })
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
            member_id,
            (size, new_size),
        );
        // The member is saved before its intent is marked done.
        if self.save() {
            self.finish_intent(&intent.key, now, &outcome);
        }
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

    async fn load_balancer_connections(&self) -> Vec<(String, u64)> {
        self.deps.load_balancer.connections()
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
            at: self.now,
            from_capacity: capacity.0,
            to_capacity: capacity.1,
            member_id: member.to_string(),
        });
    }

    fn publish(&self, connections: Vec<(String, u64)>) {
        let connections: HashMap<String, u64> = connections.into_iter().collect();
        let members = self
            .members
            .iter()
            .map(|m| MemberStatus {
                member: m.clone(),
                latest: self.latest(&m.id).cloned(),
                lb_connections: connections.get(&m.id).copied().unwrap_or(0),
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
            policy_cpu: self.policy_cpu.clone(),
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

/// The version prefix of [`launch_spec`]'s fingerprints.
const LAUNCH_SPEC_VERSION: &str = "v2:";

/// A short fingerprint of what members are launched with: the provider table as the operator wrote it
/// (canonical) and the operator's user data; versioned (`v2:` and 12 hex digits).
fn launch_spec(config: &GroupConfig) -> String {
    let mut settings = config.provider_as_written.clone();
    if let Some(operator) = &config.operator_user_data {
        settings.push('\n');
        settings.push_str(operator.text());
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, settings.as_bytes());
    format!("{LAUNCH_SPEC_VERSION}{}", crate::pki::hex(&digest.as_ref()[..6]))
}

/// The fingerprint collectors before `v2` gave (of the provider settings' Debug text, which changes
/// whenever a setting is added); only to recognise, at start, members launched with today's settings.
fn launch_spec_v1(config: &GroupConfig) -> String {
    let mut settings = format!("{:?}", config.provider);
    if let Some(operator) = &config.operator_user_data {
        settings.push_str(operator.text());
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, settings.as_bytes());
    crate::pki::hex(&digest.as_ref()[..6])
}

/// Members an older collector stamped with the v1 fingerprint of the settings in force now are stamped
/// with today's: they are not outdated. Any other old fingerprint stays, and `refresh` replaces them.
fn migrate_launch_specs(config: &GroupConfig, members: &mut [Member], spec: &str) {
    let legacy = launch_spec_v1(config);
    for member in members {
        if !member.launch_spec.starts_with(LAUNCH_SPEC_VERSION) && member.launch_spec == legacy {
            member.launch_spec = spec.to_string();
        }
    }
}

/// What a launch's user data holds, in words.
fn user_data_holds(operator: Option<&(OperatorUserData, String)>) -> String {
    match operator {
        Some((operator, source)) => format!("ebb's enrolment and {source} ({})", operator.describe()),
        None => "ebb's enrolment only".to_string(),
    }
}

/// Warnings that would repeat every step while a cloud is unreachable: the first is logged, repeats of the
/// same text are counted and summarised once a minute, and the end of the run is logged.
#[derive(Debug, Default)]
struct RepeatedWarnings {
    runs: std::collections::HashMap<&'static str, WarningRun>,
}

#[derive(Debug)]
struct WarningRun {
    error: String,
    repeats: u64,
    said_at: Millis,
}

/// How often a warning that keeps repeating is said again, with its count.
const REPEAT_SUMMARY_MS: Millis = 60_000;

impl RepeatedWarnings {
    /// `what` failed with `error`; true if it was logged now.
    fn failed(&mut self, group: &str, what: &'static str, error: &str, now: Millis) -> bool {
        match self.runs.get_mut(what) {
            Some(run) if run.error == error => {
                run.repeats += 1;
                if now - run.said_at < REPEAT_SUMMARY_MS {
                    return false;
                }
                tracing::warn!(
                    group,
                    error,
                    repeats = run.repeats,
                    "{what} (the same failure, {} times now)",
                    run.repeats + 1
                );
                run.said_at = now;
            }
            _ => {
                tracing::warn!(group, error, "{what}");
                let run = WarningRun {
                    error: error.to_string(),
                    repeats: 0,
                    said_at: now,
                };
                self.runs.insert(what, run);
            }
        }
        true
    }

    /// `what` worked; true if that ends a run of failures worth saying.
    fn succeeded(&mut self, group: &str, what: &'static str) -> bool {
        let Some(run) = self.runs.remove(what) else {
            return false;
        };
        tracing::info!(group, failures = run.repeats + 1, "{what}: works again");
        true
    }
}

mod leaving;
mod recovery;
#[cfg(test)]
mod tests;
