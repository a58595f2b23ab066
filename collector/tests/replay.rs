//! Invariant 7: a lost connection loses no samples. The real agent connection and outbox against the real
//! Telemetry service and ingest, with the collector unreachable for five minutes' worth of samples, then
//! again mid-stream.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ebb_agent::config::{AgentConfig, ReconnectConfig};
use ebb_agent::outbox::Outbox;
use ebb_agent::stream::Connection;
use ebb_collector::engine::{Metric, Window};
use ebb_collector::ingest::IngestHandle;
use ebb_collector::metrics::Metrics;
use ebb_collector::server::TelemetryService;
use ebb_proto::v1::telemetry_server::TelemetryServer;
use ebb_proto::v1::{AgentSettings, Sample};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

const START_MS: i64 = 1_700_000_000_000;

fn sample(seq: u64) -> Sample {
    Sample {
        seq,
        timestamp_ms: START_MS + seq as i64 * 1000,
        // Distinct values, so a sample stored twice would change the mean.
        cpu_busy_percent: Some((seq % 100) as f64),
        ..Sample::default()
    }
}

async fn start_collector(
    address: std::net::SocketAddr,
    ingest: IngestHandle,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    let listener = TcpListener::bind(address).await.unwrap();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(TelemetryServer::new(TelemetryService { ingest, metrics }))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    })
}

async fn wait_until(mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("condition within 30 s");
}

fn ingested(metrics: &Metrics) -> u64 {
    let text = metrics.render();
    let line = text
        .lines()
        .find(|l| l.starts_with("ebb_samples_ingested_total "))
        .unwrap();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sample_is_lost_or_stored_twice_across_outages() {
    let address = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let config = AgentConfig {
        member_id: "web-1".into(),
        collector_url: format!("http://{address}"),
        reconnect: ReconnectConfig {
            initial_backoff_ms: 20,
            max_backoff_ms: 200,
        },
        ..AgentConfig::default()
    };
    let outbox = Arc::new(Mutex::new(Outbox::new(config.buffer_samples())));
    let (settings, _) = watch::channel(ebb_agent::Settings::from_config(&config).unwrap());
    let (latest, latest_rx) = watch::channel(0u64);
    let agent = tokio::spawn(Connection::new(&config, outbox.clone(), settings).run(latest_rx));
    let take = |range: std::ops::RangeInclusive<u64>| {
        for seq in range {
            outbox.lock().unwrap().push(sample(seq));
            latest.send_replace(seq);
        }
    };

    // Five minutes of samples while nothing listens.
    take(1..=300);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outbox.lock().unwrap().len(), 300);

    let metrics = Arc::new(Metrics::default());
    let ingest = IngestHandle::spawn(metrics.clone(), i64::MAX / 4);
    ingest.register("web-1", AgentSettings::default()).await;
    let first = start_collector(address, ingest.clone(), metrics.clone()).await;
    wait_until(|| outbox.lock().unwrap().is_empty()).await;
    assert_eq!(ingested(&metrics), 300);

    // The collector drops off mid-stream; the agent keeps sampling.
    first.abort();
    let _ = first.await;
    take(301..=360);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = start_collector(address, ingest.clone(), metrics.clone()).await;
    wait_until(|| outbox.lock().unwrap().is_empty()).await;

    assert_eq!(ingested(&metrics), 360, "every sample stored once");
    let window = Window {
        start: START_MS,
        end: START_MS + 400_000,
    };
    let observed = ingest
        .observe(vec!["web-1".into()], vec![(Metric::Cpu, vec![window])])
        .await;
    let expected = (1..=360u64).map(|s| (s % 100) as f64).sum::<f64>() / 360.0;
    let mean = observed[0].means[0][0].unwrap();
    assert!(
        (mean - expected).abs() < 1e-9,
        "mean {mean} != {expected}: a sample is missing or doubled"
    );
    agent.abort();
    second.abort();
}
