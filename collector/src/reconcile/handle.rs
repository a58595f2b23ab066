//! The controller's protocol: the commands operators and enrolling VMs send a group, the handle that
//! sends them, why one is refused (`ControlError`, which the gRPC edge maps to a status code), and how the
//! controller carries each out.

use std::net::SocketAddr;

use tokio::sync::{mpsc, oneshot, watch};

use super::launch::launch_spec;
use super::{GroupController, GroupStatus};
use crate::activity::ActivityKind;
use crate::config::GroupConfig;
use crate::engine::Millis;
use crate::hooks::Hooks;
use crate::model::Member;

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
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) status: watch::Receiver<GroupStatus>,
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

impl GroupController {
    /// Handles `first`; if it is an enrolling VM's join, the joins queued behind it as well, together. Each
    /// answer waits for the group's status to be published, a copy of every member: one copy per join made
    /// a boot storm into a group of thousands cost thousands times thousands.
    pub(super) async fn handle_queued(&mut self, first: Command, commands: &mut mpsc::Receiver<Command>) {
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
            self.join_all(joins, self.deps.services.clock.now_ms()).await;
            self.save();
        }
        if let Some(command) = next {
            self.handle(command, self.deps.services.clock.now_ms()).await;
        }
    }

    /// Joins each VM, then publishes the new state once and answers them all.
    pub(super) async fn join_all(&mut self, joins: Vec<Join>, now: Millis) {
        self.clocks.now = now;
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
    pub(super) async fn handle(&mut self, command: Command, now: Millis) {
        self.clocks.now = now;
        self.carry_out(command, now).await;
        self.save();
    }

    pub(super) async fn carry_out(&mut self, command: Command, now: Millis) {
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
                    self.deps.services.ingest.unregister(&member.id).await;
                }
                self.refresh_status().await;
            }
            Command::Refresh {
                min_healthy_percent,
                reply,
            } => {
                let outdated = self.outdated() as u32;
                self.refresh = Some(min_healthy_percent.min(100));
                self.record(
                    ActivityKind::Refresh,
                    format!("an operator started an instance refresh keeping {min_healthy_percent}% healthy"),
                    Ok(format!(
                        "{outdated} member(s) launched from an older launch specification"
                    )),
                    "",
                    (self.capacity.desired, self.capacity.desired),
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
                        (self.capacity.desired, self.capacity.desired),
                    );
                }
                let _ = reply.send(self.suspended);
            }
        }
    }

    pub(super) fn set_protected(&mut self, member_id: &str, protected: bool) -> Result<(), ControlError> {
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
            (self.capacity.desired, self.capacity.desired),
        );
        Ok(())
    }

    pub(super) async fn set_desired(&mut self, desired: u32, now: Millis) -> Result<(), ControlError> {
        if !(self.capacity.min_size..=self.capacity.max_size).contains(&desired) {
            return Err(ControlError::Refused(format!(
                "desired capacity {desired} is outside group {}'s min_size..max_size ({}..{}); change the group's limits in the configuration first",
                self.config.name, self.capacity.min_size, self.capacity.max_size
            )));
        }
        let from = self.capacity.desired;
        self.record(
            ActivityKind::SetDesired,
            format!("an operator set desired capacity {from} → {desired}"),
            Ok(String::new()),
            "",
            (from, desired),
        );
        self.capacity.desired = desired;
        // Policies wait their cooldowns after an operator's change too.
        (self.memory.last_scale_out, self.memory.last_scale_in) = (Some(now), Some(now));
        let input = self.group_input(now);
        let plan = self.engine.converge(&input);
        self.converge(plan, now, "an operator set desired capacity").await;
        Ok(())
    }

    pub(super) async fn join_external(
        &mut self,
        facts: ebb_proto::v1::InstanceFacts,
        protected: bool,
        now: Millis,
    ) -> Result<String, ControlError> {
        if self.members.len() as u32 >= self.capacity.max_size {
            return Err(ControlError::Refused(format!(
                "group {} is at max_size {}; raise it before adding VMs by hand",
                self.config.name, self.capacity.max_size
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
        let from = self.capacity.desired;
        self.capacity.desired = self
            .capacity
            .desired
            .max(self.live())
            .clamp(self.capacity.min_size, self.capacity.max_size);
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
            (from, self.capacity.desired),
        );
        Ok(member_id)
    }

    /// New limits, policies, schedules and health rules at once; members stay as they are, their agents
    /// get the new interval and health check.
    pub(super) async fn reconfigure(&mut self, config: GroupConfig) {
        self.engine = config.engine();
        self.predictor.follow(&self.engine);
        self.schedules = config.scheduled_actions();
        self.hooks = Hooks::new(&config.name, config.lifecycle_hooks.clone());
        (self.capacity.min_size, self.capacity.max_size) = (config.min_size, config.max_size);
        let from = self.capacity.desired;
        self.capacity.desired = self
            .capacity
            .desired
            .clamp(self.capacity.min_size, self.capacity.max_size);
        // New user data (a changed user_data_file) makes the members launched with the old outdated.
        self.launch_spec = launch_spec(&config);
        self.config = config;
        for member in &self.members {
            let settings = self.agent_settings(member);
            self.deps.services.ingest.register(&member.id, settings).await;
        }
        self.record(
            ActivityKind::Reconfigure,
            "the configuration was reloaded".into(),
            Ok(format!(
                "min_size..max_size {}..{}",
                self.capacity.min_size, self.capacity.max_size
            )),
            "",
            (from, self.capacity.desired),
        );
    }
}
