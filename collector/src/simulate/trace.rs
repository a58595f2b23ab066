//! A demand trace: `time,demand` lines, read from an operator's CSV file.
//!
//! `time` is seconds (relative, or since the Unix epoch) or an RFC 3339 timestamp; `demand` is any
//! non-negative figure in the unit `--member-capacity` is given in (requests per second, busy CPUs, ...).
//! Points may come at any step, strictly increasing in time; demand between two points is interpolated
//! linearly. A first line that does not start with a number is a header; `#` starts a comment.

use crate::engine::Millis;

/// The largest trace read: a year at one point a minute is 525,600 lines.
pub const MAX_TRACE_BYTES: u64 = 128 * 1024 * 1024;
/// The most points a trace may have (several years at one a minute, or two weeks at one a second).
pub const MAX_POINTS: usize = 2_000_000;
/// A relative trace (times below this many seconds) starts on Monday 2024-01-01 00:00 UTC, so that
/// weekday schedules mean something.
const RELATIVE_BELOW_SECS: f64 = 1e9;
const RELATIVE_EPOCH_MS: Millis = 1_704_067_200_000;
/// The most simulation steps a run takes (a year at 3 s).
pub const MAX_STEPS: i64 = 10_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// (time, demand), strictly increasing in time; at least two points.
    points: Vec<(Millis, f64)>,
}

impl Trace {
    /// Parses a trace; `speedup` divides the time between points (a half-hour point per minute is 30).
    pub fn parse(text: &str, speedup: f64) -> Result<Self, String> {
        if !(speedup.is_finite() && speedup > 0.0) {
            return Err(format!("--speedup {speedup} must be a positive number"));
        }
        let mut points: Vec<(f64, f64)> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [time, demand] = fields[..] else {
                return Err(format!(
                    "line {number}: expected `time,demand`, found {} field(s)",
                    fields.len()
                ));
            };
            if points.is_empty() && index == first_content_line(text) && !starts_numeric(time) {
                continue; // the header
            }
            let time = parse_time(time).map_err(|e| format!("line {number}: {e}"))?;
            let demand: f64 = demand
                .parse()
                .map_err(|_| format!("line {number}: demand `{demand}` is not a number"))?;
            if !(demand.is_finite() && demand >= 0.0) {
                return Err(format!("line {number}: demand {demand} must be a non-negative number"));
            }
            if let Some(&(previous, _)) = points.last()
                && time <= previous
            {
                return Err(format!(
                    "line {number}: time {time} s is not after the previous point's {previous} s; sort the trace by time"
                ));
            }
            if points.len() == MAX_POINTS {
                return Err(format!("more than {MAX_POINTS} points; use a coarser step"));
            }
            points.push((time, demand));
        }
        if points.len() < 2 {
            return Err("a trace needs at least two points (`time,demand` lines)".into());
        }
        let (first, _) = points[0];
        let base = if first < RELATIVE_BELOW_SECS {
            RELATIVE_EPOCH_MS as f64
        } else {
            first * 1000.0
        };
        let points = points
            .into_iter()
            .map(|(time, demand)| ((base + (time - first) * 1000.0 / speedup).round() as Millis, demand))
            .collect::<Vec<_>>();
        if points.windows(2).any(|pair| pair[1].0 <= pair[0].0) {
            return Err(format!(
                "--speedup {speedup} puts two points within the same millisecond; use a smaller one"
            ));
        }
        Ok(Trace { points })
    }

    pub fn start(&self) -> Millis {
        self.points[0].0
    }

    pub fn end(&self) -> Millis {
        self.points[self.points.len() - 1].0
    }

    pub fn points(&self) -> &[(Millis, f64)] {
        &self.points
    }

    /// Demand at each of the times `start, start + step, ...` up to the trace's end, interpolated.
    pub fn sample(&self, step_ms: Millis) -> Result<Vec<f64>, String> {
        let steps = (self.end() - self.start()) / step_ms + 1;
        if steps > MAX_STEPS {
            return Err(format!(
                "the trace spans {:.1} days, {steps} steps of {} s: more than {MAX_STEPS}; use a larger --step-secs \
                 or a --speedup",
                (self.end() - self.start()) as f64 / 86_400_000.0,
                step_ms / 1000
            ));
        }
        let count = steps as usize;
        let mut values = Vec::with_capacity(count);
        let mut segment = 0;
        for k in 0..count {
            let t = self.start() + k as Millis * step_ms;
            while segment + 2 < self.points.len() && self.points[segment + 1].0 <= t {
                segment += 1;
            }
            let ((t0, d0), (t1, d1)) = (self.points[segment], self.points[segment + 1]);
            let share = ((t - t0) as f64 / (t1 - t0) as f64).clamp(0.0, 1.0);
            values.push(d0 + (d1 - d0) * share);
        }
        Ok(values)
    }
}

fn first_content_line(text: &str) -> usize {
    text.lines()
        .position(|line| !line.split('#').next().unwrap_or_default().trim().is_empty())
        .unwrap_or(0)
}

fn starts_numeric(field: &str) -> bool {
    field.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+' || c == '.')
}

/// Seconds: a number, or an RFC 3339 timestamp.
fn parse_time(field: &str) -> Result<f64, String> {
    if let Ok(seconds) = field.parse::<f64>() {
        return if seconds.is_finite() && (0.0..1e11).contains(&seconds) {
            Ok(seconds)
        } else {
            Err(format!("time `{field}` is out of range (seconds, 0 to 10^11)"))
        };
    }
    let timestamp: jiff::Timestamp = field
        .parse()
        .map_err(|_| format!("time `{field}` is neither seconds nor an RFC 3339 timestamp"))?;
    let seconds = timestamp.as_millisecond() as f64 / 1000.0;
    if seconds < 0.0 {
        return Err(format!("time `{field}` is before 1970"));
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_comments_and_both_time_forms_are_read() {
        let trace = Trace::parse("time,demand\n# a comment\n0,10\n\n60, 20 # trailing\n120,0\n", 1.0).unwrap();
        assert_eq!(
            trace.points(),
            [
                (RELATIVE_EPOCH_MS, 10.0),
                (RELATIVE_EPOCH_MS + 60_000, 20.0),
                (RELATIVE_EPOCH_MS + 120_000, 0.0)
            ]
        );
        let stamped = Trace::parse("2026-12-05T00:00:00Z,1\n2026-12-05T00:01:00Z,2\n", 1.0).unwrap();
        let start = "2026-12-05T00:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_millisecond();
        assert_eq!(stamped.points(), [(start, 1.0), (start + 60_000, 2.0)]);
    }

    #[test]
    fn demand_between_points_is_interpolated_and_speedup_compresses_time() {
        let trace = Trace::parse("0,0\n60,60\n120,0\n", 1.0).unwrap();
        assert_eq!(trace.sample(30_000).unwrap(), [0.0, 30.0, 60.0, 30.0, 0.0]);
        // Half-hour points replayed one a minute.
        let fast = Trace::parse("0,1\n1800,2\n3600,3\n", 30.0).unwrap();
        assert_eq!(fast.end() - fast.start(), 120_000);
    }

    #[test]
    fn malformed_traces_say_which_line_and_why() {
        let cases = [
            ("0,1\n60\n", "line 2: expected `time,demand`, found 1 field(s)"),
            ("0,1\n60,x\n", "line 2: demand `x` is not a number"),
            ("0,1\n60,-1\n", "line 2: demand -1 must be a non-negative number"),
            ("0,1\n60,NaN\n", "line 2: demand NaN must be a non-negative number"),
            ("0,1\n60,inf\n", "line 2: demand inf must be a non-negative number"),
            ("60,1\n0,1\n", "line 2: time 0 s is not after the previous point's 60 s"),
            ("0,1\n0,1\n", "line 2: time 0 s is not after"),
            (
                "0,1\nyesterday,1\n",
                "line 2: time `yesterday` is neither seconds nor an RFC 3339",
            ),
            ("0,1\n1e300,1\n", "line 2: time `1e300` is out of range"),
            ("time,demand\n0,1\n", "at least two points"),
            ("", "at least two points"),
        ];
        for (text, expected) in cases {
            let error = Trace::parse(text, 1.0).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        assert!(Trace::parse("0,1\n1,1\n", 0.0).unwrap_err().contains("--speedup"));
        assert!(
            Trace::parse("0,1\n1,1\n", 1e9)
                .unwrap_err()
                .contains("same millisecond")
        );
    }

    #[test]
    fn a_trace_longer_than_the_limit_is_refused() {
        let text: String = (0..=MAX_POINTS).map(|i| format!("{i},1\n")).collect();
        assert!(Trace::parse(&text, 1.0).unwrap_err().contains("more than"));
        let long = Trace::parse("0,1\n99999999999,1\n", 1.0).unwrap();
        assert!(long.sample(1000).unwrap_err().contains("use a larger --step-secs"));
    }
}
