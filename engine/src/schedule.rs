//! Scheduled actions: a cron expression in a time zone that sets a group's min, max or desired capacity.
//!
//! Cron is the classic five fields — minute, hour, day of month, month, day of week — each `*`, a value,
//! a range `a-b`, a step `*/n` or `a-b/n`, or a list of those; months and days may be names (`jan`,
//! `mon`); Sunday is 0 or 7. When both day fields are restricted, either may match (as in Vixie cron).
//! `@hourly`, `@daily`, `@weekly`, `@monthly` and `@yearly` are accepted too.

use jiff::tz::TimeZone;

use super::Millis;

const MINUTE_MS: Millis = 60_000;
/// After a long outage, only the last week is looked at for a missed action.
const LOOKBACK_MINUTES: i64 = 7 * 24 * 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

impl Cron {
    pub fn parse(expression: &str) -> Result<Self, String> {
        let expanded = match expression.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(format!(
                "`{expression}` has {} fields; cron needs five: minute hour day-of-month month day-of-week",
                fields.len()
            ));
        };
        const MONTHS: [&str; 12] = [
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ];
        const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
        let mut weekdays = field(weekday, 0, 7, &DAYS, 0, "day of week")?;
        // 7 is Sunday too.
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1;
        }
        Ok(Self {
            minutes: field(minute, 0, 59, &[], 0, "minute")?,
            hours: field(hour, 0, 23, &[], 0, "hour")?,
            days: field(day, 1, 31, &[], 0, "day of month")?,
            months: field(month, 1, 12, &MONTHS, 1, "month")?,
            weekdays,
            days_restricted: day != "*",
            weekdays_restricted: weekday != "*",
        })
    }

    /// Whether the minute starting at `time` (in `zone`) matches.
    pub fn matches(&self, time: Millis, zone: &TimeZone) -> bool {
        let Ok(timestamp) = jiff::Timestamp::from_millisecond(time) else {
            return false;
        };
        let local = zone.to_datetime(timestamp);
        let bit = |set: u64, value: i64| set & (1 << value) != 0;
        let day = bit(self.days, i64::from(local.day()));
        let weekday = bit(self.weekdays, i64::from(local.weekday().to_sunday_zero_offset()));
        let day_matches = match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => day || weekday,
            _ => day && weekday,
        };
        bit(self.minutes, i64::from(local.minute()))
            && bit(self.hours, i64::from(local.hour()))
            && bit(self.months, i64::from(local.month()))
            && day_matches
    }

    /// The latest matching minute in `(after, upto]`, if any.
    pub fn latest_between(&self, after: Millis, upto: Millis, zone: &TimeZone) -> Option<Millis> {
        let first = (after.div_euclid(MINUTE_MS) + 1) * MINUTE_MS;
        let last = upto.div_euclid(MINUTE_MS) * MINUTE_MS;
        let first = first.max(last - LOOKBACK_MINUTES * MINUTE_MS);
        (0..=(last - first) / MINUTE_MS)
            .map(|k| last - k * MINUTE_MS)
            .find(|t| *t >= first && self.matches(*t, zone))
    }
}

/// One cron field as a bit set of the values it allows.
fn field(text: &str, min: i64, max: i64, names: &[&str], first_name: i64, what: &str) -> Result<u64, String> {
    let value = |s: &str| -> Result<i64, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            return Ok(i as i64 + first_name);
        }
        let v: i64 = s.parse().map_err(|_| format!("{what}: `{s}` is not a number"))?;
        if !(min..=max).contains(&v) {
            return Err(format!("{what}: {v} is outside {min}..{max}"));
        }
        Ok(v)
    };
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: i64 = step
                    .parse()
                    .map_err(|_| format!("{what}: step `{step}` is not a number"))?;
                if step < 1 {
                    return Err(format!("{what}: step must be at least 1"));
                }
                (range, step)
            }
            None => (part, 1),
        };
        let (start, end) = match range {
            "*" => (min, max),
            _ => match range.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                None if step > 1 => (value(range)?, max),
                None => {
                    let v = value(range)?;
                    (v, v)
                }
            },
        };
        if start > end {
            return Err(format!("{what}: range `{range}` runs backwards"));
        }
        for v in (start..=end).step_by(step as usize) {
            set |= 1 << v;
        }
    }
    Ok(set)
}

/// A scheduled action of a group.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledAction {
    pub name: String,
    pub cron: Cron,
    pub zone: TimeZone,
    pub min_size: Option<u32>,
    pub max_size: Option<u32>,
    pub desired_capacity: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Millis {
        text.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn weekday_mornings_in_tokyo() {
        let cron = Cron::parse("0 9 * * mon-fri").unwrap();
        let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
        // Monday 2026-11-23 09:00 JST = 00:00 UTC.
        assert!(cron.matches(at("2026-11-23T00:00:00Z"), &tokyo));
        assert!(!cron.matches(at("2026-11-23T09:00:00Z"), &tokyo));
        // Sunday 2026-11-22 09:00 JST.
        assert!(!cron.matches(at("2026-11-22T00:00:00Z"), &tokyo));
        assert!(cron.matches(at("2026-11-23T09:00:00Z"), &TimeZone::UTC));
    }

    #[test]
    fn fields_ranges_steps_lists_and_names() {
        let cron = Cron::parse("*/15 8-18/2 1,15 jan-mar,dec 7").unwrap();
        assert_eq!(cron.minutes, (1 << 0) | (1 << 15) | (1 << 30) | (1 << 45));
        assert_eq!(
            cron.hours,
            (1 << 8) | (1 << 10) | (1 << 12) | (1 << 14) | (1 << 16) | (1 << 18)
        );
        assert_eq!(cron.days, (1 << 1) | (1 << 15));
        assert_eq!(cron.months, 0b1_0000_0000_1110);
        assert_eq!(cron.weekdays & 1, 1, "7 is Sunday");
        assert_eq!(Cron::parse("@daily").unwrap(), Cron::parse("0 0 * * *").unwrap());
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        assert!(Cron::parse("0 9 * *").unwrap_err().contains("five"));
        assert!(
            Cron::parse("61 * * * *")
                .unwrap_err()
                .contains("minute: 61 is outside 0..59")
        );
        assert!(Cron::parse("* * * foo *").unwrap_err().contains("month: `foo`"));
        assert!(Cron::parse("*/0 * * * *").unwrap_err().contains("step"));
        assert!(Cron::parse("5-1 * * * *").unwrap_err().contains("backwards"));
    }

    #[test]
    fn either_day_field_matches_when_both_are_restricted() {
        // The 1st of the month, and every Monday.
        let cron = Cron::parse("0 0 1 * mon").unwrap();
        assert!(cron.matches(at("2026-12-01T00:00:00Z"), &TimeZone::UTC)); // a Tuesday
        assert!(cron.matches(at("2026-11-23T00:00:00Z"), &TimeZone::UTC)); // a Monday
        assert!(!cron.matches(at("2026-11-24T00:00:00Z"), &TimeZone::UTC));
    }

    #[test]
    fn the_latest_due_minute_in_a_span() {
        let cron = Cron::parse("*/10 * * * *").unwrap();
        let utc = TimeZone::UTC;
        let base = at("2026-11-23T10:00:00Z");
        assert_eq!(cron.latest_between(base - 1, base, &utc), Some(base));
        assert_eq!(cron.latest_between(base, base + 59_000, &utc), None);
        assert_eq!(
            cron.latest_between(base, base + 25 * MINUTE_MS, &utc),
            Some(base + 20 * MINUTE_MS)
        );
    }
}
