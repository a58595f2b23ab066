//! `cargo xtask trace`: synthetic demand traces for `ebb-collector simulate` and `bench simulate`.
//! Synthetic, not measured: a daily curve (a night trough, a morning ramp, a midday plateau, an evening
//! peak), quieter weekends, a slow trend, day-to-day level changes and minute-to-minute noise; the
//! `flash` kind adds flash crowds, +60 % within a minute for 20 minutes, a few times a week. The seed
//! also varies the curve's shape (peak hour, trough depth, weekend dip), so that policies are judged on
//! more than one shape.

use std::fmt::Write;

use rand_core::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

/// A seeded generator: the same seed gives the same trace.
struct Random(Pcg64Mcg);

impl Random {
    fn new(seed: u64) -> Self {
        Random(Pcg64Mcg::seed_from_u64(seed))
    }

    fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-12), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    fn between(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.uniform()
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSpec {
    pub flash_crowds: bool,
    pub weeks: u32,
    pub step_secs: u32,
    /// The weekday peak, before noise and trend.
    pub peak: f64,
    pub seed: u64,
}

/// The trace as `time,demand` CSV (time in seconds from a Monday 00:00).
pub fn generate(spec: &TraceSpec) -> String {
    let mut random = Random::new(spec.seed);
    let peak_hour = random.between(13.0, 21.0);
    let trough = random.between(0.08, 0.3);
    let weekend = random.between(0.55, 0.9);
    let evening = random.between(0.0, 0.25);
    let trend_per_week = random.between(-0.02, 0.05);
    let steps = u64::from(spec.weeks) * 7 * 86_400 / u64::from(spec.step_secs);
    let days = spec.weeks as usize * 7;
    let day_level: Vec<f64> = (0..days).map(|_| 1.0 + 0.06 * random.normal()).collect();
    // Flash crowds: two to four a week, at any hour; drawn apart, so that the same seed's smooth trace is
    // this one without them.
    let mut flashes = Vec::new();
    if spec.flash_crowds {
        let mut random = Random::new(spec.seed ^ 0x5eed_f1a5);
        for week in 0..u64::from(spec.weeks) {
            let count = 2 + (random.uniform() * 3.0) as u64;
            for _ in 0..count {
                flashes.push(week * 7 * 86_400 + (random.uniform() * 7.0 * 86_400.0) as u64);
            }
        }
    }
    let mut noise = 0.0;
    let mut csv = String::from("time,demand\n");
    for k in 0..=steps {
        let t = k * u64::from(spec.step_secs);
        let day = (t / 86_400) as usize;
        let hour = (t % 86_400) as f64 / 3600.0;
        let weekday = day % 7; // 0 is Monday
        // The daily curve: a raised cosine centred on the peak hour, widened, with an evening shoulder.
        let phase = (hour - peak_hour) / 24.0 * 2.0 * std::f64::consts::PI;
        let daily = (0.5 + 0.5 * phase.cos()).powf(1.5);
        let shoulder = evening * (-((hour - 21.5) / 1.5).powi(2)).exp();
        let mut level = trough + (1.0 - trough) * (daily + shoulder).min(1.0);
        if weekday >= 5 {
            level *= weekend;
        }
        level *= day_level[day.min(days - 1)] * (1.0 + trend_per_week * t as f64 / (7.0 * 86_400.0));
        // Minute-to-minute noise: AR(1), about 3 %.
        noise = 0.9 * noise + 0.013 * random.normal();
        let mut demand = spec.peak * level * (1.0 + noise);
        if flashes.iter().any(|&at| t >= at && t < at + 20 * 60) {
            demand *= 1.6;
        }
        let _ = writeln!(csv, "{t},{:.2}", demand.max(0.0));
    }
    csv
}

/// `cargo xtask trace [--kind smooth|flash] [--weeks N] [--step-secs S] [--peak P] [--seed N]`: a
/// trace on stdout.
pub fn trace(args: &[String]) -> anyhow::Result<()> {
    let mut spec = TraceSpec {
        flash_crowds: false,
        weeks: 2,
        step_secs: 60,
        peak: 2000.0,
        seed: 1,
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--kind" => {
                spec.flash_crowds = match value.as_str() {
                    "smooth" => false,
                    "flash" => true,
                    other => anyhow::bail!("--kind {other}: smooth or flash"),
                }
            }
            "--weeks" => spec.weeks = value.parse()?,
            "--step-secs" => spec.step_secs = value.parse()?,
            "--peak" => spec.peak = value.parse()?,
            "--seed" => spec.seed = value.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    anyhow::ensure!(
        (1..=520).contains(&spec.weeks) && (1..=3600).contains(&spec.step_secs),
        "--weeks 1 to 520, --step-secs 1 to 3600"
    );
    print!("{}", generate(&spec));
    Ok(())
}

/// The traces `bench simulate` judges policies on: smooth and with flash crowds, each from two seeds
/// (two curve shapes).
const BENCH_TRACES: [(&str, bool, u64); 4] = [
    ("smooth, seed 1", false, 1),
    ("flash crowds, seed 1", true, 1),
    ("smooth, seed 2", false, 2),
    ("flash crowds, seed 2", true, 2),
];

/// `cargo xtask bench simulate [--weeks N]`: `examples/web-recommended.toml` and the six anchors on
/// synthetic traces of `weeks` (12) at one point a minute; each policy's under-provisioned minutes,
/// instance-hours and slack over the oracle, and whether ebb beats every anchor.
pub fn bench_simulate(args: &[String]) -> anyhow::Result<bool> {
    use crate::report::{Report, figure, text};
    let weeks = crate::fleet::flag(args, "--weeks", 12)?;
    let bin = crate::build_release()?;
    let dir = crate::TempDir::new("ebb-bench-simulate")?;
    let config = crate::root().join("examples/web-recommended.toml");
    let mut report = Report::new(
        "simulate",
        args,
        &[
            ("trace: policy", ""),
            ("under-provisioned", "min"),
            ("instance-hours", "h"),
            ("slack over the oracle", "%"),
            ("flaps", ""),
        ],
    );
    let (mut slowest, mut worst_slack, mut not_beaten) = (0.0f64, f64::MIN, Vec::new());
    for (name, flash_crowds, seed) in BENCH_TRACES {
        let spec = TraceSpec {
            flash_crowds,
            weeks,
            step_secs: 60,
            peak: 2000.0,
            seed,
        };
        let path = dir.0.join(format!("trace-{seed}-{flash_crowds}.csv"));
        std::fs::write(&path, generate(&spec))?;
        let started = std::time::Instant::now();
        let output = std::process::Command::new(bin.join("ebb-collector"))
            .args([
                "simulate",
                "--group",
                "web",
                "--member-capacity",
                "100",
                "--compare",
                "all",
                "--json",
            ])
            .arg("--config")
            .arg(&config)
            .arg("--trace")
            .arg(&path)
            .output()?;
        let took = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            output.status.success(),
            "simulate failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        slowest = slowest.max(took);
        eprintln!("{name}: {took:.2} s");
        let json: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let policies = json["policies"].as_array().cloned().unwrap_or_default();
        let figure_of = |p: &serde_json::Value, key: &str| p[key].as_f64().unwrap_or(f64::NAN);
        let ebb = &policies[0];
        for policy in &policies {
            report.row(vec![
                text(format!("{name}: {}", policy["policy"].as_str().unwrap_or("?"))),
                figure(figure_of(policy, "under_provisioned_minutes"), 1),
                figure(figure_of(policy, "instance_hours"), 0),
                figure(figure_of(policy, "slack_over_oracle_percent"), 1),
                figure(figure_of(policy, "flaps"), 0),
            ]);
        }
        worst_slack = worst_slack.max(figure_of(ebb, "slack_over_oracle_percent"));
        let (u, h) = (
            figure_of(ebb, "under_provisioned_minutes"),
            figure_of(ebb, "instance_hours"),
        );
        for anchor in &policies[1..policies.len() - 1] {
            let (au, ah) = (
                figure_of(anchor, "under_provisioned_minutes"),
                figure_of(anchor, "instance_hours"),
            );
            if !(u < au || (u == au && h < ah)) {
                not_beaten.push(format!("{} on {name}", anchor["policy"].as_str().unwrap_or("?")));
            }
        }
    }
    report.at_most(
        format!("one simulate run: {weeks} weeks at a point a minute, ebb and six anchors"),
        slowest,
        10.0,
        "s",
    );
    report.at_most(
        "anchors ebb does not beat (fewer under-provisioned minutes, or as few and fewer instance-hours)",
        not_beaten.len() as f64,
        0.0,
        "",
    );
    report.at_most("ebb's slack over the oracle, worst trace", worst_slack, 15.0, "%");
    if !not_beaten.is_empty() {
        report.note(format!("not beaten: {}", not_beaten.join(", ")));
    }
    report.note(
        "synthetic traces (cargo xtask trace): peak 2,000 in the trace's unit, members of capacity 100, a 120 s \
         boot, a step every 10 s; the oracle keeps the group's 55 % target with perfect foresight",
    );
    report.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(csv: &str) -> Vec<(u64, f64)> {
        csv.lines()
            .skip(1)
            .map(|line| {
                let (t, d) = line.split_once(',').unwrap();
                (t.parse().unwrap(), d.parse().unwrap())
            })
            .collect()
    }

    fn spec(flash_crowds: bool) -> TraceSpec {
        TraceSpec {
            flash_crowds,
            weeks: 2,
            step_secs: 60,
            peak: 1000.0,
            seed: 3,
        }
    }

    #[test]
    fn a_trace_repeats_daily_and_weekly_and_is_the_same_for_a_seed() {
        let csv = generate(&spec(false));
        assert_eq!(csv, generate(&spec(false)));
        assert_ne!(csv, generate(&TraceSpec { seed: 4, ..spec(false) }));
        let points = demand(&csv);
        assert_eq!(points.len(), 2 * 7 * 1440 + 1);
        let day = |d: usize| &points[d * 1440..(d + 1) * 1440];
        let peak = |d: usize| day(d).iter().map(|p| p.1).fold(0.0, f64::max);
        let trough = |d: usize| day(d).iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        for d in 0..14 {
            assert!(peak(d) > 2.0 * trough(d), "day {d}: a daily cycle");
        }
        // Weekends are quieter than the weekdays around them.
        assert!(peak(5).max(peak(6)) < peak(2).max(peak(3)));
    }

    #[test]
    fn flash_crowds_add_sixty_percent_within_a_minute_for_twenty_minutes() {
        let smooth = demand(&generate(&spec(false)));
        let flash = demand(&generate(&spec(true)));
        let ratios: Vec<f64> = smooth.iter().zip(&flash).map(|(s, f)| f.1 / s.1).collect();
        let raised = ratios.iter().filter(|r| (**r - 1.6).abs() < 1e-2).count();
        // Two to four a week, 20 minutes each (overlaps aside).
        assert!((4 * 20 - 20..=8 * 20).contains(&raised), "{raised} raised minutes");
        assert!(
            ratios
                .iter()
                .all(|r| (*r - 1.0).abs() < 1e-2 || (*r - 1.6).abs() < 1e-2)
        );
    }
}
