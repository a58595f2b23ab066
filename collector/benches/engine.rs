//! `cargo bench -p ebb-collector --bench engine` (also run by `cargo xtask bench engine`): the decision
//! engine's cost. Goals (issue 5): one evaluation of a 1,000-member group ≤ 1 ms; every group of a
//! 1,000-group collector evaluated each second in < 10% of one core.
//!
//! Each group has the policies an operator is likely to combine: a step scale-out with three evaluation
//! periods and two step ranges, a step scale-in over five periods, and target tracking; every member has
//! data for every period, so no evaluation takes a shortcut.

use std::hint::black_box;
use std::time::{Duration, Instant};

use ebb_collector::engine::{Engine, GroupInput, HealthRun, Means, MemberInput, MemberState, Rollout};
use ebb_collector::testing::GroupToml;

const NOW: i64 = 1_000_000_000;

/// The group's policies as an operator writes them; the collector's own defaults fill in the rest.
const POLICIES: &str = r#"
[[groups.policies]]
name = "out"
metric = "cpu"
statistic = "p95"
evaluation_periods = 3
comparison = "gt"
threshold = 70.0
steps = [{ lower = 0.0, upper = 15.0, adjustment = 1 }, { lower = 15.0, adjustment = 3 }]
[[groups.policies]]
name = "in"
metric = "cpu"
statistic = "p95"
evaluation_periods = 5
comparison = "lt"
threshold = 20.0
adjustment = -1
[[groups.policies]]
name = "target"
type = "target_tracking"
metric = "cpu"
target = 50.0
"#;

/// The benchmark's group: local instances behind the built-in load balancer, with [`POLICIES`].
fn group_toml() -> String {
    GroupToml::local("web")
        .set("min_size", 1)
        .set("max_size", 2000)
        .set("cooldown_secs", 60)
        .set("scale_in_cooldown_secs", 300)
        .table(POLICIES)
        .to_toml()
}

fn engine() -> Engine {
    let config =
        ebb_collector::config::parse(std::path::Path::new("bench.toml"), &group_toml()).expect("a valid group");
    config.groups[0].engine()
}

fn group(members: usize) -> GroupInput {
    GroupInput {
        now: NOW,
        min_size: 1,
        max_size: members as u32 * 2,
        desired: members as u32,
        last_scale_out: None,
        last_scale_in: None,
        suspended: false,
        members: (0..members)
            .map(|i| {
                let cpu = 30.0 + (i % 40) as f64;
                MemberInput {
                    id: format!("web-{i}"),
                    state: MemberState::InService,
                    launched: NOW - 3_600_000,
                    watched_since: None,
                    in_service_since: Some(NOW - 3_500_000),
                    protected: false,
                    unhealthy: false,
                    health: HealthRun {
                        passes: 30,
                        failures: 0,
                        last_heard: Some(NOW - 500),
                    },
                    means: Means::new(vec![vec![Some(cpu); 3], vec![Some(cpu); 5], vec![Some(cpu)]]),
                    load: Some(cpu),
                    replacing: false,
                    leaving: false,
                    outdated: false,
                }
            })
            .collect(),
        recommendations: Vec::new(),
        predictions: Vec::new(),
        changes: Vec::new(),
        rollout: Rollout::default(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this once, quickly, as a smoke test.
    let quick = !std::env::args().any(|a| a == "--bench");
    let engine = engine();

    let big = group(1000);
    let runs = if quick { 10 } else { 2000 };
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        black_box(engine.plan(black_box(&big)));
        times.push(started.elapsed());
    }
    times.sort();
    let (evaluation_median_ms, evaluation_p99_ms) = (
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
    );
    println!("| measure | median | p99 | goal |");
    println!("|---|---|---|---|");
    println!(
        "| one evaluation and its plan, 1,000 members, 3 policies ({runs} runs) | {evaluation_median_ms:.3} ms | {evaluation_p99_ms:.3} ms | ≤ 1 ms |"
    );
    // For `cargo xtask bench engine`, which keeps them in target/bench/engine.json.
    println!("figure evaluation_median_ms {evaluation_median_ms}");
    println!("figure evaluation_p99_ms {evaluation_p99_ms}");

    let groups: Vec<GroupInput> = (0..1000).map(|_| group(10)).collect();
    let rounds = if quick { 1 } else { 20 };
    let mut round_times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        for g in &groups {
            black_box(engine.plan(black_box(g)));
        }
        round_times.push(started.elapsed());
    }
    round_times.sort();
    let (round_median_ms, round_p99_ms) = (
        percentile(&round_times, 0.5).as_secs_f64() * 1e3,
        percentile(&round_times, 0.99).as_secs_f64() * 1e3,
    );
    println!(
        "| all 1,000 groups of 10 members, once ({rounds} rounds) | {round_median_ms:.1} ms = {:.1}% of one core each second | {round_p99_ms:.1} ms | < 10% of one core |",
        round_median_ms / 10.0
    );
    println!("figure round_median_ms {round_median_ms}");
    println!("figure round_p99_ms {round_p99_ms}");
}
