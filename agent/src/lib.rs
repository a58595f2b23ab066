//! `ebb-agent`: every `interval_secs` one sample of load, CPU, memory and HTTP health, streamed to the
//! collector over one long-lived gRPC stream. Samples wait in a bounded [`outbox::Outbox`] until the
//! collector acknowledges them, so a lost connection loses nothing that fits in the buffer.
//!
//! Tasks: the sampler, the health checker (started by the sampler after each sample, in its own task so a
//! slow check never delays sampling), and the connection loop (connect, replay, stream, back off on failure).

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod cpu;
pub mod drain;
pub mod health;
pub mod identity;
pub mod metadata;
pub mod outbox;
pub mod procfs;
pub mod reread;
pub mod sampler;
pub mod stream;
pub mod ticker;
pub mod transport;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::health::HealthTarget;
use crate::identity::{Identity, IdentityError};
use crate::outbox::Outbox;

/// What the agent does right now; starts from the configuration, the collector may change it.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub interval: Duration,
    pub health: Option<HealthTarget>,
    /// The collector says this member is leaving.
    pub drain: bool,
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
            drain: false,
        })
    }
}

/// Runs the agent until the future is dropped: enrols if it has no identity yet, keeps its certificate
/// renewed, samples and streams.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let identity = Arc::new(RwLock::new(obtain_identity(&config).await?));
    tracing::info!(member = %identity.read().expect("identity lock").member_id, "Identity ready.");
    tokio::spawn(keep_renewed(config.clone(), identity.clone()));
    let settings = Settings::from_config(&config)?;
    let (settings_tx, settings_rx) = watch::channel(settings);
    let outbox = Arc::new(Mutex::new(Outbox::new(config.buffer_samples())));
    let (latest_tx, latest_rx) = watch::channel(0u64);
    let (health_tx, health_rx) = watch::channel(health::not_configured());
    let health_due = Arc::new(tokio::sync::Notify::new());
    let drained = drain::spawn(&config, settings_rx.clone());
    let sampler = sampler::Sampler::new(&config)?.reporting_drained(drained);
    let connection = stream::Connection::new(&config, identity, outbox.clone(), settings_tx);
    // All run as tasks, not inside the caller's future: the sampler then wakes the others without a
    // system call each sample (a wake-up of `block_on`'s own future signals the event loop's eventfd).
    // Dropping the set (the agent stopping on a signal) aborts them all.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(sampler::check_health(
        settings_rx.clone(),
        health_due.clone(),
        health_tx,
    ));
    tasks.spawn(sampler.run(settings_rx, health_rx, health_due, outbox, latest_tx));
    tasks.spawn(async move {
        connection.run(latest_rx).await;
        Ok(())
    });
    tasks.join_next().await.expect("three tasks were spawned")?
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn backoff(config: &AgentConfig) -> Backoff {
    Backoff::new(
        Duration::from_millis(config.reconnect.initial_backoff_ms.into()),
        Duration::from_millis(config.reconnect.max_backoff_ms.into()),
        backoff::Random::from_entropy().next_u64(),
    )
}

/// The identity in the state directory, or a new one from enrolment. Retries while the collector is
/// unreachable; gives up at once on anything an operator must fix (wrong CA, refused token).
pub async fn obtain_identity(config: &AgentConfig) -> Result<Identity, IdentityError> {
    if let Some(identity) = Identity::load(&config.state_dir)? {
        return Ok(identity);
    }
    let enrollment = config.enrollment.as_ref().ok_or(IdentityError::NotEnrolled)?;
    // The token and where to use it: from this file, or from the user data in the metadata service (kept in
    // memory only).
    let (url, group, pin, token, instance_id) = match (&enrollment.token, enrollment.user_data_source) {
        (Some(token), _) => (
            config.collector_url.clone(),
            config.group.clone(),
            enrollment.ca_sha256.clone(),
            token.clone(),
            String::new(),
        ),
        (None, Some(source)) => {
            let fetched = metadata::fetch(source, enrollment.metadata_url.as_deref()).await?;
            let text = metadata::agent_config_in(&fetched.user_data)
                .ok_or_else(|| IdentityError::Invalid("the user data holds no ebb agent configuration".into()))?;
            let from_user_data: AgentConfig = config::parse_toml(std::path::Path::new("(user data)"), &text)
                .map_err(|e| IdentityError::Invalid(e.to_string()))?;
            let inner = from_user_data.enrollment.ok_or(IdentityError::NotEnrolled)?;
            let token = inner.token.ok_or(IdentityError::NotEnrolled)?;
            (
                from_user_data.collector_url,
                from_user_data.group,
                inner.ca_sha256,
                token,
                fetched.instance_id,
            )
        }
        (None, None) => return Err(IdentityError::NotEnrolled),
    };
    let mut backoff = backoff(config);
    loop {
        match identity::enroll_as(&url, &pin, &token, &group, &instance_id, now_ms()).await {
            Ok(identity) => {
                identity.save(&config.state_dir)?;
                if let Some(path) = &config.source {
                    identity::forget_token(path)?;
                }
                tracing::info!(member = %identity.member_id, group = %identity.group, "Enrolled.");
                return Ok(identity);
            }
            Err(e) if e.is_retryable() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "Cannot enrol yet; retrying.");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Renews the certificate at about two thirds of its life, saving each new one.
async fn keep_renewed(config: AgentConfig, identity: Arc<RwLock<Identity>>) {
    let mut backoff = backoff(&config);
    loop {
        let current = identity.read().expect("identity lock").clone();
        let wait = (current.renew_at_ms() - now_ms()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        match identity::renew(&current, now_ms()).await {
            Ok(renewed) => {
                if let Err(e) = renewed.save(&config.state_dir) {
                    tracing::error!(error = %e, "Cannot save the renewed certificate; keeping it in memory.");
                }
                tracing::info!(not_after_ms = renewed.not_after_ms, "Renewed the certificate.");
                *identity.write().expect("identity lock") = renewed;
                backoff.reset();
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "Cannot renew the certificate; retrying.");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
