//! `ebb-collector`: ingests agent telemetry, decides, and drives providers and load balancers.
//!
//! The path of a sample: [`server`] (gRPC edge) → [`ingest`] (validate, dedup, per-member windows) →
//! [`reconcile`] (one controller per group) → [`engine`] (the pure decision) → back in [`reconcile`]:
//! [`providers`] and [`lb`] calls, each recorded in [`activity`]. [`Collector::start`] wires them up.

#![forbid(unsafe_code)]

pub mod activity;
pub mod cli;
pub mod config;
pub mod demo;
pub mod engine;
pub mod ingest;
pub mod lb;
pub mod metrics;
pub mod providers;
pub mod reconcile;
pub mod server;
pub mod workload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use ebb_proto::v1::admin_server::AdminServer;
use ebb_proto::v1::telemetry_server::TelemetryServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::activity::ActivityLog;
use crate::config::{CollectorConfig, LoadBalancerConfig, ProviderConfig};
use crate::ingest::IngestHandle;
use crate::lb::LoadBalancer;
use crate::lb::builtin::BuiltinLoadBalancer;
use crate::metrics::Metrics;
use crate::providers::Provider;
use crate::providers::local::LocalProvider;
use crate::reconcile::{Dependencies, GroupController, GroupHandle};

/// Samples are kept at least this long, and longer if a policy looks further back.
const MIN_RETENTION_MS: i64 = 10 * 60 * 1000;

/// A running collector. Dropping it without [`Collector::shutdown`] stops the tasks but may leave the
/// local provider's processes to their stdin-close fallback.
pub struct Collector {
    pub grpc_address: SocketAddr,
    pub http_address: SocketAddr,
    pub groups: BTreeMap<String, GroupHandle>,
    /// The built-in load balancers' front addresses, by group.
    pub load_balancer_fronts: BTreeMap<String, SocketAddr>,
    pub activities: ActivityLog,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    controllers: Vec<JoinHandle<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    metrics_server: JoinHandle<()>,
}

impl Collector {
    /// Binds every listener and starts every task; returns once all are listening.
    pub async fn start(config: CollectorConfig) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let activities = ActivityLog::new(metrics.clone());
        let retention_ms = config
            .groups
            .iter()
            .flat_map(|g| &g.policies)
            .map(|p| i64::from(p.period_secs) * i64::from(p.evaluation_periods) * 1000 + 60_000)
            .fold(MIN_RETENTION_MS, i64::max);
        let ingest = IngestHandle::spawn(metrics.clone(), retention_ms);

        let grpc = TcpListener::bind(config.server.grpc_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on server.grpc_listen {}",
                    config.server.grpc_listen
                )
            })?;
        let grpc_address = grpc.local_addr()?;
        let http = TcpListener::bind(config.server.http_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on server.http_listen {}",
                    config.server.http_listen
                )
            })?;
        let http_address = http.local_addr()?;
        let collector_url = config
            .server
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{grpc_address}"));

        let (stop, stop_rx) = watch::channel(false);
        let mut groups = BTreeMap::new();
        let mut load_balancer_fronts = BTreeMap::new();
        let mut controllers = Vec::new();
        for group in config.groups {
            let provider: Arc<dyn Provider> = match &group.provider {
                ProviderConfig::Local(local) => Arc::new(
                    LocalProvider::new(local.clone())
                        .with_context(|| format!("group {}: provider", group.name))?,
                ),
            };
            let load_balancer: Arc<dyn LoadBalancer> = match &group.load_balancer {
                LoadBalancerConfig::Builtin { listen } => {
                    let lb = BuiltinLoadBalancer::bind(*listen).await.with_context(|| {
                        format!(
                            "group {}: cannot listen on load_balancer.listen {listen}",
                            group.name
                        )
                    })?;
                    load_balancer_fronts.insert(group.name.clone(), lb.front());
                    Arc::new(lb)
                }
            };
            let deps = Dependencies {
                provider,
                load_balancer,
                ingest: ingest.clone(),
                activities: activities.clone(),
                metrics: metrics.clone(),
                collector_url: collector_url.clone(),
            };
            let name = group.name.clone();
            let (controller, handle, commands) = GroupController::new(group, deps);
            controllers.push(tokio::spawn(controller.run(commands, stop_rx.clone())));
            groups.insert(name, handle);
        }

        let telemetry = TelemetryServer::new(server::TelemetryService {
            ingest: ingest.clone(),
            metrics: metrics.clone(),
        });
        let admin = AdminServer::new(server::AdminService {
            groups: groups.clone(),
            activities: activities.clone(),
        });
        let mut server_stop = stop_rx.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(telemetry)
                .add_service(admin)
                .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), async move {
                    let _ = server_stop.changed().await;
                }),
        );
        let metrics_server = tokio::spawn(metrics::serve(http, metrics.clone()));
        tracing::info!(grpc = %grpc_address, http = %http_address, groups = groups.len(), "Collector started.");
        Ok(Self {
            grpc_address,
            http_address,
            groups,
            load_balancer_fronts,
            activities,
            metrics,
            stop,
            controllers,
            server,
            metrics_server,
        })
    }

    /// Stops evaluating, stops the local provider's instances, closes the listeners.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for controller in self.controllers {
            let _ = controller.await;
        }
        self.metrics_server.abort();
        // Agents' streams keep the gRPC server's graceful shutdown waiting; they are gone or going now.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.server).await;
        tracing::info!("Collector stopped.");
    }
}
