//! Predictive scaling's forecast: the group's load a minute at a time, learnt from its own history, with
//! daily and weekly seasonality.
//!
//! The load is what the group's serving members measure together (for CPU, the sum of their percentages:
//! 250 is two and a half members' worth at 100 %). Two models predict a minute from the same minute of
//! earlier periods — **daily**, the median of the last seven days; **weekly**, the mean of one and two
//! weeks before (once a week of history exists) — and each is scored on the last day it could have
//! predicted. The better one forecasts, scaled by how the last half hour compares with what it predicted
//! for it. Without a day of history there is no forecast; when the better model still misses the last
//! day by more than [`MAX_ERROR`], the load has no pattern worth following and there is none either.

use std::collections::VecDeque;

use serde::Serialize;

use crate::{Engine, MemberInput, MemberState, Metric, Millis, Policy, Prediction};

pub const MINUTE_MS: Millis = 60_000;
const DAY_MINUTES: i64 = 1440;
const WEEK_MINUTES: i64 = 7 * DAY_MINUTES;
/// History kept: two weeks and a day, enough for the weekly model's two weeks back.
pub const HISTORY_MINUTES: i64 = 2 * WEEK_MINUTES + DAY_MINUTES;
/// The history a forecast needs: a day to predict from, and half a day more the models are judged on
/// ([`Model::error`] needs half of the last day predicted).
pub const MIN_HISTORY_MINUTES: i64 = DAY_MINUTES + DAY_MINUTES / 2;
/// The largest error on the last day (absolute error over load, summed) a model may have and forecast.
pub const MAX_ERROR: f64 = 0.2;
/// The last half hour's level against the model's is followed within these bounds.
const LEVEL_BOUNDS: (f64, f64) = (0.7, 1.5);
const LEVEL_MINUTES: i64 = 30;

/// The group's load per minute, for the last [`HISTORY_MINUTES`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadHistory {
    /// The minute (since the epoch) of `loads[0]`.
    first: i64,
    loads: VecDeque<Option<f32>>,
}

impl LoadHistory {
    /// Records the load of the minute containing `at`; a later record of the same minute replaces it.
    pub fn record(&mut self, at: Millis, load: f64) {
        let minute = at.div_euclid(MINUTE_MS);
        if self.loads.is_empty() {
            self.first = minute;
        }
        if minute < self.first {
            return;
        }
        let index = (minute - self.first) as usize;
        if index >= self.loads.len() {
            // A gap longer than the history leaves nothing of the old.
            if (index - self.loads.len()) as i64 >= HISTORY_MINUTES {
                self.loads.clear();
                self.first = minute;
                self.loads.push_back(Some(load as f32));
                return;
            }
            self.loads.resize(index + 1, None);
        }
        self.loads[index] = Some(load as f32);
        while self.loads.len() as i64 > HISTORY_MINUTES {
            self.loads.pop_front();
            self.first += 1;
        }
    }

    /// The load of `minute`, if recorded.
    pub fn at(&self, minute: i64) -> Option<f64> {
        let index = usize::try_from(minute - self.first).ok()?;
        self.loads.get(index).copied().flatten().map(f64::from)
    }

    /// Minutes from the first record to the last.
    pub fn span_minutes(&self) -> i64 {
        self.loads.len() as i64
    }

    /// Every recorded minute and its load, oldest first.
    pub fn minutes(&self) -> impl Iterator<Item = (i64, f64)> + '_ {
        self.loads
            .iter()
            .enumerate()
            .filter_map(|(i, load)| Some((self.first + i as i64, f64::from((*load)?))))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Model {
    Daily,
    Weekly,
}

impl Model {
    pub fn name(self) -> &'static str {
        match self {
            Model::Daily => "daily",
            Model::Weekly => "weekly",
        }
    }

    /// The model's prediction of `minute` from the same minute of earlier periods.
    fn predict(self, history: &LoadHistory, minute: i64) -> Option<f64> {
        match self {
            Model::Daily => {
                let mut values: Vec<f64> = (1..=7).filter_map(|d| history.at(minute - d * DAY_MINUTES)).collect();
                if values.is_empty() {
                    return None;
                }
                values.sort_by(f64::total_cmp);
                Some(values[values.len() / 2])
            }
            Model::Weekly => {
                let values: Vec<f64> = (1..=2).filter_map(|w| history.at(minute - w * WEEK_MINUTES)).collect();
                (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
            }
        }
    }

    /// The model's error over the day before `now_minute`: absolute error over load, summed over the
    /// minutes it could predict; `None` if it could predict fewer than half of them.
    fn error(self, history: &LoadHistory, now_minute: i64) -> Option<f64> {
        let (mut missed, mut total, mut count) = (0.0, 0.0, 0);
        for minute in now_minute - DAY_MINUTES..now_minute {
            let (Some(actual), Some(predicted)) = (history.at(minute), self.predict(history, minute)) else {
                continue;
            };
            missed += (predicted - actual).abs();
            total += actual;
            count += 1;
        }
        (count * 2 >= DAY_MINUTES && total > 0.0).then(|| missed / total)
    }
}

/// The load forecast for the minutes after `made_at`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forecast {
    pub made_at: Millis,
    pub model: Model,
    /// The model's error on the last day.
    pub error: f64,
    /// The last half hour's load over the model's prediction of it, applied to the forecast.
    pub level: f64,
    /// Per minute from the minute after `made_at`.
    pub loads: Vec<f64>,
}

/// Why there is no forecast.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoForecast {
    /// Less than a day of history.
    TooLittleHistory { minutes: i64 },
    /// Neither model predicted the last day within [`MAX_ERROR`].
    NoPattern { error: Option<f64> },
}

impl std::fmt::Display for NoForecast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoForecast::TooLittleHistory { minutes } => write!(
                f,
                "no forecast yet: {:.1} h of load history, a forecast needs 36 h (a day to learn from, half a \
                 day to judge it on)",
                *minutes as f64 / 60.0
            ),
            NoForecast::NoPattern { error: Some(error) } => write!(
                f,
                "no forecast: the load has no daily or weekly pattern to follow (the best model missed the last \
                 day by {:.0} %, more than {:.0} %)",
                error * 100.0,
                MAX_ERROR * 100.0
            ),
            NoForecast::NoPattern { error: None } => {
                write!(f, "no forecast: too few minutes of the last day to judge a model by")
            }
        }
    }
}

/// The load for the `minutes` after `now`, from `history`.
pub fn forecast(history: &LoadHistory, now: Millis, minutes: i64) -> Result<Forecast, NoForecast> {
    let (model, error) = choose_model(history, now)?;
    Ok(forecast_with(history, now, minutes, model, error))
}

/// The model that predicted the last day best, with its error; none without a day of history or when
/// the best misses by more than [`MAX_ERROR`]. The costly part of a forecast: [`Predictor`] does it once
/// an hour.
pub fn choose_model(history: &LoadHistory, now: Millis) -> Choice {
    if history.span_minutes() < MIN_HISTORY_MINUTES {
        return Err(NoForecast::TooLittleHistory {
            minutes: history.span_minutes(),
        });
    }
    let now_minute = now.div_euclid(MINUTE_MS);
    let scored = [Model::Daily, Model::Weekly]
        .into_iter()
        .filter_map(|model| Some((model, model.error(history, now_minute)?)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    scored
        .filter(|(_, error)| *error <= MAX_ERROR)
        .ok_or(NoForecast::NoPattern {
            error: scored.map(|(_, e)| e),
        })
}

/// The load for the `minutes` after `now` by `model`, levelled by the last half hour.
pub fn forecast_with(history: &LoadHistory, now: Millis, minutes: i64, model: Model, error: f64) -> Forecast {
    let now_minute = now.div_euclid(MINUTE_MS);
    let (mut actual, mut predicted) = (0.0, 0.0);
    for minute in now_minute - LEVEL_MINUTES..now_minute {
        if let (Some(a), Some(p)) = (history.at(minute), model.predict(history, minute)) {
            actual += a;
            predicted += p;
        }
    }
    let level = if predicted > 0.0 {
        (actual / predicted).clamp(LEVEL_BOUNDS.0, LEVEL_BOUNDS.1)
    } else {
        1.0
    };
    let loads = (1..=minutes)
        .map(|ahead| model.predict(history, now_minute + ahead).unwrap_or(0.0) * level)
        .collect();
    Forecast {
        made_at: now,
        model,
        error,
        level,
        loads,
    }
}

/// A group's predictive policies between evaluations: each one's load history and latest forecast,
/// brought up to date once a minute. The live controller and the simulator keep it the same way.
#[derive(Debug, Clone, Default)]
pub struct Predictor {
    /// Per predictive policy (by index in the engine's policies): its history, its model as last chosen
    /// (and the hour it was), and its prediction.
    policies: Vec<PolicyState>,
    last_minute: Option<i64>,
    /// The group's latest launch-to-in-service time, the default scheduling buffer.
    boot_secs: Option<u32>,
}

/// A model with its error on the last day, or why there is none.
type Choice = Result<(Model, f64), NoForecast>;

#[derive(Debug, Clone)]
struct PolicyState {
    /// The predictive policy's name and the metric its load is measured in: a reload that keeps both
    /// keeps the history.
    name: String,
    metric: Metric,
    history: LoadHistory,
    /// The hour the model was chosen, and the choice.
    model: Option<(i64, Choice)>,
    prediction: Option<Prediction>,
}

/// The scheduling buffer before any launch has been measured.
pub const DEFAULT_BUFFER_SECS: u32 = 300;

impl Predictor {
    /// For the engine's predictive policies (none: nothing to do).
    pub fn new(engine: &Engine) -> Self {
        let mut predictor = Predictor::default();
        predictor.follow(engine);
        predictor
    }

    /// Follows the predictive policies of `engine` (a reloaded configuration): a policy of the same name
    /// and metric keeps its history; its forecast is made again at the next observation, with the new
    /// settings.
    pub fn follow(&mut self, engine: &Engine) {
        let mut old = std::mem::take(&mut self.policies);
        self.policies = engine
            .policies
            .iter()
            .filter_map(|policy| match policy {
                Policy::Predictive(p) => Some(p),
                _ => None,
            })
            .map(|policy| {
                let kept = old
                    .iter()
                    .position(|s| s.name == policy.name && s.metric == policy.metric)
                    .map(|i| old.swap_remove(i).history);
                PolicyState {
                    name: policy.name.clone(),
                    metric: policy.metric,
                    history: kept.unwrap_or_default(),
                    model: None,
                    prediction: None,
                }
            })
            .collect();
        self.last_minute = None;
    }

    /// A member took this long from launch to in service.
    pub fn boot_measured(&mut self, took_ms: Millis) {
        self.boot_secs = Some(u32::try_from(took_ms.max(0) / 1000).unwrap_or(u32::MAX));
    }

    /// Once a minute: the minute's load recorded (the sum over members in service of their mean of the
    /// policy's metric over the last minute, as `members` carry it) and the forecast made again.
    pub fn observe(&mut self, engine: &Engine, now: Millis, members: &[MemberInput]) {
        let minute = now.div_euclid(MINUTE_MS);
        if self.policies.is_empty() || self.last_minute == Some(minute) {
            return;
        }
        self.last_minute = Some(minute);
        for state in &mut self.policies {
            let found = engine
                .policies
                .iter()
                .enumerate()
                .find_map(|(index, policy)| match policy {
                    Policy::Predictive(p) if p.name == state.name => Some((index, p)),
                    _ => None,
                });
            let Some((index, policy)) = found else {
                continue;
            };
            let serving = members
                .iter()
                .filter(|m| m.state == MemberState::InService && !m.unhealthy);
            let measured: Vec<f64> = serving.filter_map(|m| m.means.get(index, 0)).collect();
            if !measured.is_empty() {
                state.history.record(now - MINUTE_MS, measured.iter().sum());
            }
            let hour = minute.div_euclid(60);
            let choice = match &state.model {
                Some((at, choice)) if *at == hour => choice.clone(),
                _ => {
                    let choice = choose_model(&state.history, now);
                    state.model = Some((hour, choice.clone()));
                    choice
                }
            };
            let buffer_secs = policy
                .scheduling_buffer_secs
                .or(self.boot_secs)
                .unwrap_or(DEFAULT_BUFFER_SECS);
            let minutes = policy.horizon_minutes(buffer_secs);
            let forecast = choice.map(|(model, error)| forecast_with(&state.history, now, minutes, model, error));
            state.prediction = Some(Prediction {
                policy: policy.name.clone(),
                forecast,
                buffer_secs,
            });
        }
    }

    /// The latest forecasts, for [`GroupInput::predictions`](crate::GroupInput).
    pub fn predictions(&self) -> Vec<Prediction> {
        self.policies.iter().filter_map(|s| s.prediction.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `days` of a daily curve (`weekend` on days 5 and 6), optionally with `noise` from a fixed sequence.
    fn history(days: i64, weekend: f64, noise: f64) -> LoadHistory {
        let mut history = LoadHistory::default();
        let mut state = 7u64;
        for minute in 0..days * DAY_MINUTES {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let jitter = ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 2.0 * noise;
            history.record(minute * MINUTE_MS, load(minute, weekend) * (1.0 + jitter));
        }
        history
    }

    fn load(minute: i64, weekend: f64) -> f64 {
        let hour = (minute % DAY_MINUTES) as f64 / 60.0;
        let day = (minute / DAY_MINUTES) % 7;
        let daily = 100.0 + 900.0 * (0.5 - 0.5 * (hour / 24.0 * std::f64::consts::TAU).cos());
        if day >= 5 { daily * weekend } else { daily }
    }

    #[test]
    fn the_history_keeps_two_weeks_and_a_day_by_the_minute() {
        let mut history = LoadHistory::default();
        history.record(0, 1.0);
        history.record(5 * MINUTE_MS + 59_000, 2.0);
        history.record(5 * MINUTE_MS, 3.0); // the same minute again
        assert_eq!(history.at(5), Some(3.0));
        assert_eq!(history.at(3), None);
        assert_eq!(history.span_minutes(), 6);
        history.record(HISTORY_MINUTES * MINUTE_MS + 10 * MINUTE_MS, 4.0);
        assert_eq!(history.at(0), None, "older than the history is forgotten");
        assert!(history.span_minutes() <= HISTORY_MINUTES);
        // A gap longer than the history starts it afresh.
        history.record(10 * HISTORY_MINUTES * MINUTE_MS, 5.0);
        assert_eq!(history.minutes().collect::<Vec<_>>(), [(10 * HISTORY_MINUTES, 5.0)]);
    }

    #[test]
    fn a_day_and_a_half_of_history_is_needed() {
        let short = history(0, 1.0, 0.0);
        assert!(matches!(
            forecast(&short, 0, 60),
            Err(NoForecast::TooLittleHistory { minutes: 0 })
        ));
        let mut almost = history(2, 1.0, 0.0);
        while almost.span_minutes() >= MIN_HISTORY_MINUTES {
            almost.loads.pop_back();
        }
        let now = almost.span_minutes() * MINUTE_MS;
        let error = forecast(&almost, now, 60).unwrap_err();
        assert_eq!(error, NoForecast::TooLittleHistory { minutes: 2159 });
        assert!(
            error
                .to_string()
                .contains("36.0 h of load history, a forecast needs 36 h"),
            "{error}"
        );
        almost.record(now, 100.0);
        assert!(forecast(&almost, now + MINUTE_MS, 60).is_ok());
    }

    #[test]
    fn a_daily_pattern_is_forecast_ahead_of_the_ramp() {
        let history = history(3, 1.0, 0.03);
        let now = 3 * DAY_MINUTES * MINUTE_MS + 6 * 60 * MINUTE_MS; // 06:00 on day 3, the ramp ahead
        let forecast = forecast(&history, now, 120).unwrap();
        assert_eq!(forecast.model, Model::Daily);
        assert!(forecast.error < 0.05, "{forecast:?}");
        // Two hours on, the load is what the curve says, within a few percent.
        let expected = load(3 * DAY_MINUTES + 8 * 60, 1.0);
        assert!(
            (forecast.loads[119] / expected - 1.0).abs() < 0.06,
            "{} vs {expected}",
            forecast.loads[119]
        );
    }

    #[test]
    fn a_weekly_pattern_wins_once_weekends_differ() {
        // Weekends at a third: the daily median of seven days cannot follow Saturday; the weekly model can.
        let history = history(14, 0.33, 0.02);
        let saturday = (14 + 5) * DAY_MINUTES * MINUTE_MS;
        let mut history = history;
        for minute in 14 * DAY_MINUTES..19 * DAY_MINUTES + 12 * 60 {
            history.record(minute * MINUTE_MS, load(minute, 0.33));
        }
        let forecast = forecast(&history, saturday + 12 * 60 * MINUTE_MS, 60).unwrap();
        assert_eq!(forecast.model, Model::Weekly, "{forecast:?}");
    }

    #[test]
    fn a_load_without_a_pattern_gets_no_forecast() {
        // Each day a different shape: random levels held for an hour at a time.
        let mut history = LoadHistory::default();
        let mut state = 11u64;
        let mut level = 500.0;
        for minute in 0..3 * DAY_MINUTES {
            if minute % 60 == 0 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                level = 100.0 + 900.0 * ((state >> 33) as f64 / (1u64 << 31) as f64);
            }
            history.record(minute * MINUTE_MS, level);
        }
        let error = forecast(&history, 3 * DAY_MINUTES * MINUTE_MS, 60).unwrap_err();
        assert!(
            matches!(error, NoForecast::NoPattern { error: Some(e) } if e > MAX_ERROR),
            "{error:?}"
        );
        assert!(error.to_string().contains("no daily or weekly pattern"), "{error}");
    }
}
