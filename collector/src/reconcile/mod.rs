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

use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;

use crate::activity::ActivityLog;
use crate::clock::Clock;
use crate::config::GroupConfig;
pub use crate::engine::MemberState;
use crate::engine::forecast::Predictor;
use crate::engine::schedule::ScheduledAction;
use crate::engine::{Capacity, Engine, Millis, ScalingMemory};
use crate::explain::ExplanationLog;
use crate::hooks::Hooks;
use crate::ingest::{IngestHandle, Observation};
use crate::lb::LoadBalancer;
use crate::metrics::Metrics;
pub use crate::model::Member;
use crate::pki::Authority;
use crate::providers::Provider;
use crate::store::{GroupRecord, Store};
use launch::{launch_spec, migrate_launch_specs};
use persist::Saved;
use status::RepeatedWarnings;

/// How often a group is evaluated.
pub const TICK: Duration = Duration::from_secs(1);
/// The window behind the status's CPU average.
const STATUS_WINDOW_MS: Millis = 10_000;
/// After a failed launch, the next attempt waits this long.
pub(crate) const LAUNCH_RETRY_MS: Millis = 10_000;
/// How often the cloud is asked about the group's instances between inventories, to notice one that died.
/// Not every tick: clouds rate-limit these calls per account (EC2's describe actions, CloudStack's
/// management server, Nova), and a member whose instance died also stops reporting, which the health
/// judgement sees first.
const DESCRIBE_INTERVAL_MS: Millis = 10_000;

impl Member {
    /// What its lifecycle hooks are given, beside where they stand (kept with the member), to update.
    fn hook_state(&mut self) -> (crate::hooks::Subject<'_>, &mut Option<crate::hooks::HookWait>) {
        let Member {
            id,
            instance_id,
            address,
            hook,
            ..
        } = self;
        let subject = crate::hooks::Subject {
            member_id: id,
            instance_id,
            address: *address,
        };
        (subject, hook)
    }

    /// How a load balancer is told of this member, serving at `address`.
    pub fn registration(&self, address: SocketAddr) -> crate::lb::Registration<'_> {
        crate::lb::Registration {
            member_id: &self.id,
            instance_id: &self.instance_id,
            address,
        }
    }
}

/// Everything a controller needs from the rest of the collector.
pub struct Dependencies {
    pub provider: Arc<dyn Provider>,
    pub load_balancer: Arc<dyn LoadBalancer>,
    pub services: Services,
    /// The URL agents use to reach the collector.
    pub collector_url: String,
}

/// The collector's services every group's controller uses.
#[derive(Clone)]
pub struct Services {
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
}

pub struct GroupController {
    config: GroupConfig,
    engine: Engine,
    deps: Dependencies,
    capacity: Capacity,
    memory: ScalingMemory,
    clocks: Clocks,
    members: Vec<Member>,
    /// What the latest observation saw of each member, by member id: never by position, so a member
    /// that leaves mid-step cannot hand its figures to another.
    observed: HashMap<String, Observation>,
    /// Members launched so far: the next member id's number.
    launches: u64,
    schedules: Vec<ScheduledAction>,
    /// Predictive policies' load history and forecasts.
    predictor: Predictor,
    suspended: Suspended,
    hooks: Hooks,
    /// The fingerprint of the provider settings new members are launched with.
    launch_spec: String,
    /// An instance refresh under way: the healthy percentage of desired it keeps.
    refresh: Option<u32>,
    /// Instances tagged for this group that no member owns: instance id → (member id, first seen).
    orphans: HashMap<String, (String, Millis)>,
    /// What the store last accepted.
    saved: Option<Saved>,
    /// The last write failed: decisions pause until one succeeds.
    store_failing: bool,
    /// The provider's instances have been compared with the store since start.
    recovered: bool,
    /// Settings already warned about as shorter than the group's boot time.
    warned: HashSet<&'static str>,
    /// Cloud calls failing again and again, said once and then summarised.
    repeated: RepeatedWarnings,
    last_evaluation: String,
    policy_cpu: Option<PolicyFigure>,
    cpu_avg: Option<f64>,
    status: watch::Sender<GroupStatus>,
}

/// The controller's times, all read from its `Clock` at the start of a step or command.
#[derive(Debug, Default)]
struct Clocks {
    /// The time of the step or command being carried out: activities, intents and warnings use it.
    now: Millis,
    /// When this controller started: members restored from the store are judged from then.
    started_at: Millis,
    /// After a failed launch, none is tried before this.
    next_launch_at: Millis,
    /// Scheduled actions due up to this time have run.
    schedules_checked: Option<Millis>,
    /// When the provider's instances were last listed.
    last_inventory: Millis,
    /// When the cloud was last asked about the group's instances (see [`DESCRIBE_INTERVAL_MS`]).
    last_describe: Millis,
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
        let predictor = Predictor::new(&engine);
        let schedules = config.scheduled_actions();
        let (min_size, max_size) = (config.min_size, config.max_size);
        let hooks = Hooks::new(&config.name, config.lifecycle_hooks.clone());
        let spec = launch_spec(&config);
        let (saved, mut members) = deps.services.store.load_group(&config.name)?.unwrap_or_else(|| {
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
        let started_at = deps.services.clock.now_ms();
        let (status, status_rx) = watch::channel(GroupStatus::default());
        let (commands, commands_rx) = mpsc::channel(16);
        let mut controller = Self {
            config,
            engine,
            deps,
            capacity: Capacity {
                min_size,
                max_size,
                desired: saved.desired.clamp(min_size, max_size),
            },
            memory: ScalingMemory {
                last_scale_out: saved.last_scale_out,
                last_scale_in: saved.last_scale_in,
                ..ScalingMemory::default()
            },
            clocks: Clocks {
                now: started_at,
                started_at,
                ..Clocks::default()
            },
            members,
            observed: HashMap::new(),
            launches: saved.launches,
            schedules,
            predictor,
            suspended: Suspended(saved.suspended),
            hooks,
            launch_spec: spec,
            refresh: None,
            orphans: HashMap::new(),
            saved: None,
            store_failing: false,
            recovered: false,
            warned: HashSet::new(),
            repeated: RepeatedWarnings::default(),
            last_evaluation: "not evaluated yet".into(),
            policy_cpu: None,
            cpu_avg: None,
            status,
        };
        for member in &controller.members {
            let settings = controller.agent_settings(member);
            controller.deps.services.ingest.register(&member.id, settings).await;
        }
        controller.save();
        controller.publish(Vec::new());
        let handle = GroupHandle {
            commands,
            status: status_rx,
        };
        Ok((controller, handle, commands_rx))
    }

    /// Runs until `stop` fires, then closes the provider.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.step(self.deps.services.clock.now_ms()).await,
                Some(command) = commands.recv() => self.handle_queued(command, &mut commands).await,
                _ = stop.changed() => break,
            }
        }
        self.deps.provider.close().await;
    }
}

mod handle;
mod launch;
mod leaving;
mod persist;
mod recovery;
mod status;
mod step;
#[cfg(test)]
mod tests;

pub use handle::{Command, ControlError, GroupHandle, Process, Suspended};
pub use status::{GroupStatus, MemberStatus, PolicyFigure};
