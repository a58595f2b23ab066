//! `ebb-collector demo`: the local example (`examples/local.toml`) with a built-in load generator, shown
//! live. It starts one instance, drives load at the load balancer until the group scales out, stops the
//! load, waits for the group to come back to its minimum, and prints a summary. `--headless` prints one
//! JSON object per line instead.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::Collector;
use crate::activity::{Activity, ActivityKind};
use crate::config::{self, LoadBalancerConfig};
use crate::reconcile::{GroupStatus, MemberState};

/// Requests in flight at once; beyond that the generator skips (and counts) requests.
const MAX_IN_FLIGHT: u64 = 128;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// One JSON object per line instead of the live view.
    #[arg(long)]
    pub headless: bool,
    /// Stop after this long, whatever has happened.
    #[arg(long, default_value_t = 150)]
    pub duration_secs: u64,
    /// How long the load runs once the first member is in service.
    #[arg(long, default_value_t = 30)]
    pub load_secs: u64,
    /// Requests per second during the load.
    #[arg(long, default_value_t = 40)]
    pub rate: u32,
    /// A configuration to run instead of the built-in local example; its first group is shown.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// What the load generator has seen.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub skipped: AtomicU64,
    in_flight: AtomicU64,
    /// Successful answers by the member that served them.
    pub served_by: Mutex<BTreeMap<String, u64>>,
}

/// Sends `GET /work` to `target` at `rate` per second until `until`, one connection per request so the
/// load balancer spreads them.
pub async fn generate_load(target: SocketAddr, rate: u32, until: Instant, stats: Arc<LoadStats>) {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < until {
        ticker.tick().await;
        if stats.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            stats.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), request(target)).await {
                Ok(Some(member)) => {
                    stats.ok.fetch_add(1, Ordering::Relaxed);
                    *stats.served_by.lock().unwrap().entry(member).or_default() += 1;
                }
                _ => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One request; the serving member's id on a 200.
async fn request(target: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect(target).await.ok()?;
    stream
        .write_all(b"GET /work HTTP/1.1\r\nHost: ebb-demo\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    // HTTP/1.0 or 1.1: the operator's application in a VM may answer either.
    if !text.starts_with("HTTP/1.") || text.split(' ').nth(1) != Some("200") {
        return None;
    }
    text.lines()
        .find_map(|line| line.strip_prefix("X-Ebb-Member: "))
        .map(|member| member.trim().to_string())
}

/// Connections the demo's collector takes at once: its groups are a handful of local instances.
const DEMO_CONNECTIONS: u32 = 256;

/// Ports 0 everywhere, so the demo never collides with a collector already running, and its own state
/// directory (CA, admin certificate, instances), so it needs no root. Its few agents need few connections: it
/// does not ask for a fleet's open-file limit (nor warn that a desktop's is too low for one).
fn demo_config(args: &DemoArgs, state_dir: &Path) -> anyhow::Result<config::CollectorConfig> {
    let mut config = match &args.config {
        Some(path) => config::load(path)?,
        None => config::parse(Path::new("examples/local.toml"), config::LOCAL_EXAMPLE)?,
    };
    config.server.grpc_listen.set_port(0);
    config.server.http_listen.set_port(0);
    config.server.admin_listen = None;
    config.server.admin_socket = None;
    config.server.state_dir = state_dir.to_path_buf();
    config.server.max_connections = config.server.max_connections.min(DEMO_CONNECTIONS);
    for group in &mut config.groups {
        match &mut group.load_balancer {
            LoadBalancerConfig::Builtin { listen } => listen.set_port(0),
            LoadBalancerConfig::Cloudstack { .. }
            | LoadBalancerConfig::AwsTargetGroup { .. }
            | LoadBalancerConfig::Octavia { .. } => anyhow::bail!(
                "the demo runs on this machine only: group {} uses a cloud's load balancer",
                group.name
            ),
        }
    }
    anyhow::ensure!(
        !config.groups.is_empty(),
        "the demo needs a configuration with at least one group"
    );
    Ok(config)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let state_dir = tempfile::Builder::new().prefix("ebb-demo-").tempdir()?;
    let config = demo_config(&args, state_dir.path())?;
    let group_name = config.groups[0].name.clone();
    let collector = Collector::start(config).await?;
    // However the demo ends — done, a signal, or its reader gone (`| tee` stopped by Ctrl-C) — it stops
    // every process it started before it returns, and its state directory goes with it.
    let result = watch(&args, &collector, &group_name).await;
    collector.shutdown().await;
    drop(state_dir);
    result
}

/// Drives the load and shows the group until the load is over and the group back at its minimum, the
/// duration is up, or a signal (SIGINT, SIGTERM, SIGHUP) arrives.
async fn watch(args: &DemoArgs, collector: &Collector, group_name: &str) -> anyhow::Result<bool> {
    let group_name = group_name.to_string();
    let group = collector
        .groups
        .get(&group_name)
        .context("the demo's group is not running")?;
    let front = collector
        .groups
        .front(&group_name)
        .context("the demo's group has no built-in load balancer")?;
    let view = View {
        headless: args.headless,
        started: Instant::now(),
    };
    view.intro(collector, &group_name, front)?;

    let stats = Arc::new(LoadStats::default());
    let deadline = view.started + Duration::from_secs(args.duration_secs);
    let mut load: Option<(Instant, Instant)> = None;
    let mut peak = 0;
    let mut seen_activity = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let interrupted = loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break true,
            _ = terminate.recv() => break true,
            _ = hangup.recv() => break true,
        }
        let status = group.status();
        for activity in collector.activities.since(seen_activity, &group_name) {
            seen_activity = activity.id;
            view.activity(&activity, &status)?;
        }
        peak = peak.max(status.in_service());
        let now = Instant::now();
        if load.is_none() && status.in_service() >= 1 {
            let window = (now, now + Duration::from_secs(args.load_secs));
            tokio::spawn(generate_load(front, args.rate, window.1, stats.clone()));
            view.note(&format!(
                "load: {} requests/s at {front} for {} s",
                args.rate, args.load_secs
            ))?;
            load = Some(window);
        }
        let loading = load.is_some_and(|(start, end)| now >= start && now < end);
        view.status(&status, if loading { args.rate } else { 0 })?;
        let load_over = load.is_some_and(|(_, end)| now >= end);
        if load_over
            && peak > status.min_size
            && status.in_service() == status.min_size
            && status.desired == status.min_size
        {
            break false;
        }
        if now >= deadline {
            break false;
        }
    };
    let status = group.status();
    let scaled_out = peak >= 3.min(status.max_size);
    let back_to_min = status.in_service() == status.min_size && status.desired == status.min_size;
    let served_by = stats.served_by.lock().unwrap().clone();
    view.summary(json!({
        "group": group_name,
        "elapsed_secs": view.elapsed(),
        "peak_capacity": peak,
        "final_capacity": status.in_service(),
        "min_size": status.min_size,
        "scaled_out": scaled_out,
        "back_to_min": back_to_min,
        "interrupted": interrupted,
        "requests_ok": stats.ok.load(Ordering::Relaxed),
        "requests_failed": stats.failed.load(Ordering::Relaxed),
        "requests_skipped": stats.skipped.load(Ordering::Relaxed),
        "served_by": served_by,
    }))?;
    Ok(scaled_out && back_to_min)
}

struct View {
    headless: bool,
    started: Instant,
}

impl View {
    fn elapsed(&self) -> f64 {
        (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0
    }

    fn intro(&self, collector: &Collector, group: &str, front: SocketAddr) -> std::io::Result<()> {
        if self.headless {
            crate::outln!(
                "{}",
                json!({"elapsed_secs": 0.0, "group": group, "load_balancer": front.to_string(),
                       "grpc": collector.grpc_address.to_string(), "admin": collector.admin_socket,
                       "state_dir": collector.state_dir,
                       "metrics": format!("http://{}/metrics", collector.http_address)})
            );
        } else {
            crate::outln!("ebb demo — group `{group}` on this machine, no cloud needed");
            crate::outln!("  load balancer  http://{front}/work");
            crate::outln!("  metrics        http://{}/metrics", collector.http_address);
            let exe = std::env::current_exe().unwrap_or_else(|_| "ebb-collector".into());
            crate::outln!(
                "  admin          {} --state-dir {} activities",
                exe.display(),
                collector.state_dir.display()
            );
            crate::outln!("  Ctrl-C stops the demo and every process it started.\n");
        }
        Ok(())
    }

    fn note(&self, text: &str) -> std::io::Result<()> {
        if !self.headless {
            crate::outln!("{:>5.0}s  {text}", self.elapsed());
        }
        Ok(())
    }

    fn status(&self, status: &GroupStatus, load_rps: u32) -> std::io::Result<()> {
        let cpu = cpu_figure(status);
        if self.headless {
            let members: Vec<_> = status
                .members
                .iter()
                .map(|m| {
                    json!({"id": m.member.id, "state": m.member.state_name(),
                       "cpu": m.latest.as_ref().and_then(|l| l.cpu_busy_percent).map(round1),
                       "lb_connections": m.lb_connections})
                })
                .collect();
            crate::outln!(
                "{}",
                json!({"elapsed_secs": self.elapsed(), "group": status.name, "capacity": status.in_service(),
                       "desired": status.desired, "pending": status.pending(), "cpu": cpu.as_ref().map(|(_, v)| *v),
                       "cpu_of": cpu.map(|(of, _)| of),
                       "load_rps": load_rps, "members": members})
            );
            return Ok(());
        }
        let members: Vec<String> = status
            .members
            .iter()
            .map(|m| {
                let cpu = m
                    .latest
                    .as_ref()
                    .and_then(|l| l.cpu_busy_percent)
                    .map_or("  -".into(), |c| format!("{c:3.0}%"));
                let state = if m.member.state == MemberState::InService {
                    ""
                } else {
                    " (pending)"
                };
                format!("{} {cpu}{state}", m.member.id)
            })
            .collect();
        let cpu = cpu.map_or("    -".into(), |(of, c)| format!("{c:5.1}% ({of})"));
        crate::outln!(
            "{:>5.0}s  capacity {} (desired {})  cpu {cpu}  load {load_rps:>3} req/s   {}",
            self.elapsed(),
            status.in_service(),
            status.desired,
            members.join(" · ")
        );
        Ok(())
    }

    fn activity(&self, activity: &Activity, status: &GroupStatus) -> std::io::Result<()> {
        if self.headless {
            crate::outln!(
                "{}",
                json!({"elapsed_secs": self.elapsed(), "group": activity.group, "activity": activity.kind,
                       "cause": activity.cause, "outcome": activity.outcome, "member": activity.member_id,
                       "detail": activity.detail, "from": activity.from_capacity, "to": activity.to_capacity,
                       "capacity": status.in_service(), "desired": status.desired, "cpu": cpu_figure(status).map(|(_, v)| v)})
            );
            return Ok(());
        }
        let marker = match activity.kind {
            ActivityKind::ScaleOut => "▲",
            ActivityKind::ScaleIn => "▼",
            _ => "·",
        };
        let subject = if activity.member_id.is_empty() {
            String::new()
        } else {
            format!(" {}", activity.member_id)
        };
        let failed = if activity.outcome == "ok" {
            String::new()
        } else {
            format!(" FAILED: {}", activity.detail)
        };
        crate::outln!(
            "{:>5.0}s  {marker} {}{subject}: {}{failed}",
            self.elapsed(),
            activity.kind.as_str(),
            activity.cause
        );
        Ok(())
    }

    fn summary(&self, summary: serde_json::Value) -> std::io::Result<()> {
        if self.headless {
            crate::outln!("{}", json!({ "summary": summary }));
            return Ok(());
        }
        crate::outln!("\nsummary");
        crate::outln!(
            "  scaled out to {} members, back to {} after the load: {}",
            summary["peak_capacity"],
            summary["final_capacity"],
            if summary["scaled_out"] == true && summary["back_to_min"] == true {
                "as expected"
            } else {
                "NOT as expected"
            }
        );
        crate::outln!(
            "  requests: {} ok, {} failed, {} skipped; served by {}",
            summary["requests_ok"],
            summary["requests_failed"],
            summary["requests_skipped"],
            summary["served_by"]
        );
        crate::outln!("  took {} s", summary["elapsed_secs"]);
        Ok(())
    }
}

/// The group's CPU as its first CPU policy last judged it (its average over its period), so the figure shown
/// is the one the decisions were made on; and what it is.
fn cpu_figure(status: &GroupStatus) -> Option<(String, f64)> {
    let figure = status.policy_cpu.as_ref()?;
    Some((
        format!("{} avg over {} s", figure.policy, figure.period_secs),
        round1(figure.value),
    ))
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}
