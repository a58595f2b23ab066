//! Project chores, run as `cargo xtask <task>`:
//! - `demo [ARGS]`: build the release binaries and run `ebb-collector demo ARGS`.
//! - `bench agent [--secs N]`: the agent's memory and CPU at a 1 s interval with one HTTP check and its
//!   stream open, side by side with Debian's prometheus-node-exporter scraped once a second.
//! - `bench enroll [--agents N]`, `bench ingest [--max N] [--secs N]`: many agents against one collector
//!   (`fleet.rs`).
//! - `bench engine [--secs N]`: the decision engine (`collector/benches/engine.rs`) and a collector with
//!   1,000 groups (`fleet.rs`).
//! - `bench store`: activity and intent writes, and a restart with 1,000 members
//!   (`collector/benches/store.rs`).
//! - `package`: `ebb-collector` and `ebb-agent` as .deb and .rpm in `target/packages/`, with cargo-deb and
//!   cargo-generate-rpm (installed into `target/package-tools/` on first use) from the crates' metadata.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

mod fleet;

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ, 100 on every supported Linux).
const USER_HZ: f64 = 100.0;
const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]),
        Some("bench") if args.get(1).map(String::as_str) == Some("agent") => bench_agent(&args[2..]),
        Some("bench") if args.get(1).map(String::as_str) == Some("enroll") => fleet::bench_enroll(&args[2..]),
        Some("bench") if args.get(1).map(String::as_str) == Some("ingest") => fleet::bench_ingest(&args[2..]),
        Some("bench") if args.get(1).map(String::as_str) == Some("engine") => fleet::bench_engine(&args[2..]),
        Some("bench") if args.get(1).map(String::as_str) == Some("store") => cargo_bench("store"),
        Some("package") => package(),
        _ => bail!(
            "usage: cargo xtask demo [ARGS] | cargo xtask bench agent [--secs N] | bench enroll [--agents N] | bench ingest [--max N] [--secs N] | bench engine [--secs N] | bench store | cargo xtask package"
        ),
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn build_release() -> anyhow::Result<PathBuf> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(["build", "--release", "-p", "ebb-agent", "-p", "ebb-collector"])
        .status()?;
    ensure!(status.success(), "cargo build --release failed");
    Ok(root().join("target/release"))
}

/// Runs `cargo ARGS` in the workspace.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(args)
        .status()?;
    ensure!(status.success(), "cargo {} failed", args.join(" "));
    Ok(())
}

/// The agent's build target, named so that a static build's flags stay off build scripts.
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The packaging tools, pinned, installed into `target/package-tools/` if missing.
const PACKAGE_TOOLS: [(&str, &str); 2] = [("cargo-deb", "3.8.0"), ("cargo-generate-rpm", "0.21.1")];

/// `cargo xtask package`: the collector (release profile) and the agent (agent profile: small, static) as
/// .deb and .rpm in `target/packages/`.
fn package() -> anyhow::Result<()> {
    let tools = root().join("target/package-tools");
    for (tool, version) in PACKAGE_TOOLS {
        if !tools.join("bin").join(tool).exists() {
            let root = tools.to_str().context("a UTF-8 path")?;
            cargo(&["install", "--locked", "--root", root, tool, "--version", version])?;
        }
    }
    cargo(&["build", "--release", "-p", "ebb-collector"])?;
    // The agent runs on whatever Linux the fleet has: glibc linked in (static-pie), so it needs none on
    // the VM. With --target, RUSTFLAGS reach only the agent's own code, not build scripts.
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--profile",
            "agent",
            "-p",
            "ebb-agent",
            "--target",
            AGENT_TARGET,
        ])
        .status()?;
    ensure!(status.success(), "the static agent build failed");
    // rustc leaves a static-pie's symbols in place whatever the profile says; both packages get it stripped.
    let agent_binary = root().join("target").join(AGENT_TARGET).join("agent/ebb-agent");
    let status = Command::new("strip")
        .arg(&agent_binary)
        .status()
        .context("run strip (binutils)")?;
    ensure!(status.success(), "strip {} failed", agent_binary.display());
    let out = root().join("target/packages");
    std::fs::create_dir_all(&out)?;
    let out = out.to_str().context("a UTF-8 path")?;
    let run = |tool: &str, args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new(tools.join("bin").join(tool))
            .current_dir(root())
            .args(args)
            .status()
            .with_context(|| format!("run {tool}"))?;
        ensure!(status.success(), "{tool} {} failed", args.join(" "));
        Ok(())
    };
    run("cargo-deb", &["--no-build", "-p", "ebb-collector", "--output", out])?;
    let agent = ["--profile", "agent", "--target", AGENT_TARGET];
    run(
        "cargo-deb",
        &[&["--no-build", "-p", "ebb-agent", "--output", out][..], &agent].concat(),
    )?;
    run("cargo-generate-rpm", &["-p", "collector", "-o", out])?;
    run(
        "cargo-generate-rpm",
        &[&["-p", "agent", "-o", out][..], &agent].concat(),
    )?;
    for entry in std::fs::read_dir(out)? {
        println!("{}", entry?.path().display());
    }
    Ok(())
}

/// `cargo bench -p ebb-collector --bench NAME`.
pub(crate) fn cargo_bench(name: &str) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(["bench", "-p", "ebb-collector", "--bench", name])
        .status()?;
    ensure!(status.success(), "cargo bench --bench {name} failed");
    Ok(())
}

fn demo(args: &[String]) -> anyhow::Result<()> {
    let bin = build_release()?;
    let status = Command::new(bin.join("ebb-collector"))
        .arg("demo")
        .args(args)
        .status()?;
    std::process::exit(status.code().unwrap_or(1));
}

/// A child stopped when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// CPU seconds used so far by `pid`, and its resident memory in KiB.
fn usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok((ticks as f64 / USER_HZ, rss_kib))
}

fn find_process(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .contains(needle)
            .then_some(pid)
    })
}

fn scrape(address: &str) -> anyhow::Result<usize> {
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    Ok(body.len())
}

struct Measured {
    cpu_percent_of_one_core: f64,
    rss_max_kib: u64,
    rss_end_kib: u64,
}

/// Measures `pid` over `secs`, calling `each_second` once a second.
fn measure(pid: u32, secs: u64, mut each_second: impl FnMut()) -> anyhow::Result<Measured> {
    let (cpu_start, _) = usage(pid)?;
    let started = Instant::now();
    let mut rss_max = 0;
    let mut rss_end = 0;
    for second in 1..=secs {
        each_second();
        let next = started + Duration::from_secs(second);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let (_, rss) = usage(pid)?;
        rss_max = rss_max.max(rss);
        rss_end = rss;
    }
    let (cpu_end, _) = usage(pid)?;
    Ok(Measured {
        cpu_percent_of_one_core: 100.0 * (cpu_end - cpu_start) / started.elapsed().as_secs_f64(),
        rss_max_kib: rss_max,
        rss_end_kib: rss_end,
    })
}

fn bench_agent(args: &[String]) -> anyhow::Result<()> {
    let secs: u64 = match args {
        [flag, n] if flag == "--secs" => n.parse()?,
        [] => 120,
        _ => bail!("usage: cargo xtask bench agent [--secs N]"),
    };
    if !Path::new(NODE_EXPORTER).exists() {
        eprintln!("installing prometheus-node-exporter (Debian) for the comparison");
        let status = Command::new("sh")
            .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-node-exporter"])
            .status()?;
        ensure!(
            status.success(),
            "cannot install prometheus-node-exporter; install it and run again"
        );
    }
    let bin = build_release()?;
    // The agent as it ships: `--profile agent` (see Cargo.toml).
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(["build", "--profile", "agent", "-p", "ebb-agent"])
        .status()?;
    ensure!(status.success(), "cargo build --profile agent failed");
    let shipped_agent = root().join("target/agent/ebb-agent");
    let dir = std::env::temp_dir().join(format!("ebb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // A collector with one local member: its agent samples every second, checks /health over HTTP and
    // keeps its stream open, exactly as on a VM.
    let example = std::fs::read_to_string(root().join("examples/local.toml"))?;
    let config = example
        .replace("127.0.1", "127.0.9")
        .replace("127.0.0.1:7300", &format!("127.0.0.1:{}", free_port()?))
        .replace("127.0.0.1:7301", &format!("127.0.0.1:{}", free_port()?))
        .replace("127.0.0.1:7302", &format!("127.0.0.1:{}", free_port()?))
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{}", free_port()?))
        .replace(
            "/var/lib/ebb",
            dir.join("state").to_str().context("temporary directory")?,
        );
    let config_path = dir.join("collector.toml");
    std::fs::write(&config_path, config)?;
    let _collector = Guard(
        Command::new(bin.join("ebb-collector"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("EBB_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let provider_agent = loop {
        // The agent runs with `--config <state>/local/web-1/agent.toml` once the member has launched.
        if let Some(pid) = find_process("/local/web-1/agent.toml") {
            break pid;
        }
        ensure!(
            Instant::now() < deadline,
            "the collector did not start an agent within 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The local provider's agent measures its instance's process tree. Replace it with agents of our
    // own for the same member, one per CPU source, so the default (host) is measured as on a VM.
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{provider_agent}/cmdline"))?).replace('\0', " ");
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    let after = |flag: &str| {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .map(|w| w.to_string())
    };
    let agent_config = after("--config").context("agent's --config")?;
    let agent_state = after("--state-dir").context("agent's --state-dir")?;
    // Enrolled: its identity is in the state directory and the token gone from its configuration.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Path::new(&agent_state).join("identity.toml").exists() {
        ensure!(Instant::now() < deadline, "the agent did not enrol within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let workload_pid = after("--cpu-pid").context("agent's --cpu-pid")?;
    let _ = Command::new("kill")
        .args(["-KILL", &provider_agent.to_string()])
        .status();

    let exporter_address = format!("127.0.0.1:{}", free_port()?);
    let exporter = Guard(
        Command::new(NODE_EXPORTER)
            .arg(format!("--web.listen-address={exporter_address}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_secs(2));
    let exporter_pid = exporter.0.id();
    ensure!(scrape(&exporter_address)? > 0, "node exporter does not answer");

    let variants: [(&str, Vec<String>); 2] = [
        (
            "ebb-agent, host CPU (default), 1 s interval, 1 HTTP check, stream open",
            vec![],
        ),
        (
            "ebb-agent, process-tree CPU (local provider), same otherwise",
            vec!["--cpu-pid".into(), workload_pid, "--cpu-capacity".into(), "1".into()],
        ),
    ];
    let mut rows = Vec::new();
    let mut failures = 0;
    for (name, extra) in variants {
        let agent = Guard(
            Command::new(&shipped_agent)
                .args(["--config", &agent_config, "--state-dir", &agent_state])
                .args(&extra)
                .env("EBB_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()?,
        );
        // Let it connect, get its settings (the health check) and settle.
        std::thread::sleep(Duration::from_secs(5));
        eprintln!("measuring `{name}` and node-exporter side by side for {secs} s...");
        let address = exporter_address.clone();
        let exporter_thread = std::thread::spawn(move || {
            let mut failed = 0;
            measure(exporter_pid, secs, || {
                if scrape(&address).is_err() {
                    failed += 1;
                }
            })
            .map(|m| (m, failed))
        });
        let measured = measure(agent.0.id(), secs, || {})?;
        let (exporter_measured, failed) = exporter_thread.join().expect("exporter thread")?;
        failures += failed;
        rows.push((name, measured, exporter_measured));
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!("| process (each pair measured over the same {secs} s) | CPU, % of one core | RSS max | RSS at end |");
    println!("|---|---|---|---|");
    for (name, ebb, exporter) in &rows {
        for (name, m) in [(*name, ebb), ("prometheus-node-exporter, scraped every 1 s", exporter)] {
            println!(
                "| {name} | {:.3}% | {:.2} MiB | {:.2} MiB |",
                m.cpu_percent_of_one_core,
                m.rss_max_kib as f64 / 1024.0,
                m.rss_end_kib as f64 / 1024.0
            );
        }
        println!(
            "| ratio ebb-agent / node-exporter | {:.2} | {:.2} | {:.2} |",
            ebb.cpu_percent_of_one_core / exporter.cpu_percent_of_one_core.max(1e-9),
            ebb.rss_max_kib as f64 / exporter.rss_max_kib as f64,
            ebb.rss_end_kib as f64 / exporter.rss_end_kib as f64
        );
    }
    println!(
        "\ntargets: ebb-agent <= 5 MB (4.77 MiB) RSS, <= 0.1% of one core; failed node-exporter scrapes: {failures}"
    );
    Ok(())
}
