//! `cargo bench -p ebb-collector --bench store` (also run by `cargo xtask bench store`): the store's cost.
//! Goals (issue 6): writing an activity or an intent ≤ 1 ms at p99; a restart of a collector owning 1,000
//! members fully reconciled in ≤ 5 s with the fake provider.
//!
//! The store is a file in a temporary directory (WAL, synchronous = NORMAL, as the collector opens it).
//! "Restart" is what a collector does at start for one group: load its state and members from the
//! store, register them with ingest, list the provider's instances, settle open intents, and evaluate
//! once; it is timed until the group's status shows every member.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb_collector::activity::{Activity, ActivityKind, ActivityLog};
use ebb_collector::engine::MemberState;
use ebb_collector::explain::ExplanationLog;
use ebb_collector::ingest::IngestHandle;
use ebb_collector::lb::fake::FakeLoadBalancer;
use ebb_collector::metrics::Metrics;
use ebb_collector::pki::{Authority, Pki};
use ebb_collector::providers::fake::FakeProvider;
use ebb_collector::providers::{LaunchSpec, Provider};
use ebb_collector::reconcile::{Dependencies, GroupController, Member, Services};
use ebb_collector::store::{GroupRecord, Intent, IntentKind, Store};
use ebb_collector::testing::GroupToml;

/// The group's policies.
const POLICIES: &str = r#"
[[groups.policies]]
name = "cpu-high"
metric = "cpu"
comparison = "gt"
threshold = 70.0
adjustment = 1
"#;

/// The benchmark's group: local instances behind the built-in load balancer, with [`POLICIES`].
fn group_toml() -> String {
    GroupToml::local("web")
        .set("min_size", 1)
        .set("max_size", 2000)
        .table(POLICIES)
        .to_toml()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

fn timed(runs: usize, mut f: impl FnMut(usize)) -> Vec<Duration> {
    let mut times: Vec<Duration> = (0..runs)
        .map(|i| {
            let started = Instant::now();
            f(i);
            started.elapsed()
        })
        .collect();
    times.sort();
    times
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("collector.db")).unwrap());
    let runs = if quick { 20 } else { 5000 };
    let activity = Activity {
        id: 0,
        group: "web".into(),
        kind: ActivityKind::Launch,
        cause: "policy cpu-high: avg cpu > 70%: cpu 85% over 60 s → alarm → 3 → 4".into(),
        outcome: "ok",
        detail: "instance i-0123456789abcdef0".into(),
        at: 1_000,
        from_capacity: 3,
        to_capacity: 4,
        member_id: "web-4".into(),
    };
    let activities = timed(runs, |_| {
        store.add_activity(&activity).unwrap();
    });
    let intents = timed(runs, |i| {
        let intent = Intent {
            key: format!("web-{i}-1000"),
            group: "web".into(),
            kind: IntentKind::Launch,
            member_id: format!("web-{i}"),
            instance_id: String::new(),
            created_at: 1_000,
        };
        store.begin_intent(&intent).unwrap();
        store.finish_intent(&intent.key, 1_001, "launched").unwrap();
    });
    println!("| measure | p50 | p99 | goal |");
    println!("|---|---|---|---|");
    println!(
        "| write one activity ({runs}) | {:.3} ms | {:.3} ms | p99 ≤ 1 ms |",
        percentile(&activities, 0.5),
        percentile(&activities, 0.99)
    );
    println!(
        "| write an intent and mark it done ({runs}) | {:.3} ms | {:.3} ms | p99 ≤ 1 ms |",
        percentile(&intents, 0.5),
        percentile(&intents, 0.99)
    );

    let members = if quick { 50 } else { 1000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let elapsed = runtime.block_on(restart(dir.path(), members));
    println!(
        "| restart with {members} members: load, list, settle intents, first evaluation | {:.0} ms | | ≤ 5 s |",
        elapsed.as_secs_f64() * 1e3
    );
}

/// A group that owned `count` members when its collector stopped (ten launches unfinished); the time for
/// a new controller to be back in charge of all of them.
async fn restart(dir: &std::path::Path, count: usize) -> Duration {
    let store = Arc::new(Store::open(&dir.join("restart.db")).unwrap());
    let provider = FakeProvider::default();
    let mut saved = Vec::new();
    for i in 1..=count {
        let spec = LaunchSpec {
            group: "web".into(),
            member_id: format!("web-{i}"),
            cluster_id: "bench".into(),
            launch_id: format!("web-{i}-1"),
            service_port: 80,
            agent_config: String::new(),
            user_data: Vec::new(),
        };
        let instance = provider.launch(&spec).await.unwrap();
        if i + 10 > count {
            // Launched, but the collector stopped before recording it.
            let intent = Intent {
                key: spec.launch_id.clone(),
                group: "web".into(),
                kind: IntentKind::Launch,
                member_id: spec.member_id.clone(),
                instance_id: String::new(),
                created_at: 1,
            };
            store.begin_intent(&intent).unwrap();
            continue;
        }
        saved.push(Member {
            state: MemberState::InService,
            in_service_since: Some(2),
            ..Member::pending(&spec.member_id, &instance.id, Some("10.0.0.1:80".parse().unwrap()), 1)
        });
    }
    let record = GroupRecord {
        min_size: 1,
        max_size: 2000,
        desired: count as u32,
        launches: count as u64 - 10,
        ..GroupRecord::default()
    };
    store.save_group("web", &record, &saved).unwrap();

    let config = ebb_collector::config::parse(std::path::Path::new("bench.toml"), &group_toml()).unwrap();
    let metrics = Arc::new(Metrics::default());
    let pki = Pki::load_or_create(dir, &["localhost".into()], Duration::from_secs(3600)).unwrap();
    let started = Instant::now();
    let deps = Dependencies {
        provider: Arc::new(provider),
        load_balancer: Arc::new(FakeLoadBalancer::default()),
        services: Services {
            ingest: IngestHandle::spawn(metrics.clone(), 600_000, Vec::new()),
            activities: ActivityLog::new(metrics.clone(), store.clone(), 42),
            metrics,
            authority: Arc::new(Authority::new(pki, 1800, Default::default(), store.clone()).unwrap()),
            explanations: ExplanationLog::new(store.clone(), 3600),
            store,
            cluster_id: "bench".into(),
            clock: Arc::new(ebb_collector::clock::SystemClock),
        },
        collector_url: "https://127.0.0.1:7300".into(),
    };
    let (mut controller, handle, _commands) = GroupController::new(config.groups[0].clone(), deps).await.unwrap();
    controller.step(ebb_collector::clock::now_ms()).await;
    let elapsed = started.elapsed();
    let ids: Vec<String> = handle.status().members.iter().map(|m| m.member.id.clone()).collect();
    assert_eq!(ids.len(), count, "every member, adopted ones included: {ids:?}");
    elapsed
}
