//! Invariant 7: a lost connection loses no samples. The real agent connection and outbox, enrolled and
//! streaming over mTLS to a real collector, through two outages: five minutes' worth of samples buffered
//! while nothing answers, then a cut in the middle of the stream.

mod common;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use common::{Harness, Relay, wait_until};
use ebb_agent::config::{AgentConfig, ReconnectConfig};
use ebb_agent::outbox::Outbox;
use ebb_agent::stream::Connection;
use ebb_collector::engine::{Metric, Window};
use ebb_proto::v1::Sample;
use tokio::sync::watch;

fn sample(seq: u64, start_ms: i64) -> Sample {
    Sample {
        seq,
        // Ten a second, so all of them stay inside the collector's sample retention.
        timestamp_ms: start_ms + seq as i64 * 100,
        // Distinct values, so a sample stored twice would change the mean.
        cpu_busy_percent: Some((seq % 100) as f64),
        ..Sample::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sample_is_lost_or_stored_twice_across_outages() {
    let harness = Harness::start("").await;
    let mut identity = harness.enroll().await;
    let mut relay = Relay::start(harness.collector.grpc_address).await;
    relay.cut().await;
    // From now on the agent reaches its collector only through the relay.
    identity.collector_url = format!("https://{}", relay.address);
    let config = AgentConfig {
        collector_url: format!("https://{}", relay.address),
        reconnect: ReconnectConfig {
            initial_backoff_ms: 20,
            max_backoff_ms: 200,
        },
        ..AgentConfig::default()
    };
    let start_ms = ebb_agent::now_ms() - 60_000;
    let outbox = Arc::new(Mutex::new(Outbox::new(config.buffer_samples())));
    let (settings, _) = watch::channel(ebb_agent::Settings::from_config(&config).unwrap());
    let (latest, latest_rx) = watch::channel(0u64);
    let member = identity.member_id.clone();
    let agent = tokio::spawn(
        Connection::new(&config, Arc::new(RwLock::new(identity)), outbox.clone(), settings).run(latest_rx),
    );
    let take = |range: std::ops::RangeInclusive<u64>| {
        for seq in range {
            outbox.lock().unwrap().push(sample(seq, start_ms));
            latest.send_replace(seq);
        }
    };
    let ingested = || harness.metric("ebb_samples_ingested_total ");

    // Five minutes of samples while nothing answers.
    take(1..=300);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outbox.lock().unwrap().len(), 300);
    relay.restore().await;
    wait_until("the backlog is acknowledged", || outbox.lock().unwrap().is_empty()).await;
    assert_eq!(ingested(), 300);

    // The link drops mid-stream; the agent keeps sampling.
    relay.cut().await;
    take(301..=360);
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.restore().await;
    wait_until("the second backlog is acknowledged", || {
        outbox.lock().unwrap().is_empty()
    })
    .await;

    assert_eq!(ingested(), 360, "every sample stored once");
    let window = Window {
        start: start_ms,
        end: start_ms + 400_000,
    };
    let observed = harness
        .collector
        .ingest
        .observe(vec![member], vec![(Metric::Cpu, vec![window])])
        .await;
    let expected = (1..=360u64).map(|s| (s % 100) as f64).sum::<f64>() / 360.0;
    let mean = observed[0].means[0][0].unwrap();
    assert!(
        (mean - expected).abs() < 1e-9,
        "mean {mean} != {expected}: a sample is missing or doubled"
    );
    agent.abort();
    harness.collector.shutdown().await;
}
