//! The systems our users come from, as small models beside ebb in `simulate --compare`: each decides a
//! group's desired capacity the way its documentation describes, with its published defaults, on the
//! same simulated cloud as ebb's group (same demand, boot delay and launch failures). They are models,
//! not the systems: what each leaves out is said where it is defined. All of them see the CPU every
//! instance reports equally well; none is given a metric delay its cloud would add, which favours them.

use super::fleet::Fleet;
use crate::engine::{Metric, Millis};

/// The anchors by the name `--compare` takes.
pub const NAMES: [&str; 6] = ["ec2-target", "ec2-step", "heat", "k5", "ssh-scale", "hpa"];

/// The CPU target the target-tracking anchors keep: the seeds' EC2 manual calls 50 % a usual production
/// value, and it is the HPA walkthrough's.
pub const TARGET_PERCENT: f64 = 50.0;

const MINUTE_MS: Millis = 60_000;

/// A scaling system deciding desired capacity.
pub trait Anchor {
    /// One line on what the model does.
    fn describe(&self) -> &'static str;
    /// Desired capacity at `now`, seeing the fleet as measured up to this step; called every step.
    fn decide(&mut self, now: Millis, fleet: &Fleet, desired: u32) -> u32;
}

/// The anchor `name` (one of [`NAMES`]).
pub fn anchor(name: &str) -> Option<Box<dyn Anchor>> {
    Some(match name {
        "ec2-target" => Box::new(Ec2TargetTracking {
            minute: Every::new(MINUTE_MS),
            datapoints: Vec::new(),
        }),
        "ec2-step" => Box::new(Ec2StepScaling {
            minute: Every::new(MINUTE_MS),
        }),
        "heat" => Box::new(Alarms::heat()),
        "k5" => Box::new(Alarms::k5()),
        "ssh-scale" => Box::new(SshScale {
            cron: Every::new(MINUTE_MS),
        }),
        "hpa" => Box::new(Hpa {
            sync: Every::new(15_000),
            recommendations: Vec::new(),
        }),
        _ => return None,
    })
}

/// An anchor's step: the anchor decides on what was measured, the fleet follows at once (launching
/// what is missing, removing the newest first, those not yet serving before those serving), and
/// instances that booted go into the load balancer.
pub fn step(anchor: &mut dyn Anchor, fleet: &mut Fleet, now: Millis, (min, max): (u32, u32)) {
    let desired = anchor.decide(now, fleet, fleet.desired).clamp(min, max);
    fleet.set_desired(desired, now);
    let count = fleet.instances.iter().filter(|i| i.leaving_since.is_none()).count() as u32;
    if desired > count {
        for _ in count..desired {
            fleet.launch(now);
        }
    } else if desired < count {
        let mut surplus: Vec<(u64, bool, Millis)> = fleet
            .instances
            .iter()
            .filter(|i| i.leaving_since.is_none())
            .map(|i| (i.id, i.serving_since.is_some(), i.launched))
            .collect();
        surplus.sort_by_key(|&(id, serving, launched)| (serving, std::cmp::Reverse(launched), std::cmp::Reverse(id)));
        for (id, _, _) in surplus.into_iter().take((count - desired) as usize) {
            fleet.leave(id, now);
        }
    }
    for instance in &mut fleet.instances {
        if instance.serving_since.is_none() && instance.leaving_since.is_none() && instance.ready <= now {
            instance.serving_since = Some(now);
        }
    }
}

/// Something done every `period_ms`, on the multiples of it (a cron minute, a polling interval).
#[derive(Debug, Clone, Copy)]
struct Every {
    period_ms: Millis,
    last: Option<Millis>,
}

impl Every {
    fn new(period_ms: Millis) -> Self {
        Every { period_ms, last: None }
    }

    fn due(&mut self, now: Millis) -> bool {
        let slot = now.div_euclid(self.period_ms);
        if self.last == Some(slot) {
            return false;
        }
        self.last = Some(slot);
        true
    }
}

/// The group's average CPU over the minute ending now: a one-minute CloudWatch datapoint.
fn minute_cpu(fleet: &Fleet, now: Millis) -> Option<f64> {
    fleet.group_mean(Metric::Cpu, now - MINUTE_MS, now)
}

/// Instances serving that have finished `warmup_ms` (EC2's instance warm-up).
fn warmed(fleet: &Fleet, now: Millis, warmup_ms: Millis) -> u32 {
    fleet
        .instances
        .iter()
        .filter(|i| i.serving() && i.serving_since.is_some_and(|s| now - s >= warmup_ms))
        .count() as u32
}

fn serving(fleet: &Fleet) -> u32 {
    fleet.instances.iter().filter(|i| i.serving()).count() as u32
}

/// EC2 Auto Scaling target tracking on average CPU: the two alarms it creates (scale out after 3
/// one-minute datapoints above the target, scale in after 15 below 90 % of it), capacity set to
/// `ceil(serving × metric / target)`, instances in their 300 s warm-up absorbing scale-out (no new
/// capacity if desired already covers it) and no scale-in while any is warming up.
#[derive(Debug)]
pub struct Ec2TargetTracking {
    minute: Every,
    datapoints: Vec<Option<f64>>,
}

const EC2_WARMUP_MS: Millis = 300_000;

impl Anchor for Ec2TargetTracking {
    fn describe(&self) -> &'static str {
        "EC2 target tracking, CPU 50 %: 3 datapoints of 1 min to scale out, 15 below 45 % to scale in, 300 s warm-up"
    }

    fn decide(&mut self, now: Millis, fleet: &Fleet, desired: u32) -> u32 {
        if !self.minute.due(now) {
            return desired;
        }
        self.datapoints.push(minute_cpu(fleet, now));
        if self.datapoints.len() > 15 {
            self.datapoints.remove(0);
        }
        let last = |n: usize| -> Option<Vec<f64>> {
            (self.datapoints.len() >= n)
                .then(|| self.datapoints[self.datapoints.len() - n..].iter().copied().collect())?
        };
        let Some(&Some(metric)) = self.datapoints.last() else {
            return desired;
        };
        let wanted = (f64::from(serving(fleet)) * metric / TARGET_PERCENT).ceil() as u32;
        if last(3).is_some_and(|d| d.iter().all(|v| *v > TARGET_PERCENT)) {
            return desired.max(wanted);
        }
        let warming = serving(fleet) > warmed(fleet, now, EC2_WARMUP_MS);
        if !warming && last(15).is_some_and(|d| d.iter().all(|v| *v < TARGET_PERCENT * 0.9)) {
            return desired.min(wanted.max(1));
        }
        desired
    }
}

/// EC2 Auto Scaling step scaling, as the AWS guide's example: an alarm on one-minute average CPU, add
/// 10 % of capacity from 60 % and 30 % from 70 %, remove 10 % at 40 % or below and 30 % at 30 % or
/// below (at least one instance), re-invoked each minute while the alarm lasts; the 300 s warm-up keeps
/// repeated breaches in the same step from adding again.
#[derive(Debug)]
pub struct Ec2StepScaling {
    minute: Every,
}

/// EC2's rounding of a percentage change: below one instance is one, above it rounds down.
fn percent_of(capacity: u32, percent: f64) -> u32 {
    let change = f64::from(capacity) * percent / 100.0;
    if change < 1.0 { 1 } else { change.floor() as u32 }
}

impl Anchor for Ec2StepScaling {
    fn describe(&self) -> &'static str {
        "EC2 step scaling: +10 % from CPU 60 %, +30 % from 70 %, -10 % at 40 %, -30 % at 30 %, 300 s warm-up"
    }

    fn decide(&mut self, now: Millis, fleet: &Fleet, desired: u32) -> u32 {
        if !self.minute.due(now) {
            return desired;
        }
        let Some(metric) = minute_cpu(fleet, now) else {
            return desired;
        };
        if metric >= 60.0 {
            // Instances still warming up count as capacity already added.
            let counted = warmed(fleet, now, EC2_WARMUP_MS);
            let percent = if metric >= 70.0 { 30.0 } else { 10.0 };
            return desired.max(counted + percent_of(counted.max(1), percent));
        }
        if metric <= 40.0 {
            let percent = if metric <= 30.0 { 30.0 } else { 10.0 };
            return desired.saturating_sub(percent_of(desired, percent));
        }
        desired
    }
}

/// Threshold alarms on average CPU adding or removing one instance, with a cooldown after each
/// change: OpenStack Heat with Ceilometer/Aodh (seed 002: CPU polled every 10 minutes by default, above
/// 50 % +1, below 10 % -1, cooldown 60 s; acting on every poll in alarm, as with `repeat_actions`,
/// which Aodh's default would make slower still) and FUJITSU K5 (seed 003: per-minute CPU, above 50 %
/// +1, below 15 % -1, the guide's cooldown of 750 s).
#[derive(Debug)]
pub struct Alarms {
    description: &'static str,
    poll: Every,
    high: f64,
    low: f64,
    cooldown_ms: Millis,
    last_change: Option<Millis>,
}

impl Alarms {
    fn heat() -> Self {
        Alarms {
            description: "Heat + Aodh: CPU polled every 10 min, > 50 % +1, < 10 % -1, cooldown 60 s",
            poll: Every::new(600_000),
            high: 50.0,
            low: 10.0,
            cooldown_ms: 60_000,
            last_change: None,
        }
    }

    fn k5() -> Self {
        Alarms {
            description: "K5: CPU each minute, > 50 % +1, < 15 % -1, cooldown 750 s",
            poll: Every::new(MINUTE_MS),
            high: 50.0,
            low: 15.0,
            cooldown_ms: 750_000,
            last_change: None,
        }
    }
}

impl Anchor for Alarms {
    fn describe(&self) -> &'static str {
        self.description
    }

    fn decide(&mut self, now: Millis, fleet: &Fleet, desired: u32) -> u32 {
        if !self.poll.due(now) {
            return desired;
        }
        // A polled meter is the average since the previous poll.
        let Some(metric) = fleet.group_mean(Metric::Cpu, now - self.poll.period_ms, now) else {
            return desired;
        };
        if self.last_change.is_some_and(|at| now - at < self.cooldown_ms) {
            return desired;
        }
        let to = if metric > self.high {
            desired + 1
        } else if metric < self.low {
            desired.saturating_sub(1)
        } else {
            desired
        };
        if to != desired {
            self.last_change = Some(now);
        }
        to
    }
}

/// ssh_scale.py (seeds 000 and 001): from cron each minute, one VM's one-minute load average read over
/// SSH; above 2 one VM more, below 1 one fewer.
#[derive(Debug)]
pub struct SshScale {
    cron: Every,
}

impl Anchor for SshScale {
    fn describe(&self) -> &'static str {
        "ssh_scale.py: cron each minute, one VM's load1 > 2 +1, < 1 -1"
    }

    fn decide(&mut self, now: Millis, fleet: &Fleet, desired: u32) -> u32 {
        if !self.cron.due(now) {
            return desired;
        }
        match fleet.latest(Metric::Load1) {
            Some(load) if load > 2.0 => desired + 1,
            Some(load) if load < 1.0 => desired.saturating_sub(1),
            _ => desired,
        }
    }
}

/// Kubernetes' Horizontal Pod Autoscaler on CPU (target 50 %): every 15 s, `ceil(ready × usage /
/// target)` unless within the 0.1 tolerance; pods not yet ready count as 0 % when scaling up; scaling
/// up at most by max(4, 100 %) per 15 s; scaling down to the highest recommendation of the last 300 s.
#[derive(Debug)]
pub struct Hpa {
    sync: Every,
    recommendations: Vec<(Millis, u32)>,
}

impl Anchor for Hpa {
    fn describe(&self) -> &'static str {
        "HPA: CPU 50 %, sync 15 s, tolerance 0.1, unready pods 0 % on scale-up, 300 s scale-down stabilization"
    }

    fn decide(&mut self, now: Millis, fleet: &Fleet, desired: u32) -> u32 {
        if !self.sync.due(now) {
            return desired;
        }
        let ready = serving(fleet);
        let unready = fleet.instances.iter().filter(|i| i.serving_since.is_none()).count() as u32;
        let Some(usage) = fleet.group_mean(Metric::Cpu, now - 30_000, now).filter(|_| ready > 0) else {
            return desired;
        };
        let mut ratio = usage / TARGET_PERCENT;
        if ratio > 1.0 && unready > 0 {
            ratio = usage * f64::from(ready) / (TARGET_PERCENT * f64::from(ready + unready));
        }
        let recommendation = if (ratio - 1.0).abs() <= 0.1 {
            desired
        } else {
            (ratio * f64::from(ready)).ceil() as u32
        };
        if self.recommendations.is_empty() {
            // The HPA has been running: what it held until now was its recommendation.
            self.recommendations.push((now, desired));
        }
        self.recommendations.push((now, recommendation));
        self.recommendations.retain(|(at, _)| now - at <= 300_000);
        if recommendation > desired {
            return recommendation.min((desired + 4).max(desired * 2));
        }
        // Scale down no lower than anything recommended in the window.
        let highest = self.recommendations.iter().map(|(_, r)| *r).max().unwrap_or(desired);
        highest.min(desired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::fleet::test_model as model;

    const STEP: Millis = 10_000;

    /// An anchor run on constant `demand` for `minutes`, from `serving` instances; the desired capacity
    /// after each minute.
    fn run(name: &str, serving: u32, demand: impl Fn(Millis) -> f64, minutes: i64) -> Vec<u32> {
        let mut anchor = anchor(name).unwrap();
        let mut fleet = Fleet::settled(model(), 0, STEP, serving);
        let mut desired = Vec::new();
        for k in 0..minutes * 6 {
            let now = k * STEP;
            fleet.measure(now, demand(now));
            step(anchor.as_mut(), &mut fleet, now, (1, 20));
            if k % 6 == 5 {
                desired.push(fleet.desired);
            }
        }
        desired
    }

    #[test]
    fn ec2_target_tracking_scales_out_after_three_minutes_and_in_after_fifteen() {
        // 4 instances at 80 %: after three datapoints above 50 %, ceil(4 × 80 / 50) = 7.
        let out = run("ec2-target", 4, |_| 32.0, 5);
        assert_eq!(out[..2], [4, 4]);
        assert_eq!(out[2], 7);
        // 10 instances at 20 %: 15 datapoints below 45 % before ceil(10 × 20 / 50) = 4.
        let cut = run("ec2-target", 10, |_| 20.0, 16);
        assert!(cut[..14].iter().all(|d| *d == 10), "{cut:?}");
        assert_eq!(cut[14], 4);
    }

    #[test]
    fn ec2_target_tracking_does_not_add_again_while_new_instances_warm_up() {
        let out = run("ec2-target", 4, |_| 32.0, 8);
        // 7 after three minutes; the new instances serve after 60 s and bring CPU to 46 %: no more.
        assert_eq!(out[2..], [7, 7, 7, 7, 7, 7]);
    }

    #[test]
    fn ec2_step_scaling_adds_by_the_step_the_breach_falls_in() {
        // 10 at 65 %: +10 % → 11; at 75 %: +30 % → 13.
        assert_eq!(run("ec2-step", 10, |_| 65.0, 1), [11]);
        assert_eq!(run("ec2-step", 10, |_| 75.0, 1), [13]);
        // 10 at 35 %: -10 % → 9; at 25 %: -30 % → 7; 2 at 25 %: 30 % of 2 is below one, so one.
        assert_eq!(run("ec2-step", 10, |_| 35.0, 1), [9]);
        assert_eq!(run("ec2-step", 10, |_| 25.0, 1), [7]);
        assert_eq!(run("ec2-step", 2, |_| 5.0, 1), [1]);
    }

    #[test]
    fn ec2_step_scaling_does_not_repeat_a_step_while_instances_warm_up() {
        // 10 at 65 % → 11; the new one boots in 60 s and warms up for 300 s: CPU falls to 59 %, below
        // the alarm; with demand raised to keep it at 65 %, still no second step until it warmed up.
        let out = run("ec2-step", 10, |t| if t < 60_000 { 65.0 } else { 71.5 }, 6);
        assert_eq!(out[..5], [11, 11, 11, 11, 11], "{out:?}");
    }

    #[test]
    fn heat_acts_on_ten_minute_polls_and_k5_waits_out_its_cooldown() {
        // Heat: 2 at 100 % (more demand than they serve); polls at 0, 10, 20 minutes find 100 %, 80 %
        // and 60 %: +1 each.
        let heat = run("heat", 2, |_| 24.0, 21);
        assert_eq!((heat[0], heat[9], heat[10], heat[19], heat[20]), (3, 3, 4, 4, 5));
        // K5: +1 at once, then nothing for 750 s although CPU stays above 50 %.
        let k5 = run("k5", 2, |_| 18.0, 14);
        assert!(k5[..13].iter().all(|d| *d == 3), "{k5:?}");
        assert_eq!(k5[13], 4, "the first poll after 750 s, at 780 s");
    }

    #[test]
    fn ssh_scale_reads_one_vms_load_average_each_minute() {
        // 2 VMs of 2 CPUs at 150 %: load1 3 → +1 each minute while one VM's load1 stays above 2 (it
        // falls slowly: the one-minute average lags the new VM taking its share).
        let out = run("ssh-scale", 2, |_| 30.0, 3);
        assert_eq!(out, [3, 4, 5]);
        // 4 VMs at 60 %: load1 1.2, between the thresholds: nothing.
        assert_eq!(run("ssh-scale", 4, |_| 24.0, 3), [4, 4, 4]);
        // Idle: one fewer each minute down to the minimum (1).
        assert_eq!(run("ssh-scale", 3, |_| 0.0, 3), [2, 1, 1]);
    }

    #[test]
    fn the_hpa_keeps_within_tolerance_and_stabilizes_scale_down() {
        // 4 pods at 54 %: within 10 % of 50 %, no change.
        assert_eq!(run("hpa", 4, |_| 21.6, 2), [4, 4]);
        // 4 pods at 100 %: doubled, at most +max(4, 100 %) per sync.
        assert_eq!(run("hpa", 4, |_| 40.0, 1)[0], 8);
        // 10 pods at 20 %: 4 recommended, taken only after 300 s of such recommendations.
        let down = run("hpa", 10, |_| 20.0, 7);
        assert_eq!(down[..4], [10, 10, 10, 10], "{down:?}");
        assert_eq!(down[5], 4, "{down:?}");
    }

    #[test]
    fn every_anchor_has_a_name_and_a_description() {
        for name in NAMES {
            assert!(!anchor(name).unwrap().describe().is_empty(), "{name}");
        }
        assert!(anchor("nomad").is_none());
    }
}
