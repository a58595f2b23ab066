//! The engine's semantics, one test per rule, plus the seeds' scenarios as vectors and property tests.

use proptest::prelude::*;

use super::*;

const NOW: Millis = 100_000_000;
const SEC: Millis = 1000;

fn step(name: &str, comparison: Comparison, threshold: f64, adjustment: i32) -> Policy {
    Policy::Step(StepPolicy {
        name: name.into(),
        metric: Metric::Cpu,
        statistic: Statistic::Avg,
        period_secs: 10,
        evaluation_periods: 1,
        datapoints_to_alarm: 1,
        comparison,
        threshold,
        adjustment_type: AdjustmentType::ChangeInCapacity,
        steps: vec![Step {
            lower: None,
            upper: None,
            adjustment,
        }],
        min_adjustment_step: 0,
    })
}

fn target(value: f64) -> Policy {
    Policy::TargetTracking(TargetPolicy {
        name: "cpu-target".into(),
        metric: Metric::Cpu,
        target: value,
        period_secs: 10,
        scale_out_tolerance: 0.1,
        scale_in_tolerance: 0.1,
        stabilization_secs: 300,
        disable_scale_in: false,
        scale_out_limit: None,
        scale_in_limit: None,
    })
}

fn engine(policies: Vec<Policy>) -> Engine {
    Engine {
        scale_out_cooldown_secs: 60,
        scale_in_cooldown_secs: 60,
        warmup_secs: 30,
        policies,
        health: HealthRules {
            unhealthy_threshold: 3,
            healthy_threshold: 3,
            grace_period_secs: 120,
            silent_secs: 30,
            launch_timeout_secs: 900,
            replace_unhealthy: true,
        },
        on_metric_loss: OnMetricLoss::Hold,
        termination: Termination::Newest,
        billing_period_secs: 3600,
    }
}

fn high_low() -> Engine {
    engine(vec![
        step("cpu-high", Comparison::Gt, 60.0, 2),
        step("cpu-low", Comparison::Lt, 20.0, -1),
    ])
}

/// In service for ten minutes, heard a second ago, healthy; `cpu` for every policy and period.
fn member(id: &str, cpu: Option<f64>) -> MemberInput {
    MemberInput {
        id: id.into(),
        state: MemberState::InService,
        launched: NOW - 700 * SEC,
        watched_since: None,
        in_service_since: Some(NOW - 600 * SEC),
        protected: false,
        unhealthy: false,
        health: HealthRun {
            passes: 10,
            failures: 0,
            last_heard: Some(NOW - SEC),
        },
        means: Means::new(vec![vec![cpu; 15]; 4]),
        load: cpu,
        replacing: false,
        leaving: false,
        outdated: false,
    }
}

fn group(desired: u32, members: Vec<MemberInput>) -> GroupInput {
    GroupInput {
        now: NOW,
        min_size: 1,
        max_size: 4,
        desired,
        last_scale_out: None,
        last_scale_in: None,
        suspended: false,
        members,
        recommendations: Vec::new(),
        changes: Vec::new(),
        predictions: Vec::new(),
        rollout: Rollout::default(),
    }
}

fn outcome(e: &Evaluation) -> (Action, u32, ReasonCode) {
    (e.action, e.desired, e.reason.code)
}

#[test]
fn windows_are_consecutive_periods_ending_now() {
    let mut engine = high_low();
    let Policy::Step(p) = &mut engine.policies[0] else {
        unreachable!()
    };
    p.evaluation_periods = 3;
    let windows = engine.windows(NOW);
    assert_eq!(windows[0].metric, Metric::Cpu);
    let windows = &windows[0].windows;
    assert_eq!(windows.len(), 3);
    assert_eq!(
        windows[0],
        Window {
            start: NOW - 10 * SEC,
            end: NOW
        }
    );
    assert_eq!(
        windows[2],
        Window {
            start: NOW - 30 * SEC,
            end: NOW - 20 * SEC
        }
    );
    assert_eq!(engine.lookback_ms(), 30 * SEC);
}

#[test]
fn scales_out_with_the_policy_and_value_in_the_explanation() {
    let e = high_low().evaluate(&group(1, vec![member("web-1", Some(85.0))]));
    assert_eq!(outcome(&e), (Action::ScaleOut, 3, ReasonCode::Policy));
    assert_eq!(e.policy.as_deref(), Some("cpu-high"));
    assert!(
        e.reason.text.contains("avg cpu > 60%: cpu 85% over 10 s"),
        "{}",
        e.reason.text
    );
    assert!(e.explanation.starts_with("scale_out 1 → 3"), "{}", e.explanation);
}

#[test]
fn scale_out_is_clamped_to_max_and_holds_at_max() {
    let members = vec![
        member("a", Some(90.0)),
        member("b", Some(90.0)),
        member("c", Some(90.0)),
    ];
    let e = high_low().evaluate(&group(3, members.clone()));
    assert_eq!(outcome(&e), (Action::ScaleOut, 4, ReasonCode::Policy));
    assert!(e.reason.text.contains("clamped to max_size 4"), "{}", e.reason.text);
    let mut at_max = members;
    at_max.push(member("d", Some(90.0)));
    let e = high_low().evaluate(&group(4, at_max));
    assert_eq!(outcome(&e), (Action::None, 4, ReasonCode::AtMax));
}

#[test]
fn scales_in_when_idle_but_never_below_min() {
    let e = high_low().evaluate(&group(2, vec![member("a", Some(5.0)), member("b", Some(3.0))]));
    assert_eq!(outcome(&e), (Action::ScaleIn, 1, ReasonCode::Policy));
    let e = high_low().evaluate(&group(1, vec![member("a", Some(5.0))]));
    assert_eq!(outcome(&e), (Action::None, 1, ReasonCode::AtMin));
}

#[test]
fn a_silent_member_blocks_scale_in_and_counts_as_zero_for_scale_out() {
    let e = high_low().evaluate(&group(2, vec![member("a", Some(2.0)), member("b", None)]));
    assert_eq!(outcome(&e), (Action::None, 2, ReasonCode::InsufficientData));
    assert!(e.explanation.contains("member b sent no cpu data"), "{}", e.explanation);
    // 100 and a silent member: avg 50, not > 60.
    let e = high_low().evaluate(&group(2, vec![member("a", Some(100.0)), member("b", None)]));
    assert_eq!(e.action, Action::None);
    assert_eq!(e.verdicts[0].values[0], Some(50.0));
}

#[test]
fn no_data_at_all_never_scales() {
    let e = high_low().evaluate(&group(2, vec![member("a", None), member("b", None)]));
    assert_eq!(outcome(&e), (Action::None, 2, ReasonCode::InsufficientData));
    let e = high_low().evaluate(&group(1, vec![]));
    assert_eq!(outcome(&e), (Action::None, 1, ReasonCode::InsufficientData));
}

#[test]
fn warming_and_pending_members_are_left_out_and_absorb_a_repeated_alarm() {
    let mut warming = member("new", Some(100.0));
    warming.in_service_since = Some(NOW - 10 * SEC);
    let mut pending = member("newer", None);
    pending.state = MemberState::Pending;
    pending.in_service_since = None;
    // One busy member wanted +2: the two are on their way, so no more.
    let e = high_low().evaluate(&group(3, vec![member("old", Some(90.0)), warming, pending]));
    assert_eq!(outcome(&e), (Action::None, 3, ReasonCode::Warming));
    assert_eq!((e.members.counted, e.members.warming, e.members.pending), (1, 1, 1));
}

#[test]
fn a_bigger_breach_adds_the_difference_while_members_warm_up() {
    let mut engine = engine(vec![Policy::Step(StepPolicy {
        steps: vec![
            Step {
                lower: Some(0.0),
                upper: Some(20.0),
                adjustment: 1,
            },
            Step {
                lower: Some(20.0),
                upper: None,
                adjustment: 3,
            },
        ],
        ..match step("cpu-high", Comparison::Gt, 60.0, 1) {
            Policy::Step(p) => p,
            _ => unreachable!(),
        }
    })]);
    engine.scale_out_cooldown_secs = 0;
    let mut warming = member("new", None);
    warming.in_service_since = Some(NOW - 5 * SEC);
    // 70% (breach 10): +1 over the one counted member = 2, already there.
    let e = engine.evaluate(&group(2, vec![member("old", Some(70.0)), warming.clone()]));
    assert_eq!(outcome(&e), (Action::None, 2, ReasonCode::Warming));
    // 95% (breach 35): +3 over one counted = 4, two more.
    let e = engine.evaluate(&group(2, vec![member("old", Some(95.0)), warming]));
    assert_eq!(outcome(&e), (Action::ScaleOut, 4, ReasonCode::Policy));
}

/// The EC2 Auto Scaling guide's step adjustments example: a group of 10, alarms at 50 % both ways, steps in
/// percent of capacity, each first step 0. The guide's outcomes, through `evaluate`.
#[test]
fn ec2s_step_adjustment_example() {
    let policy = |name: &str, comparison, steps: Vec<Step>| {
        Policy::Step(StepPolicy {
            adjustment_type: AdjustmentType::PercentChangeInCapacity,
            steps,
            ..match step(name, comparison, 50.0, 1) {
                Policy::Step(p) => p,
                _ => unreachable!(),
            }
        })
    };
    let bounded = |lower: Option<f64>, upper: Option<f64>, adjustment| Step {
        lower,
        upper,
        adjustment,
    };
    let mut engine = engine(vec![
        policy(
            "out",
            Comparison::Ge,
            vec![
                bounded(Some(0.0), Some(10.0), 0),
                bounded(Some(10.0), Some(20.0), 10),
                bounded(Some(20.0), None, 30),
            ],
        ),
        policy(
            "in",
            Comparison::Le,
            vec![
                bounded(Some(-10.0), Some(0.0), 0),
                bounded(Some(-20.0), Some(-10.0), -10),
                bounded(None, Some(-20.0), -30),
            ],
        ),
    ]);
    engine.scale_in_cooldown_secs = 0;
    let at = |cpu: f64| {
        let mut g = group(10, (0..10).map(|i| member(&format!("m{i}"), Some(cpu))).collect());
        g.max_size = 20;
        engine.evaluate(&g)
    };
    // 50 ≤ metric < 60: the 0 step; 60 ≤ metric < 70: +10 % (1); metric ≥ 70: +30 % (3).
    assert_eq!((at(55.0).action, at(55.0).desired), (Action::None, 10));
    assert_eq!((at(60.0).action, at(60.0).desired), (Action::ScaleOut, 11));
    assert_eq!((at(75.0).action, at(75.0).desired), (Action::ScaleOut, 13));
    // 40 < metric ≤ 50: the 0 step; 30 < metric ≤ 40: −10 % (1); metric ≤ 30: −30 % (3).
    assert_eq!((at(45.0).action, at(45.0).desired), (Action::None, 10));
    assert_eq!((at(40.0).action, at(40.0).desired), (Action::ScaleIn, 9));
    assert_eq!((at(30.0).action, at(30.0).desired), (Action::ScaleIn, 7));
}

#[test]
fn percent_and_exact_adjustments() {
    let percent = |adjustment, min_step| {
        engine(vec![Policy::Step(StepPolicy {
            adjustment_type: AdjustmentType::PercentChangeInCapacity,
            min_adjustment_step: min_step,
            ..match step("p", Comparison::Gt, 60.0, adjustment) {
                Policy::Step(p) => p,
                _ => unreachable!(),
            }
        })])
    };
    let busy = |n: usize| (0..n).map(|i| member(&format!("m{i}"), Some(90.0))).collect::<Vec<_>>();
    let mut g = group(4, busy(4));
    g.max_size = 100;
    // 50% of 4 = 2.
    assert_eq!(percent(50, 0).evaluate(&g).desired, 6);
    // 10% of 4 = 0.4 → 1; with min_adjustment_step 3 → 3.
    assert_eq!(percent(10, 0).evaluate(&g).desired, 5);
    assert_eq!(percent(10, 3).evaluate(&g).desired, 7);
    let exact = engine(vec![Policy::Step(StepPolicy {
        adjustment_type: AdjustmentType::ExactCapacity,
        ..match step("e", Comparison::Gt, 60.0, 9) {
            Policy::Step(p) => p,
            _ => unreachable!(),
        }
    })]);
    assert_eq!(exact.evaluate(&g).desired, 9);
}

#[test]
fn separate_cooldowns_scale_in_waits_after_any_scaling() {
    let engine = Engine {
        scale_out_cooldown_secs: 30,
        scale_in_cooldown_secs: 300,
        ..high_low()
    };
    let busy = vec![member("a", Some(90.0))];
    let mut g = group(1, busy);
    g.last_scale_out = Some(NOW - 20 * SEC);
    assert_eq!(outcome(&engine.evaluate(&g)), (Action::None, 1, ReasonCode::InCooldown));
    g.last_scale_out = Some(NOW - 31 * SEC);
    assert_eq!(engine.evaluate(&g).action, Action::ScaleOut);
    // A scale-out right after a scale-in is allowed.
    g.last_scale_out = None;
    g.last_scale_in = Some(NOW - SEC);
    assert_eq!(engine.evaluate(&g).action, Action::ScaleOut);
    let mut idle = group(2, vec![member("a", Some(1.0)), member("b", Some(1.0))]);
    idle.last_scale_out = Some(NOW - 200 * SEC);
    let e = engine.evaluate(&idle);
    assert_eq!(outcome(&e), (Action::None, 2, ReasonCode::InCooldown));
    assert!(e.reason.text.contains("100 s left"), "{}", e.reason.text);
}

#[test]
fn m_of_n_periods() {
    let mut engine = high_low();
    let Policy::Step(p) = &mut engine.policies[0] else {
        unreachable!()
    };
    p.evaluation_periods = 3;
    p.datapoints_to_alarm = 2;
    let mut m = member("a", None);
    m.means = Means::new(vec![vec![Some(90.0), Some(10.0), Some(10.0)], vec![None]]);
    assert_eq!(engine.evaluate(&group(1, vec![m.clone()])).action, Action::None);
    m.means = Means::new(vec![vec![Some(90.0), Some(10.0), Some(95.0)], vec![Some(50.0)]]);
    assert_eq!(engine.evaluate(&group(1, vec![m])).action, Action::ScaleOut);
}

#[test]
fn scale_out_beats_scale_in_and_the_largest_wins() {
    let engine = engine(vec![
        step("in", Comparison::Lt, 95.0, -1),
        step("out-small", Comparison::Gt, 50.0, 1),
        step("out-big", Comparison::Gt, 60.0, 2),
    ]);
    let e = engine.evaluate(&group(1, vec![member("a", Some(80.0))]));
    assert_eq!(
        (e.action, e.desired, e.policy.as_deref()),
        (Action::ScaleOut, 3, Some("out-big"))
    );
    // Even a scale-out held by cooldown keeps scale-in from happening.
    let mut g = group(2, vec![member("a", Some(80.0)), member("b", Some(80.0))]);
    g.last_scale_out = Some(NOW - SEC);
    assert_eq!(outcome(&engine.evaluate(&g)), (Action::None, 2, ReasonCode::InCooldown));
}

#[test]
fn desired_outside_the_limits_is_corrected() {
    let e = high_low().evaluate(&group(9, vec![]));
    assert_eq!(outcome(&e), (Action::ScaleIn, 4, ReasonCode::Limits));
    let mut g = group(0, vec![]);
    g.min_size = 2;
    assert_eq!(
        outcome(&high_low().evaluate(&g)),
        (Action::ScaleOut, 2, ReasonCode::Limits)
    );
}

#[test]
fn suspended_decides_nothing() {
    let mut g = group(1, vec![member("a", Some(99.0))]);
    g.suspended = true;
    assert_eq!(
        outcome(&high_low().evaluate(&g)),
        (Action::None, 1, ReasonCode::Suspended)
    );
}

#[test]
fn target_tracking_scales_out_in_one_step() {
    let engine = engine(vec![target(50.0)]);
    // 2 members at 90%: 180 / 50 = 3.6 → 4.
    let e = engine.evaluate(&group(2, vec![member("a", Some(90.0)), member("b", Some(90.0))]));
    assert_eq!(outcome(&e), (Action::ScaleOut, 4, ReasonCode::Policy));
    assert_eq!(e.recommendations[0].capacity, 4);
}

#[test]
fn target_tracking_rounds_up_only_past_a_whole_member() {
    // 3 members at a third of the load each carry 100 %: two members at 50 %, not three (the float sum
    // is a hair above 100).
    let third = 100.0 / 3.0;
    let members = vec![
        member("a", Some(third)),
        member("b", Some(third)),
        member("c", Some(third)),
    ];
    let e = engine(vec![target(50.0)]).evaluate(&group(3, members));
    assert_eq!(e.recommendations[0].capacity, 2);
}

#[test]
fn target_tracking_tolerance_and_stabilization() {
    let engine = engine(vec![target(50.0)]);
    let e = engine.evaluate(&group(2, vec![member("a", Some(53.0)), member("b", Some(54.0))]));
    assert_eq!(outcome(&e), (Action::None, 2, ReasonCode::WithinTolerance));
    // Idle: 2 × 10% / 50% = 0.4 → 1, but a recommendation of 2 was made 100 s ago.
    let mut g = group(2, vec![member("a", Some(10.0)), member("b", Some(10.0))]);
    g.recommendations = vec![Recommendation {
        policy: "cpu-target".into(),
        at: NOW - 100 * SEC,
        capacity: 2,
    }];
    assert_eq!(
        outcome(&engine.evaluate(&g)),
        (Action::None, 2, ReasonCode::Stabilizing)
    );
    g.recommendations[0].at = NOW - 301 * SEC;
    assert_eq!(outcome(&engine.evaluate(&g)), (Action::ScaleIn, 1, ReasonCode::Policy));
}

#[test]
fn target_tracking_scale_in_can_be_disabled_and_needs_every_member() {
    let mut engine = engine(vec![target(50.0)]);
    let idle = group(2, vec![member("a", Some(10.0)), member("b", None)]);
    assert_eq!(
        outcome(&engine.evaluate(&idle)),
        (Action::None, 2, ReasonCode::InsufficientData)
    );
    let Policy::TargetTracking(t) = &mut engine.policies[0] else {
        unreachable!()
    };
    t.disable_scale_in = true;
    let idle = group(2, vec![member("a", Some(10.0)), member("b", Some(10.0))]);
    assert_eq!(
        outcome(&engine.evaluate(&idle)),
        (Action::None, 2, ReasonCode::ScaleInDisabled)
    );
}

#[test]
fn target_tracking_rate_limits() {
    let mut engine = engine(vec![target(10.0)]);
    let Policy::TargetTracking(t) = &mut engine.policies[0] else {
        unreachable!()
    };
    t.scale_out_limit = Some(RateLimit {
        members: Some(2),
        percent: Some(50.0),
        period_secs: 60,
    });
    let mut g = group(2, vec![member("a", Some(100.0)), member("b", Some(100.0))]);
    g.max_size = 50;
    // Wants 20; at most max(2, 50% of 2) = 2 more.
    assert_eq!(engine.evaluate(&g).desired, 4);
    g.changes = vec![Change {
        at: NOW - 30 * SEC,
        from: 1,
        to: 2,
    }];
    assert_eq!(engine.evaluate(&g).desired, 3);
    g.changes.push(Change {
        at: NOW - 20 * SEC,
        from: 2,
        to: 3,
    });
    assert_eq!(
        outcome(&engine.evaluate(&g)),
        (Action::None, 2, ReasonCode::RateLimited)
    );
}

#[test]
fn health_is_judged_after_the_grace_period_with_thresholds_both_ways() {
    let engine = high_low();
    let mut sick = member("sick", Some(30.0));
    sick.health = HealthRun {
        passes: 0,
        failures: 3,
        last_heard: Some(NOW - SEC),
    };
    let e = engine.evaluate(&group(2, vec![member("a", Some(30.0)), sick.clone()]));
    assert_eq!(
        (e.action, e.replace.clone()),
        (Action::Replace, vec!["sick".to_string()])
    );
    assert!(e.health[0].unhealthy && e.health[0].why.contains("3 health checks failed"));
    // Two failures are not enough.
    sick.health.failures = 2;
    assert!(engine.evaluate(&group(2, vec![sick.clone()])).health.is_empty());
    // Inside the grace period, nothing is judged.
    sick.health.failures = 5;
    sick.launched = NOW - 100 * SEC;
    assert!(engine.evaluate(&group(2, vec![sick.clone()])).health.is_empty());
    // Healthy again after three passes.
    sick.launched = NOW - 700 * SEC;
    sick.unhealthy = true;
    sick.health = HealthRun {
        passes: 3,
        failures: 0,
        last_heard: Some(NOW - SEC),
    };
    let e = engine.evaluate(&group(2, vec![member("a", Some(30.0)), sick]));
    assert!(!e.health[0].unhealthy);
    assert!(e.replace.is_empty());
}

#[test]
fn silence_is_unhealthy_only_while_others_report() {
    let engine = high_low();
    let mut quiet = member("quiet", Some(30.0));
    quiet.health.last_heard = Some(NOW - 31 * SEC);
    let e = engine.evaluate(&group(2, vec![member("a", Some(30.0)), quiet.clone()]));
    assert_eq!(e.replace, vec!["quiet".to_string()]);
    // Everyone silent: the collector's side is the likelier fault; replace nobody, hold.
    let mut other = quiet.clone();
    other.id = "other".into();
    let e = engine.evaluate(&group(2, vec![quiet.clone(), other.clone()]));
    assert!(e.replace.is_empty());
    assert_eq!(outcome(&e), (Action::None, 2, ReasonCode::InsufficientData));
    assert!(
        e.reason.text.contains("no member has reported for 30 s"),
        "{}",
        e.reason.text
    );
    // assume_high: scale out by the smallest step.
    let engine = Engine {
        on_metric_loss: OnMetricLoss::AssumeHigh,
        ..high_low()
    };
    assert_eq!(engine.evaluate(&group(2, vec![quiet, other])).desired, 4);
}

#[test]
fn a_member_never_healthy_is_replaced_after_the_launch_timeout() {
    let mut stuck = member("stuck", None);
    stuck.state = MemberState::Pending;
    stuck.in_service_since = None;
    stuck.launched = NOW - 901 * SEC;
    let e = high_low().evaluate(&group(2, vec![member("a", Some(30.0)), stuck.clone()]));
    assert_eq!(e.replace, vec!["stuck".to_string()]);
    stuck.launched = NOW - 899 * SEC;
    assert!(high_low().evaluate(&group(2, vec![stuck])).replace.is_empty());
}

/// The plan of a group of `members` (each `member(id, Some(40.0))` unless changed) at `desired`.
fn plan_of(desired: u32, members: Vec<MemberInput>, rollout: Rollout) -> Plan {
    high_low().plan(&GroupInput {
        rollout,
        ..group(desired, members)
    })
}

fn serving(id: &str) -> MemberInput {
    member(id, Some(40.0))
}

#[test]
fn an_unhealthy_member_is_replaced_a_new_member_first_then_it_goes() {
    let mut sick = serving("sick");
    (sick.health.passes, sick.health.failures) = (0, 3);
    let plan = plan_of(2, vec![serving("a"), sick.clone()], Rollout::default());
    assert_eq!(plan.evaluation.replace, ["sick"]);
    let c = &plan.convergence;
    assert_eq!((c.replacing.as_slice(), c.launch), (&["sick".to_string()][..], 1));
    // Only one healthy member serves of the two desired: the sick one stays until its replacement serves.
    assert!(c.retire.is_empty() && c.victims.is_empty(), "{c:?}");

    sick.unhealthy = true;
    sick.replacing = true;
    let plan = plan_of(2, vec![serving("a"), sick.clone(), serving("new")], Rollout::default());
    assert_eq!(plan.convergence.retire, ["sick"]);
    assert_eq!(plan.convergence.launch, 0);
    assert!(plan.convergence.victims.is_empty());

    // Suspended replacement: judged unhealthy, but nobody launches for it.
    let mut sick = serving("sick");
    sick.health.failures = 3;
    let held = Rollout {
        replace_unhealthy: false,
        ..Rollout::default()
    };
    let plan = plan_of(2, vec![serving("a"), sick], held);
    assert!(plan.convergence.replacing.is_empty());
    assert_eq!(plan.convergence.launch, 0);
}

#[test]
fn a_member_healthy_again_in_service_is_no_longer_replaced() {
    let mut back = serving("back");
    (back.unhealthy, back.replacing) = (true, true);
    back.health.failures = 0;
    let plan = plan_of(2, vec![serving("a"), back, serving("new")], Rollout::default());
    assert_eq!(plan.evaluation.health.len(), 1, "{:?}", plan.evaluation.health);
    assert!(plan.convergence.replacing.is_empty());
    // Three live members now for two desired: the newest goes, not the one that recovered.
    assert_eq!(plan.convergence.victims, ["new"]);
}

#[test]
fn launches_fill_desired_with_at_most_max_surge_in_flight() {
    let mut booting = serving("booting");
    (booting.state, booting.in_service_since) = (MemberState::Pending, None);
    booting.launched = NOW - 10 * SEC;
    let members = vec![serving("a"), booting];
    let surge = |max_surge| Rollout {
        max_surge,
        ..Rollout::default()
    };
    assert_eq!(plan_of(4, members.clone(), surge(10)).convergence.launch, 2);
    assert_eq!(plan_of(4, members.clone(), surge(2)).convergence.launch, 1);
    assert_eq!(plan_of(4, members.clone(), surge(1)).convergence.launch, 0);
    let waiting = Rollout {
        launch: false,
        ..Rollout::default()
    };
    assert_eq!(plan_of(4, members, waiting).convergence.launch, 0);
}

#[test]
fn a_scale_in_takes_victims_among_live_unprotected_members_only() {
    let mut leaving = serving("leaving");
    leaving.leaving = true;
    let mut guarded = serving("guarded");
    guarded.protected = true;
    let members = vec![serving("a"), guarded.clone(), leaving.clone(), serving("b")];
    let plan = plan_of(1, members.clone(), Rollout::default());
    assert_eq!(plan.convergence.victims, ["b", "a"]);
    assert!(!plan.convergence.only_protected_left);

    let mut members = members;
    members[0].protected = true;
    let plan = plan_of(1, members, Rollout::default());
    assert_eq!(plan.convergence.victims, ["b"]);
    assert!(
        plan.convergence.only_protected_left,
        "a and guarded stay though the group is above desired"
    );

    let held = Rollout {
        terminate: false,
        ..Rollout::default()
    };
    assert!(
        plan_of(1, vec![serving("a"), serving("b")], held)
            .convergence
            .victims
            .is_empty()
    );
}

#[test]
fn an_instance_refresh_replaces_outdated_members_in_batches_within_its_healthy_percentage() {
    let outdated = |id: &str| MemberInput {
        outdated: true,
        ..serving(id)
    };
    let members: Vec<MemberInput> = ["a", "b", "c", "d"].into_iter().map(outdated).collect();
    let refresh = |percent| Rollout {
        refresh: Some(percent),
        ..Rollout::default()
    };
    // Keeping 50 % of 4: two at once, each replaced by a launch first.
    let c = plan_of(4, members.clone(), refresh(50)).convergence;
    assert_eq!(
        (c.refreshed.as_slice(), c.launch),
        (&["a".to_string(), "b".to_string()][..], 2)
    );
    assert!(!c.refresh_finished);
    // Keeping 100 %: still one at a time, never none.
    assert_eq!(plan_of(4, members.clone(), refresh(100)).convergence.refreshed, ["a"]);
    // One already being replaced counts against the batch.
    let mut members = members;
    members[0].replacing = true;
    assert_eq!(plan_of(4, members, refresh(50)).convergence.refreshed, ["b"]);
    // Nothing outdated and nothing being replaced: the refresh is over.
    let c = plan_of(2, vec![serving("a"), serving("b")], refresh(50)).convergence;
    assert!(c.refresh_finished && c.refreshed.is_empty());
}

#[test]
fn an_operators_desired_capacity_converges_without_a_decision() {
    let mut input = group(1, vec![serving("a"), serving("b"), serving("c")]);
    input.members[1].protected = true;
    let c = high_low().converge(&input);
    assert_eq!(
        (c.launch, c.victims.as_slice()),
        (0, &["c".to_string(), "a".to_string()][..])
    );
    input.desired = 5;
    let c = high_low().converge(&input);
    assert_eq!((c.launch, c.victims.len()), (2, 0));
}

#[test]
fn victims_pending_first_then_by_termination_policy_never_protected() {
    let at = |id: &str, launched_ago: Millis, load: f64| MemberInput {
        launched: NOW - launched_ago * SEC,
        load: Some(load),
        ..member(id, Some(load))
    };
    let mut pending = at("pending", 10, 0.0);
    pending.state = MemberState::Pending;
    let mut protected = at("protected", 5, 0.0);
    protected.protected = true;
    let members = vec![
        at("old", 7000, 50.0),
        at("mid", 3500, 10.0),
        at("new", 100, 90.0),
        pending,
        protected,
    ];
    let victims = |termination| {
        Engine {
            termination,
            ..high_low()
        }
        .victims(&members, 3, NOW)
    };
    assert_eq!(victims(Termination::Newest), ["pending", "new", "mid"]);
    assert_eq!(victims(Termination::Oldest), ["pending", "old", "mid"]);
    assert_eq!(victims(Termination::LeastLoaded), ["pending", "mid", "old"]);
    // Next billing hour: old in 200 s, mid in 100 s, new in 3500 s.
    assert_eq!(victims(Termination::ClosestToBillingHour), ["pending", "mid", "old"]);
}

// The seeds' scenarios (../shared/seeds/).

/// Seed 003 (K5): min 2, max 6; two servers at 40% and 70% for a minute average 55% > 50% → +1;
/// three at 22/10/10 average 14% < 15% → −1.
#[test]
fn seed_k5_cpu_alarms() {
    let k5 = || {
        let mut e = engine(vec![
            step("cpu_alarm_high", Comparison::Gt, 50.0, 1),
            step("cpu_alarm_low", Comparison::Lt, 15.0, -1),
        ]);
        for p in &mut e.policies {
            let Policy::Step(p) = p else { unreachable!() };
            p.period_secs = 60;
        }
        e
    };
    let mut g = group(2, vec![member("vm-1", Some(40.0)), member("vm-2", Some(70.0))]);
    (g.min_size, g.max_size) = (2, 6);
    let e = k5().evaluate(&g);
    assert_eq!(outcome(&e), (Action::ScaleOut, 3, ReasonCode::Policy));
    assert!(e.reason.text.contains("cpu 55% over 60 s"), "{}", e.reason.text);
    let mut g = group(
        3,
        vec![
            member("vm-1", Some(22.0)),
            member("vm-2", Some(10.0)),
            member("vm-3", Some(10.0)),
        ],
    );
    (g.min_size, g.max_size) = (2, 6);
    assert_eq!(outcome(&k5().evaluate(&g)), (Action::ScaleIn, 2, ReasonCode::Policy));
}

/// Seed 003 (K5): HealthyThreshold 3 and UnhealthyThreshold 3 with checks every Interval 10 s: a server
/// is judged down 3 × 10 = 30 s after it stops answering and back 30 s after it answers again.
#[test]
fn seed_k5_recovery_counts() {
    let engine = high_low();
    let interval = 10 * SEC;
    let mut server = member("web", Some(30.0));
    let mut judged_down = None;
    for check in 1..=5 {
        server.health = HealthRun {
            passes: 0,
            failures: check,
            last_heard: Some(NOW - SEC),
        };
        if engine
            .evaluate(&group(2, vec![member("a", Some(30.0)), server.clone()]))
            .health
            .iter()
            .any(|h| h.unhealthy)
        {
            judged_down.get_or_insert(i64::from(check) * interval);
        }
    }
    assert_eq!(judged_down, Some(30 * SEC));
    server.unhealthy = true;
    let mut judged_up = None;
    for check in 1..=5 {
        server.health = HealthRun {
            passes: check,
            failures: 0,
            last_heard: Some(NOW - SEC),
        };
        if engine
            .evaluate(&group(2, vec![server.clone()]))
            .health
            .iter()
            .any(|h| !h.unhealthy)
        {
            judged_up.get_or_insert(i64::from(check) * interval);
        }
    }
    assert_eq!(judged_up, Some(30 * SEC));
}

/// Seed 002 (Heat): cpu > 50 for 1 × 60 s → +1, up to max 3 and no further.
#[test]
fn seed_heat_scales_up_to_max_and_stops() {
    let mut engine = engine(vec![step("cpu_alarm_high", Comparison::Gt, 50.0, 1)]);
    engine.scale_out_cooldown_secs = 0;
    engine.warmup_secs = 0;
    let mut desired = 1;
    let mut history = Vec::new();
    for _ in 0..5 {
        let members = (0..desired).map(|i| member(&format!("vm-{i}"), Some(80.0))).collect();
        let mut g = group(desired, members);
        g.max_size = 3;
        let e = engine.evaluate(&g);
        history.push(e.reason.code);
        desired = e.desired;
    }
    assert_eq!(desired, 3);
    assert_eq!(
        history,
        [
            ReasonCode::Policy,
            ReasonCode::Policy,
            ReasonCode::AtMax,
            ReasonCode::AtMax,
            ReasonCode::AtMax
        ]
    );
}

/// Seed 003's four cooldown / grace-period patterns. A new server's boot-time CPU spike and failing
/// checks must never make the group grow on and on (pattern 4), whatever the two settings are.
#[test]
fn seed_k5_cooldown_and_grace_patterns_never_grow_endlessly() {
    let boot_secs = 300; // the server is up 300 s after launch
    for (pattern, cooldown, grace) in [(1, 750, 400), (2, 100, 400), (3, 750, 100), (4, 100, 100)] {
        let mut engine = engine(vec![step("cpu_alarm_high", Comparison::Gt, 50.0, 1)]);
        engine.scale_out_cooldown_secs = cooldown;
        engine.health.grace_period_secs = grace;
        engine.health.launch_timeout_secs = 900;
        let launched = NOW;
        let mut desired = 3;
        let mut scale_outs = 0;
        let mut last_scale_out = Some(NOW);
        for t in (0..1200).step_by(5) {
            let now = NOW + t * SEC;
            let up = t >= boot_secs;
            // The old two stay at 60% until the new one takes its share.
            let old_cpu = if up { 40.0 } else { 60.0 };
            let new = MemberInput {
                state: if up {
                    MemberState::InService
                } else {
                    MemberState::Pending
                },
                launched,
                in_service_since: up.then_some(launched + boot_secs * SEC),
                health: HealthRun {
                    passes: 0,
                    failures: if up { 0 } else { (t / 5) as u32 },
                    last_heard: Some(now - SEC),
                },
                // A boot-time spike, then its share of the load.
                ..member("new", Some(if up { 30.0 } else { 100.0 }))
            };
            let old = |id: &str| MemberInput {
                health: HealthRun {
                    passes: 10,
                    failures: 0,
                    last_heard: Some(now - SEC),
                },
                ..member(id, Some(old_cpu))
            };
            let mut g = group(desired, vec![old("a"), old("b"), new]);
            (g.now, g.min_size, g.max_size, g.last_scale_out) = (now, 2, 6, last_scale_out);
            let e = engine.evaluate(&g);
            assert!(
                e.replace.is_empty(),
                "pattern {pattern}: a booting server was judged unhealthy at {t} s: {}",
                e.explanation
            );
            if e.action == Action::ScaleOut {
                scale_outs += 1;
                last_scale_out = Some(now);
            }
            desired = e.desired;
        }
        assert_eq!((scale_outs, desired), (0, 3), "pattern {pattern}");
    }
}

// Properties over random groups.

fn arb_member() -> impl Strategy<Value = MemberInput> {
    (
        0..4u8,
        proptest::option::of(0.0..100.0f64),
        0..2000i64,
        any::<bool>(),
        any::<bool>(),
        0..5u32,
        0..5u32,
        0..60i64,
    )
        .prop_map(
            |(state, cpu, age, protected, unhealthy, passes, failures, silent)| MemberInput {
                state: match state {
                    0 => MemberState::Pending,
                    3 => MemberState::Draining,
                    _ => MemberState::InService,
                },
                launched: NOW - age * SEC,
                in_service_since: (state != 0).then_some(NOW - age / 2 * SEC),
                protected,
                unhealthy,
                health: HealthRun {
                    passes,
                    failures,
                    last_heard: Some(NOW - silent * SEC),
                },
                ..member("m", cpu)
            },
        )
}

fn arb_group() -> impl Strategy<Value = GroupInput> {
    (
        proptest::collection::vec(arb_member(), 0..8),
        0..4u32,
        0..6u32,
        0..12u32,
        any::<bool>(),
    )
        .prop_map(|(mut members, min, span, desired, cooled)| {
            for (i, m) in members.iter_mut().enumerate() {
                m.id = format!("m{i}");
            }
            GroupInput {
                min_size: min,
                max_size: min + span,
                last_scale_out: cooled.then_some(NOW - 10 * SEC),
                ..group(desired, members)
            }
        })
}

fn arb_engine() -> impl Strategy<Value = Engine> {
    (20.0..90.0f64, 1..4i32, any::<bool>()).prop_map(|(threshold, adjustment, tracking)| {
        let mut policies = vec![
            step("out", Comparison::Gt, threshold, adjustment),
            step("in", Comparison::Lt, threshold / 3.0, -adjustment),
        ];
        if tracking {
            policies.push(target(threshold));
        }
        engine(policies)
    })
}

proptest! {
    #[test]
    fn capacity_stays_within_the_limits(engine in arb_engine(), g in arb_group()) {
        let e = engine.evaluate(&g);
        prop_assert!(e.desired >= g.min_size && e.desired <= g.max_size, "{e:?}");
    }

    #[test]
    fn never_scales_in_while_a_counted_member_lacks_data(engine in arb_engine(), mut g in arb_group()) {
        for m in g.members.iter_mut().skip(1) {
            m.means = Means::new(vec![vec![None; 15]; 4]);
        }
        let e = engine.evaluate(&g);
        if e.action == Action::ScaleIn && e.reason.code != ReasonCode::Limits {
            // Only possible when no counted member lacks data.
            prop_assert!(e.members.counted <= 1, "{}", e.explanation);
        }
    }

    #[test]
    fn same_input_same_output(engine in arb_engine(), g in arb_group()) {
        prop_assert_eq!(engine.evaluate(&g), engine.evaluate(&g));
    }
}

/// The codes' names are what operators see in `explain`, the Admin API's JSON and the store: stable, the
/// same in every one; the enum's order is the priority among policies that did not act.
#[test]
fn reason_codes_have_stable_names_and_their_order_is_their_priority() {
    use ReasonCode::*;
    let all = [
        InsufficientData,
        Warming,
        Stabilizing,
        RateLimited,
        ScaleInDisabled,
        WithinTolerance,
        NoStep,
        NoChange,
        ForecastOnly,
        NoForecast,
        NoAlarm,
        Suspended,
        Limits,
        AtMax,
        AtMin,
        InCooldown,
        Forecast,
        Policy,
        NoPolicies,
    ];
    // Every code is in the list above: a new one fails to compile here until it is added.
    for code in all {
        match code {
            InsufficientData | Warming | Stabilizing | RateLimited | ScaleInDisabled | WithinTolerance | NoStep
            | NoChange | ForecastOnly | NoForecast | NoAlarm | Suspended | Limits | AtMax | AtMin | InCooldown
            | Forecast | Policy | NoPolicies => {}
        }
    }
    for code in all {
        assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
    }
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    let names: Vec<&str> = all.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names.join(" "),
        "insufficient_data warming stabilizing rate_limited scale_in_disabled within_tolerance no_step \
         no_change forecast_only no_forecast no_alarm suspended limits at_max at_min in_cooldown forecast policy \
         no_policies"
    );
}

/// The English of one whole evaluation, once: every other test asserts codes and figures.
#[test]
fn an_evaluation_reads_as_a_sentence_per_fact() {
    let e = high_low().evaluate(&group(2, vec![member("a", Some(85.0)), member("b", Some(75.0))]));
    assert_eq!(
        e.explanation,
        "scale_out 2 → 4: policy cpu-high: avg cpu > 60%: cpu 80% over 10 s, 1 of 1 periods breaching \
         (1 needed) → alarm → 2 → 4\n  \
         members: 2 counted, 0 warming, 0 pending, 0 unhealthy, 0 draining, 0 silent\n  \
         policy cpu-high: avg cpu > 60%: cpu 80% over 10 s, 1 of 1 periods breaching (1 needed) → alarm → 2 → 4\n  \
         policy cpu-low: avg cpu < 20%: cpu 80% over 10 s, 0 of 1 periods breaching (1 needed) → ok"
    );
}

fn predictive(mode: PredictiveMode) -> Policy {
    Policy::Predictive(PredictivePolicy {
        name: "daily".into(),
        metric: Metric::Cpu,
        target: 50.0,
        mode,
        scheduling_buffer_secs: None,
    })
}

/// A forecast whose load (sum of the members' CPU) is `now` for the buffer's minutes, then `later`.
fn prediction(now: f64, later: f64, buffer_secs: u32) -> Prediction {
    let minutes = (buffer_secs / 60) as usize;
    let mut loads = vec![now; minutes];
    loads.extend([later; 30]);
    Prediction {
        policy: "daily".into(),
        forecast: Ok(forecast::Forecast {
            made_at: NOW,
            model: forecast::Model::Daily,
            error: 0.04,
            level: 1.0,
            loads,
        }),
        buffer_secs,
    }
}

#[test]
fn a_forecast_only_policy_explains_and_does_nothing() {
    let engine = engine(vec![predictive(PredictiveMode::ForecastOnly)]);
    let mut g = group(2, vec![member("a", Some(40.0)), member("b", Some(40.0))]);
    g.predictions = vec![prediction(80.0, 180.0, 300)];
    let e = engine.evaluate(&g);
    assert_eq!(outcome(&e), (Action::None, 2, ReasonCode::ForecastOnly));
    assert!(
        e.verdicts[0].explanation.contains("needs 4 at 50%"),
        "{}",
        e.verdicts[0].explanation
    );
}

#[test]
fn a_scaling_forecast_raises_capacity_a_buffer_ahead() {
    let engine = engine(vec![predictive(PredictiveMode::ForecastAndScale)]);
    let mut g = group(2, vec![member("a", Some(40.0)), member("b", Some(40.0))]);
    // The load rises to 180 after 5 minutes; with a 5-minute buffer it is within the horizon now.
    g.predictions = vec![prediction(80.0, 180.0, 300)];
    assert_eq!(outcome(&engine.evaluate(&g)), (Action::ScaleOut, 4, ReasonCode::Policy));
    // With the rise 50 minutes away, past a 5-minute buffer and the lookahead, nothing yet.
    let mut far = prediction(80.0, 180.0, 3000);
    far.buffer_secs = 300;
    g.predictions = vec![far];
    assert_eq!(outcome(&engine.evaluate(&g)).0, Action::None);
    // Without a forecast it says why.
    g.predictions = vec![Prediction {
        forecast: Err(forecast::NoForecast::TooLittleHistory { minutes: 90 }),
        ..prediction(0.0, 0.0, 60)
    }];
    let e = engine.evaluate(&g);
    assert_eq!(e.verdicts[0].hold.as_ref().unwrap().code, ReasonCode::NoForecast);
    assert!(
        e.verdicts[0].explanation.contains("1.5 h of load history"),
        "{}",
        e.verdicts[0].explanation
    );
}

#[test]
fn no_scale_in_below_what_the_forecast_needs() {
    let scaling = engine(vec![target(50.0), predictive(PredictiveMode::ForecastAndScale)]);
    let idle = |n: usize| (0..n).map(|i| member(&format!("m{i}"), Some(5.0))).collect::<Vec<_>>();
    // Target tracking wants 1; the forecast needs 3 (150 % of CPU at 50 %): 4 → 3, not 1.
    let mut g = group(4, idle(4));
    g.predictions = vec![prediction(150.0, 150.0, 60)];
    assert_eq!(outcome(&scaling.evaluate(&g)), (Action::ScaleIn, 3, ReasonCode::Policy));
    // At 3, the forecast holds it.
    let mut g = group(3, idle(3));
    g.predictions = vec![prediction(150.0, 150.0, 60)];
    let e = scaling.evaluate(&g);
    assert_eq!(outcome(&e), (Action::None, 3, ReasonCode::Forecast));
    assert!(
        e.reason.text.contains("policy daily's forecast needs 3"),
        "{}",
        e.reason.text
    );
    // Forecast-only never holds a scale-in.
    let only = engine(vec![target(50.0), predictive(PredictiveMode::ForecastOnly)]);
    assert_eq!(outcome(&only.evaluate(&g)), (Action::ScaleIn, 1, ReasonCode::Policy));
}

#[test]
fn a_reload_keeps_a_predictive_policys_history_by_name_wherever_it_moves() {
    let members = vec![member("a", Some(40.0)), member("b", Some(40.0))];
    let before = engine(vec![target(50.0), predictive(PredictiveMode::ForecastAndScale)]);
    let mut predictor = forecast::Predictor::new(&before);
    let minute = 60 * SEC;
    for m in 0..37 * 60 {
        predictor.observe(&before, m * minute, &members);
    }
    let has_forecast = |p: &forecast::Predictor| p.predictions()[0].forecast.is_ok();
    assert!(has_forecast(&predictor), "{:?}", predictor.predictions());
    // Reloaded with the target-tracking policy gone: the predictive one is now first, its history kept.
    let after = engine(vec![predictive(PredictiveMode::ForecastAndScale)]);
    predictor.follow(&after);
    predictor.observe(&after, 37 * 60 * minute, &members);
    assert!(has_forecast(&predictor), "{:?}", predictor.predictions());
    // Renamed, it is another policy: it learns from the start.
    let renamed = engine(vec![Policy::Predictive(PredictivePolicy {
        name: "weekly".into(),
        metric: Metric::Cpu,
        target: 50.0,
        mode: PredictiveMode::ForecastAndScale,
        scheduling_buffer_secs: None,
    })]);
    predictor.follow(&renamed);
    predictor.observe(&renamed, 37 * 60 * minute + minute, &members);
    assert!(matches!(
        predictor.predictions()[0].forecast,
        Err(forecast::NoForecast::TooLittleHistory { .. })
    ));
}
