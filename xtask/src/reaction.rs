//! From load to the cloud's launch call, against a real collector (release build) whose group uses the
//! directory fake cloud (`type = "fake"`: each launch is a file recording when the call began and, by its
//! modification time, when it answered), with one simulated agent on mTLS:
//! - `bench reaction [--trials N]`: with a policy "average CPU > 60 % over 10 s", the time from the first
//!   over-threshold sample to the launch call, and the overhead beyond the moment the samples sent first
//!   satisfy the policy; beside the documented floors of the tools ebb replaces.
//! - `bench fanout`: +10 members in one decision, each launch call taking 2 s: the calls overlap, so the ten
//!   take about one call's time.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, ensure};

use crate::fleet::{Fleet, SentSamples, SimulatedAgent, enroll_many, flag, runtime, start_collector};
use crate::report::{Report, figure, ratio, text};
use crate::{TempDir, build_release};

const WINDOW_MS: i64 = 10_000;
const THRESHOLD: f64 = 60.0;

/// A group on the directory fake cloud whose one policy adds `adjustment` members when the average CPU
/// over `period_secs` exceeds 60 %.
fn group(cloud: &Path, launch_latency_ms: u32, period_secs: u32, adjustment: u32) -> String {
    format!(
        r#"
        [[groups]]
        name = "web"
        min_size = 0
        max_size = 20
        cooldown_secs = 0
        warmup_secs = 0
        agent_interval_secs = 1
        [groups.provider]
        type = "fake"
        dir = "{cloud}"
        launch_latency_ms = {launch_latency_ms}
        [groups.load_balancer]
        type = "builtin"
        listen = "127.0.0.1:0"
        [[groups.policies]]
        name = "cpu-high"
        metric = "cpu"
        period_secs = {period_secs}
        evaluation_periods = 1
        comparison = "gt"
        threshold = {THRESHOLD:.1}
        adjustment = {adjustment}
        "#,
        cloud = cloud.display()
    )
}

/// A launch as the fake cloud recorded it: when the call began and when it answered (ms since the epoch).
struct Launch {
    called_at_ms: i64,
    answered_at_ms: i64,
}

fn launches(cloud: &Path) -> anyhow::Result<Vec<Launch>> {
    let mut launches = Vec::new();
    for entry in std::fs::read_dir(cloud)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let called_at_ms = record["called_at_ms"]
            .as_i64()
            .with_context(|| format!("called_at_ms in {}", path.display()))?;
        let answered = std::fs::metadata(&path)?.modified()?.duration_since(UNIX_EPOCH)?;
        launches.push(Launch {
            called_at_ms,
            answered_at_ms: answered.as_millis() as i64,
        });
    }
    Ok(launches)
}

/// Waits until the fake cloud holds `n` launches (polling every 5 ms, at most `limit`).
fn wait_for_launches(cloud: &Path, n: usize, limit: Duration) -> anyhow::Result<Vec<Launch>> {
    let deadline = Instant::now() + limit;
    loop {
        let found = launches(cloud)?;
        if found.len() >= n {
            return Ok(found);
        }
        ensure!(
            Instant::now() < deadline,
            "{} of {n} launches within {limit:?}",
            found.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One enrolled simulated agent reporting `cpu`, its samples recorded; the runtime it runs on.
fn one_agent(
    fleet: &Fleet,
    start_after: Duration,
    cpu: Arc<dyn Fn() -> f64 + Send + Sync>,
) -> anyhow::Result<(tokio::runtime::Runtime, SentSamples)> {
    let runtime = runtime()?;
    let (mut identities, _) = runtime.block_on(enroll_many(fleet, 1))?;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let agent = SimulatedAgent {
        url: fleet.url.clone(),
        identity: identities.pop().context("one identity")?,
        from: None,
        start_after,
        cpu,
        sent: Some(sent.clone()),
        latencies: Arc::new(Mutex::new(Vec::new())),
    };
    runtime.spawn(async move {
        if let Err(e) = agent.run().await {
            eprintln!("the simulated agent stopped: {e}");
        }
    });
    Ok((runtime, sent))
}

/// The first moment the samples sent satisfy the policy: the mean of those in [t − 10 s, t) exceeds 60 %.
/// The set changes only when a sample enters (just after its time) or leaves (10 s after it).
fn policy_satisfied_at(sent: &[(i64, f64)]) -> Option<i64> {
    let mut moments: Vec<i64> = sent.iter().flat_map(|(at, _)| [at + 1, at + WINDOW_MS + 1]).collect();
    moments.sort_unstable();
    moments.into_iter().find(|t| {
        let inside: Vec<f64> = sent
            .iter()
            .filter(|(at, _)| *at >= t - WINDOW_MS && at < t)
            .map(|(_, cpu)| *cpu)
            .collect();
        !inside.is_empty() && inside.iter().sum::<f64>() / inside.len() as f64 > THRESHOLD
    })
}

struct Trial {
    reaction_ms: i64,
    window_ms: i64,
    overhead_ms: i64,
}

/// One trial, the agent's samples starting `phase` into the collector's second (trials spread it, so the
/// worst case of the once-a-second evaluation shows).
fn trial(bin: &Path, phase: Duration) -> anyhow::Result<Trial> {
    let cloud = TempDir::new("ebb-reaction-cloud")?;
    let fleet = start_collector(bin, &group(&cloud.0, 0, 10, 1), 1)?;
    let high = Arc::new(AtomicBool::new(false));
    let load = high.clone();
    // 0 % and then 65 %: the 10 s average passes 60 % only once all ten samples in the window are high.
    let (_runtime, sent) = one_agent(
        &fleet,
        phase,
        Arc::new(move || if load.load(Ordering::SeqCst) { 65.0 } else { 0.0 }),
    )?;
    // A full window of low samples first, and the member in service.
    std::thread::sleep(Duration::from_secs(11));
    ensure!(launches(&cloud.0)?.is_empty(), "a launch before any load");
    high.store(true, Ordering::SeqCst);
    let launch = wait_for_launches(&cloud.0, 1, Duration::from_secs(30))?;
    // One more second: a second launch for the same breach would show here.
    std::thread::sleep(Duration::from_secs(1));
    ensure!(launches(&cloud.0)?.len() == 1, "more than one launch for one breach");
    let sent = sent.lock().unwrap().clone();
    let first_high = sent
        .iter()
        .find(|(_, cpu)| *cpu > THRESHOLD)
        .context("an over-threshold sample")?
        .0;
    let satisfied = policy_satisfied_at(&sent).context("the samples never satisfied the policy")?;
    let called = launch[0].called_at_ms;
    Ok(Trial {
        reaction_ms: called - first_high,
        window_ms: satisfied - first_high,
        overhead_ms: called - satisfied,
    })
}

pub fn bench_reaction(args: &[String]) -> anyhow::Result<bool> {
    let trials = flag(args, "--trials", 5)?;
    let bin = build_release()?;
    let mut results = Vec::new();
    for n in 1..=trials {
        let result = trial(&bin, Duration::from_millis(u64::from(n - 1) * 1000 / u64::from(trials)))?;
        eprintln!(
            "trial {n}: launch call {} ms after the first over-threshold sample, {} ms after the policy was satisfied",
            result.reaction_ms, result.overhead_ms
        );
        results.push(result);
    }
    let median = |f: fn(&Trial) -> i64| {
        let mut values: Vec<i64> = results.iter().map(f).collect();
        values.sort_unstable();
        values[values.len() / 2] as f64
    };
    let worst_overhead = results.iter().map(|t| t.overhead_ms).max().unwrap_or(0) as f64;
    let reaction_s = median(|t| t.reaction_ms) / 1000.0;
    let mut report = Report::new(
        "reaction",
        args,
        &[
            ("from the first over-threshold sample to the launch call", ""),
            ("reaction", "s"),
            ("of which the policy's own window", "s"),
            ("overhead, median", "ms"),
            ("overhead, worst", "ms"),
            ("reaction / ebb's", ""),
        ],
    );
    report.row(vec![
        text(format!(
            "ebb, avg CPU > 60 % over 10 s, 1 s samples ({trials} trials, median)"
        )),
        figure(reaction_s, 2),
        figure(median(|t| t.window_ms) / 1000.0, 2),
        figure(median(|t| t.overhead_ms), 0),
        figure(worst_overhead, 0),
        ratio(1.0, 1),
    ]);
    for (anchor, floor_s) in [
        ("ssh_scale.py: cron every minute (documented floor, not measured)", 60.0),
        ("EC2 target tracking: 3 one-minute datapoints (documented floor)", 180.0),
        ("Heat + Ceilometer: default 600 s polling (documented floor)", 600.0),
    ] {
        report.row(vec![
            text(anchor),
            figure(floor_s, 0),
            figure(f64::NAN, 0),
            figure(f64::NAN, 0),
            figure(f64::NAN, 0),
            ratio(floor_s / reaction_s, 0),
        ]);
    }
    report.at_most(
        "worst overhead beyond the policy's window (goal: one sample interval + 100 ms)",
        worst_overhead,
        1100.0,
        "ms",
    );
    report.note(
        "the policy is satisfied at the first moment the samples sent, by their timestamps, average over 60 % in \
         the 10 s before it (computed by the benchmark from what it sent); the launch call's time is when the fake \
         cloud's launch began",
    );
    report.finish()
}

pub fn bench_fanout(args: &[String]) -> anyhow::Result<bool> {
    const LATENCY_MS: u32 = 2000;
    let bin = build_release()?;
    let cloud = TempDir::new("ebb-fanout-cloud")?;
    let fleet = start_collector(&bin, &group(&cloud.0, LATENCY_MS, 3, 10), 1)?;
    let (_runtime, _sent) = one_agent(&fleet, Duration::ZERO, Arc::new(|| 90.0))?;
    let launches = wait_for_launches(&cloud.0, 10, Duration::from_secs(60))?;
    ensure!(launches.len() == 10, "{} launches, not 10", launches.len());
    let first_call = launches.iter().map(|l| l.called_at_ms).min().unwrap_or(0);
    let last_answer = launches.iter().map(|l| l.answered_at_ms).max().unwrap_or(0);
    let last_call = launches.iter().map(|l| l.called_at_ms).max().unwrap_or(0);
    // The most calls in flight at one moment: at some call's start, those begun and not yet answered.
    let most_in_flight = launches
        .iter()
        .map(|l| {
            launches
                .iter()
                .filter(|o| o.called_at_ms <= l.called_at_ms && o.answered_at_ms > l.called_at_ms)
                .count()
        })
        .max()
        .unwrap_or(0);
    let wall_s = (last_answer - first_call) as f64 / 1000.0;
    let one_call_s = f64::from(LATENCY_MS) / 1000.0;
    let mut report = Report::new(
        "fanout",
        args,
        &[
            ("scale-out", ""),
            ("launch calls", ""),
            ("one call", "s"),
            ("first call to last answer", "s"),
            ("first call to last call", "ms"),
            ("most in flight at once", ""),
            ("wall / one call", ""),
        ],
    );
    report.row(vec![
        text("+10 in one decision, fake cloud answering each launch after 2 s"),
        figure(launches.len() as f64, 0),
        figure(one_call_s, 1),
        figure(wall_s, 2),
        figure((last_call - first_call) as f64, 0),
        figure(most_in_flight as f64, 0),
        figure(wall_s / one_call_s, 2),
    ]);
    report.at_least("launch calls in flight at once", most_in_flight as f64, 10.0, "calls");
    report.at_most(
        "wall time of the ten launches / one call's",
        wall_s / one_call_s,
        1.5,
        "",
    );
    report.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_is_satisfied_once_the_ten_seconds_before_average_over_sixty() {
        // 0 % every second from 0 to 10 s, then 65 % from 11 s on.
        let sent: Vec<(i64, f64)> = (0..30).map(|s| (s * 1000, if s <= 10 { 0.0 } else { 65.0 })).collect();
        // At 20.001 s the window [10.001 s, 20.001 s) holds the ten samples of 11..=20 s, all 65 %.
        assert_eq!(policy_satisfied_at(&sent), Some(20_001));
        let low: Vec<(i64, f64)> = (0..30).map(|s| (s * 1000, 60.0)).collect();
        assert_eq!(policy_satisfied_at(&low), None, "60 % is not over 60 %");
    }
}
