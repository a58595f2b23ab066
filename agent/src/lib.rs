//! `ebb-agent`: every `interval_secs` one sample of load, CPU, memory and HTTP health, streamed to the
//! collector over one long-lived gRPC stream. Samples wait in a bounded [`outbox::Outbox`] until the
//! collector acknowledges them, so a lost connection loses nothing that fits in the buffer.
//!
//! Tasks: the health checker (its own pace, so a slow check never delays sampling), the sampler, and the
//! connection loop (connect, replay, stream, back off on failure).

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod cpu;
pub mod health;
pub mod outbox;
pub mod procfs;
pub mod sampler;
pub mod stream;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::health::HealthTarget;
use crate::outbox::Outbox;

/// What the agent does right now; starts from the configuration, the collector may change it.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub interval: Duration,
    pub health: Option<HealthTarget>,
}

impl Settings {
    pub fn from_config(config: &AgentConfig) -> Result<Self, health::UrlError> {
        let health = match &config.health_check {
            Some(check) => Some(HealthTarget::parse(
                &check.url,
                Duration::from_millis(check.timeout_ms.into()),
                (check.healthy_statuses[0], check.healthy_statuses[1]),
            )?),
            None => None,
        };
        Ok(Self {
            interval: Duration::from_secs(config.interval_secs.into()),
            health,
        })
    }
}

/// Runs the agent until the future is dropped.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let settings = Settings::from_config(&config)?;
    let (settings_tx, settings_rx) = watch::channel(settings);
    let outbox = Arc::new(Mutex::new(Outbox::new(config.buffer_samples())));
    let (latest_tx, latest_rx) = watch::channel(0u64);
    let health = sampler::spawn_health_checker(settings_rx.clone());
    let sampler = sampler::Sampler::new(&config)?;
    let sampling = tokio::spawn(sampler.run(settings_rx, health, outbox.clone(), latest_tx));
    let connection = stream::Connection::new(&config, outbox, settings_tx);
    tokio::select! {
        result = sampling => result?,
        () = connection.run(latest_rx) => Ok(()),
    }
}
