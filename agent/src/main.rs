#![forbid(unsafe_code)]

use clap::Parser;
use ebb_agent::config::Cli;

fn main() -> anyhow::Result<()> {
    init_logging();
    let cli = Cli::parse();
    let config = cli.load()?;
    // One thread: the agent runs on every VM and must stay small.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        tokio::select! {
            result = ebb_agent::run(config) => result,
            () = shutdown_signal() => Ok(()),
        }
    })
}

async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("Stopping.");
}

/// `EBB_LOG` takes `level` or `target=level,...` (no regular expressions: they would cost the agent
/// memory on every VM); `EBB_LOG_FORMAT=json` logs JSON.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter: tracing_subscriber::filter::Targets = std::env::var("EBB_LOG")
        .ok()
        .and_then(|spec| spec.parse().ok())
        .unwrap_or_else(|| "info".parse().expect("a valid filter"));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    if std::env::var("EBB_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().finish().with(filter).init();
    } else {
        builder.finish().with(filter).init();
    }
}
