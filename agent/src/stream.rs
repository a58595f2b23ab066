//! The connection to the collector: connect, say hello, replay every unacknowledged sample in order, then
//! stream new ones as they are taken. On any failure: back off (exponential, jittered, capped) and start
//! over. The collector acknowledges by sequence number and drops duplicates, so replaying is always safe.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ebb_proto::v1::telemetry_client::TelemetryClient;
use ebb_proto::v1::{Hello, ReportRequest, ReportResponse, SampleBatch, report_request, report_response};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::Settings;
use crate::backoff::{Backoff, Random};
use crate::config::AgentConfig;
use crate::health::HealthTarget;
use crate::identity::Identity;
use crate::outbox::Outbox;
use crate::transport;

/// Samples per message; a long replay goes out in several.
const BATCH_LIMIT: usize = 100;

pub struct Connection {
    url: String,
    identity: Arc<RwLock<Identity>>,
    hello: Hello,
    outbox: Arc<Mutex<Outbox>>,
    settings: watch::Sender<Settings>,
    backoff: Backoff,
}

impl Connection {
    /// Streams as `identity` (shared with the renewal task, which replaces it).
    pub fn new(
        config: &AgentConfig,
        identity: Arc<RwLock<Identity>>,
        outbox: Arc<Mutex<Outbox>>,
        settings: watch::Sender<Settings>,
    ) -> Self {
        let mut random = Random::from_entropy();
        let (member_id, url) = {
            let identity = identity.read().expect("identity lock");
            (identity.member_id.clone(), identity.collector_url.clone())
        };
        Self {
            url,
            identity,
            hello: Hello {
                member_id,
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                    .map(|id| id.trim().to_string())
                    .unwrap_or_default(),
                run_id: random.next_u64(),
            },
            outbox,
            settings,
            backoff: Backoff::new(
                Duration::from_millis(config.reconnect.initial_backoff_ms.into()),
                Duration::from_millis(config.reconnect.max_backoff_ms.into()),
                random.next_u64(),
            ),
        }
    }

    /// Streams forever, reconnecting as needed.
    pub async fn run(mut self, mut latest_seq: watch::Receiver<u64>) {
        loop {
            match self.stream_once(&mut latest_seq).await {
                Ok(()) => tracing::warn!(collector = %self.url, "The collector closed the stream."),
                Err(e) => tracing::warn!(collector = %self.url, error = %e, "Lost the collector."),
            }
            let delay = self.backoff.next_delay();
            let pending = self.outbox.lock().expect("outbox lock").len();
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                pending,
                "Reconnecting after a pause."
            );
            tokio::time::sleep(delay).await;
        }
    }

    async fn stream_once(&mut self, latest_seq: &mut watch::Receiver<u64>) -> anyhow::Result<()> {
        let tls = self.identity.read().expect("identity lock").client_tls()?;
        let channel = transport::connect(&self.url, tls).await?;
        let origin = channel.origin();
        let mut client = TelemetryClient::with_origin(channel, origin)
            .max_decoding_message_size(transport::limits::MAX_MESSAGE_BYTES);
        // Two messages in flight at most: the stream holds little, and a batch is taken from the outbox only
        // when it can be sent.
        let (requests, outgoing) = mpsc::channel::<ReportRequest>(2);
        requests
            .send(ReportRequest {
                message: Some(report_request::Message::Hello(self.hello.clone())),
            })
            .await?;
        let mut responses = client.report(ReceiverStream::new(outgoing)).await?.into_inner();
        let mut connected = false;

        // Everything in the outbox is unacknowledged: replay it all, then follow new samples.
        let mut sent_upto = 0u64;
        loop {
            let unsent = self.outbox.lock().expect("outbox lock").has_after(sent_upto);
            tokio::select! {
                // A slot first (cancel-safe), then the batch: an answer arriving meanwhile never cancels a
                // batch already counted as sent.
                permit = requests.reserve(), if unsent => {
                    let batch = self.outbox.lock().expect("outbox lock").after(sent_upto, BATCH_LIMIT);
                    if let Some(last) = batch.last() {
                        sent_upto = last.seq;
                        permit?.send(ReportRequest {
                            message: Some(report_request::Message::Batch(SampleBatch { samples: batch })),
                        });
                    }
                }
                changed = latest_seq.changed(), if !unsent => changed?,
                response = responses.message() => {
                    let message = response?.ok_or_else(|| anyhow::anyhow!("stream ended by the collector"))?;
                    if !connected {
                        connected = true;
                        self.backoff.reset();
                        tracing::info!(collector = %self.url, member = %self.hello.member_id, "Connected to the collector.");
                    }
                    self.handle(message);
                }
            }
        }
    }

    /// Applies one message from the collector.
    fn handle(&self, response: ReportResponse) {
        match response.message {
            Some(report_response::Message::Ack(ack)) => {
                for rejection in &ack.rejected {
                    tracing::warn!(seq = rejection.seq, code = rejection.code, reason = %rejection.message, "The collector rejected a sample.");
                }
                self.outbox.lock().expect("outbox lock").acknowledge(ack.highest_seq);
            }
            Some(report_response::Message::Settings(wanted)) => self.apply_settings(wanted),
            None => {}
        }
    }

    fn apply_settings(&self, wanted: ebb_proto::v1::AgentSettings) {
        let current = self.settings.borrow().clone();
        let mut next = current.clone();
        if wanted.interval_secs > 0 {
            next.interval = Duration::from_secs(wanted.interval_secs.into());
        }
        if !wanted.health_check_url.is_empty() {
            let timeout = match wanted.health_check_timeout_ms {
                0 => Duration::from_secs(2),
                ms => Duration::from_millis(ms.into()),
            };
            let statuses = current.health.as_ref().map_or((200, 399), |h| h.healthy_statuses);
            match HealthTarget::parse(&wanted.health_check_url, timeout, statuses) {
                Ok(target) => next.health = Some(target),
                Err(e) => {
                    tracing::warn!(error = %e, "Ignoring the collector's health-check setting.")
                }
            }
        }
        next.drain = wanted.drain;
        if next != current {
            tracing::info!(interval_secs = next.interval.as_secs(), health = ?next.health.as_ref().map(|h| &h.path), "Settings changed by the collector.");
            self.settings.send_replace(next);
        }
    }
}
