//! The decision engine: **where every scaling decision is made.**
//!
//! Pure: no I/O, no async, no clock reads. The caller passes the time and, for every member, the mean of
//! each policy's metric over each evaluation period ([`Engine::windows`] says which); [`evaluate`] returns
//! every policy's verdict and one [`Decision`] with the reason in words.
//!
//! Semantics (CloudWatch / Aodh alarms driving simple step policies):
//! - A policy's metric is first averaged per member over each period, then combined across members with
//!   the policy's statistic (avg, min, max, sum, p95). Members not in service, or in service for less than
//!   the group's warm-up, are left out, so a booting VM cannot trigger more scale-out.
//! - The alarm fires when at least `datapoints_to_alarm` of the last `evaluation_periods` periods breach.
//!   A period with no member data is insufficient data, which never fires.
//! - A policy that removes members never fires while any counted member sent no data in a period: a
//!   silent member counts as busy, so missing data never causes a scale-in.
//! - Of the firing policies, the one giving the largest capacity wins (a scale-out beats a scale-in).
//!   The result is clamped to min..max. No policy acts within `cooldown_secs` of the last scaling.

use serde::Deserialize;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Busy CPU, percent of the member's capacity.
    Cpu,
    Load1,
    Load5,
    Load15,
    Load1PerCpu,
    Load5PerCpu,
    Load15PerCpu,
    /// Memory in use, percent.
    Mem,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Load1 => "load1",
            Metric::Load5 => "load5",
            Metric::Load15 => "load15",
            Metric::Load1PerCpu => "load1_per_cpu",
            Metric::Load5PerCpu => "load5_per_cpu",
            Metric::Load15PerCpu => "load15_per_cpu",
            Metric::Mem => "mem",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::Cpu | Metric::Mem => "%",
            _ => "",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    Avg,
    Min,
    Max,
    Sum,
    P95,
}

impl Statistic {
    fn name(self) -> &'static str {
        match self {
            Statistic::Avg => "avg",
            Statistic::Min => "min",
            Statistic::Max => "max",
            Statistic::Sum => "sum",
            Statistic::P95 => "p95",
        }
    }

    /// Combines per-member values; `values` is not empty.
    pub fn apply(self, values: &[f64]) -> f64 {
        match self {
            Statistic::Avg => values.iter().sum::<f64>() / values.len() as f64,
            Statistic::Min => values.iter().copied().fold(f64::INFINITY, f64::min),
            Statistic::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            Statistic::Sum => values.iter().sum(),
            Statistic::P95 => {
                let mut sorted = values.to_vec();
                sorted.sort_by(f64::total_cmp);
                // Nearest rank.
                let rank = (0.95 * sorted.len() as f64).ceil() as usize;
                sorted[rank.clamp(1, sorted.len()) - 1]
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    Gt,
    Ge,
    Lt,
    Le,
}

impl Comparison {
    fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Gt => value > threshold,
            Comparison::Ge => value >= threshold,
            Comparison::Lt => value < threshold,
            Comparison::Le => value <= threshold,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Comparison::Gt => ">",
            Comparison::Ge => ">=",
            Comparison::Lt => "<",
            Comparison::Le => "<=",
        }
    }
}

/// A threshold alarm and the change in capacity it makes.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub metric: Metric,
    pub statistic: Statistic,
    pub period_secs: u32,
    pub evaluation_periods: u32,
    pub datapoints_to_alarm: u32,
    pub comparison: Comparison,
    pub threshold: f64,
    pub adjustment: i32,
}

/// What the engine knows about a group besides its members.
#[derive(Debug, Clone, PartialEq)]
pub struct Engine {
    pub min_size: u32,
    pub max_size: u32,
    pub cooldown_secs: u32,
    pub warmup_secs: u32,
    pub policies: Vec<Policy>,
}

/// A half-open time range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Millis,
    pub end: Millis,
}

/// One member as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberInput {
    pub id: String,
    /// When it joined the load balancer; `None` while it is not in service.
    pub in_service_since: Option<Millis>,
    /// `means[p][k]`: the member's mean of policy `p`'s metric over window `k` of [`Engine::windows`]
    /// (newest first); `None` where it sent no data.
    pub means: Vec<Vec<Option<f64>>>,
}

/// The group's state the engine needs.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupInput {
    pub now: Millis,
    pub desired: u32,
    pub last_scaling: Option<Millis>,
    pub members: Vec<MemberInput>,
}

/// A policy's alarm state in this evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmState {
    /// Enough periods breached; `value` is the newest period's.
    Alarm {
        value: f64,
        breaching: u32,
    },
    Ok {
        value: f64,
        breaching: u32,
    },
    InsufficientData {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub policy: String,
    pub state: AlarmState,
    /// The statistic per period, newest first; `None` for a period without data.
    pub values: Vec<Option<f64>>,
    /// In words, for the activity log and `evaluate`.
    pub explanation: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Change desired capacity.
    Scale {
        from: u32,
        to: u32,
        policy: String,
        /// The policy, the measured value and the threshold, in words.
        cause: String,
    },
    /// Keep desired capacity; `reason` says why.
    Hold { reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub verdicts: Vec<Verdict>,
    pub decision: Decision,
}

impl Engine {
    /// The windows each policy needs, newest first: `evaluation_periods` periods ending at `now`.
    pub fn windows(&self, now: Millis) -> Vec<Vec<Window>> {
        self.policies
            .iter()
            .map(|policy| {
                let period = Millis::from(policy.period_secs) * 1000;
                (0..Millis::from(policy.evaluation_periods))
                    .map(|k| Window {
                        start: now - (k + 1) * period,
                        end: now - k * period,
                    })
                    .collect()
            })
            .collect()
    }

    pub fn clamp(&self, desired: u32) -> u32 {
        desired.clamp(self.min_size, self.max_size)
    }

    /// Evaluates every policy and decides. The same input always gives the same output.
    pub fn evaluate(&self, input: &GroupInput) -> Evaluation {
        let counted: Vec<&MemberInput> = input
            .members
            .iter()
            .filter(|m| {
                m.in_service_since
                    .is_some_and(|since| input.now - since >= Millis::from(self.warmup_secs) * 1000)
            })
            .collect();
        let verdicts: Vec<Verdict> = self
            .policies
            .iter()
            .enumerate()
            .map(|(p, policy)| self.verdict(p, policy, &counted))
            .collect();
        let decision = self.decide(input, &verdicts);
        Evaluation { verdicts, decision }
    }

    fn verdict(&self, p: usize, policy: &Policy, counted: &[&MemberInput]) -> Verdict {
        let describe = format!(
            "{} {} {} {}{}",
            policy.statistic.name(),
            policy.metric.name(),
            policy.comparison.symbol(),
            fmt_value(policy.threshold),
            policy.metric.unit()
        );
        let insufficient = |values: Vec<Option<f64>>, reason: String| Verdict {
            policy: policy.name.clone(),
            explanation: format!("{}: insufficient data ({reason})", policy.name),
            state: AlarmState::InsufficientData { reason },
            values,
        };
        if counted.is_empty() {
            return insufficient(
                vec![None; policy.evaluation_periods as usize],
                "no member has been in service past its warm-up".into(),
            );
        }
        let mut values = Vec::with_capacity(policy.evaluation_periods as usize);
        let mut silent = None;
        for k in 0..policy.evaluation_periods as usize {
            let present: Vec<f64> = counted
                .iter()
                .filter_map(|m| m.means.get(p)?.get(k).copied().flatten())
                .collect();
            if present.len() < counted.len() && silent.is_none() {
                silent = counted
                    .iter()
                    .find(|m| m.means.get(p).and_then(|w| w.get(k).copied().flatten()).is_none())
                    .map(|m| (m.id.clone(), k));
            }
            values.push((!present.is_empty()).then(|| policy.statistic.apply(&present)));
        }
        if policy.adjustment < 0
            && let Some((member, k)) = silent
        {
            return insufficient(
                values,
                format!(
                    "member {member} sent no {} data in period {} of {}; a silent member counts as busy, so no scale-in",
                    policy.metric.name(),
                    k + 1,
                    policy.evaluation_periods
                ),
            );
        }
        let Some(newest) = values[0] else {
            return insufficient(
                values,
                format!("no {} data in the last {} s", policy.metric.name(), policy.period_secs),
            );
        };
        let breaching = values
            .iter()
            .filter(|v| v.is_some_and(|v| policy.comparison.holds(v, policy.threshold)))
            .count() as u32;
        let fired = breaching >= policy.datapoints_to_alarm;
        let explanation = format!(
            "{}: {describe}: {} {}{} over {} s ({breaching} of {} periods breaching, {} needed) → {}",
            policy.name,
            policy.metric.name(),
            fmt_value(newest),
            policy.metric.unit(),
            policy.period_secs,
            policy.evaluation_periods,
            policy.datapoints_to_alarm,
            if fired { "alarm" } else { "ok" }
        );
        Verdict {
            policy: policy.name.clone(),
            state: if fired {
                AlarmState::Alarm {
                    value: newest,
                    breaching,
                }
            } else {
                AlarmState::Ok {
                    value: newest,
                    breaching,
                }
            },
            values,
            explanation,
        }
    }

    fn decide(&self, input: &GroupInput, verdicts: &[Verdict]) -> Decision {
        let current = self.clamp(input.desired);
        if current != input.desired {
            return Decision::Scale {
                from: input.desired,
                to: current,
                policy: String::new(),
                cause: format!(
                    "desired capacity {} is outside min_size..max_size ({}..{})",
                    input.desired, self.min_size, self.max_size
                ),
            };
        }
        let firing = self
            .policies
            .iter()
            .zip(verdicts)
            .filter_map(|(policy, verdict)| match verdict.state {
                AlarmState::Alarm { value, .. } => {
                    let target = self.clamp(current.saturating_add_signed(policy.adjustment));
                    Some((target, policy, value))
                }
                _ => None,
            });
        // The largest resulting capacity wins; among equals, the first policy.
        let Some((target, policy, value)) = firing.fold(None, |best: Option<(u32, &Policy, f64)>, next| match best {
            Some(b) if b.0 >= next.0 => Some(b),
            _ => Some(next),
        }) else {
            return Decision::Hold {
                reason: "no policy in alarm".into(),
            };
        };
        if target == current {
            let bound = if policy.adjustment > 0 { "max_size" } else { "min_size" };
            return Decision::Hold {
                reason: format!("{} in alarm, but capacity {current} is already at {bound}", policy.name),
            };
        }
        if let Some(last) = input.last_scaling {
            let until = last + Millis::from(self.cooldown_secs) * 1000;
            if input.now < until {
                return Decision::Hold {
                    reason: format!(
                        "{} in alarm, but in cooldown for {} more s",
                        policy.name,
                        (until - input.now + 999) / 1000
                    ),
                };
            }
        }
        Decision::Scale {
            from: current,
            to: target,
            policy: policy.name.clone(),
            cause: format!(
                "policy {}: {} {} {}{} {} {}{} over {} s ({} of {} periods); capacity {current} → {target}",
                policy.name,
                policy.statistic.name(),
                policy.metric.name(),
                fmt_value(value),
                policy.metric.unit(),
                policy.comparison.symbol(),
                fmt_value(policy.threshold),
                policy.metric.unit(),
                policy.period_secs,
                policy.datapoints_to_alarm,
                policy.evaluation_periods,
            ),
        }
    }
}

fn fmt_value(value: f64) -> String {
    let rounded = format!("{value:.1}");
    rounded.strip_suffix(".0").map(str::to_string).unwrap_or(rounded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_000_000;

    fn policy(name: &str, comparison: Comparison, threshold: f64, adjustment: i32) -> Policy {
        Policy {
            name: name.into(),
            metric: Metric::Cpu,
            statistic: Statistic::Avg,
            period_secs: 10,
            evaluation_periods: 1,
            datapoints_to_alarm: 1,
            comparison,
            threshold,
            adjustment,
        }
    }

    fn engine() -> Engine {
        Engine {
            min_size: 1,
            max_size: 4,
            cooldown_secs: 60,
            warmup_secs: 30,
            policies: vec![
                policy("cpu-high", Comparison::Gt, 60.0, 2),
                policy("cpu-low", Comparison::Lt, 20.0, -1),
            ],
        }
    }

    /// A member in service long past warm-up whose mean is `cpu` for both policies.
    fn member(id: &str, cpu: Option<f64>) -> MemberInput {
        MemberInput {
            id: id.into(),
            in_service_since: Some(NOW - 600_000),
            means: vec![vec![cpu], vec![cpu]],
        }
    }

    fn group(desired: u32, members: Vec<MemberInput>) -> GroupInput {
        GroupInput {
            now: NOW,
            desired,
            last_scaling: None,
            members,
        }
    }

    #[test]
    fn windows_are_consecutive_periods_ending_now() {
        let mut engine = engine();
        engine.policies[0].evaluation_periods = 3;
        let windows = engine.windows(NOW);
        assert_eq!(windows[0].len(), 3);
        assert_eq!(
            windows[0][0],
            Window {
                start: NOW - 10_000,
                end: NOW
            }
        );
        assert_eq!(
            windows[0][2],
            Window {
                start: NOW - 30_000,
                end: NOW - 20_000
            }
        );
    }

    #[test]
    fn scales_out_with_the_policy_and_value_in_the_cause() {
        let evaluation = engine().evaluate(&group(1, vec![member("web-1", Some(85.0))]));
        let Decision::Scale {
            from,
            to,
            policy,
            cause,
        } = evaluation.decision
        else {
            panic!("{evaluation:?}")
        };
        assert_eq!((from, to, policy.as_str()), (1, 3, "cpu-high"));
        assert!(
            cause.contains("policy cpu-high") && cause.contains("avg cpu 85%") && cause.contains("> 60%"),
            "{cause}"
        );
    }

    #[test]
    fn scale_out_is_clamped_to_max_and_says_so_at_max() {
        let members = vec![
            member("a", Some(90.0)),
            member("b", Some(90.0)),
            member("c", Some(90.0)),
        ];
        let evaluation = engine().evaluate(&group(3, members.clone()));
        assert!(
            matches!(evaluation.decision, Decision::Scale { to: 4, .. }),
            "{evaluation:?}"
        );
        let evaluation = engine().evaluate(&group(4, members));
        let Decision::Hold { reason } = evaluation.decision else {
            panic!()
        };
        assert!(reason.contains("already at max_size"), "{reason}");
    }

    #[test]
    fn scales_in_when_idle_but_never_below_min() {
        let evaluation = engine().evaluate(&group(2, vec![member("a", Some(5.0)), member("b", Some(3.0))]));
        assert!(
            matches!(evaluation.decision, Decision::Scale { from: 2, to: 1, .. }),
            "{evaluation:?}"
        );
        let evaluation = engine().evaluate(&group(1, vec![member("a", Some(5.0))]));
        assert!(matches!(evaluation.decision, Decision::Hold { .. }), "{evaluation:?}");
    }

    #[test]
    fn a_silent_member_blocks_scale_in() {
        let evaluation = engine().evaluate(&group(2, vec![member("a", Some(2.0)), member("b", None)]));
        let Decision::Hold { .. } = evaluation.decision else {
            panic!("{evaluation:?}")
        };
        let AlarmState::InsufficientData { reason } = &evaluation.verdicts[1].state else {
            panic!()
        };
        assert!(reason.contains("member b sent no cpu data"), "{reason}");
    }

    #[test]
    fn no_data_at_all_never_scales() {
        let evaluation = engine().evaluate(&group(2, vec![member("a", None), member("b", None)]));
        assert!(matches!(evaluation.decision, Decision::Hold { .. }));
        assert!(
            evaluation
                .verdicts
                .iter()
                .all(|v| matches!(v.state, AlarmState::InsufficientData { .. }))
        );
    }

    #[test]
    fn warming_up_and_pending_members_are_left_out() {
        let mut booting = member("new", Some(100.0));
        booting.in_service_since = Some(NOW - 5_000); // warm-up is 30 s
        let mut pending = member("pending", Some(100.0));
        pending.in_service_since = None;
        let evaluation = engine().evaluate(&group(3, vec![member("old", Some(40.0)), booting, pending]));
        assert_eq!(evaluation.verdicts[0].values, [Some(40.0)]);
        assert!(matches!(evaluation.decision, Decision::Hold { .. }), "{evaluation:?}");
    }

    #[test]
    fn cooldown_holds_and_expires() {
        let mut input = group(1, vec![member("a", Some(90.0))]);
        input.last_scaling = Some(NOW - 50_000);
        let Decision::Hold { reason } = engine().evaluate(&input).decision else {
            panic!()
        };
        assert!(reason.contains("cooldown for 10 more s"), "{reason}");
        input.last_scaling = Some(NOW - 60_000);
        assert!(matches!(engine().evaluate(&input).decision, Decision::Scale { .. }));
    }

    #[test]
    fn m_of_n_periods() {
        let mut engine = engine();
        engine.policies[0].evaluation_periods = 3;
        engine.policies[0].datapoints_to_alarm = 2;
        let mut m = member("a", None);
        m.means[0] = vec![Some(70.0), Some(50.0), Some(65.0)];
        let evaluation = engine.evaluate(&group(1, vec![m.clone()]));
        assert!(matches!(
            evaluation.verdicts[0].state,
            AlarmState::Alarm { breaching: 2, .. }
        ));
        m.means[0] = vec![Some(70.0), Some(50.0), Some(55.0)];
        let evaluation = engine.evaluate(&group(1, vec![m]));
        assert!(matches!(
            evaluation.verdicts[0].state,
            AlarmState::Ok { breaching: 1, .. }
        ));
    }

    #[test]
    fn the_largest_capacity_wins() {
        let mut engine = engine();
        engine.policies.push(Policy {
            metric: Metric::Mem,
            ..policy("mem-high", Comparison::Gt, 50.0, 1)
        });
        // CPU is low (scale in) but memory is high (scale out): scale out.
        let mut m = member("a", Some(5.0));
        m.means.push(vec![Some(80.0)]);
        let evaluation = engine.evaluate(&group(2, vec![m]));
        assert!(
            matches!(evaluation.decision, Decision::Scale { to: 3, ref policy, .. } if policy == "mem-high"),
            "{evaluation:?}"
        );
    }

    #[test]
    fn desired_outside_the_bounds_is_corrected() {
        let evaluation = engine().evaluate(&group(9, vec![]));
        assert!(
            matches!(evaluation.decision, Decision::Scale { from: 9, to: 4, .. }),
            "{evaluation:?}"
        );
    }

    /// Seed 003 (K5): two servers at 40% and 70% for a minute average 55% > 50%, so one is added.
    #[test]
    fn the_k5_manual_example() {
        let engine = Engine {
            min_size: 2,
            max_size: 6,
            cooldown_secs: 60,
            warmup_secs: 0,
            policies: vec![Policy {
                period_secs: 60,
                ..policy("cpu_alarm_high", Comparison::Gt, 50.0, 1)
            }],
        };
        let mut a = member("vm-1", Some(40.0));
        let mut b = member("vm-2", Some(70.0));
        a.means.truncate(1);
        b.means.truncate(1);
        let evaluation = engine.evaluate(&group(2, vec![a, b]));
        let Decision::Scale {
            from: 2, to: 3, cause, ..
        } = evaluation.decision
        else {
            panic!("{evaluation:?}")
        };
        assert!(cause.contains("avg cpu 55% > 50% over 60 s"), "{cause}");
    }

    #[test]
    fn statistics() {
        let values = [10.0, 20.0, 30.0, 40.0];
        assert_eq!(Statistic::Avg.apply(&values), 25.0);
        assert_eq!(Statistic::Min.apply(&values), 10.0);
        assert_eq!(Statistic::Max.apply(&values), 40.0);
        assert_eq!(Statistic::Sum.apply(&values), 100.0);
        assert_eq!(Statistic::P95.apply(&values), 40.0);
        let many: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(Statistic::P95.apply(&many), 95.0);
    }
}
