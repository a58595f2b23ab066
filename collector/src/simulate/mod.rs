//! `ebb-collector simulate`: a demand trace replayed in virtual time through a group's own policies
//! and, beside them, through models of the systems our users come from, each on a simulated cloud of
//! its own; what each would have cost (instance-hours) and where it would have been short
//! (under-provisioned time, unserved demand), against a perfect-foresight oracle.
//!
//! - `trace.rs` reads the `time,demand` CSV.
//! - `fleet.rs` is the simulated cloud: boots, failures, what instances measure, the figures.
//! - `ebb.rs` is the group's own controller step, with the engine's plan.
//! - `anchors.rs` are EC2 (target tracking, step), Heat, K5, ssh_scale.py and the HPA.
//! - `chart.rs` draws the SVG.

pub mod anchors;
mod chart;
mod ebb;
pub mod fleet;
pub mod trace;

use serde::Serialize;

use crate::config::GroupConfig;
use crate::engine::{Millis, Policy};
use fleet::{Accounts, CloudModel, Fleet};
use trace::Trace;

/// How to simulate, besides the group and the trace.
#[derive(Debug, Clone)]
pub struct Options {
    pub cloud: CloudModel,
    /// Time between evaluations (the live collector evaluates every second).
    pub step_secs: u32,
    /// Anchors to run beside the group, by name ([`anchors::NAMES`]).
    pub compare: Vec<String>,
    /// The oracle's utilisation; default: the group's CPU target, or the anchors' 50 %.
    pub oracle_target_percent: Option<f64>,
}

/// One policy's figures over the whole trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub policy: String,
    pub description: String,
    /// Time with demand above 100 % of the serving members' capacity.
    pub under_provisioned_minutes: f64,
    /// Demand beyond capacity, as a share of all demand.
    pub unserved_demand_percent: f64,
    /// Instances billed, from launch to termination.
    pub instance_hours: f64,
    /// Instance-hours above the oracle's, as a share of the oracle's.
    pub slack_over_oracle_percent: f64,
    pub scaling_actions: u32,
    /// Changes of direction within ten minutes of the previous change.
    pub flaps: u32,
    /// The largest shortfall, as a share of the demand at that moment.
    pub worst_shortfall_percent: f64,
}

/// A whole simulation: the figures of the group, each anchor and the oracle, and the timelines.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub group: String,
    pub trace_hours: f64,
    pub step_secs: u32,
    pub boot_secs: f64,
    pub member_capacity: f64,
    pub oracle_target_percent: f64,
    /// The group first, then the anchors in the order asked, then the oracle.
    pub policies: Vec<Figures>,
    #[serde(skip)]
    pub timelines: Timelines,
}

/// What the chart draws: demand and each policy's serving capacity, per step.
#[derive(Debug, Clone, Default)]
pub struct Timelines {
    pub start: Millis,
    pub step_ms: Millis,
    pub demand: Vec<f64>,
    /// Per policy (in the order of [`Report::policies`]), instances serving per step.
    pub serving: Vec<Vec<u32>>,
}

/// Runs the group and the anchors on `trace`.
pub fn simulate(group: &GroupConfig, trace: &Trace, options: &Options) -> Result<Report, String> {
    check(options)?;
    let step_ms = Millis::from(options.step_secs) * 1000;
    let demand = trace.sample(step_ms)?;
    let start = trace.start();
    let limits = (group.min_size, group.max_size);
    let target = options
        .oracle_target_percent
        .unwrap_or_else(|| cpu_target(group).unwrap_or(anchors::TARGET_PERCENT));
    // Every policy starts with the group sized for the first demand, as the oracle would have it.
    let initial = needed(demand[0], &options.cloud, target, limits);
    let fleet = || Fleet::settled(options.cloud, start, step_ms, initial);
    let mut ebb = ebb::EbbGroup::new(group, fleet())?;
    let mut others = Vec::new();
    for name in &options.compare {
        let anchor = anchors::anchor(name).ok_or_else(|| {
            format!(
                "--compare: no anchor `{name}`; the anchors are {}",
                anchors::NAMES.join(", ")
            )
        })?;
        others.push((name.clone(), anchor, fleet()));
    }
    for (k, &d) in demand.iter().enumerate() {
        let now = start + k as Millis * step_ms;
        ebb.fleet.measure(now, d);
        ebb.step(now);
        for (_, anchor, fleet) in &mut others {
            fleet.measure(now, d);
            anchors::step(anchor.as_mut(), fleet, now, limits);
        }
    }
    let (oracle_accounts, oracle_serving) = oracle(&demand, step_ms, &options.cloud, target, limits);
    let oracle_hours = hours(oracle_accounts.billed_ms);
    let figures = |policy: String, description: String, accounts: &Accounts| Figures {
        policy,
        description,
        under_provisioned_minutes: accounts.under_provisioned_ms as f64 / 60_000.0,
        unserved_demand_percent: if accounts.demand > 0.0 {
            accounts.unserved / accounts.demand * 100.0
        } else {
            0.0
        },
        instance_hours: hours(accounts.billed_ms),
        slack_over_oracle_percent: if oracle_hours > 0.0 {
            (hours(accounts.billed_ms) / oracle_hours - 1.0) * 100.0
        } else {
            0.0
        },
        scaling_actions: accounts.actions,
        flaps: accounts.flaps,
        worst_shortfall_percent: accounts.worst_shortfall_percent,
    };
    let mut policies = vec![figures(
        format!("ebb:{}", group.name),
        describe_group(group),
        &ebb.fleet.accounts,
    )];
    let mut serving = vec![std::mem::take(&mut ebb.fleet.serving)];
    for (name, anchor, fleet) in &mut others {
        policies.push(figures(name.clone(), anchor.describe().into(), &fleet.accounts));
        serving.push(std::mem::take(&mut fleet.serving));
    }
    policies.push(figures(
        "oracle".into(),
        format!(
            "perfect foresight at {target} % utilisation, launching {} s ahead",
            options.cloud.boot_secs
        ),
        &oracle_accounts,
    ));
    serving.push(oracle_serving);
    Ok(Report {
        group: group.name.clone(),
        trace_hours: hours((trace.end() - trace.start()) as f64),
        step_secs: options.step_secs,
        boot_secs: options.cloud.boot_secs,
        member_capacity: options.cloud.member_capacity,
        oracle_target_percent: target,
        policies,
        timelines: Timelines {
            start,
            step_ms,
            demand,
            serving,
        },
    })
}

fn check(options: &Options) -> Result<(), String> {
    let cloud = &options.cloud;
    let problems = [
        (
            cloud.boot_secs.is_finite() && (0.0..=86_400.0).contains(&cloud.boot_secs),
            "--boot-secs must be 0 to 86400",
        ),
        (
            cloud.jitter.is_finite() && (0.0..=1.0).contains(&cloud.jitter),
            "--boot-jitter must be 0 to 1",
        ),
        (
            cloud.failure_rate.is_finite() && (0.0..1.0).contains(&cloud.failure_rate),
            "--launch-failure-rate must be at least 0 and below 1",
        ),
        (
            cloud.member_capacity.is_finite() && cloud.member_capacity > 0.0,
            "--member-capacity must be a positive number",
        ),
        (
            cloud.member_cpus.is_finite() && (1.0..=1024.0).contains(&cloud.member_cpus),
            "--member-cpus must be 1 to 1024",
        ),
        ((1..=3600).contains(&options.step_secs), "--step-secs must be 1 to 3600"),
        (
            options
                .oracle_target_percent
                .is_none_or(|t| t.is_finite() && t > 0.0 && t <= 100.0),
            "--oracle-target must be above 0 and at most 100",
        ),
    ];
    match problems.iter().find(|(ok, _)| !ok) {
        Some((_, problem)) => Err((*problem).into()),
        None => Ok(()),
    }
}

fn hours(ms: f64) -> f64 {
    ms / 3_600_000.0
}

/// The group's CPU target, if a target-tracking policy keeps one.
fn cpu_target(group: &GroupConfig) -> Option<f64> {
    group.engine().policies.iter().find_map(|policy| match policy {
        Policy::TargetTracking(p) if p.metric == crate::engine::Metric::Cpu => Some(p.target),
        _ => None,
    })
}

fn describe_group(group: &GroupConfig) -> String {
    let names: Vec<String> = group.engine().policies.iter().map(|p| p.name().to_string()).collect();
    format!("the group's policies: {}", names.join(", "))
}

/// The instances `demand` needs at `target_percent` utilisation, within the group's limits.
fn needed(demand: f64, cloud: &CloudModel, target_percent: f64, (min, max): (u32, u32)) -> u32 {
    ((demand / (cloud.member_capacity * target_percent / 100.0)).ceil() as u32).clamp(min, max)
}

/// Perfect foresight at `target_percent` utilisation: at each step exactly the instances the demand
/// needs at that utilisation serve (within the group's limits), each launched `boot_secs` before it is
/// needed and terminated when it is not.
fn oracle(
    demand: &[f64],
    step_ms: Millis,
    cloud: &CloudModel,
    target_percent: f64,
    (min, max): (u32, u32),
) -> (Accounts, Vec<u32>) {
    let needed: Vec<u32> = demand
        .iter()
        .map(|&d| needed(d, cloud, target_percent, (min, max)))
        .collect();
    let ahead = ((cloud.boot_secs * 1000.0) / step_ms as f64).ceil() as usize;
    // Billed at a step: the most needed from then until one boot later (a sliding maximum).
    let mut billed = vec![0; needed.len()];
    let mut window: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    for k in (0..needed.len()).rev() {
        while window.back().is_some_and(|&j| needed[j] <= needed[k]) {
            window.pop_back();
        }
        window.push_back(k);
        while window.front().is_some_and(|&j| j > k + ahead) {
            window.pop_front();
        }
        billed[k] = needed[window[0]];
    }
    let mut accounts = Accounts::default();
    let mut previous = needed.first().copied().unwrap_or(0);
    for (k, &d) in demand.iter().enumerate() {
        accounts.add_step(d, f64::from(needed[k]) * cloud.member_capacity, billed[k], step_ms);
        if needed[k] != previous {
            accounts.actions += 1;
            previous = needed[k];
        }
    }
    (accounts, needed)
}

impl Report {
    /// The figures as a table, one line per policy.
    pub fn table(&self) -> String {
        let mut text = format!(
            "group {}: {:.1} h of demand, a step every {} s, members of capacity {} booting in {} s; the \
             oracle runs at {} % utilisation\n\n",
            self.group,
            self.trace_hours,
            self.step_secs,
            self.member_capacity,
            self.boot_secs,
            self.oracle_target_percent
        );
        let header = [
            "policy",
            "under-provisioned min",
            "unserved %",
            "instance-hours",
            "slack over oracle %",
            "actions",
            "flaps",
            "worst shortfall %",
        ];
        let rows: Vec<[String; 8]> = self
            .policies
            .iter()
            .map(|f| {
                [
                    f.policy.clone(),
                    format!("{:.1}", f.under_provisioned_minutes),
                    format!("{:.3}", f.unserved_demand_percent),
                    format!("{:.1}", f.instance_hours),
                    format!("{:.1}", f.slack_over_oracle_percent),
                    f.scaling_actions.to_string(),
                    f.flaps.to_string(),
                    format!("{:.1}", f.worst_shortfall_percent),
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|c| {
                rows.iter()
                    .map(|r| r[c].len())
                    .chain([header[c].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<&str>| {
            let mut out = String::new();
            for (c, cell) in cells.iter().enumerate() {
                if c == 0 {
                    out.push_str(&format!("{cell:<w$}", w = widths[c]));
                } else {
                    out.push_str(&format!("  {cell:>w$}", w = widths[c]));
                }
            }
            out.trim_end().to_string() + "\n"
        };
        text.push_str(&line(header.to_vec()));
        for row in &rows {
            text.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        text.push('\n');
        for figures in &self.policies {
            text.push_str(&format!("{}: {}\n", figures.policy, figures.description));
        }
        text
    }

    /// The chart of demand and each policy's serving capacity, as SVG.
    pub fn svg(&self) -> Result<String, String> {
        chart::draw(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::GroupToml;

    fn cloud() -> CloudModel {
        CloudModel {
            member_capacity: 100.0,
            ..fleet::test_model()
        }
    }

    fn options(compare: &[&str]) -> Options {
        Options {
            cloud: cloud(),
            step_secs: 10,
            compare: compare.iter().map(|c| c.to_string()).collect(),
            oracle_target_percent: None,
        }
    }

    /// A group keeping CPU at 50 %, 1 to 20 members.
    fn group() -> GroupConfig {
        let text = GroupToml::local("web")
            .set("min_size", 1)
            .set("max_size", 20)
            .set("scale_out_cooldown_secs", 0)
            .set("scale_in_cooldown_secs", 60)
            .table(
                "[[groups.policies]]\nname = \"cpu\"\ntype = \"target_tracking\"\nmetric = \"cpu\"\n\
                 target = 50.0\nperiod_secs = 60\nstabilization_secs = 120",
            )
            .to_toml();
        crate::config::parse(std::path::Path::new("t.toml"), &text)
            .unwrap()
            .groups
            .remove(0)
    }

    /// Demand 100 for an hour, 600 for two, 100 again for an hour (one point a minute).
    fn plateau() -> Trace {
        let text: String = (0..=240)
            .map(|minute| {
                let demand = if (60..180).contains(&minute) { 600 } else { 100 };
                format!("{},{demand}\n", minute * 60)
            })
            .collect();
        Trace::parse(&text, 1.0).unwrap()
    }

    #[test]
    fn the_oracle_serves_exactly_what_demand_needs_and_launches_a_boot_ahead() {
        // 100 → 600 at 50 %: 2 → 12 instances; serving the moment they are needed, billed from a boot
        // (60 s) before.
        let demand = plateau().sample(10_000).unwrap();
        let (accounts, serving) = oracle(&demand, 10_000, &cloud(), 50.0, (1, 20));
        assert_eq!(accounts.under_provisioned_ms, 0);
        assert_eq!(serving[0], 2);
        assert_eq!(serving[360], 12, "at the hour, as demand reaches 600");
        // Billed: 2 for 4 h, plus 10 from one minute before demand rises past 200 (in the minute after
        // the hour) until it falls back within the minute after three hours.
        let billed_hours = accounts.billed_ms / 3_600_000.0;
        assert!((billed_hours - (2.0 * 4.0 + 10.0 * 2.0)).abs() < 0.7, "{billed_hours}");
        // Capped at max_size, the oracle is short too.
        let (capped, _) = oracle(&demand, 10_000, &cloud(), 50.0, (1, 5));
        assert!(capped.under_provisioned_ms >= 119 * 60_000, "{capped:?}");
    }

    #[test]
    fn the_group_scales_out_on_the_step_and_back_in_after_it() {
        let report = simulate(&group(), &plateau(), &options(&[])).unwrap();
        let serving = &report.timelines.serving[0];

        assert_eq!(serving[0], 2, "sized for the first demand at the group's 50 %");
        // CPU saturates at 100 %, so each evaluation sees at most twice the target: 2 → 4 → 8 → 12, each
        // step a minute's average and a boot; at 600 on 12 (50 %) within seven minutes.
        let hour = 360;
        assert!(serving[hour + 42] >= 12, "{:?}", &serving[hour..hour + 42]);
        // And back to 2 within ten minutes of the drop (stabilization 120 s, cooldown 60 s).
        assert!(serving[3 * hour + 60] <= 2, "{:?}", &serving[3 * hour..3 * hour + 60]);
        let ebb = &report.policies[0];
        assert_eq!(ebb.policy, "ebb:web");
        // Short only while the step's new members boot: 600 on 200 for about three minutes.
        assert!(
            ebb.under_provisioned_minutes > 0.0 && ebb.under_provisioned_minutes < 6.0,
            "{ebb:?}"
        );
        assert_eq!(ebb.flaps, 0);
        let oracle = report.policies.last().unwrap();
        assert_eq!(
            (oracle.policy.as_str(), oracle.under_provisioned_minutes),
            ("oracle", 0.0)
        );
        // Short for minutes, it pays about what perfect foresight pays.
        assert!(ebb.slack_over_oracle_percent.abs() < 10.0, "{ebb:?}");
    }

    #[test]
    fn anchors_run_beside_the_group_on_the_same_cloud() {
        let report = simulate(&group(), &plateau(), &options(&anchors::NAMES)).unwrap();

        let names: Vec<&str> = report.policies.iter().map(|f| f.policy.as_str()).collect();
        assert_eq!(
            names,
            [
                "ebb:web",
                "ec2-target",
                "ec2-step",
                "heat",
                "k5",
                "ssh-scale",
                "hpa",
                "oracle"
            ]
        );
        let figures = |name: &str| report.policies.iter().find(|f| f.policy == name).unwrap();
        // Heat sees the step at its next ten-minute poll and adds one instance per poll: short until the
        // fourth poll brings it to 6 (600 at 100 %); ebb for minutes.
        assert!(figures("heat").under_provisioned_minutes > 30.0);
        assert!(figures("ebb:web").under_provisioned_minutes < figures("ec2-target").under_provisioned_minutes);
        let text = report.table();
        for name in names {
            assert!(text.contains(name), "{text}");
        }
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        let first = &json["policies"][0];
        for key in [
            "policy",
            "under_provisioned_minutes",
            "unserved_demand_percent",
            "instance_hours",
            "slack_over_oracle_percent",
            "scaling_actions",
            "flaps",
            "worst_shortfall_percent",
        ] {
            assert!(first.get(key).is_some(), "{key} in {first}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_run_and_failures_cost_time() {
        let mut failing = options(&["hpa"]);
        failing.cloud.failure_rate = 0.5;
        failing.cloud.jitter = 0.5;
        let a = simulate(&group(), &plateau(), &failing).unwrap();
        let b = simulate(&group(), &plateau(), &failing).unwrap();
        assert_eq!(a.policies, b.policies);
        failing.cloud.seed = 2;
        assert_ne!(a.policies, simulate(&group(), &plateau(), &failing).unwrap().policies);
        // Half the launch calls failing (each retried 10 s later) leaves more demand unserved.
        failing.cloud.jitter = 0.0;
        let failed = simulate(&group(), &plateau(), &failing).unwrap();
        let clean = simulate(&group(), &plateau(), &options(&["hpa"])).unwrap();
        assert!(
            failed.policies[0].unserved_demand_percent > clean.policies[0].unserved_demand_percent,
            "{:?} {:?}",
            failed.policies[0],
            clean.policies[0]
        );
    }

    #[test]
    fn the_chart_draws_demand_and_every_policy() {
        let report = simulate(&group(), &plateau(), &options(&["hpa"])).unwrap();
        let svg = report.svg().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        for label in ["demand", "ebb:web", "hpa", "oracle"] {
            assert!(svg.contains(label), "{label}");
        }
        assert!(svg.matches("<polyline").count() >= 4);
    }

    /// Two days of a daily curve (peak 2,000 at 15:00, trough a fifth of it) with three flash crowds of
    /// +60 % for 20 minutes, one on a morning ramp; a point a minute.
    fn two_days_with_flash_crowds() -> Trace {
        let flashes = [11 * 60, 20 * 60 + 30, 33 * 60];
        let text: String = (0..=2 * 1440)
            .map(|minute: i64| {
                let hour = (minute % 1440) as f64 / 60.0;
                let daily = (0.5 + 0.5 * ((hour - 15.0) / 24.0 * std::f64::consts::TAU).cos()).powf(1.5);
                let mut demand = 2000.0 * (0.2 + 0.8 * daily);
                if flashes.iter().any(|&at| (at..at + 20).contains(&minute)) {
                    demand *= 1.6;
                }
                format!("{},{demand:.1}\n", minute * 60)
            })
            .collect();
        Trace::parse(&text, 1.0).unwrap()
    }

    /// The goal of `examples/web-recommended.toml` (docs/policies.md): never short where an anchor is
    /// not, and cheaper than every anchor that is never short; within 15 % of perfect foresight.
    #[test]
    fn the_recommended_web_group_beats_every_anchor() {
        let text = include_str!("../../../examples/web-recommended.toml");
        let config = crate::config::parse(std::path::Path::new("web-recommended.toml"), text).unwrap();
        let report = simulate(
            &config.groups[0],
            &two_days_with_flash_crowds(),
            &options(&anchors::NAMES),
        )
        .unwrap();
        let ebb = &report.policies[0];
        for anchor in &report.policies[1..report.policies.len() - 1] {
            let better = ebb.under_provisioned_minutes < anchor.under_provisioned_minutes
                || (ebb.under_provisioned_minutes == anchor.under_provisioned_minutes
                    && ebb.instance_hours < anchor.instance_hours);
            assert!(better, "ebb does not beat {}:\n{}", anchor.policy, report.table());
        }
        assert!(ebb.slack_over_oracle_percent <= 15.0, "{}", report.table());
        // A flash crowd arriving minutes after a scale-in on a falling slope turns the group round: a
        // change of direction the demand made, at most once per flash crowd.
        assert!(ebb.flaps <= 3, "{}", report.table());
    }

    /// `days` of a working day: 200 at night, up to 2,000 within ten minutes at 08:00, down at 18:00; or,
    /// without a pattern, a level drawn afresh every hour.
    fn working_days(days: i64, patterned: bool) -> Trace {
        let mut state = 5u64;
        let mut level = 1000.0;
        let text: String = (0..=days * 1440)
            .map(|minute: i64| {
                let hour = (minute % 1440) as f64 / 60.0;
                let demand = if patterned {
                    let up = ((hour - 8.0) * 6.0).clamp(0.0, 1.0);
                    let down = ((18.0 - hour) * 6.0).clamp(0.0, 1.0);
                    200.0 + 1800.0 * up.min(down)
                } else {
                    if minute % 60 == 0 {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        level = 200.0 + 1800.0 * ((state >> 33) as f64 / (1u64 << 31) as f64);
                    }
                    level
                };
                format!("{},{demand:.1}\n", minute * 60)
            })
            .collect();
        Trace::parse(&text, 1.0).unwrap()
    }

    /// The test group with a predictive policy beside its target tracking.
    fn predictive_group(mode: &str) -> GroupConfig {
        let mut config = group();
        config.max_size = 60;
        let text = format!(
            "[[groups]]\nname = \"web\"\nmin_size = 1\nmax_size = 60\n[groups.provider]\ntype = \"local\"\n\
             [groups.load_balancer]\ntype = \"builtin\"\nlisten = \"127.0.0.1:0\"\n[[groups.policies]]\n\
             name = \"daily\"\ntype = \"predictive\"\nmetric = \"cpu\"\ntarget = 50.0\nmode = \"{mode}\"\n"
        );
        let predictive = crate::config::parse(std::path::Path::new("t.toml"), &text)
            .unwrap()
            .groups[0]
            .policies
            .remove(0);
        config.policies.push(predictive);
        config
    }

    fn with_boot(secs: f64) -> Options {
        let mut options = options(&[]);
        options.cloud.boot_secs = secs;
        options
    }

    #[test]
    fn predictive_scaling_launches_ahead_of_a_daily_ramp() {
        let trace = working_days(3, true);
        let mut reactive_group = group();
        reactive_group.max_size = 60;
        let reactive = simulate(&reactive_group, &trace, &with_boot(300.0)).unwrap();
        let predictive = simulate(&predictive_group("forecast_and_scale"), &trace, &with_boot(300.0)).unwrap();
        // On the third day the forecast (two days of history) has members in service as the ramp starts.
        let step = |day: i64, hour: f64| ((day as f64 * 24.0 + hour) * 360.0) as usize;
        let before_ramp = step(2, 8.0);
        assert!(
            predictive.timelines.serving[0][before_ramp] > 2 * reactive.timelines.serving[0][before_ramp],
            "{} vs {}",
            predictive.timelines.serving[0][before_ramp],
            reactive.timelines.serving[0][before_ramp]
        );
        let short = |report: &Report| {
            report.timelines.demand[step(2, 0.0)..]
                .iter()
                .zip(&report.timelines.serving[0][step(2, 0.0)..])
                .filter(|(d, s)| **d > f64::from(**s) * 100.0)
                .count()
        };
        assert!(
            short(&predictive) < short(&reactive),
            "{} vs {}",
            short(&predictive),
            short(&reactive)
        );
        // The first two days it had too little history, or had just learnt: the same as reactive.
        assert_eq!(
            predictive.timelines.serving[0][..step(1, 0.0)],
            reactive.timelines.serving[0][..step(1, 0.0)]
        );
    }

    #[test]
    fn predictive_scaling_stays_out_of_the_way_without_a_pattern_or_history() {
        let trace = working_days(3, false);
        let mut reactive_group = group();
        reactive_group.max_size = 60;
        let reactive = simulate(&reactive_group, &trace, &with_boot(300.0)).unwrap();
        let predictive = simulate(&predictive_group("forecast_and_scale"), &trace, &with_boot(300.0)).unwrap();
        assert_eq!(predictive.timelines.serving[0], reactive.timelines.serving[0]);
        // Forecast-only never changes anything, pattern or not.
        let patterned = working_days(3, true);
        let only = simulate(&predictive_group("forecast_only"), &patterned, &with_boot(300.0)).unwrap();
        let reactive = simulate(&reactive_group, &patterned, &with_boot(300.0)).unwrap();
        assert_eq!(only.timelines.serving[0], reactive.timelines.serving[0]);
    }

    #[test]
    fn what_cannot_be_simulated_is_refused_with_the_reason() {
        let unknown = simulate(&group(), &plateau(), &options(&["nomad"])).unwrap_err();
        assert!(
            unknown.contains("no anchor `nomad`; the anchors are ec2-target"),
            "{unknown}"
        );
        let mut memory = group();
        memory.policies[0].metric = crate::engine::Metric::Mem;
        let error = simulate(&memory, &plateau(), &options(&[])).unwrap_err();
        assert!(
            error.contains("policy `cpu` scales on mem, which the simulation does not model"),
            "{error}"
        );
        let mut bad = options(&[]);
        bad.cloud.member_capacity = 0.0;
        assert!(
            simulate(&group(), &plateau(), &bad)
                .unwrap_err()
                .contains("--member-capacity")
        );
        bad = options(&[]);
        bad.step_secs = 0;
        assert!(
            simulate(&group(), &plateau(), &bad)
                .unwrap_err()
                .contains("--step-secs")
        );
    }
}
