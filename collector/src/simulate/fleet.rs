//! The simulated cloud, and what its instances would measure: every policy under comparison scales a
//! fleet of its own, on the same demand, with the same boot delay and the same launch failures.
//!
//! Load is spread evenly over the instances serving (in the load balancer), each of `member_capacity`:
//! at demand `d` on `n` serving instances each runs at `d / (n × member_capacity)` of its capacity, CPU
//! saturating at 100 % and load average (per CPU) growing past 1 as requests queue. Instances boot for
//! `boot_secs` (± `jitter`), are billed from launch to termination, and a launch call fails at
//! `failure_rate`.

use rand_core::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::engine::{Metric, Millis};

/// The simulated cloud's behaviour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CloudModel {
    /// From the launch call to the instance serving (booted, agent up, health check passing).
    pub boot_secs: f64,
    /// Each boot takes `boot_secs × (1 ± jitter)`, uniformly.
    pub jitter: f64,
    /// The share of launch calls that fail.
    pub failure_rate: f64,
    /// What one instance serves, in the trace's unit.
    pub member_capacity: f64,
    /// CPUs per instance: load averages are per instance, and `load1 = 2` is a saturated 2-CPU VM.
    pub member_cpus: f64,
    /// Seeds the boot jitter and launch failures; the same seed gives the same run.
    pub seed: u64,
}

/// The trace's demand at one step and the figures every policy is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Accounts {
    /// Time with demand above the serving instances' capacity.
    pub under_provisioned_ms: Millis,
    /// Demand beyond capacity, summed over time (demand × ms).
    pub unserved: f64,
    /// All demand, summed over time.
    pub demand: f64,
    /// Instances billed (launch to termination), summed over time (instance × ms).
    pub billed_ms: f64,
    /// The largest shortfall, as a share of the demand at that moment (percent).
    pub worst_shortfall_percent: f64,
    /// Changes of desired capacity.
    pub actions: u32,
    /// Changes of direction less than ten minutes after the previous change.
    pub flaps: u32,
}

impl Accounts {
    /// One step of `step_ms`: `demand` on `capacity` (serving instances × their capacity), with
    /// `billed` instances running.
    pub fn add_step(&mut self, demand: f64, capacity: f64, billed: u32, step_ms: Millis) {
        let dt = step_ms as f64;
        self.demand += demand * dt;
        self.billed_ms += f64::from(billed) * dt;
        // A hair of tolerance: demand exactly at capacity is served.
        if demand > capacity * (1.0 + 1e-9) {
            self.under_provisioned_ms += step_ms;
            self.unserved += (demand - capacity) * dt;
            let shortfall = (demand - capacity) / demand * 100.0;
            self.worst_shortfall_percent = self.worst_shortfall_percent.max(shortfall);
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: u64,
    pub launched: Millis,
    /// Booted, its agent reporting.
    pub ready: Millis,
    /// Put in the load balancer at this step (after its measurement): serving from the next one.
    pub serving_since: Option<Millis>,
    /// Taken out of the load balancer at this step (after its measurement), terminated before the next.
    pub leaving_since: Option<Millis>,
}

impl Instance {
    pub fn serving(&self) -> bool {
        self.serving_since.is_some() && self.leaving_since.is_none()
    }
}

/// Uniform in [0, 1), from a seeded generator: simulations must repeat exactly.
fn uniform(random: &mut Pcg64Mcg) -> f64 {
    (random.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// How long a fleet's starting instances have served when a simulation starts.
pub const SETTLED_MS: Millis = 3_600_000;

/// Load averages decay over 1, 5 and 15 minutes, as the kernel's do.
const LOAD_MINUTES: [f64; 3] = [1.0, 5.0, 15.0];
/// Past this many times its capacity, an instance's queue is not modelled further.
const MAX_OVERLOAD: f64 = 20.0;

/// One policy's instances and the measurements of each step so far.
pub struct Fleet {
    model: CloudModel,
    random: Pcg64Mcg,
    pub start: Millis,
    pub step_ms: Millis,
    pub instances: Vec<Instance>,
    next_id: u64,
    /// The group's desired capacity as its policy last set it.
    pub desired: u32,
    last_change: Option<(Millis, bool)>,
    /// Per step: the serving instances' CPU (percent) and load averages, as prefix sums.
    cpu: Vec<f64>,
    load: [Vec<f64>; 3],
    current_load: [f64; 3],
    /// Per step: instances serving.
    pub serving: Vec<u32>,
    pub accounts: Accounts,
}

impl Fleet {
    pub fn new(model: CloudModel, start: Millis, step_ms: Millis, desired: u32) -> Self {
        Fleet {
            model,
            random: Pcg64Mcg::seed_from_u64(model.seed),
            start,
            step_ms,
            instances: Vec::new(),
            next_id: 0,
            desired,
            last_change: None,
            cpu: vec![0.0],
            load: [vec![0.0], vec![0.0], vec![0.0]],
            current_load: [0.0; 3],
            serving: Vec::new(),
            accounts: Accounts::default(),
        }
    }

    /// Launches one instance; `None` if the cloud refused the call.
    pub fn launch(&mut self, now: Millis) -> Option<u64> {
        if uniform(&mut self.random) < self.model.failure_rate {
            return None;
        }
        let spread = self.model.jitter * (2.0 * uniform(&mut self.random) - 1.0);
        let boot_ms = (self.model.boot_secs * (1.0 + spread) * 1000.0).max(0.0) as Millis;
        self.next_id += 1;
        self.instances.push(Instance {
            id: self.next_id,
            launched: now,
            ready: now + boot_ms,
            serving_since: None,
            leaving_since: None,
        });
        Some(self.next_id)
    }

    /// A fleet whose group starts with `initial` instances that have served for [`SETTLED_MS`] (a
    /// simulation judges scaling, not the first boot).
    pub fn settled(model: CloudModel, start: Millis, step_ms: Millis, initial: u32) -> Self {
        let mut fleet = Fleet::new(model, start, step_ms, initial);
        for _ in 0..initial {
            fleet.next_id += 1;
            let since = start - SETTLED_MS;
            fleet.instances.push(Instance {
                id: fleet.next_id,
                launched: since,
                ready: since,
                serving_since: Some(since),
                leaving_since: None,
            });
        }
        fleet
    }

    /// Instance `id`, if it runs (instances are kept in launch order, so by id).
    pub fn instance(&self, id: u64) -> Option<&Instance> {
        let index = self.instances.binary_search_by_key(&id, |i| i.id).ok()?;
        Some(&self.instances[index])
    }

    pub fn instance_mut(&mut self, id: u64) -> Option<&mut Instance> {
        let index = self.instances.binary_search_by_key(&id, |i| i.id).ok()?;
        Some(&mut self.instances[index])
    }

    /// Takes instance `id` out of the load balancer; it is terminated at the next step.
    pub fn leave(&mut self, id: u64, now: Millis) {
        if let Some(instance) = self.instance_mut(id) {
            instance.leaving_since.get_or_insert(now);
        }
    }

    /// Records a change of desired capacity (for actions and flapping).
    pub fn set_desired(&mut self, desired: u32, now: Millis) {
        if desired == self.desired {
            return;
        }
        let out = desired > self.desired;
        self.accounts.actions += 1;
        if let Some((at, was_out)) = self.last_change
            && was_out != out
            && now - at < 600_000
        {
            self.accounts.flaps += 1;
        }
        self.last_change = Some((now, out));
        self.desired = desired;
    }

    /// The step at `now`: instances that left are terminated, then the serving ones take `demand`; what
    /// they measure is recorded and the step's figures are counted.
    pub fn measure(&mut self, now: Millis, demand: f64) {
        self.instances
            .retain(|i| i.leaving_since.is_none_or(|since| since >= now));
        let serving = self.instances.iter().filter(|i| i.serving()).count() as u32;
        let capacity = f64::from(serving) * self.model.member_capacity;
        let utilisation = if capacity > 0.0 {
            demand / capacity
        } else if demand > 0.0 {
            MAX_OVERLOAD
        } else {
            0.0
        };
        let cpu = (utilisation * 100.0).min(100.0);
        self.cpu.push(self.cpu.last().copied().unwrap_or(0.0) + cpu);
        let per_cpu = utilisation.min(MAX_OVERLOAD);
        if self.serving.is_empty() {
            // The group has been running like this for a while: its load averages have settled.
            self.current_load = [per_cpu; 3];
        }
        for (k, minutes) in LOAD_MINUTES.iter().enumerate() {
            let keep = (-(self.step_ms as f64) / (minutes * 60_000.0)).exp();
            self.current_load[k] = self.current_load[k] * keep + per_cpu * (1.0 - keep);
            let sum = self.load[k].last().copied().unwrap_or(0.0) + self.current_load[k];
            self.load[k].push(sum);
        }
        let billed = self.instances.len() as u32;
        self.serving.push(serving);
        self.accounts.add_step(demand, capacity, billed, self.step_ms);
    }

    /// Steps measured so far.
    pub fn steps(&self) -> usize {
        self.serving.len()
    }

    /// The index of the latest step at or before `at`, if any.
    fn step_at(&self, at: Millis) -> Option<usize> {
        if at < self.start {
            return None;
        }
        Some((((at - self.start) / self.step_ms) as usize).min(self.steps().checked_sub(1)?))
    }

    /// The sum of `metric` (per serving instance) over steps `from..to`; `None` for a metric the
    /// simulation does not model.
    fn sum(&self, metric: Metric, from: usize, to: usize) -> Option<f64> {
        let load = |k: usize, cpus: f64| (self.load[k][to] - self.load[k][from]) * cpus;
        let cpus = self.model.member_cpus;
        Some(match metric {
            Metric::Cpu => self.cpu[to] - self.cpu[from],
            Metric::Load1 => load(0, cpus),
            Metric::Load5 => load(1, cpus),
            Metric::Load15 => load(2, cpus),
            Metric::Load1PerCpu => load(0, 1.0),
            Metric::Load5PerCpu => load(1, 1.0),
            Metric::Load15PerCpu => load(2, 1.0),
            Metric::HealthRatio => 100.0 * (to - from) as f64,
            Metric::Mem | Metric::Custom { .. } => return None,
        })
    }

    /// Whether the simulation can say what `metric` measures.
    pub fn models(metric: Metric) -> bool {
        !matches!(metric, Metric::Mem | Metric::Custom { .. })
    }

    /// The mean of `metric` as a serving instance measured it over steps after `start` up to `end`.
    pub fn group_mean(&self, metric: Metric, start: Millis, end: Millis) -> Option<f64> {
        let to = self.step_at(end)? + 1;
        let from = self.step_at(start).map_or(0, |k| k + 1);
        (to > from).then(|| self.sum(metric, from, to).map(|sum| sum / (to - from) as f64))?
    }

    /// The latest value of `metric` on a serving instance.
    pub fn latest(&self, metric: Metric) -> Option<f64> {
        let to = self.steps();
        self.sum(metric, to.checked_sub(1)?, to)
    }

    /// The mean of `metric` as `instance` measured it over steps after `start` up to `end`: what the group
    /// measured while it served, nothing (idle) while it was up but out of the load balancer, and no
    /// sample before it booted.
    pub fn instance_mean(&self, metric: Metric, instance: &Instance, start: Millis, end: Millis) -> Option<f64> {
        let to = self.step_at(end)? + 1;
        let from = self.step_at(start.max(instance.ready - 1)).map_or(0, |k| k + 1);
        if to <= from {
            return None;
        }
        // Admitted or leaving at a step, after that step's measurement: it serves from the next step on,
        // up to and including the step it left at.
        let after = |at: Millis| self.step_at(at).map_or(0, |k| k + 1);
        let served = instance.serving_since.map_or(0.0, |since| {
            let a = after(since).max(from);
            let b = instance.leaving_since.map_or(to, after).min(to);
            if b > a {
                self.sum(metric, a, b).unwrap_or(0.0)
            } else {
                0.0
            }
        });
        Fleet::models(metric).then(|| served / (to - from) as f64)
    }
}

/// A cloud for tests: boots in 60 s, never fails, members of capacity 10 with 2 CPUs.
#[cfg(test)]
pub fn test_model() -> CloudModel {
    CloudModel {
        boot_secs: 60.0,
        jitter: 0.0,
        failure_rate: 0.0,
        member_capacity: 10.0,
        member_cpus: 2.0,
        seed: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> CloudModel {
        test_model()
    }

    #[test]
    fn demand_spreads_over_serving_instances_and_shortfall_is_counted() {
        let mut fleet = Fleet::new(model(), 0, 10_000, 2);
        let a = fleet.launch(0).unwrap();
        fleet.launch(0).unwrap();
        assert_eq!(fleet.instances[0].ready, 60_000);
        for instance in &mut fleet.instances {
            instance.serving_since = Some(-1);
        }
        fleet.measure(0, 10.0); // 2 × 10 serve 10: 50 %
        fleet.measure(10_000, 30.0); // 30 on 20: 100 %, 10 unserved
        assert_eq!(fleet.latest(Metric::Cpu), Some(100.0));
        assert_eq!(fleet.group_mean(Metric::Cpu, -1, 10_000), Some(75.0));
        let accounts = fleet.accounts;
        assert_eq!(accounts.under_provisioned_ms, 10_000);
        assert_eq!(accounts.unserved, 10.0 * 10_000.0);
        assert!((accounts.worst_shortfall_percent - 100.0 / 3.0).abs() < 1e-9);
        assert_eq!(accounts.billed_ms, 2.0 * 20_000.0);
        // One leaves: out of the load balancer now, terminated at the next step.
        fleet.leave(a, 10_000);
        fleet.measure(20_000, 5.0);
        assert_eq!(fleet.serving[2], 1);
        assert_eq!(fleet.accounts.billed_ms, 2.0 * 20_000.0 + 10_000.0);
        assert_eq!(fleet.latest(Metric::Cpu), Some(50.0));
    }

    #[test]
    fn an_instance_measures_nothing_before_it_boots_and_idles_out_of_the_load_balancer() {
        let mut fleet = Fleet::new(model(), 0, 10_000, 1);
        let serving = fleet.launch(0).unwrap();
        fleet.instances[0].serving_since = Some(-1);
        fleet.launch(0).unwrap();
        let late = fleet.instances[1].clone();
        for k in 0..12 {
            fleet.measure(k * 10_000, 8.0); // one instance serves 8 of 10: 80 %
        }
        let first = fleet.instances.iter().find(|i| i.id == serving).unwrap().clone();
        assert_eq!(fleet.instance_mean(Metric::Cpu, &first, 50_000, 110_000), Some(80.0));
        // Booted at 60 s, never in the load balancer: idle from then, nothing before.
        assert_eq!(fleet.instance_mean(Metric::Cpu, &late, 0, 50_000), None);
        assert_eq!(fleet.instance_mean(Metric::Cpu, &late, 50_000, 110_000), Some(0.0));
        assert_eq!(fleet.instance_mean(Metric::Mem, &first, 50_000, 110_000), None);
    }

    #[test]
    fn load_averages_follow_utilisation_with_the_kernels_time_constants() {
        let mut fleet = Fleet::new(model(), 0, 1_000, 1);
        fleet.launch(0).unwrap();
        fleet.instances[0].serving_since = Some(-1);
        fleet.measure(0, 0.0); // idle
        for k in 1..=60 {
            fleet.measure(k * 1_000, 10.0); // saturated: one per CPU
        }
        let load1 = fleet.latest(Metric::Load1).unwrap();
        // After one time constant, 1 - 1/e of the way to 2 (two CPUs busy).
        assert!((load1 - 2.0 * (1.0 - (-1.0f64).exp())).abs() < 0.02, "{load1}");
        assert!(fleet.latest(Metric::Load15).unwrap() < fleet.latest(Metric::Load5).unwrap());
    }

    #[test]
    fn launches_fail_and_jitter_as_seeded_and_repeat_exactly() {
        let run = |seed| {
            let mut fleet = Fleet::new(
                CloudModel {
                    jitter: 0.5,
                    failure_rate: 0.3,
                    seed,
                    ..model()
                },
                0,
                1_000,
                0,
            );
            (0..1000)
                .map(|_| fleet.launch(0).map(|_| fleet.instances.last().unwrap().ready))
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(7), run(7));
        assert_eq!(a, b);
        let failed = a.iter().filter(|r| r.is_none()).count();
        assert!((250..350).contains(&failed), "{failed} of 1000 failed");
        let boots: Vec<Millis> = a.iter().flatten().copied().collect();
        assert!(boots.iter().all(|r| (30_000..=90_000).contains(r)));
        assert!(boots.iter().any(|r| *r < 40_000) && boots.iter().any(|r| *r > 80_000));
        assert_ne!(a, run(8));
    }

    #[test]
    fn a_change_of_direction_within_ten_minutes_is_a_flap() {
        let mut fleet = Fleet::new(model(), 0, 1_000, 2);
        fleet.set_desired(3, 0);
        fleet.set_desired(2, 300_000); // back within 10 minutes: a flap
        fleet.set_desired(2, 400_000); // no change
        fleet.set_desired(1, 500_000); // same direction
        fleet.set_desired(2, 1_200_000); // 11.7 minutes later
        assert_eq!((fleet.accounts.actions, fleet.accounts.flaps), (4, 1));
    }
}
