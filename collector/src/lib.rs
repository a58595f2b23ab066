//! `ebb-collector`: ingests agent telemetry, decides, and drives providers and load balancers.
//!
//! The path of a sample: [`server`] (gRPC edge) → [`ingest`] (validate, dedup, per-member windows) →
//! [`reconcile`] (one controller per group) → [`engine`] (the pure decision) → back in [`reconcile`]:
//! [`providers`] and [`lb`] calls, each recorded in [`activity`]. [`Collector::start`] wires them up.

#![forbid(unsafe_code)]

/// Writes a line of a command's output to stdout and returns the write's error from the function (`?`):
/// a reader that went away (`ebb-collector groups | head -1`) ends the command quietly, never in a panic
/// as `println!` would.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// [`outln!`] without the newline.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}

pub mod activity;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod explain;
pub mod fuzzing;
pub mod groups;
pub mod hooks;
pub mod http;
pub mod import;
pub mod ingest;
pub mod lb;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod providers;
pub mod reconcile;
pub mod reload;
pub mod server;
pub mod simulate;
pub mod store;
pub mod testing;
pub mod tls;
pub mod transport;
pub mod userdata;
pub mod workload;

/// The decision engine, a crate of its own (`engine/`): `crate::engine::Engine::evaluate` is where every
/// scaling decision is made.
pub use ebb_engine as engine;

use std::net::SocketAddr;
use std::sync::Arc;

use std::os::unix::fs::FileTypeExt;

use ebb_proto::v1::admin_server::AdminServer;
use ebb_proto::v1::enrollment_server::EnrollmentServer;
use ebb_proto::v1::telemetry_server::TelemetryServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::activity::ActivityLog;
use crate::config::{CollectorConfig, ProviderConfig};
use crate::explain::ExplanationLog;
use crate::groups::Groups;
use crate::ingest::IngestHandle;
use crate::metrics::Metrics;
use crate::pki::{Authority, Pki};
use crate::reload::Reloader;
use crate::store::Store;

/// A running collector. Dropping it without [`Collector::shutdown`] stops the tasks; the local provider's
/// instances are killed when its last handle goes.
pub struct Collector {
    pub grpc_address: SocketAddr,
    /// The Admin API's Unix socket, and its TCP address if `server.admin_listen` is set.
    pub admin_socket: std::path::PathBuf,
    pub admin_address: Option<SocketAddr>,
    /// The URL agents use.
    pub collector_url: String,
    pub authority: Arc<Authority>,
    /// Holds the CA, the admin certificate (`admin.pem`, `admin.key`) and local instances' state.
    pub state_dir: std::path::PathBuf,
    pub http_address: SocketAddr,
    /// The running groups (`reload` may add to them), with their built-in load balancers' fronts.
    pub groups: Arc<Groups>,
    /// `reload` and SIGHUP.
    pub reloader: Arc<Reloader>,
    pub activities: ActivityLog,
    pub metrics: Arc<Metrics>,
    pub ingest: IngestHandle,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    admin_servers: Vec<JoinHandle<()>>,
    metrics_server: JoinHandle<()>,
}

/// Why the collector did not start. Each says what it was doing; the error underneath is its `source`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file, directory, socket or listener.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Another collector runs with this state directory (its admin socket answers).
    #[error("{} is in use: another collector runs with this state directory", .0.display())]
    InUse(std::path::PathBuf),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The server's certificate and key could not make a TLS configuration.
    #[error("cannot set up TLS with the server certificate")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The open-file limit could not be read or raised.
    #[error("{0}")]
    OpenFiles(&'static str, #[source] nix::Error),
    /// A group's provider or load balancer could not be made, or its state not read.
    #[error("group {group}: {what}")]
    Group {
        group: String,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A TCP listener on `address` (the setting `key`), and the address it got (the port, when 0 was asked).
async fn listen(key: &str, address: std::net::SocketAddr) -> Result<(TcpListener, std::net::SocketAddr), StartError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(io_error(format!("cannot listen on {key} {address}")))?;
    let bound = listener
        .local_addr()
        .map_err(io_error(format!("cannot read {key}'s address")))?;
    Ok((listener, bound))
}

/// An error and every error underneath it, as one line: `what: why: why`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Turns an I/O error into a [`StartError`] saying `what` was being done.
pub(crate) fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Io {
        what: what.into(),
        source,
    }
}

impl Collector {
    /// Binds every listener and starts every task; returns once all are listening.
    pub async fn start(config: CollectorConfig) -> Result<Self, StartError> {
        secure_state_dir(&config.server.state_dir)?;
        let metrics = Arc::new(Metrics::default());
        let pki = pki(&config)?;
        let store = Arc::new(Store::open(&config.server.store_path())?);
        let cluster_id = store.cluster_id()?;
        let activities = ActivityLog::new(metrics.clone(), store.clone(), config.server.activity_retention_days);
        let explanations = ExplanationLog::new(store.clone(), config.server.explanation_retention_secs);
        let ingest = IngestHandle::spawn(
            metrics.clone(),
            config.sample_retention_ms(),
            config.custom_metric_slots(),
        );
        let authority = Arc::new(Authority::new(
            pki,
            config.server.launch_token_ttl_secs,
            pki::EnrollmentLimits {
                per_address_per_minute: config.server.enrollments_per_minute,
                total_per_minute: config.server.enrollments_per_minute_total,
            },
            store.clone(),
        )?);
        let tls = tls::server_config(authority.pki.server_chain_pem(), authority.pki.server_key_pem())?;

        let (grpc, grpc_address) = listen("server.grpc_listen", config.server.grpc_listen).await?;
        let (http, http_address) = listen("server.http_listen", config.server.http_listen).await?;
        let admin_socket = config.server.admin_socket();
        let admin_unix = bind_admin_socket(&admin_socket)?;
        let (admin_tcp, admin_address) = match config.server.admin_listen {
            Some(address) => {
                let (listener, bound) = listen("server.admin_listen", address).await?;
                (Some(listener), Some(bound))
            }
            None => (None, None),
        };
        let collector_url = config.server.collector_url(grpc_address);

        let (stop, stop_rx) = watch::channel(false);
        let groups = Groups::new(groups::Shared {
            server: config.server.clone(),
            grpc_address,
            services: reconcile::Services {
                ingest: ingest.clone(),
                activities: activities.clone(),
                metrics: metrics.clone(),
                authority: authority.clone(),
                explanations: explanations.clone(),
                store: store.clone(),
                cluster_id: cluster_id.clone(),
                clock: Arc::new(clock::SystemClock),
            },
            stop: stop_rx.clone(),
        });
        groups.start(config.groups.clone()).await?;

        let telemetry_service = Arc::new(server::TelemetryService {
            ingest: ingest.clone(),
            metrics: metrics.clone(),
            authority: authority.clone(),
            stopping: stop_rx.clone(),
        });
        let telemetry =
            TelemetryServer::from_arc(telemetry_service).max_decoding_message_size(server::MAX_MESSAGE_BYTES);
        let enrollment = EnrollmentServer::new(server::EnrollmentService {
            authority: authority.clone(),
            metrics: metrics.clone(),
            groups: groups.clone(),
        })
        .max_decoding_message_size(server::MAX_MESSAGE_BYTES);
        let reloader = Arc::new(Reloader::new(config.clone(), groups.clone(), ingest.clone()));
        let admin_service = AdminServer::new(server::AdminService {
            groups: groups.clone(),
            activities: activities.clone(),
            explanations: explanations.clone(),
            authority: authority.clone(),
            ingest: ingest.clone(),
            reloader: reloader.clone(),
        })
        .max_decoding_message_size(server::MAX_MESSAGE_BYTES);
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<TelemetryServer<server::TelemetryService>>().await;
        health
            .set_serving::<EnrollmentServer<server::EnrollmentService>>()
            .await;
        health.set_serving::<AdminServer<server::AdminService>>().await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(ebb_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // Each reflection service lists itself; list both, for old and new grpcurl alike.
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        };
        // Fails only on descriptors compiled in that do not decode: every test that starts a collector says so.
        const DESCRIPTORS: &str = "the descriptors compiled in decode";
        let reflection_v1 = reflection().build_v1().expect(DESCRIPTORS);
        let reflection_v1alpha = reflection().build_v1alpha().expect(DESCRIPTORS);

        let agents_routes = tonic::service::Routes::new(telemetry)
            .add_service(enrollment)
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone());
        let agents = transport::Listener {
            name: "grpc",
            max_connections: fit_open_file_limit(config.server.max_connections)? as usize,
            gate: server::agents_gate(admin_socket.clone(), admin_address),
            metrics: metrics.clone(),
        };
        let server = tokio::spawn(transport::serve(
            grpc,
            tls.clone(),
            agents_routes,
            agents,
            stop_rx.clone(),
        ));
        let admin_routes = tonic::service::Routes::new(admin_service)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let admin = transport::Listener {
            name: "admin",
            max_connections: transport::limits::ADMIN_CONNECTIONS,
            gate: server::admin_gate(authority.clone(), metrics.clone()),
            metrics: metrics.clone(),
        };
        let mut admin_servers = vec![tokio::spawn(transport::serve(
            admin_unix,
            tls.clone(),
            admin_routes.clone(),
            admin.clone(),
            stop_rx.clone(),
        ))];
        if let Some(listener) = admin_tcp {
            admin_servers.push(tokio::spawn(transport::serve(
                listener,
                tls,
                admin_routes,
                admin,
                stop_rx.clone(),
            )));
        }
        let metrics_server = tokio::spawn(metrics::serve(http, metrics.clone()));
        if config.groups.is_empty() {
            let file = config
                .source
                .as_ref()
                .map_or("the configuration".into(), |p| p.display().to_string());
            tracing::warn!(
                "No groups yet: add a [[groups]] table to {file} (examples in /usr/share/doc/ebb-collector/examples/, \
                 or `ebb-collector gen-config --provider aws`), check it with `ebb-collector validate`, then `ebb-collector reload`."
            );
        }
        tracing::info!(grpc = %grpc_address, admin = %admin_socket.display(), admin_tcp = ?admin_address, http = %http_address, groups = config.groups.len(), ca_sha256 = %authority.pki.fingerprint(), "Collector started.");
        Ok(Self {
            grpc_address,
            admin_socket,
            admin_address,
            collector_url,
            authority,
            state_dir: config.server.state_dir.clone(),
            http_address,
            groups,
            reloader,
            activities,
            metrics,
            ingest,
            stop,
            server,
            admin_servers,
            metrics_server,
        })
    }

    /// Stops evaluating, stops the local provider's instances, closes the listeners.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.groups.stopped().await;
        self.metrics_server.abort();
        // Each listener gives its connections a grace period to finish, then ends.
        let _ = self.server.await;
        for admin in self.admin_servers {
            let _ = admin.await;
        }
        let _ = std::fs::remove_file(&self.admin_socket);
        tracing::info!("Collector stopped.");
    }
}

/// The collector's CA (its own, created on first start, or the operator's), and on first start an admin
/// certificate in the state directory for the local CLI.
/// The CA (created in the state directory on first start, or the operator's) and a local admin certificate.
fn pki(config: &CollectorConfig) -> Result<Pki, pki::PkiError> {
    let server = &config.server;
    let lifetime = std::time::Duration::from_secs(server.member_cert_lifetime_secs.into());
    // The Admin API's Unix socket is reached as `localhost`; qemu guests reach it through their gateway.
    let mut names = server.tls_names.clone();
    let qemu_guests = reload::guests_need_gateway(config);
    for name in ["localhost", providers::qemu::GUEST_GATEWAY] {
        let needed = name == "localhost" || qemu_guests;
        if needed && !names.iter().any(|n| n == name) {
            names.push(name.into());
        }
    }
    let pki = match (&server.ca_cert, &server.ca_key) {
        (Some(cert), Some(key)) => Pki::from_files(cert, key, &names, lifetime)?,
        _ => Pki::load_or_create(&server.state_dir, &names, lifetime)?,
    };
    let admin_cert = server.state_dir.join("admin.pem");
    if !admin_cert.exists() {
        let year = std::time::Duration::from_secs(365 * 24 * 3600);
        let (cert, key) = pki.issue_admin("local", clock::now_ms(), year)?;
        pki::write_private(&server.state_dir.join("admin.key"), &key)?;
        pki::write_private(&admin_cert, &cert.pem)?;
    }
    Ok(pki)
}

/// File descriptors kept for everything but the agents' connections: the store, the cloud and load-balancer
/// APIs, the admin listeners (64 each), `/metrics`, hooks, the built-in load balancers' proxied connections.
pub const RESERVED_FILES: u64 = 1024;

/// Raises the soft open-file limit as far as `max_connections` needs (and the hard limit allows), and returns
/// how many agents' connections fit: `max_connections`, or fewer when the hard limit is too low, so that a
/// full agents' port never leaves the store, the cloud API or the admin socket without a descriptor.
pub fn fit_open_file_limit(max_connections: u32) -> Result<u32, StartError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| StartError::OpenFiles("cannot read the open-file limit", e))?;
    let wanted = u64::from(max_connections) + RESERVED_FILES;
    let raised = wanted.min(hard).max(soft);
    if raised > soft {
        setrlimit(Resource::RLIMIT_NOFILE, raised, hard)
            .map_err(|e| StartError::OpenFiles("cannot raise the open-file limit", e))?;
    }
    if hard >= wanted {
        return Ok(max_connections);
    }
    let fits = u32::try_from(hard.saturating_sub(RESERVED_FILES).max(16)).unwrap_or(u32::MAX);
    tracing::warn!(
        hard_limit = hard,
        max_connections,
        accepting = fits,
        "The open-file limit is too low for server.max_connections: at most {fits} agents' connections will be \
         accepted. Raise it (LimitNOFILE= in the systemd unit, `ulimit -Hn`) to at least {wanted}."
    );
    Ok(fits)
}

/// The state directory holds the CA key, token hashes, members and activities: owner-only (0700, every file
/// in it 0600), whatever the umask it was made under, also when an earlier version or a hand left it open.
fn secure_state_dir(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(format!("cannot create the state directory {}", dir.display())))?;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error(format!("cannot make {} owner-only", dir.display())))?;
        let cannot_read = || io_error(format!("cannot read {}", dir.display()));
        for entry in std::fs::read_dir(&dir).map_err(cannot_read())? {
            let entry = entry.map_err(cannot_read())?;
            // Not followed: a link's target is not ours to change.
            let kind = entry.file_type().map_err(cannot_read())?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() || kind.is_socket() {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))
                    .map_err(io_error(format!("cannot make {} owner-only", entry.path().display())))?;
            }
        }
    }
    Ok(())
}

/// The Admin API's Unix socket, owner-only. A stale socket left by a crash is replaced; a live one means
/// another collector uses this state directory.
fn bind_admin_socket(path: &std::path::Path) -> Result<tokio::net::UnixListener, StartError> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_error(format!("cannot remove the stale {}", path.display())))?;
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io_error(format!("cannot create {}", dir.display())))?;
    // Bound in a private (0700) directory beside it, made owner-only there, then moved into place: it is
    // never reachable by others, not even for the moment between bind and chmod.
    let staging = tempfile::Builder::new()
        .prefix(".admin-socket-")
        .tempdir_in(dir)
        .map_err(io_error(format!(
            "cannot create a private directory in {}",
            dir.display()
        )))?;
    let staged = staging.path().join("admin.sock");
    let listener =
        tokio::net::UnixListener::bind(&staged).map_err(io_error(format!("cannot listen on {}", path.display())))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error(format!("cannot make {} owner-only", path.display())))?;
    std::fs::rename(&staged, path).map_err(io_error(format!("cannot place the admin socket at {}", path.display())))?;
    Ok(listener)
}

/// What `serve` would refuse at start that the configuration file alone does not show, checked by `validate`
/// without starting anything: CloudStack keys (present, owner-only), OpenStack clouds.yaml entries, the
/// local provider's agent binary, the operator's CA. Problems, then warnings (an address VMs cannot reach). AWS's credential chain is not
/// asked: it may query the instance metadata service.
pub fn preflight(config: &config::CollectorConfig) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let server = &config.server;
    match (&server.ca_cert, &server.ca_key) {
        (Some(cert), Some(key)) => {
            let lifetime = std::time::Duration::from_secs(server.member_cert_lifetime_secs.into());
            if let Err(e) = Pki::from_files(cert, key, &server.tls_names, lifetime) {
                problems.push(format!("server.ca_cert, server.ca_key: {e:#}"));
            }
        }
        (Some(_), None) | (None, Some(_)) => problems
            .push("server.ca_cert, server.ca_key: give both, or neither (the collector makes its own CA)".into()),
        (None, None) => {}
    }
    let mut cloud = false;
    for (i, group) in config.groups.iter().enumerate() {
        // qemu guests reach the collector their own way (provider.collector_url).
        let guests_reach_it = matches!(group.provider, ProviderConfig::Qemu(_));
        let result = match &group.provider {
            ProviderConfig::Cloudstack(cloudstack) => cloudstack.api().map(drop),
            ProviderConfig::Openstack(openstack) => openstack.keystone().map(drop),
            ProviderConfig::Local(local) => crate::providers::local::agent_path(local).map(drop),
            ProviderConfig::Qemu(qemu) => crate::providers::qemu::preflight(qemu),
            ProviderConfig::Aws(_) => Ok(()),
            #[cfg(feature = "fake-cloud")]
            ProviderConfig::Fake(_) => Ok(()),
        };
        if let Err(e) = result {
            problems.push(format!("groups[{i}].provider: {e}"));
        }
        cloud |= group.user_data_rules().is_some() && !guests_reach_it;
    }
    let ip = server.grpc_listen.ip();
    if cloud && server.advertise_url.is_none() && (ip.is_loopback() || ip.is_unspecified()) {
        warnings.push(format!(
            "server.advertise_url: not set, so new VMs are told to connect to https://{}, which they cannot \
             reach; set it to the address VMs reach this collector at (https://10.0.0.5:7300)",
            server.grpc_listen
        ));
    }
    (problems, warnings)
}
