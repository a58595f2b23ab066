//! A real collector on loopback with two groups (`web`, `db`; no launches: min 0), for tests that drive its
//! gRPC services as agents and operators would.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ebb_agent::identity::{self, Identity};
use ebb_collector::Collector;
use ebb_collector::testing::GroupToml;
use ebb_proto::v1::telemetry_client::TelemetryClient;
use ebb_proto::v1::{Hello, ReportRequest, Sample, SampleBatch, report_request};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

pub fn config(state_dir: &Path, extra_server: &str) -> ebb_collector::config::CollectorConfig {
    let text = format!(
        r#"
        [server]
        grpc_listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:0"
        http_listen = "127.0.0.1:0"
        state_dir = "{}"
        {extra_server}

        "#,
        state_dir.display()
    );
    // Two groups that launch nothing and admit hand-made members.
    let groups: String = ["web", "db"]
        .iter()
        .map(|name| {
            GroupToml::local(name)
                .set("max_size", 5)
                .provider("agent_path", "/bin/true")
                .to_toml()
        })
        .collect();
    let text = text + &groups;
    ebb_collector::config::parse(Path::new("test.toml"), &text).unwrap()
}

pub struct Harness {
    pub collector: Collector,
    pub state: tempfile::TempDir,
    extra_server: String,
}

impl Harness {
    pub async fn start(extra_server: &str) -> Self {
        let state = tempfile::tempdir().unwrap();
        let collector = Collector::start(config(state.path(), extra_server)).await.unwrap();
        Self {
            collector,
            state,
            extra_server: extra_server.to_string(),
        }
    }

    /// Stops the collector and starts a new one on the same state directory (new ports).
    pub async fn restart(self) -> Self {
        self.collector.shutdown().await;
        let collector = Collector::start(config(self.state.path(), &self.extra_server))
            .await
            .unwrap();
        Self { collector, ..self }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.collector.grpc_address)
    }

    pub fn fingerprint(&self) -> String {
        self.collector.authority.pki.fingerprint()
    }

    /// An operator token for `group`.
    pub fn token(&self, group: &str, ttl_secs: u32, uses: u32) -> String {
        let now = ebb_agent::now_ms();
        self.collector
            .authority
            .tokens
            .create(group, now, ttl_secs, uses, false, None)
            .0
    }

    /// Enrols a new member of `web` through the real Enrollment service.
    pub async fn enroll(&self) -> Identity {
        let token = self.token("web", 600, 1);
        identity::enroll(&self.url(), &self.fingerprint(), &token, "web", ebb_agent::now_ms())
            .await
            .unwrap()
    }

    /// A channel to `address` trusting the CA, with an optional client certificate.
    pub async fn channel(&self, address: SocketAddr, client: Option<(&str, &str)>) -> Channel {
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.collector.authority.pki.ca_pem()));
        if let Some((cert, key)) = client {
            tls = tls.identity(TlsIdentity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://{address}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// The local admin certificate the collector wrote at first start.
    pub fn admin_identity(&self) -> (String, String) {
        let read = |name: &str| std::fs::read_to_string(self.state.path().join(name)).unwrap();
        (read("admin.pem"), read("admin.key"))
    }

    /// A TLS client trusting the collector's CA, with `client`'s certificate if given.
    pub fn client_tls(&self, client: Option<(&str, &str)>) -> rustls::ClientConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.collector.authority.pki.ca_pem().as_bytes()).unwrap())
            .unwrap();
        let builder =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        }
    }

    /// A TLS connection to `address` that speaks `h2`, trusting the CA, with `client`'s certificate if given.
    pub async fn tls(
        &self,
        address: SocketAddr,
        client: Option<(&str, &str)>,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut config = self.client_tls(client);
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(address).await.unwrap();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(rustls::pki_types::ServerName::from(address.ip()), tcp)
            .await
            .unwrap()
    }

    pub fn metric(&self, line_start: &str) -> u64 {
        let text = self.collector.metrics.render();
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// A TCP relay that can cut every connection and refuse new ones, to make the collector unreachable.
pub struct Relay {
    pub address: SocketAddr,
    target: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut relay = Self {
            address,
            target,
            task: None,
        };
        relay.task = Some(tokio::spawn(relay_loop(listener, target)));
        relay
    }

    /// Drops every connection; nothing listens until `restore`.
    pub async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    pub async fn restore(&mut self) {
        let listener = TcpListener::bind(self.address).await.unwrap();
        self.task = Some(tokio::spawn(relay_loop(listener, self.target)));
    }
}

async fn relay_loop(listener: TcpListener, target: SocketAddr) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        connections.spawn(async move {
            if let Ok(mut upstream) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
    }
}

pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within 30 s"));
}

/// Opens a Report stream as `member_id` and sends one sample; the first response or the refusal.
pub async fn report(
    channel: tonic::transport::Channel,
    member_id: &str,
) -> Result<
    (
        tonic::Streaming<ebb_proto::v1::ReportResponse>,
        mpsc::Sender<ReportRequest>,
    ),
    tonic::Status,
> {
    let (requests, outgoing) = mpsc::channel(4);
    requests
        .send(ReportRequest {
            message: Some(report_request::Message::Hello(Hello {
                member_id: member_id.into(),
                run_id: 1,
                ..Hello::default()
            })),
        })
        .await
        .unwrap();
    requests
        .send(ReportRequest {
            message: Some(report_request::Message::Batch(SampleBatch {
                samples: vec![Sample {
                    seq: 1,
                    timestamp_ms: ebb_agent::now_ms(),
                    cpu_busy_percent: Some(10.0),
                    ..Sample::default()
                }],
            })),
        })
        .await
        .unwrap();
    let stream = TelemetryClient::new(channel)
        .report(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    Ok((stream, requests))
}
