//! The two kinds of scaling policy and how each judges one evaluation: threshold alarms driving step
//! adjustments (CloudWatch, Aodh, K5, ssh_scale.py) and target tracking (EC2, Kubernetes' HPA).

use serde::{Deserialize, Serialize};

use super::{Context, Millis, Reason, ReasonCode, fmt_value};
use crate::reading::Metric;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    Avg,
    Min,
    Max,
    Sum,
    P95,
}

impl Statistic {
    pub fn name(self) -> &'static str {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    Gt,
    Ge,
    Lt,
    Le,
}

impl Comparison {
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Gt => value > threshold,
            Comparison::Ge => value >= threshold,
            Comparison::Lt => value < threshold,
            Comparison::Le => value <= threshold,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Comparison::Gt => ">",
            Comparison::Ge => ">=",
            Comparison::Lt => "<",
            Comparison::Le => "<=",
        }
    }

    /// Whether the alarm fires on high values.
    pub fn is_upward(self) -> bool {
        matches!(self, Comparison::Gt | Comparison::Ge)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustmentType {
    /// Add (or remove) this many members.
    ChangeInCapacity,
    /// Set the capacity to this many members.
    ExactCapacity,
    /// Add (or remove) this percentage of the capacity, at least `min_adjustment_step` members.
    PercentChangeInCapacity,
}

/// One step of a step policy: applies when `lower <= value - threshold < upper` (for an alarm on low
/// values, `lower < value - threshold <= upper`); a missing bound is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub lower: Option<f64>,
    pub upper: Option<f64>,
    pub adjustment: i32,
}

impl Step {
    fn contains(&self, breach: f64, upward: bool) -> bool {
        if upward {
            self.lower.is_none_or(|l| breach >= l) && self.upper.is_none_or(|u| breach < u)
        } else {
            self.lower.is_none_or(|l| breach > l) && self.upper.is_none_or(|u| breach <= u)
        }
    }
}

/// A threshold alarm: `statistic(metric)` across members, per period, compared with `threshold`; fires
/// when at least `datapoints_to_alarm` of the last `evaluation_periods` periods breach.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPolicy {
    pub name: String,
    pub metric: Metric,
    pub statistic: Statistic,
    pub period_secs: u32,
    pub evaluation_periods: u32,
    pub datapoints_to_alarm: u32,
    pub comparison: Comparison,
    pub threshold: f64,
    pub adjustment_type: AdjustmentType,
    /// At least one; a simple policy has one step without bounds.
    pub steps: Vec<Step>,
    pub min_adjustment_step: u32,
}

/// How fast target tracking may change capacity: at most the larger of `members` and `percent` of the
/// capacity within any `period_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub members: Option<u32>,
    pub percent: Option<f64>,
    pub period_secs: u32,
}

impl RateLimit {
    fn allowed(&self, capacity: u32) -> u32 {
        let by_percent = self
            .percent
            .map_or(0, |p| (p * f64::from(capacity) / 100.0).ceil() as u32);
        self.members.unwrap_or(0).max(by_percent)
    }
}

/// Keep `metric`'s average over the last `period_secs` at `target`.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetPolicy {
    pub name: String,
    pub metric: Metric,
    pub target: f64,
    pub period_secs: u32,
    /// No scale-out while the metric is within this fraction above the target.
    pub scale_out_tolerance: f64,
    /// No scale-in while the metric is within this fraction below the target.
    pub scale_in_tolerance: f64,
    /// Scale-in acts on the highest recommendation of this many seconds.
    pub stabilization_secs: u32,
    pub disable_scale_in: bool,
    pub scale_out_limit: Option<RateLimit>,
    pub scale_in_limit: Option<RateLimit>,
}

/// Whether a predictive policy acts on its forecast or only says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictiveMode {
    /// The forecast in the explanation, no action (EC2's default, to judge a forecast before trusting it).
    #[default]
    ForecastOnly,
    /// Capacity raised ahead of the forecast load, and never scaled in below it.
    ForecastAndScale,
}

/// Capacity for the load the group's own history forecasts, in service `scheduling_buffer_secs` ahead
/// of it (see [`crate::forecast`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PredictivePolicy {
    pub name: String,
    /// What the load is measured in: the sum of this metric over the serving members.
    pub metric: Metric,
    /// Each member is planned at this value of the metric.
    pub target: f64,
    pub mode: PredictiveMode,
    /// How far ahead capacity is raised; `None`: the group's measured launch-to-in-service time.
    pub scheduling_buffer_secs: Option<u32>,
}

/// What a predictive policy's forecast says at one evaluation, made by the caller from the group's load
/// history ([`crate::forecast::forecast`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub policy: String,
    pub forecast: Result<crate::forecast::Forecast, crate::forecast::NoForecast>,
    /// How far ahead the capacity must be in service.
    pub buffer_secs: u32,
}

/// Minutes a forecast covers beyond the scheduling buffer.
pub const FORECAST_LOOKAHEAD_MINUTES: i64 = 10;

impl PredictivePolicy {
    /// The minutes of forecast this policy reads.
    pub fn horizon_minutes(&self, buffer_secs: u32) -> i64 {
        i64::from(buffer_secs.div_ceil(60)) + FORECAST_LOOKAHEAD_MINUTES
    }

    fn verdict(&self, context: &Context) -> Verdict {
        let v = verdict(&self.name, AlarmState::Tracking, vec![None]);
        let Some(prediction) = context.predictions.iter().find(|p| p.policy == self.name) else {
            return v.holding(ReasonCode::NoForecast, "no forecast made yet".into());
        };
        let forecast = match &prediction.forecast {
            Ok(forecast) => forecast,
            Err(why) => return v.holding(ReasonCode::NoForecast, why.to_string()),
        };
        let minutes = (self.horizon_minutes(prediction.buffer_secs) as usize).min(forecast.loads.len());
        let (peak_minute, peak) = forecast.loads[..minutes]
            .iter()
            .copied()
            .enumerate()
            .fold((0, 0.0), |best, (i, load)| if load > best.1 { (i, load) } else { best });
        let capacity = members_for(peak, self.target).max(1);
        let text = format!(
            "forecast ({} model, {:.0} % off on the last day): load {} {} within {} min needs {capacity} at {}{}",
            forecast.model.name(),
            forecast.error * 100.0,
            fmt_value(peak),
            self.metric.name(),
            peak_minute + 1,
            fmt_value(self.target),
            self.metric.unit()
        );
        let mut v = Verdict {
            values: vec![Some(peak)],
            ..v
        };
        match self.mode {
            PredictiveMode::ForecastOnly => v.holding(
                ReasonCode::ForecastOnly,
                format!("{text} (mode forecast_only: no action)"),
            ),
            PredictiveMode::ForecastAndScale => {
                v.floor = Some(capacity);
                if capacity > context.desired {
                    v.proposing(capacity, format!("{text} → {} → {capacity}", context.desired))
                } else {
                    v.holding(ReasonCode::NoChange, format!("{text}, already there"))
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    Step(StepPolicy),
    TargetTracking(TargetPolicy),
    Predictive(PredictivePolicy),
}

/// What to do when no member has reported for the group's silence limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMetricLoss {
    /// Change nothing.
    #[default]
    Hold,
    /// Treat the group as overloaded: scale-out policies add their smallest step.
    AssumeHigh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmState {
    Alarm,
    Ok,
    InsufficientData,
    /// Target tracking: the verdict is a recommendation, not an alarm.
    Tracking,
}

/// One policy's judgement in one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub policy: String,
    pub state: AlarmState,
    /// The aggregate per period, newest first; `None` for a period without data.
    pub values: Vec<Option<f64>>,
    /// The capacity this policy asks for, when it asks for a change.
    pub proposal: Option<u32>,
    /// Why it asks for nothing, when it does not.
    pub hold: Option<Reason>,
    /// In words.
    pub explanation: String,
    /// Target tracking's recommendation before stabilization, to remember for later evaluations.
    #[serde(skip)]
    pub recommendation: Option<u32>,
    /// A predictive policy that scales: the capacity its forecast needs, below which no scale-in goes.
    pub floor: Option<u32>,
}

impl Policy {
    pub fn name(&self) -> &str {
        match self {
            Policy::Step(p) => &p.name,
            Policy::TargetTracking(p) => &p.name,
            Policy::Predictive(p) => &p.name,
        }
    }

    pub fn metric(&self) -> Metric {
        match self {
            Policy::Step(p) => p.metric,
            Policy::TargetTracking(p) => p.metric,
            Policy::Predictive(p) => p.metric,
        }
    }

    pub fn period_secs(&self) -> u32 {
        match self {
            Policy::Step(p) => p.period_secs,
            Policy::TargetTracking(p) => p.period_secs,
            // The load is recorded a minute at a time.
            Policy::Predictive(_) => 60,
        }
    }

    /// How many periods back the policy looks.
    pub fn periods(&self) -> u32 {
        match self {
            Policy::Step(p) => p.evaluation_periods,
            Policy::TargetTracking(_) | Policy::Predictive(_) => 1,
        }
    }

    pub(super) fn verdict(&self, p: usize, context: &Context) -> Verdict {
        match self {
            Policy::Step(policy) => policy.verdict(p, context),
            Policy::TargetTracking(policy) => policy.verdict(p, context),
            Policy::Predictive(policy) => policy.verdict(context),
        }
    }
}

fn verdict(policy: &str, state: AlarmState, values: Vec<Option<f64>>) -> Verdict {
    Verdict {
        policy: policy.to_string(),
        state,
        values,
        proposal: None,
        hold: None,
        explanation: String::new(),
        recommendation: None,
        floor: None,
    }
}

impl Verdict {
    fn holding(mut self, code: ReasonCode, text: String) -> Self {
        self.explanation = format!("policy {}: {text}", self.policy);
        self.hold = Some(Reason { code, text });
        self
    }

    fn proposing(mut self, capacity: u32, text: String) -> Self {
        self.explanation = format!("policy {}: {text}", self.policy);
        self.proposal = Some(capacity);
        self
    }
}

impl StepPolicy {
    /// Whether this policy removes members (an exact-capacity policy on low values counts as one).
    pub fn scales_in(&self) -> bool {
        match self.adjustment_type {
            AdjustmentType::ExactCapacity => !self.comparison.is_upward(),
            _ => self.steps.iter().any(|s| s.adjustment < 0),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} {} {} {}{}",
            self.statistic.name(),
            self.metric.name(),
            self.comparison.symbol(),
            fmt_value(self.threshold),
            self.metric.unit()
        )
    }

    fn verdict(&self, p: usize, context: &Context) -> Verdict {
        let periods = self.evaluation_periods as usize;
        let insufficient = |values, text| {
            verdict(&self.name, AlarmState::InsufficientData, values).holding(ReasonCode::InsufficientData, text)
        };
        if let Some(loss) = &context.metric_loss {
            if context.on_metric_loss == crate::OnMetricLoss::AssumeHigh
                && self.comparison.is_upward()
                && !self.scales_in()
            {
                let step = self
                    .steps
                    .iter()
                    .map(|s| s.adjustment)
                    .filter(|a| *a > 0)
                    .min()
                    .unwrap_or(1);
                let to = self.apply(step, context);
                return verdict(&self.name, AlarmState::Alarm, vec![None; periods]).proposing(
                    to,
                    format!("{loss}; on_metric_loss = \"assume_high\" → {} → {to}", context.desired),
                );
            }
            return insufficient(vec![None; periods], loss.clone());
        }
        if context.counted.is_empty() {
            return insufficient(
                vec![None; periods],
                "no member has been in service past its warm-up".into(),
            );
        }
        // A member without data never helps an alarm fire: it counts as 0 for an alarm on high values and
        // makes the period insufficient for one on low values (so missing data never causes a scale-in).
        let mut values = Vec::with_capacity(periods);
        let mut silent = None;
        for k in 0..periods {
            let mut present = Vec::with_capacity(context.counted.len());
            let mut missing = false;
            for member in &context.counted {
                match member.means.get(p, k) {
                    Some(v) => present.push(v),
                    None if self.comparison.is_upward() => present.push(0.0),
                    None => {
                        missing = true;
                        silent.get_or_insert((member.id.clone(), k));
                    }
                }
            }
            let any_data = context.counted.iter().any(|m| m.means.get(p, k).is_some());
            values.push((!missing && any_data).then(|| self.statistic.apply(&present)));
        }
        let Some(newest) = values[0] else {
            let text = match silent {
                Some((member, 0)) => format!(
                    "member {member} sent no {} data in the last {} s; a silent member counts as busy",
                    self.metric.name(),
                    self.period_secs
                ),
                _ => format!("no {} data in the last {} s", self.metric.name(), self.period_secs),
            };
            return insufficient(values, text);
        };
        let breaching = values
            .iter()
            .filter(|v| v.is_some_and(|v| self.comparison.holds(v, self.threshold)))
            .count() as u32;
        let measured = format!(
            "{}: {} {}{} over {} s, {breaching} of {} periods breaching ({} needed)",
            self.describe(),
            self.metric.name(),
            fmt_value(newest),
            self.metric.unit(),
            self.period_secs,
            self.evaluation_periods,
            self.datapoints_to_alarm
        );
        if breaching < self.datapoints_to_alarm {
            let mut v =
                verdict(&self.name, AlarmState::Ok, values).holding(ReasonCode::NoAlarm, format!("{measured} → ok"));
            if let (Some((member, k)), true) = (&silent, self.scales_in()) {
                v = v.holding(
                    ReasonCode::InsufficientData,
                    format!(
                        "{measured}; member {member} sent no data in period {}, so no scale-in",
                        k + 1
                    ),
                );
                v.state = AlarmState::InsufficientData;
            }
            return v;
        }
        let alarm = verdict(&self.name, AlarmState::Alarm, values);
        let breach = newest - self.threshold;
        let Some(step) = self
            .steps
            .iter()
            .find(|s| s.contains(breach, self.comparison.is_upward()))
        else {
            return alarm.holding(
                ReasonCode::NoStep,
                format!(
                    "{measured} → alarm, but a breach of {} matches no step",
                    fmt_value(breach)
                ),
            );
        };
        let to = self.apply(step.adjustment, context);
        if to == context.desired {
            if step.adjustment > 0 && context.uncounted > 0 {
                return alarm.holding(
                    ReasonCode::Warming,
                    format!(
                        "{measured} → alarm, but the {to} members it asks for are there: {} still launching or warming up",
                        context.uncounted
                    ),
                );
            }
            return alarm.holding(
                ReasonCode::NoChange,
                format!("{measured} → alarm, but capacity is already {to}"),
            );
        }
        alarm.proposing(to, format!("{measured} → alarm → {} → {to}", context.desired))
    }

    /// The capacity an adjustment leads to. A scale-out adds to the members that are already counted, so
    /// members still launching or warming up absorb a repeated alarm instead of adding to it.
    fn apply(&self, adjustment: i32, context: &Context) -> u32 {
        let base = if adjustment > 0 {
            context.counted.len() as u32
        } else {
            context.desired
        };
        let to = match self.adjustment_type {
            AdjustmentType::ExactCapacity => return adjustment.max(0) as u32,
            AdjustmentType::ChangeInCapacity => i64::from(base) + i64::from(adjustment),
            AdjustmentType::PercentChangeInCapacity => {
                let change = f64::from(adjustment) * f64::from(base) / 100.0;
                // Like EC2: a fraction of a member is one member, larger values are truncated.
                let members = if change.abs() < 1.0 {
                    1
                } else {
                    change.abs().trunc() as i64
                };
                let members = members.max(i64::from(self.min_adjustment_step));
                i64::from(base) + members * i64::from(adjustment.signum())
            }
        };
        let to = to.clamp(0, i64::from(u32::MAX)) as u32;
        if adjustment > 0 { to.max(context.desired) } else { to }
    }
}

/// The members that carry `sum` at `target` each: rounded up, but not past a whole number that float
/// arithmetic missed (three members at 33.33 % are 100 %, two members at 50 %, not three).
fn members_for(sum: f64, target: f64) -> u32 {
    (sum / target - 1e-9).ceil() as u32
}

impl TargetPolicy {
    fn verdict(&self, p: usize, context: &Context) -> Verdict {
        let value_of = |m: &&super::MemberInput| m.means.get(p, 0);
        if let Some(loss) = &context.metric_loss {
            if context.on_metric_loss == crate::OnMetricLoss::AssumeHigh {
                let to = context.desired + 1;
                return verdict(&self.name, AlarmState::Tracking, vec![None]).proposing(
                    to,
                    format!("{loss}; on_metric_loss = \"assume_high\" → {} → {to}", context.desired),
                );
            }
            return verdict(&self.name, AlarmState::InsufficientData, vec![None])
                .holding(ReasonCode::InsufficientData, loss.clone());
        }
        let present: Vec<f64> = context.counted.iter().filter_map(value_of).collect();
        if present.is_empty() {
            let text = if context.counted.is_empty() {
                "no member has been in service past its warm-up".to_string()
            } else {
                format!("no {} data in the last {} s", self.metric.name(), self.period_secs)
            };
            return verdict(&self.name, AlarmState::InsufficientData, vec![None])
                .holding(ReasonCode::InsufficientData, text);
        }
        // Missing members count as 0 here: they can only lower the recommendation.
        let sum: f64 = present.iter().sum();
        let mean = sum / context.counted.len() as f64;
        let unit = self.metric.unit();
        let measured = format!(
            "avg {} {}{unit} (target {}{unit})",
            self.metric.name(),
            fmt_value(mean),
            fmt_value(self.target)
        );
        let mut v = verdict(&self.name, AlarmState::Tracking, vec![Some(mean)]);
        let desired = context.desired;
        let ratio = mean / self.target;
        if ratio > 1.0 + self.scale_out_tolerance {
            let wanted = members_for(sum, self.target);
            v.recommendation = Some(wanted.max(desired));
            if wanted <= desired {
                return v.holding(
                    ReasonCode::Warming,
                    format!(
                        "{measured} wants {wanted}, already there: {} member(s) still launching or warming up",
                        context.uncounted
                    ),
                );
            }
            let to = match self.scale_out_limit {
                Some(limit) => {
                    let left = limit
                        .allowed(desired)
                        .saturating_sub(context.changed_within(limit.period_secs, true));
                    if left == 0 {
                        return v.holding(
                            ReasonCode::RateLimited,
                            format!(
                                "{measured} wants {wanted}, but the scale-out limit for {} s is used up",
                                limit.period_secs
                            ),
                        );
                    }
                    wanted.min(desired + left)
                }
                None => wanted,
            };
            return v.proposing(to, format!("{measured} → wants {wanted} → {desired} → {to}"));
        }
        if ratio >= 1.0 - self.scale_in_tolerance {
            v.recommendation = Some(desired);
            return v.holding(ReasonCode::WithinTolerance, format!("{measured}, within tolerance"));
        }
        // Members still launching or warming up count as exactly at the target.
        let wanted = members_for(sum, self.target) + context.uncounted;
        v.recommendation = Some(wanted);
        if self.disable_scale_in {
            return v.holding(
                ReasonCode::ScaleInDisabled,
                format!("{measured} wants {wanted}, but scale-in is disabled"),
            );
        }
        if let Some(member) = context.counted.iter().find(|m| value_of(m).is_none()) {
            v.state = AlarmState::InsufficientData;
            return v.holding(
                ReasonCode::InsufficientData,
                format!("{measured}, but member {} sent no data, so no scale-in", member.id),
            );
        }
        let window_start = context.now - Millis::from(self.stabilization_secs) * 1000;
        let stabilized = context
            .recommendations
            .iter()
            .filter(|r| r.policy == self.name && r.at > window_start)
            .map(|r| r.capacity)
            .fold(wanted, u32::max);
        if stabilized >= desired {
            return v.holding(
                ReasonCode::Stabilizing,
                format!(
                    "{measured} wants {wanted}, but the highest recommendation of the last {} s is {stabilized}",
                    self.stabilization_secs
                ),
            );
        }
        let to = match self.scale_in_limit {
            Some(limit) => {
                let left = limit
                    .allowed(desired)
                    .saturating_sub(context.changed_within(limit.period_secs, false));
                if left == 0 {
                    return v.holding(
                        ReasonCode::RateLimited,
                        format!(
                            "{measured} wants {stabilized}, but the scale-in limit for {} s is used up",
                            limit.period_secs
                        ),
                    );
                }
                stabilized.max(desired.saturating_sub(left))
            }
            None => stabilized,
        };
        v.proposing(to, format!("{measured} → wants {stabilized} → {desired} → {to}"))
    }
}
