//! ebb's own group in the simulation: each step is the live controller's step (`reconcile::step`) with
//! the cloud, the load balancer and the agents simulated — the same engine plan, the same memory between
//! evaluations, the same scheduled actions, launches within `max_surge` and retried after a failure,
//! members admitted once their agent reports them healthy, drained and terminated as victims or
//! replaced members.

use super::fleet::{Fleet, SETTLED_MS};
use crate::config::GroupConfig;
use crate::engine::forecast::Predictor;
use crate::engine::schedule::ScheduledAction;
use crate::engine::{
    Capacity, Engine, GroupInput, HealthRun, Means, MemberInput, MemberState, Metric, Millis, Plan, Rollout,
    ScalingMemory,
};
use crate::reconcile::LAUNCH_RETRY_MS;

/// A member of the simulated group: the controller's view of it, and its instance in the fleet.
#[derive(Debug, Clone)]
struct Member {
    id: String,
    instance: u64,
    state: MemberState,
    launched: Millis,
    in_service_since: Option<Millis>,
    unhealthy: bool,
    replacing: bool,
}

pub struct EbbGroup {
    engine: Engine,
    capacity: Capacity,
    memory: ScalingMemory,
    schedules: Vec<ScheduledAction>,
    schedules_checked: Option<Millis>,
    predictor: Predictor,
    max_surge: u32,
    next_launch_at: Millis,
    started_at: Millis,
    launches: u64,
    members: Vec<Member>,
    pub fleet: Fleet,
}

impl EbbGroup {
    /// The group as configured, its members the instances `fleet` starts with.
    pub fn new(config: &GroupConfig, fleet: Fleet) -> Result<Self, String> {
        let engine = config.engine();
        if let Some(policy) = engine.policies.iter().find(|p| !Fleet::models(p.metric())) {
            return Err(format!(
                "policy `{}` scales on {}, which the simulation does not model (it models cpu, load and \
                 health_ratio)",
                policy.name(),
                policy.metric().name()
            ));
        }
        let predictor = Predictor::new(&engine);
        let members: Vec<Member> = fleet
            .instances
            .iter()
            .enumerate()
            .map(|(n, instance)| Member {
                id: format!("m-{}", n + 1),
                instance: instance.id,
                state: MemberState::InService,
                launched: instance.launched,
                in_service_since: instance.serving_since,
                unhealthy: false,
                replacing: false,
            })
            .collect();
        Ok(EbbGroup {
            engine,
            capacity: Capacity {
                min_size: config.min_size,
                max_size: config.max_size,
                desired: fleet.desired,
            },
            memory: ScalingMemory::default(),
            predictor,
            schedules: config.scheduled_actions(),
            schedules_checked: None,
            max_surge: config.max_surge,
            next_launch_at: fleet.start,
            started_at: fleet.start - SETTLED_MS,
            launches: members.len() as u64,
            members,
            fleet,
        })
    }

    /// One evaluation at `now`, after the fleet measured this step.
    pub fn step(&mut self, now: Millis) {
        self.run_schedules(now);
        self.admit_healthy_members(now);
        let input = self.group_input(now);
        let Plan {
            evaluation,
            convergence,
        } = self.engine.plan(&input);
        for change in &evaluation.health {
            if let Some(member) = self.members.iter_mut().find(|m| m.id == change.member) {
                member.unhealthy = change.unhealthy;
            }
        }
        self.memory.remember(&evaluation, true);
        self.capacity.desired = evaluation.desired;
        self.fleet.set_desired(evaluation.desired, now);
        for member in &mut self.members {
            member.replacing = convergence.replacing.contains(&member.id);
        }
        if convergence.launch > 0 && !self.launch(convergence.launch, now) {
            self.next_launch_at = now + LAUNCH_RETRY_MS;
        }
        for id in convergence.retire.iter().chain(&convergence.victims) {
            self.leave(id, now);
        }
    }

    fn run_schedules(&mut self, now: Millis) {
        let Some(checked) = self.schedules_checked.replace(now) else {
            return;
        };
        for action in &self.schedules {
            if action.cron.latest_between(checked, now, &action.zone).is_some() {
                self.capacity.schedule(action);
            }
        }
    }

    /// Pending members whose agent is up (booted) and healthy go behind the load balancer.
    fn admit_healthy_members(&mut self, now: Millis) {
        for member in &mut self.members {
            if member.state != MemberState::Pending || member.unhealthy {
                continue;
            }
            let Some(instance) = self.fleet.instance_mut(member.instance) else {
                continue;
            };
            if instance.ready <= now {
                self.predictor.boot_measured(now - member.launched);
                member.state = MemberState::InService;
                member.in_service_since = Some(now);
                instance.serving_since = Some(now);
            }
        }
    }

    fn group_input(&mut self, now: Millis) -> GroupInput {
        let windows = self.engine.windows(now);
        let members: Vec<MemberInput> = self
            .members
            .iter()
            .map(|member| {
                let instance = self.fleet.instance(member.instance);
                let booted = instance.is_some_and(|i| i.ready <= now);
                let means = windows
                    .iter()
                    .map(|policy| {
                        policy
                            .windows
                            .iter()
                            .map(|w| instance.and_then(|i| self.fleet.instance_mean(policy.metric, i, w.start, w.end)))
                            .collect()
                    })
                    .collect();
                let serving = instance.is_some_and(|i| i.serving());
                MemberInput {
                    id: member.id.clone(),
                    state: member.state,
                    launched: member.launched,
                    watched_since: Some(self.started_at),
                    in_service_since: member.in_service_since,
                    protected: false,
                    unhealthy: member.unhealthy,
                    // The agent reports every second from boot, and its health check passes.
                    health: if booted {
                        HealthRun {
                            passes: 1_000,
                            failures: 0,
                            last_heard: Some(now),
                        }
                    } else {
                        HealthRun::default()
                    },
                    means: Means::new(means),
                    load: serving.then(|| self.fleet.latest(Metric::Cpu)).flatten(),
                    replacing: member.replacing,
                    leaving: false,
                    outdated: false,
                }
            })
            .collect();
        let rollout = Rollout {
            max_surge: self.max_surge,
            launch: now >= self.next_launch_at,
            ..Rollout::default()
        };
        self.predictor.observe(&self.engine, now, &members);
        let predictions = self.predictor.predictions();
        GroupInput::new(now, &self.capacity, &self.memory, false, members, predictions, rollout)
    }

    /// Launches `count` members at once; `false` if any launch call failed.
    fn launch(&mut self, count: u32, now: Millis) -> bool {
        let mut all = true;
        for _ in 0..count {
            self.launches += 1;
            let Some(instance) = self.fleet.launch(now) else {
                all = false;
                continue;
            };
            self.members.push(Member {
                id: format!("m-{}", self.launches),
                instance,
                state: MemberState::Pending,
                launched: now,
                in_service_since: None,
                unhealthy: false,
                replacing: false,
            });
        }
        all
    }

    /// Out of the load balancer now; its agent reports drained at once, so it is terminated before the
    /// next step.
    fn leave(&mut self, id: &str, now: Millis) {
        if let Some(index) = self.members.iter().position(|m| m.id == id) {
            let member = self.members.remove(index);
            self.fleet.leave(member.instance, now);
        }
    }
}
