#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use ebb_collector::Collector;
use ebb_collector::cli::{Cli, Command, ImportCommand};
use ebb_collector::config;

fn main() -> ExitCode {
    // Everything the collector creates (its state, keys, sockets, local instances' records) is owner-only.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    if let Command::Workload(args) = cli.command {
        // Plain threads: the workload must behave like a simple one-CPU server.
        return report(ebb_collector::workload::run(args).map(|()| true));
    }
    init_logging(matches!(cli.command, Command::Demo(_)));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return report(Err(e.into())),
    };
    report(runtime.block_on(run(cli)))
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Serve { config } => {
            let mut config = config::load(&config)?;
            config.override_state_dir(cli.connection.state_dir.as_deref());
            let collector = Collector::start(config).await?;
            serve_until_stopped(&collector).await;
            tracing::info!("Stopping: no new evaluations; stopping local instances.");
            collector.shutdown().await;
            Ok(true)
        }
        Command::Demo(args) => ebb_collector::demo::run(args).await,
        Command::Validate { config } => {
            let parsed = config::load(&config)?;
            let (problems, mut warnings) = ebb_collector::preflight(&parsed);
            warnings.extend(parsed.warnings());
            if !problems.is_empty() {
                anyhow::bail!(
                    "{}: `serve` would refuse it:\n  {}",
                    config.display(),
                    problems.join("\n  ")
                );
            }
            ebb_collector::outln!("{}: valid, {} group(s)", config.display(), parsed.groups.len());
            for warning in warnings {
                ebb_collector::outln!("warning: {warning}");
            }
            Ok(true)
        }
        Command::GenConfig { provider } => {
            ebb_collector::out!("{}", provider.example());
            Ok(true)
        }
        Command::Import { from } => {
            let imported = match from {
                ImportCommand::Idcfrc { path, group } => ebb_collector::import::idcfrc(&path, &group),
                ImportCommand::Heat { path, group } => ebb_collector::import::heat(&path, &group),
            }
            .map_err(anyhow::Error::msg)?;
            ebb_collector::out!("{}", imported.config);
            for note in imported.notes {
                eprintln!("note: {note}");
            }
            Ok(true)
        }
        Command::Workload(_) => unreachable!("handled before the runtime starts"),
        command
        @ (Command::Ca { .. } | Command::AdminCert { .. } | Command::Evaluate { .. } | Command::Simulate(_)) => {
            ebb_collector::cli::local(&cli.connection, command)?;
            Ok(true)
        }
        command => {
            ebb_collector::cli::admin(&cli.connection, command).await?;
            Ok(true)
        }
    }
}

/// Until SIGINT or SIGTERM; SIGHUP reloads the configuration.
async fn serve_until_stopped(collector: &Collector) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = terminate.recv() => return,
            _ = hangup.recv() => match collector.reloader.reload().await {
                Ok(changes) => tracing::info!(changes = ?changes, "SIGHUP: reloaded the configuration."),
                Err(e) => tracing::error!(error = %e, "SIGHUP: the configuration was not reloaded."),
            },
        }
    }
}

fn report(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        // The reader of our output went away (`| head`): what it wanted, it has.
        Err(e)
            if e.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `EBB_LOG` is a tracing filter; `EBB_LOG_FORMAT=json` logs JSON. The demo logs only warnings by default,
/// so that its own view stays readable.
fn init_logging(quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("EBB_LOG").unwrap_or_else(|_| default.into());
    // Colour only for a person at a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if std::env::var("EBB_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
