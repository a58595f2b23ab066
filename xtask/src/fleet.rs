//! Benchmarks with many agents against one real collector (`ebb-collector serve`, release build):
//! - `bench enroll [--agents N]`: N agents enrolling at once (a boot storm), each through the whole path an
//!   agent takes: pin the CA over TLS, then Enroll over TLS with a fresh key and CSR.
//! - `bench ingest [--max N]`: simulated agents, each on its own mTLS connection sending one sample a second;
//!   for growing N, the p99 time from sending a sample to its ack (stored by the ingest task), the
//!   collector's CPU and its memory per connected agent.
//!
//! The load generator runs on the same two cores as the collector; its own CPU is reported too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use ebb_agent::identity::{self, Identity};
use ebb_proto::v1::telemetry_client::TelemetryClient;
use ebb_proto::v1::{Hello, ReportRequest, Sample, SampleBatch, report_request, report_response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::{Guard, build_release, free_port, usage};

struct Fleet {
    _collector: Guard,
    pid: u32,
    url: String,
    fingerprint: String,
    token: String,
    _dir: TempDir,
}

/// A directory removed when dropped, whether the collector started or not.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A collector with one group that launches nothing and admits `capacity` hand-made members, and one
/// operator token good for all of them; `more_groups` is appended to its configuration.
fn start_collector(bin: &Path, capacity: u32, more_groups: &str) -> anyhow::Result<Fleet> {
    let guard = TempDir(std::env::temp_dir().join(format!("ebb-fleet-{}", std::process::id())));
    let dir = guard.0.clone();
    let state = dir.join("state");
    std::fs::create_dir_all(&dir)?;
    let (grpc, admin) = (
        format!("127.0.0.1:{}", free_port()?),
        format!("127.0.0.1:{}", free_port()?),
    );
    let config = format!(
        r#"
        [server]
        grpc_listen = "{grpc}"
        admin_listen = "{admin}"
        http_listen = "127.0.0.1:{http}"
        state_dir = "{state}"
        enrollments_per_minute = 1000000

        [[groups]]
        name = "web"
        min_size = 0
        max_size = {capacity}
        [groups.provider]
        type = "local"
        [groups.load_balancer]
        type = "builtin"
        listen = "127.0.0.1:0"
        {more_groups}
        "#,
        http = free_port()?,
        state = state.display()
    );
    std::fs::write(dir.join("collector.toml"), config)?;
    let collector = Guard(
        Command::new(bin.join("ebb-collector"))
            .args(["serve", "--config"])
            .arg(dir.join("collector.toml"))
            .env("EBB_LOG", "error")
            .stdin(Stdio::null())
            .spawn()?,
    );
    let pid = collector.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(state.join("admin.pem").exists() && std::net::TcpStream::connect(&admin).is_ok()) {
        ensure!(Instant::now() < deadline, "the collector did not start within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let admin_command = |args: &[&str]| -> anyhow::Result<String> {
        let output = Command::new(bin.join("ebb-collector"))
            .args(["--server", &format!("https://{admin}"), "--state-dir"])
            .arg(&state)
            .args(args)
            .output()?;
        ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let token = admin_command(&[
        "token",
        "create",
        "--group",
        "web",
        "--ttl-secs",
        "3600",
        "--uses",
        &capacity.to_string(),
    ])?;
    let fingerprint = admin_command(&["ca", "show"])?
        .split_whitespace()
        .next()
        .context("fingerprint")?
        .to_string();
    Ok(Fleet {
        _collector: collector,
        pid,
        url: format!("https://{grpc}"),
        fingerprint,
        token,
        _dir: guard,
    })
}

fn flag(args: &[String], name: &str, default: u32) -> anyhow::Result<u32> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args.get(i + 1).context("a number after the flag")?.parse()?),
        None => Ok(default),
    }
}

/// Enrols `n` agents at once; their identities and the wall time.
async fn enroll_many(fleet: &Fleet, n: u32) -> anyhow::Result<(Vec<Identity>, Duration)> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (url, pin, token) = (fleet.url.clone(), fleet.fingerprint.clone(), fleet.token.clone());
        tasks.spawn(async move { identity::enroll(&url, &pin, &token, "web", ebb_agent::now_ms()).await });
    }
    let mut identities = Vec::new();
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        match result? {
            Ok(identity) => identities.push(identity),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let elapsed = started.elapsed();
    ensure!(
        failures.is_empty(),
        "{} enrolments failed, first: {}",
        failures.len(),
        failures[0]
    );
    Ok((identities, elapsed))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

pub fn bench_enroll(args: &[String]) -> anyhow::Result<()> {
    let n = flag(args, "--agents", 1000)?;
    let bin = build_release()?;
    let fleet = start_collector(&bin, n, "")?;
    let (collector_cpu_before, _) = usage(fleet.pid)?;
    let (own_cpu_before, _) = usage(std::process::id())?;
    let (identities, elapsed) = runtime()?.block_on(enroll_many(&fleet, n))?;
    let (collector_cpu, rss) = usage(fleet.pid)?;
    let (own_cpu, _) = usage(std::process::id())?;
    let rate = f64::from(n) / elapsed.as_secs_f64();
    println!(
        "| agents enrolling at once | all enrolled in | enrolments/s | collector CPU | generator CPU | collector RSS after |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {n} | {:.2} s | {rate:.0} | {:.1} s | {:.1} s | {:.1} MiB |",
        elapsed.as_secs_f64(),
        collector_cpu - collector_cpu_before,
        own_cpu - own_cpu_before,
        rss as f64 / 1024.0
    );
    ensure!(identities.len() == n as usize);
    println!("\ntarget: 1,000 agents all enrolled in under 10 s");
    Ok(())
}

/// One simulated agent: its own mTLS connection and stream, one sample a second; records send→ack latency.
async fn simulate(
    url: String,
    identity: Identity,
    latencies: Arc<Mutex<Vec<u32>>>,
    start_after: Duration,
) -> anyhow::Result<()> {
    tokio::time::sleep(start_after).await;
    let channel = Endpoint::from_shared(url)?
        .tls_config(identity.client_tls())?
        .connect()
        .await?;
    let (requests, outgoing) = mpsc::channel(4);
    let hello = Hello {
        member_id: identity.member_id.clone(),
        agent_version: "bench".into(),
        boot_id: String::new(),
        run_id: 1,
    };
    requests
        .send(ReportRequest {
            message: Some(report_request::Message::Hello(hello)),
        })
        .await?;
    let mut responses = TelemetryClient::new(channel)
        .report(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut sent: Option<(u64, Instant)> = None;
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                seq += 1;
                let sample = Sample { seq, timestamp_ms: ebb_agent::now_ms(), cpu_busy_percent: Some(42.0), load1: 0.5, mem_used_percent: 30.0, ..Sample::default() };
                sent = Some((seq, Instant::now()));
                requests.send(ReportRequest { message: Some(report_request::Message::Batch(SampleBatch { samples: vec![sample] })) }).await?;
            }
            message = responses.message() => {
                let Some(message) = message? else { return Ok(()) };
                if let (Some(report_response::Message::Ack(ack)), Some((waiting, at))) = (message.message, sent)
                    && ack.highest_seq >= waiting
                {
                    latencies.lock().unwrap().push(at.elapsed().as_micros() as u32);
                    sent = None;
                }
            }
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1]) / 1000.0
}

pub fn bench_ingest(args: &[String]) -> anyhow::Result<()> {
    let max = flag(args, "--max", 10_000)?;
    let secs = u64::from(flag(args, "--secs", 20)?);
    let steps: Vec<u32> = [1000, 2500, 5000, 7500, 10_000, 15_000]
        .into_iter()
        .filter(|s| *s <= max)
        .collect();
    let bin = build_release()?;
    let fleet = start_collector(&bin, max, "")?;
    let runtime = runtime()?;
    let (_, baseline_rss) = usage(fleet.pid)?;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut agents = 0u32;
    println!(
        "| agents connected | p50 send→ack | p99 send→ack | collector CPU (% of one core) | collector RSS | per agent | generator CPU |"
    );
    println!("|---|---|---|---|---|---|---|");
    for step in steps {
        let (identities, _) = runtime.block_on(enroll_many(&fleet, step - agents))?;
        for identity in identities {
            let (url, latencies) = (fleet.url.clone(), latencies.clone());
            // Spread the agents' seconds evenly, as real agents' clocks are.
            let offset = Duration::from_micros(u64::from(agents) * 1_000_000 / u64::from(step.max(1)) % 1_000_000);
            runtime.spawn(async move {
                if let Err(e) = simulate(url, identity, latencies, offset).await {
                    eprintln!("a simulated agent stopped: {e}");
                }
            });
            agents += 1;
        }
        // Let every agent connect and settle, then measure.
        std::thread::sleep(Duration::from_secs(10));
        latencies.lock().unwrap().clear();
        let (cpu_before, _) = usage(fleet.pid)?;
        let (own_before, _) = usage(std::process::id())?;
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        let wall = started.elapsed().as_secs_f64();
        let (cpu_after, rss) = usage(fleet.pid)?;
        let (own_after, _) = usage(std::process::id())?;
        let mut sorted = std::mem::take(&mut *latencies.lock().unwrap());
        sorted.sort_unstable();
        let per_agent_kib = (rss.saturating_sub(baseline_rss)) as f64 / f64::from(agents);
        println!(
            "| {agents} | {:.1} ms | {:.1} ms | {:.0}% | {:.0} MiB | {:.1} KiB | {:.0}% |",
            percentile(&sorted, 0.50),
            percentile(&sorted, 0.99),
            100.0 * (cpu_after - cpu_before) / wall,
            rss as f64 / 1024.0,
            per_agent_kib,
            100.0 * (own_after - own_before) / wall
        );
        eprintln!("  {} acks measured over {secs} s", sorted.len());
    }
    println!("\ngoal: >= 10,000 agents with p99 <= 50 ms and <= 1 core, <= 32 KB per agent");
    Ok(())
}

/// `bench engine`: the engine's own cost (`cargo bench -p ebb-collector --bench engine`), then a real
/// collector with 1,000 groups, each evaluated every second: its CPU over `--secs` (default 20).
pub fn bench_engine(args: &[String]) -> anyhow::Result<()> {
    let secs = u64::from(flag(args, "--secs", 20)?);
    crate::cargo_bench("engine")?;
    let bin = build_release()?;
    let groups: String = (1..1000)
        .map(|i| {
            format!(
                r#"
                [[groups]]
                name = "g{i:04}"
                min_size = 0
                max_size = 10
                [groups.provider]
                type = "local"
                [groups.load_balancer]
                type = "builtin"
                listen = "127.0.0.1:0"
                [[groups.policies]]
                name = "out"
                metric = "cpu"
                period_secs = 60
                evaluation_periods = 3
                comparison = "gt"
                threshold = 70.0
                adjustment = 2
                [[groups.policies]]
                name = "in"
                metric = "cpu"
                period_secs = 60
                evaluation_periods = 5
                comparison = "lt"
                threshold = 20.0
                adjustment = -1
                "#
            )
        })
        .collect();
    let fleet = start_collector(&bin, 1, &groups)?;
    // Let every group's controller start ticking.
    std::thread::sleep(Duration::from_secs(5));
    let (cpu_before, _) = usage(fleet.pid)?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let (cpu_after, rss) = usage(fleet.pid)?;
    let wall = started.elapsed().as_secs_f64();
    println!("\n| collector with 1,000 groups (no members), each evaluated every second | CPU | RSS |");
    println!("|---|---|---|");
    println!(
        "| over {secs} s | {:.1}% of one core | {:.0} MiB |",
        100.0 * (cpu_after - cpu_before) / wall,
        rss as f64 / 1024.0
    );
    println!("\ngoal: one evaluation of 1,000 members <= 1 ms; 1,000 groups every second < 10% of one core");
    Ok(())
}
