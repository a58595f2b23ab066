//! Project chores, run as `cargo xtask <task>`:
//! - `demo [--vm] [ARGS]`: build the release binaries and run `ebb-collector demo ARGS`; with `--vm`, on
//!   `examples/qemu.toml`'s real VMs (the template built first).
//! - `bench NAME [ARGS]`: one benchmark, its table printed and kept in `target/bench/NAME.json` with the
//!   goal it is held to (`report.rs`); `bench all` runs them in turn, with a summary. Each names its
//!   flags in `usage`.
//!   - `agent` (`agent.rs`): the agent beside collectd and prometheus-node-exporter.
//!   - `enroll`, `ingest`, `engine` (`fleet.rs`): many agents, or many groups, against one collector.
//!   - `reaction`, `fanout` (`reaction.rs`): from load to the launch call; ten launch calls at once.
//!   - `simulate` (`trace.rs`): `ebb-collector simulate` on synthetic traces, ebb against six anchors.
//!   - `store`: activity and intent writes, and a restart with 1,000 members (`collector/benches/store.rs`).
//!   - `vm` (`vm.rs`): real VMs under qemu, power-on to in service, and the agent's footprint inside one.
//! - `package [--deb]`: `ebb-collector` and `ebb-agent` as .deb and .rpm (or .deb only) in `target/packages/`,
//!   with cargo-deb and cargo-generate-rpm (installed into `target/package-tools/` on first use) from the
//!   crates' metadata.
//! - `image` (`image.rs`): the VM template the qemu provider boots, in `target/images/`.
//! - `trace` (`trace.rs`): a synthetic demand trace for `ebb-collector simulate`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

mod agent;
mod fleet;
mod image;
mod reaction;
mod report;
mod trace;
mod vm;

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ, 100 on every supported Linux).
const USER_HZ: f64 = 100.0;

const USAGE: &str = "usage: cargo xtask demo [--vm] [ARGS]    the local demo, or on real VMs under qemu
       cargo xtask bench agent [--secs N] [--runs N] [--agent PATH] [--compare PATH]
                                                 ebb-agent beside collectd and node-exporter (3 runs of 60 s)
       cargo xtask bench ingest [--max N] [--secs N]   simulated agents on mTLS, 1,000 up to 15,000
       cargo xtask bench enroll [--agents N]     a boot storm of N enrolments (1,000)
       cargo xtask bench engine [--secs N]       one evaluation; a collector with 1,000 groups
       cargo xtask bench reaction [--trials N]   first over-threshold sample to the launch call (5 trials)
       cargo xtask bench fanout                  +10 members in one decision, launches taking 2 s each
       cargo xtask bench simulate [--weeks N]    the recommended web group and six anchors on 12-week traces
       cargo xtask bench all                     all of the above in turn (under 15 minutes), with a summary
       cargo xtask bench store                   store writes and a restart with 1,000 members
       cargo xtask bench vm [--members N]        real VMs: power-on to in service, the agent inside (2)
       cargo xtask package [--deb]               .deb and .rpm packages (or the .debs only) in target/packages/
       cargo xtask image                         the qemu provider's VM template in target/images/
       cargo xtask trace [--kind smooth|flash] [--weeks N] [--step-secs S] [--peak P] [--seed N]
                                                 a synthetic demand trace (CSV) on stdout";

/// Each benchmark: its name and how to run it; true when it met its goals.
type Bench = fn(&[String]) -> anyhow::Result<bool>;
const BENCHES: [(&str, Bench); 7] = [
    ("agent", agent::bench_agent),
    ("ingest", fleet::bench_ingest),
    ("enroll", fleet::bench_enroll),
    ("engine", fleet::bench_engine),
    ("reaction", reaction::bench_reaction),
    ("fanout", reaction::bench_fanout),
    ("simulate", trace::bench_simulate),
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let met = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["demo", ..] => return demo(&args[1..]),
        ["package"] => return package(false),
        ["package", "--deb"] => return package(true),
        ["image", ..] => return image::image(&args[1..]),
        ["trace", ..] => return trace::trace(&args[1..]),
        ["bench", "store"] => return cargo_bench("store").map(drop),
        ["bench", "vm", ..] => vm::bench_vm(&args[2..])?,
        ["bench", "all"] => bench_all()?,
        ["bench", name, ..] => {
            let (_, bench) = BENCHES
                .iter()
                .find(|(n, _)| *n == name)
                .with_context(|| format!("no benchmark `{name}`\n{USAGE}"))?;
            bench(&args[2..])?
        }
        _ => bail!("{USAGE}"),
    };
    if !met {
        eprintln!("some goals were missed (MISSED above)");
        std::process::exit(1);
    }
    Ok(())
}

/// Every benchmark in turn, each with its default size; a summary of their goals at the end.
fn bench_all() -> anyhow::Result<bool> {
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for (name, bench) in BENCHES {
        println!("\n## bench {name}");
        let outcome = bench(&[]);
        if let Err(e) = &outcome {
            eprintln!("bench {name} failed: {e:#}");
        }
        outcomes.push((name, outcome.ok()));
    }
    println!(
        "\n## summary ({:.0} s, {} cores)",
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map(usize::from).unwrap_or(0)
    );
    for (name, outcome) in &outcomes {
        let verdict = match outcome {
            Some(true) => "every goal met",
            Some(false) => "a goal MISSED",
            None => "FAILED to run",
        };
        println!("- {name}: {verdict} (target/bench/{name}.json)");
    }
    Ok(outcomes.iter().all(|(_, o)| *o == Some(true)))
}

/// A temporary directory, removed when dropped.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(prefix: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A `cargo` run in the workspace, with the environment a shell's `cargo` would have. `cargo xtask` sets
/// the xtask crate's own variables (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...) for us; build scripts that
/// watch one (ring's does) would then rebuild the whole release tree every time a build alternates
/// between the shell and xtask, five minutes each time.
fn cargo_command() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo_run = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix));
        if set_by_cargo_run {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// The agent and the collector for benchmarks: release profile, the collector with its fake clouds (the
/// reaction benchmark's `type = "fake"`). `cargo xtask package` rebuilds the collector without them.
pub(crate) fn build_release() -> anyhow::Result<PathBuf> {
    let status = cargo_command()
        .args(["build", "--release", "-p", "ebb-agent", "-p", "ebb-collector"])
        .args(["--features", "fake-cloud"]) // ebb-collector's
        .status()?;
    ensure!(status.success(), "cargo build --release failed");
    Ok(root().join("target/release"))
}

/// Runs `cargo ARGS` in the workspace.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = cargo_command().args(args).status()?;
    ensure!(status.success(), "cargo {} failed", args.join(" "));
    Ok(())
}

/// The agent's build target, named so that a static build's flags stay off build scripts.
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The packaging tools, pinned, installed into `target/package-tools/` if missing.
const PACKAGE_TOOLS: [(&str, &str); 2] = [("cargo-deb", "3.8.0"), ("cargo-generate-rpm", "0.21.1")];

/// `cargo xtask package`: the collector (release profile, no fake cloud) and the agent (agent profile: small, static) as
/// .deb and .rpm in `target/packages/`.
/// With `debs_only`, the .deb packages only (what the VM tests install).
fn package(debs_only: bool) -> anyhow::Result<()> {
    cargo(&["build", "--release", "-p", "ebb-collector"])?;
    package_agent_deb()?;
    let out = packages_dir()?;
    run_package_tool("cargo-deb", &["--no-build", "-p", "ebb-collector", "--output", &out])?;
    if !debs_only {
        run_package_tool("cargo-generate-rpm", &["-p", "collector", "-o", &out])?;
        run_package_tool(
            "cargo-generate-rpm",
            &[&["-p", "agent", "-o", &out][..], &AGENT_BUILD].concat(),
        )?;
    }
    for entry in std::fs::read_dir(&out)? {
        println!("{}", entry?.path().display());
    }
    Ok(())
}

/// How cargo-deb and cargo-generate-rpm find the shipped agent's build.
const AGENT_BUILD: [&str; 4] = ["--profile", "agent", "--target", AGENT_TARGET];

/// The agent as it ships, packaged as a .deb in `target/packages/`; returns its path.
pub(crate) fn package_agent_deb() -> anyhow::Result<PathBuf> {
    build_shipped_agent()?;
    let out = packages_dir()?;
    run_package_tool(
        "cargo-deb",
        &[&["--no-build", "-p", "ebb-agent", "--output", &out][..], &AGENT_BUILD].concat(),
    )?;
    let version = env!("CARGO_PKG_VERSION");
    let deb = Path::new(&out).join(format!("ebb-agent_{version}-1_amd64.deb"));
    ensure!(deb.exists(), "cargo-deb did not write {}", deb.display());
    Ok(deb)
}

fn packages_dir() -> anyhow::Result<String> {
    let out = root().join("target/packages");
    std::fs::create_dir_all(&out)?;
    Ok(out.to_str().context("a UTF-8 path")?.to_string())
}

/// Runs cargo-deb or cargo-generate-rpm, pinned, installed into `target/package-tools/` on first use.
fn run_package_tool(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let tools = root().join("target/package-tools");
    let (_, version) = PACKAGE_TOOLS
        .iter()
        .find(|(name, _)| *name == tool)
        .context("a pinned packaging tool")?;
    if !tools.join("bin").join(tool).exists() {
        let root = tools.to_str().context("a UTF-8 path")?;
        cargo(&["install", "--locked", "--root", root, tool, "--version", version])?;
    }
    let status = Command::new(tools.join("bin").join(tool))
        .current_dir(root())
        .args(args)
        .status()
        .with_context(|| format!("run {tool}"))?;
    ensure!(status.success(), "{tool} {} failed", args.join(" "));
    Ok(())
}

/// Builds the agent as it ships and returns its path: the agent profile, static, stripped.
pub(crate) fn build_shipped_agent() -> anyhow::Result<PathBuf> {
    // The agent runs on whatever Linux the fleet has: glibc linked in (static-pie), so it needs none on
    // the VM. With --target, RUSTFLAGS reach only the agent's own code, not build scripts.
    let status = cargo_command()
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
    Ok(agent_binary)
}

/// `cargo bench -p ebb-collector --bench NAME`, its output shown; the figures it prints as
/// `figure NAME VALUE` lines.
pub(crate) fn cargo_bench(name: &str) -> anyhow::Result<HashMap<String, f64>> {
    let output = cargo_command()
        .args(["bench", "-p", "ebb-collector", "--bench", name])
        .stderr(Stdio::inherit())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    ensure!(output.status.success(), "cargo bench --bench {name} failed");
    Ok(stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("figure ")?.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.parse().ok()?))
        })
        .collect())
}

/// `demo [--vm] [ARGS]`: the demo of the local example, or with `--vm` of `examples/qemu.toml` on real VMs
/// from the template (built first if needed). VMs boot in about a minute under TCG, so the load runs
/// longer and lighter (the page is slower inside an emulated CPU); later ARGS override these.
fn demo(args: &[String]) -> anyhow::Result<()> {
    let on_vms = args.iter().any(|a| a == "--vm");
    let args: Vec<&String> = args.iter().filter(|a| *a != "--vm").collect();
    if on_vms {
        image::image(&[])?;
    }
    let bin = build_release()?;
    let mut command = Command::new(bin.join("ebb-collector"));
    command.current_dir(root()).arg("demo");
    if on_vms {
        command.args([
            "--config",
            "examples/qemu.toml",
            "--load-secs",
            "180",
            "--rate",
            "4",
            "--duration-secs",
            "900",
        ]);
    }
    let status = command.args(args).status()?;
    std::process::exit(status.code().unwrap_or(1));
}

/// A child stopped when dropped.
pub(crate) struct Guard(pub Child);

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

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// CPU seconds used so far by `pid`, and its resident memory in KiB.
pub(crate) fn usage(pid: u32) -> anyhow::Result<(f64, u64)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_runs_without_the_variables_cargo_sets_for_xtask_itself() {
        // `cargo test` sets them for this test as `cargo xtask` does for xtask.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let command = cargo_command();
        let removed: Vec<_> = command
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .collect();
        assert!(removed.contains(&"CARGO_MANIFEST_DIR".to_string()), "{removed:?}");
        assert!(removed.contains(&"CARGO_PKG_NAME".to_string()), "{removed:?}");
        assert_eq!(command.get_current_dir(), Some(root().as_path()));
    }
}
