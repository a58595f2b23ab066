//! The decision engine: **where every scaling decision is made.**
//!
//! Pure: no I/O, no async, no clock reads. The caller passes the time, the group's limits and, for every
//! member, its state, its health run and the mean of each policy's metric over each evaluation period
//! ([`Engine::windows`] says which); [`Engine::evaluate`] returns every policy's verdict and one decision
//! with its reason, in words and as a code.
//!
//! Semantics (each also in `docs/policies.md`):
//! - **Who counts.** Only members in service past the warm-up and not unhealthy feed the aggregates. A
//!   scale-out adds to the counted members, so members still launching or warming up absorb a repeated
//!   alarm: a booting VM's CPU spike cannot cause more scale-out (the K5 guide's pattern 4).
//! - **Missing data never helps a policy act.** For an alarm on high values a silent member counts as 0;
//!   for an alarm on low values (a scale-in) it makes the period insufficient; target tracking counts it
//!   as 0 for scale-out and refuses to scale in. When no member reports at all, `on_metric_loss` decides.
//! - **Combining.** Scale-out beats scale-in; among scale-outs the largest capacity wins, among scale-ins
//!   also the largest (the smallest step down). The result is clamped to min..max, saying so. A scale-out
//!   waits `scale_out_cooldown_secs` after the last scale-out; a scale-in waits `scale_in_cooldown_secs`
//!   after any scaling.
//! - **Health.** Judged only after the grace period: unhealthy after `unhealthy_threshold` failed checks
//!   in a row, or when silent for `silent_secs` while others still report; healthy again after
//!   `healthy_threshold` passes. A member never healthy `launch_timeout_secs` after launch is unhealthy.

#![forbid(unsafe_code)]

pub mod forecast;
mod memory;
mod plan;
mod policy;
mod reading;
pub mod schedule;
pub mod snapshot;

use serde::Serialize;

pub use memory::{Capacity, ScalingMemory};
pub use plan::{Convergence, Plan, Rollout};
pub use policy::{
    AdjustmentType, AlarmState, Comparison, OnMetricLoss, Policy, Prediction, PredictiveMode, PredictivePolicy,
    RateLimit, Statistic, Step, StepPolicy, TargetPolicy, Verdict,
};
pub use reading::{HealthRun, MAX_CUSTOM_METRICS, Metric, Reading, mean};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Which members a scale-in removes first (after members still launching, which are cancelled first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Termination {
    /// Long-running members keep their warm caches.
    #[default]
    Newest,
    Oldest,
    /// The lowest CPU in the latest sample.
    LeastLoaded,
    /// The member whose next billing period starts soonest (`billing_period_secs`).
    ClosestToBillingHour,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthRules {
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub grace_period_secs: u32,
    pub silent_secs: u32,
    pub launch_timeout_secs: u32,
    pub replace_unhealthy: bool,
}

/// A group's rules, from its configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Engine {
    pub scale_out_cooldown_secs: u32,
    pub scale_in_cooldown_secs: u32,
    pub warmup_secs: u32,
    pub policies: Vec<Policy>,
    pub health: HealthRules,
    pub on_metric_loss: OnMetricLoss,
    pub termination: Termination,
    pub billing_period_secs: u32,
}

/// One policy's evaluation periods, newest first, and the metric to average over each.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyWindows {
    pub metric: Metric,
    pub windows: Vec<Window>,
}

/// A member's means of each policy's metric over each of that policy's periods, in the shape
/// [`Engine::windows`] asked for them; read by policy and period with [`Means::get`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Means(Vec<Vec<Option<f64>>>);

impl Means {
    /// `per_policy[p][k]`: the mean over period `k` of the `p`-th [`PolicyWindows`] that
    /// [`Engine::windows`] gave (`None` where the member sent no data).
    pub fn new(per_policy: Vec<Vec<Option<f64>>>) -> Self {
        Means(per_policy)
    }

    /// The mean of policy `policy`'s metric over its period `period` (0: the one ending now), if any.
    pub fn get(&self, policy: usize, period: usize) -> Option<f64> {
        self.0.get(policy)?.get(period).copied().flatten()
    }
}

/// A half-open time range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Millis,
    pub end: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Launched, not yet behind the load balancer.
    Pending,
    /// Behind the load balancer.
    InService,
    /// Leaving: out of the load balancer, finishing its requests.
    Draining,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Pending => "pending",
            MemberState::InService => "in_service",
            MemberState::Draining => "draining",
        }
    }
}

/// One member as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberInput {
    pub id: String,
    pub state: MemberState,
    pub launched: Millis,
    /// When this collector started watching it, if after its launch (it restarted since): the grace
    /// period, the launch timeout and silence count from then, so a restart never condemns members whose
    /// agents have not reconnected yet.
    pub watched_since: Option<Millis>,
    /// When it joined the load balancer.
    pub in_service_since: Option<Millis>,
    pub protected: bool,
    /// Judged unhealthy by an earlier evaluation.
    pub unhealthy: bool,
    pub health: HealthRun,
    /// Its mean of each policy's metric over each of the policy's periods ([`Engine::windows`]).
    pub means: Means,
    /// Latest CPU, for `least_loaded`.
    pub load: Option<f64>,
    /// Marked for replacement: a new member launches first, then this one goes.
    pub replacing: bool,
    /// Leaving the group (draining, or its termination under way).
    pub leaving: bool,
    /// Launched from an older launch specification than the group's (an instance refresh replaces it).
    pub outdated: bool,
}

impl MemberInput {
    /// Since when its health may be judged: its launch, or this collector's start if later.
    fn watched(&self) -> Millis {
        self.watched_since.map_or(self.launched, |w| w.max(self.launched))
    }
}

/// A target-tracking recommendation made by an earlier evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Recommendation {
    pub policy: String,
    pub at: Millis,
    pub capacity: u32,
}

/// A change of desired capacity made by a policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Change {
    pub at: Millis,
    pub from: u32,
    pub to: u32,
}

/// The group's state the engine needs.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupInput {
    pub now: Millis,
    pub min_size: u32,
    pub max_size: u32,
    pub desired: u32,
    pub last_scale_out: Option<Millis>,
    pub last_scale_in: Option<Millis>,
    /// Scaling suspended by an operator: decide nothing.
    pub suspended: bool,
    pub members: Vec<MemberInput>,
    pub recommendations: Vec<Recommendation>,
    pub changes: Vec<Change>,
    /// Predictive policies' forecasts, made by the caller from the group's load history.
    pub predictions: Vec<Prediction>,
    /// What carrying out the decision may do this step.
    pub rollout: Rollout,
}

/// Why something did or did not happen: a stable code and words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    pub code: ReasonCode,
    pub text: String,
}

impl Reason {
    pub fn new(code: ReasonCode, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }
}

/// A reason's stable code: in JSON, the store and the Admin API, its `snake_case` name.
///
/// The first group is what a policy that did not act says, in order of priority: when no policy acts, the
/// decision gives the earliest one any policy gave (a policy short of data is more telling than one within
/// its tolerance). The rest are the decision's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    InsufficientData,
    Warming,
    Stabilizing,
    RateLimited,
    ScaleInDisabled,
    WithinTolerance,
    NoStep,
    NoChange,
    /// A predictive policy in `forecast_only` mode: its forecast, no action.
    ForecastOnly,
    /// A predictive policy without a forecast (too little history, no pattern).
    NoForecast,
    /// A policy whose alarm is not raised; as the decision's reason, no policy is in alarm.
    NoAlarm,
    Suspended,
    Limits,
    AtMax,
    AtMin,
    InCooldown,
    /// A scale-in held at the capacity a predictive policy's forecast needs.
    Forecast,
    /// A policy's proposal was carried out.
    Policy,
    NoPolicies,
}

impl ReasonCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientData => "insufficient_data",
            Self::Warming => "warming",
            Self::Stabilizing => "stabilizing",
            Self::RateLimited => "rate_limited",
            Self::ScaleInDisabled => "scale_in_disabled",
            Self::WithinTolerance => "within_tolerance",
            Self::NoStep => "no_step",
            Self::NoChange => "no_change",
            Self::ForecastOnly => "forecast_only",
            Self::NoForecast => "no_forecast",
            Self::NoAlarm => "no_alarm",
            Self::Suspended => "suspended",
            Self::Limits => "limits",
            Self::AtMax => "at_max",
            Self::AtMin => "at_min",
            Self::InCooldown => "in_cooldown",
            Self::Forecast => "forecast",
            Self::Policy => "policy",
            Self::NoPolicies => "no_policies",
        }
    }
}

/// What one evaluation decides about capacity, before health replacement is added.
struct Decision {
    desired: u32,
    action: Action,
    reason: Reason,
    /// The policy whose proposal was carried out or held back.
    policy: Option<String>,
}

/// The two ways a policy can move capacity; what differs between them is data, and one gate
/// ([`Engine::gate`]) decides both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Out,
    In,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    ScaleOut,
    ScaleIn,
    Replace,
    None,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::ScaleOut => "scale_out",
            Action::ScaleIn => "scale_in",
            Action::Replace => "replace",
            Action::None => "none",
        }
    }
}

/// Members by state in one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MemberCounts {
    /// In service past the warm-up and healthy: these feed the aggregates.
    pub counted: u32,
    pub warming: u32,
    pub pending: u32,
    pub unhealthy: u32,
    pub draining: u32,
    /// In service but not heard from for `silent_secs`.
    pub silent: u32,
}

/// A member whose health judgement changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthChange {
    pub member: String,
    pub unhealthy: bool,
    pub why: String,
}

/// Everything one evaluation decided and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub at: Millis,
    pub desired_before: u32,
    /// After the decision and clamping.
    pub desired: u32,
    pub action: Action,
    /// For a change, its cause; otherwise why nothing changed.
    pub reason: Reason,
    /// The policy that decided, if one did.
    pub policy: Option<String>,
    pub members: MemberCounts,
    pub verdicts: Vec<Verdict>,
    pub health: Vec<HealthChange>,
    /// Unhealthy members to replace: a new member first, then this one goes.
    pub replace: Vec<String>,
    /// Recommendations to pass back in later evaluations.
    pub recommendations: Vec<Recommendation>,
    /// The whole evaluation in words.
    pub explanation: String,
}

/// What the policies see of the group.
pub(crate) struct Context<'a> {
    now: Millis,
    desired: u32,
    counted: Vec<&'a MemberInput>,
    /// Members still launching or warming up: capacity not yet counted.
    uncounted: u32,
    metric_loss: Option<String>,
    on_metric_loss: OnMetricLoss,
    recommendations: &'a [Recommendation],
    changes: &'a [Change],
    predictions: &'a [Prediction],
}

impl Context<'_> {
    /// Members added (`out`) or removed by policies within the last `period_secs`.
    fn changed_within(&self, period_secs: u32, out: bool) -> u32 {
        let since = self.now - Millis::from(period_secs) * 1000;
        self.changes
            .iter()
            .filter(|c| c.at > since && (c.to > c.from) == out)
            .map(|c| c.to.abs_diff(c.from))
            .sum()
    }
}

impl Engine {
    /// What each policy averages, in the order of [`Engine::policies`]: its metric over its periods
    /// ending at `now`, newest first.
    pub fn windows(&self, now: Millis) -> Vec<PolicyWindows> {
        self.policies
            .iter()
            .map(|policy| {
                let period = Millis::from(policy.period_secs()) * 1000;
                let windows = (0..Millis::from(policy.periods()))
                    .map(|k| Window {
                        start: now - (k + 1) * period,
                        end: now - k * period,
                    })
                    .collect();
                PolicyWindows {
                    metric: policy.metric(),
                    windows,
                }
            })
            .collect()
    }

    /// How far back the policies look, in milliseconds.
    pub fn lookback_ms(&self) -> Millis {
        self.policies
            .iter()
            .map(|p| Millis::from(p.period_secs()) * Millis::from(p.periods()) * 1000)
            .max()
            .unwrap_or(0)
    }

    /// Evaluates every policy and decides. The same input always gives the same output.
    pub fn evaluate(&self, input: &GroupInput) -> Evaluation {
        let health = self.judge_health(input);
        let unhealthy = |m: &MemberInput| {
            health
                .iter()
                .find(|c| c.member == m.id)
                .map_or(m.unhealthy, |c| c.unhealthy)
        };
        let silent_ms = Millis::from(self.health.silent_secs) * 1000;
        let mut counts = MemberCounts::default();
        let mut counted = Vec::new();
        for member in &input.members {
            match member.state {
                MemberState::Draining => counts.draining += 1,
                _ if unhealthy(member) => counts.unhealthy += 1,
                MemberState::Pending => counts.pending += 1,
                MemberState::InService => {
                    let since = member.in_service_since.unwrap_or(member.launched);
                    if input.now - since < Millis::from(self.warmup_secs) * 1000 {
                        counts.warming += 1;
                    } else {
                        counts.counted += 1;
                        counted.push(member);
                    }
                }
            }
            if member.state == MemberState::InService && self.is_silent(member, input.now) {
                counts.silent += 1;
            }
        }
        let in_service = input
            .members
            .iter()
            .filter(|m| m.state == MemberState::InService)
            .count() as u32;
        let metric_loss = (in_service > 0 && counts.silent == in_service).then(|| {
            format!(
                "no member has reported for {} s (on_metric_loss = \"{}\")",
                silent_ms / 1000,
                match self.on_metric_loss {
                    OnMetricLoss::Hold => "hold",
                    OnMetricLoss::AssumeHigh => "assume_high",
                }
            )
        });
        let context = Context {
            now: input.now,
            desired: input.desired,
            counted,
            uncounted: counts.warming + counts.pending,
            metric_loss,
            on_metric_loss: self.on_metric_loss,
            recommendations: &input.recommendations,
            changes: &input.changes,
            predictions: &input.predictions,
        };
        let verdicts: Vec<Verdict> = self
            .policies
            .iter()
            .enumerate()
            .map(|(p, policy)| policy.verdict(p, &context))
            .collect();
        let recommendations = self
            .policies
            .iter()
            .zip(&verdicts)
            .filter_map(|(policy, verdict)| {
                Some(Recommendation {
                    policy: policy.name().to_string(),
                    at: input.now,
                    capacity: verdict.recommendation?,
                })
            })
            .collect();
        let Decision {
            desired,
            action,
            reason,
            policy,
        } = self.decide(input, &verdicts);
        let replace: Vec<String> = if self.health.replace_unhealthy && !input.suspended {
            input
                .members
                .iter()
                .filter(|m| unhealthy(m) && m.state != MemberState::Draining)
                .map(|m| m.id.clone())
                .collect()
        } else {
            Vec::new()
        };
        let action = if action == Action::None && !replace.is_empty() {
            Action::Replace
        } else {
            action
        };
        let mut evaluation = Evaluation {
            at: input.now,
            desired_before: input.desired,
            desired,
            action,
            reason,
            policy,
            members: counts,
            verdicts,
            health,
            replace,
            recommendations,
            explanation: String::new(),
        };
        evaluation.explanation = evaluation.describe();
        evaluation
    }

    fn is_silent(&self, member: &MemberInput, now: Millis) -> bool {
        let heard = member
            .health
            .last_heard
            .or(member.in_service_since)
            .unwrap_or(member.launched)
            .max(member.watched());
        now - heard > Millis::from(self.health.silent_secs) * 1000
    }

    /// Members whose health judgement changes in this evaluation.
    fn judge_health(&self, input: &GroupInput) -> Vec<HealthChange> {
        let rules = &self.health;
        let reporting = input
            .members
            .iter()
            .any(|m| m.state == MemberState::InService && !self.is_silent(m, input.now));
        let mut changes = Vec::new();
        for member in &input.members {
            if input.now - member.watched() < Millis::from(rules.grace_period_secs) * 1000 {
                continue;
            }
            let change = |unhealthy: bool, why: String| HealthChange {
                member: member.id.clone(),
                unhealthy,
                why,
            };
            match (member.state, member.unhealthy) {
                (MemberState::Pending, false)
                    if member.in_service_since.is_none()
                        && input.now - member.watched() > Millis::from(rules.launch_timeout_secs) * 1000 =>
                {
                    changes.push(change(
                        true,
                        format!(
                            "not healthy {} s after launch (launch_timeout_secs)",
                            rules.launch_timeout_secs
                        ),
                    ));
                }
                (MemberState::InService, false) => {
                    if member.health.failures >= rules.unhealthy_threshold {
                        changes.push(change(
                            true,
                            format!("{} health checks failed in a row", member.health.failures),
                        ));
                    } else if reporting && self.is_silent(member, input.now) {
                        changes.push(change(
                            true,
                            format!(
                                "silent for more than {} s while other members report",
                                rules.silent_secs
                            ),
                        ));
                    }
                }
                (MemberState::InService, true)
                    if member.health.passes >= rules.healthy_threshold && !self.is_silent(member, input.now) =>
                {
                    changes.push(change(
                        false,
                        format!("{} health checks passed in a row", member.health.passes),
                    ));
                }
                _ => {}
            }
        }
        changes
    }

    fn decide(&self, input: &GroupInput, verdicts: &[Verdict]) -> Decision {
        let current = input.desired;
        let (min, max) = (input.min_size, input.max_size);
        let hold = |code, text: String| Decision {
            desired: current,
            action: Action::None,
            reason: Reason::new(code, text),
            policy: None,
        };
        if input.suspended {
            return hold(ReasonCode::Suspended, "scaling is suspended by an operator".into());
        }
        if !(min..=max).contains(&current) {
            let to = current.clamp(min, max);
            let action = if to > current {
                Action::ScaleOut
            } else {
                Action::ScaleIn
            };
            let text =
                format!("desired capacity {current} is outside min_size..max_size ({min}..{max}); {current} → {to}");
            return Decision {
                desired: to,
                action,
                reason: Reason::new(ReasonCode::Limits, text),
                policy: None,
            };
        }
        // Scale-out beats scale-in; in each direction the largest capacity wins, the first policy on a tie.
        for direction in [Direction::Out, Direction::In] {
            let best = verdicts
                .iter()
                .enumerate()
                .filter_map(|(i, v)| Some((i, v, v.proposal?)))
                .filter(|(_, _, to)| *to != current && (*to > current) == (direction == Direction::Out))
                .max_by_key(|(i, _, to)| (*to, std::cmp::Reverse(*i)));
            if let Some((_, verdict, wanted)) = best {
                // A scale-in goes no lower than a predictive policy's forecast needs.
                let floor = verdicts
                    .iter()
                    .zip(&self.policies)
                    .filter_map(|(v, p)| Some((v.floor?, p.name())))
                    .max();
                if direction == Direction::In
                    && let Some((floor, predictive)) = floor
                    && wanted < floor
                {
                    if floor >= current {
                        let text = format!(
                            "{} asks for {wanted}, but policy {predictive}'s forecast needs {floor}",
                            verdict.policy
                        );
                        return Decision {
                            policy: Some(verdict.policy.clone()),
                            ..hold(ReasonCode::Forecast, text)
                        };
                    }
                    return self.gate(input, direction, verdict, floor);
                }
                return self.gate(input, direction, verdict, wanted);
            }
        }
        if verdicts.is_empty() {
            return hold(ReasonCode::NoPolicies, "the group has no scaling policy".into());
        }
        // The most telling reason a policy gave for doing nothing.
        let reason = verdicts
            .iter()
            .filter_map(|v| v.hold.as_ref())
            .filter(|hold| hold.code < ReasonCode::NoAlarm)
            .min_by_key(|hold| hold.code)
            .cloned()
            .unwrap_or_else(|| Reason::new(ReasonCode::NoAlarm, "no policy in alarm"));
        Decision {
            desired: current,
            action: Action::None,
            reason,
            policy: None,
        }
    }

    /// Whether `verdict`'s proposal of `wanted` goes ahead: not past the limit in its direction, not within
    /// its cooldown; clamped to the limit, saying so.
    fn gate(&self, input: &GroupInput, direction: Direction, verdict: &Verdict, wanted: u32) -> Decision {
        let current = input.desired;
        let (at_limit, limit_code, limit_name, limit, last, cooldown_secs, action, word) = match direction {
            Direction::Out => (
                current >= input.max_size,
                ReasonCode::AtMax,
                "max_size",
                input.max_size,
                input.last_scale_out,
                self.scale_out_cooldown_secs,
                Action::ScaleOut,
                "scale-out",
            ),
            Direction::In => (
                current <= input.min_size,
                ReasonCode::AtMin,
                "min_size",
                input.min_size,
                input.last_scale_out.max(input.last_scale_in),
                self.scale_in_cooldown_secs,
                Action::ScaleIn,
                "scale-in",
            ),
        };
        let policy = Some(verdict.policy.clone());
        let hold = |code, text: String| Decision {
            desired: current,
            action: Action::None,
            reason: Reason::new(code, text),
            policy: policy.clone(),
        };
        if at_limit {
            let text = format!(
                "{} asks for {wanted}, but capacity {current} is at {limit_name}",
                verdict.policy
            );
            return hold(limit_code, text);
        }
        if let Some(left) = cooldown_left(last, cooldown_secs, input.now) {
            let text = format!(
                "{} asks for {wanted}, but {word} cooldown has {left} s left",
                verdict.policy
            );
            return hold(ReasonCode::InCooldown, text);
        }
        let to = match direction {
            Direction::Out => wanted.min(limit),
            Direction::In => wanted.max(limit),
        };
        let clamped = if to != wanted {
            format!(" (clamped to {limit_name} {limit})")
        } else {
            String::new()
        };
        Decision {
            desired: to,
            action,
            reason: Reason::new(ReasonCode::Policy, format!("{}{clamped}", verdict.explanation)),
            policy,
        }
    }
}

/// Seconds of cooldown left after `last`, if any.
fn cooldown_left(last: Option<Millis>, cooldown_secs: u32, now: Millis) -> Option<i64> {
    let until = last? + Millis::from(cooldown_secs) * 1000;
    (now < until).then(|| (until - now + 999) / 1000)
}

impl Evaluation {
    fn describe(&self) -> String {
        let m = &self.members;
        let mut text = match self.action {
            Action::None => format!(
                "hold at {} ({}): {}",
                self.desired,
                self.reason.code.as_str(),
                self.reason.text
            ),
            Action::Replace => format!("replace {}; capacity stays {}", self.replace.join(", "), self.desired),
            _ => format!(
                "{} {} → {}: {}",
                self.action.as_str(),
                self.desired_before,
                self.desired,
                self.reason.text
            ),
        };
        text.push_str(&format!(
            "\n  members: {} counted, {} warming, {} pending, {} unhealthy, {} draining, {} silent",
            m.counted, m.warming, m.pending, m.unhealthy, m.draining, m.silent
        ));
        for verdict in &self.verdicts {
            text.push_str("\n  ");
            text.push_str(&verdict.explanation);
        }
        for change in &self.health {
            let state = if change.unhealthy { "unhealthy" } else { "healthy again" };
            text.push_str(&format!("\n  {} {state}: {}", change.member, change.why));
        }
        text
    }
}

pub(crate) fn fmt_value(value: f64) -> String {
    let rounded = format!("{value:.1}");
    rounded.strip_suffix(".0").map(str::to_string).unwrap_or(rounded)
}

#[cfg(test)]
mod tests;
