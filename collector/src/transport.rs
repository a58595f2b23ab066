//! Every gRPC listener of the collector: accepts connections up to a cap, completes their TLS handshakes
//! ([`crate::tls`]) and serves them with hyper's HTTP/2 and tonic's routes, with every limit set here on
//! purpose. We do not maintain our own HTTP/2: h2 has years of hardening against hostile peers (HPACK
//! bombs, CONTINUATION floods, rapid reset) that ours lacked.
//!
//! What one connection may cost, whoever is on the other end:
//! - a place among the listener's `max_connections` (refused at once past it, counted);
//! - its handshake under [`crate::tls`]'s deadlines;
//! - [`limits::IDLE`] without an open stream, then it is closed (an attacker's idle TLS, an agent gone);
//! - [`limits::STREAM_BURST`] streams, then [`limits::STREAMS_PER_MINUTE`]; past that it is closed;
//! - each request's headers, and a unary call's whole message, within [`limits::REQUEST_DEADLINE`];
//! - HTTP/2 PINGs answered within [`limits::KEEPALIVE_TIMEOUT`], or it is dead (a partition, a zero window).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tower::ServiceExt;

use crate::metrics::Metrics;
use crate::tls::{self, Accept, PeerInfo};

/// The HTTP/2 and gRPC limits of every listener, each chosen for what agents and operators send: one
/// long-lived stream of messages of a few KB, a few unary calls.
pub mod limits {
    use std::time::Duration;

    /// The largest gRPC message accepted from anyone; a batch of 100 samples is about 10 KB.
    pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
    /// HPACK dynamic table a client may make us keep (RFC 7541's default; h2 refuses a larger size update).
    pub const HEADER_TABLE_BYTES: u32 = 4096;
    /// Decoded header list of one request (gRPC's are a few hundred bytes). h2 also bounds the CONTINUATION
    /// frames that may carry it.
    pub const HEADER_LIST_BYTES: u32 = 16 * 1024;
    /// The smallest frame size HTTP/2 allows.
    pub const FRAME_BYTES: u32 = 16 * 1024;
    /// Flow-control windows: what a client may send before we have read it.
    pub const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
    pub const CONNECTION_WINDOW_BYTES: u32 = 128 * 1024;
    /// Bytes queued to send on a connection before the handler waits (our answers are small).
    pub const SEND_BUFFER_BYTES: usize = 64 * 1024;
    /// Streams open at once on one connection (an agent uses one; grpcurl one).
    pub const CONCURRENT_STREAMS: u32 = 16;
    /// Streams a client reset before we accepted them, and streams we reset for its errors, before the
    /// connection is closed (h2's rapid-reset defences).
    pub const PENDING_ACCEPT_RESETS: usize = 20;
    pub const LOCAL_ERROR_RESETS: usize = 64;
    /// Streams a connection may open at once, then per minute: an agent opens one or two an hour.
    pub const STREAM_BURST: u32 = 100;
    pub const STREAMS_PER_MINUTE: u32 = 60;
    /// A connection without an open stream this long is closed.
    pub const IDLE: Duration = Duration::from_secs(10);
    /// A request's headers, and a unary call's message and answer, within this; a Report stream's next
    /// message within [`crate::server::REPORT_MESSAGE_DEADLINE`].
    pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
    /// A PING every interval, answered within the timeout, or the connection is dead.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
    /// Connections at once on each Admin API listener: operators and their scripts.
    pub const ADMIN_CONNECTIONS: usize = 64;
    /// After the collector stops, connections have this long to finish.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
}

/// Decides, before any handler, whether a request on this listener is answered at all; the status refuses it.
pub type Gate = Arc<dyn Fn(&PeerInfo, &str) -> Result<(), Status> + Send + Sync>;

/// One listener's name (for metrics and logs), cap and gate.
#[derive(Clone)]
pub struct Listener {
    /// `grpc` (agents) or `admin`; the `service` label of `ebb_requests_refused_total`.
    pub name: &'static str,
    pub max_connections: usize,
    pub gate: Gate,
    pub metrics: Arc<Metrics>,
}

/// Serves `routes` on every connection `listener` accepts until `stop` turns true, then lets connections
/// finish for [`limits::SHUTDOWN_GRACE`].
pub async fn serve<L: Accept>(
    listener: L,
    tls_config: Arc<rustls::ServerConfig>,
    routes: tonic::service::Routes,
    settings: Listener,
    mut stop: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(settings.max_connections));
    let handshakes = tls::Handshakes::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stopping| *stopping) => break,
        };
        let (io, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: the system is out of something; do not spin on it.
                tracing::warn!(listener = settings.name, error = %e, "Cannot accept a connection.");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            settings.metrics.refused(settings.name, "connection_limit");
            tracing::debug!(
                listener = settings.name,
                ?remote,
                "Refused a connection: at max_connections."
            );
            continue;
        };
        let (tls_config, handshakes, routes, settings, stop) = (
            tls_config.clone(),
            handshakes.clone(),
            routes.clone(),
            settings.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let _place = place;
            let Some((stream, peer)) = handshakes.complete(io, remote, tls_config).await else {
                return;
            };
            serve_connection(stream, peer, routes, &settings, stop).await;
        });
    }
    // Every connection gives its place back when it ends.
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(limits::SHUTDOWN_GRACE * 2, places.acquire_many(all)).await;
}

/// What one connection has used: open streams, the stream budget, since when it idles.
struct Usage {
    open_streams: AtomicUsize,
    state: Mutex<UsageState>,
    /// Woken when the connection must close now (its stream budget is spent).
    close: Notify,
}

struct UsageState {
    idle_since: Instant,
    /// Streams it may still open; refilled at [`limits::STREAMS_PER_MINUTE`].
    stream_tokens: f64,
    refilled_at: Instant,
}

impl Usage {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            open_streams: AtomicUsize::new(0),
            state: Mutex::new(UsageState {
                idle_since: now,
                stream_tokens: f64::from(limits::STREAM_BURST),
                refilled_at: now,
            }),
            close: Notify::new(),
        }
    }

    /// Spends one stream of the budget; false when it is spent.
    fn take_stream(&self) -> bool {
        let mut state = self.state.lock().expect("usage lock");
        let now = Instant::now();
        let refill = now.duration_since(state.refilled_at).as_secs_f64() * f64::from(limits::STREAMS_PER_MINUTE) / 60.0;
        state.stream_tokens = (state.stream_tokens + refill).min(f64::from(limits::STREAM_BURST));
        state.refilled_at = now;
        if state.stream_tokens < 1.0 {
            return false;
        }
        state.stream_tokens -= 1.0;
        true
    }

    /// When the connection has been idle for [`limits::IDLE`], or `None` while a stream is open.
    fn idle_deadline(&self) -> Option<Instant> {
        let state = self.state.lock().expect("usage lock");
        (self.open_streams.load(Ordering::Acquire) == 0).then(|| state.idle_since + limits::IDLE)
    }
}

/// Counts a stream as open until dropped (with the response body, or with the request if it never answered).
struct OpenStream(Arc<Usage>);

impl OpenStream {
    fn new(usage: Arc<Usage>) -> Self {
        usage.open_streams.fetch_add(1, Ordering::AcqRel);
        Self(usage)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().expect("usage lock");
        state.idle_since = Instant::now();
        self.0.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its stream counted as open.
struct CountedBody {
    body: Body,
    _open: OpenStream,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The per-connection service hyper calls for each stream.
#[derive(Clone)]
struct ConnectionService {
    routes: tonic::service::Routes,
    peer: PeerInfo,
    usage: Arc<Usage>,
    listener: Listener,
}

impl hyper::service::Service<http::Request<Incoming>> for ConnectionService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        let (metrics, listener) = (self.listener.metrics.clone(), self.listener.name);
        if !self.usage.take_stream() {
            metrics.refused(listener, "stream_budget");
            self.usage.close.notify_one();
            let status = Status::resource_exhausted(format!(
                "more than {} streams on one connection ({} a minute after the first {}); the connection is closed",
                limits::STREAM_BURST,
                limits::STREAMS_PER_MINUTE,
                limits::STREAM_BURST
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        if let Err(status) = (self.listener.gate)(&self.peer, request.uri().path()) {
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        request.extensions_mut().insert(self.peer.clone());
        let open = OpenStream::new(self.usage.clone());
        let answering = self.routes.clone().oneshot(request);
        Box::pin(async move {
            let response = match tokio::time::timeout(limits::REQUEST_DEADLINE, answering).await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => {
                    metrics.refused(listener, "deadline_exceeded");
                    return Ok(Status::deadline_exceeded(format!(
                        "the request was not complete within {} s",
                        limits::REQUEST_DEADLINE.as_secs()
                    ))
                    .into_http());
                }
            };
            if Status::from_header_map(response.headers()).is_some_and(|status| crate::server::is_oversized(&status)) {
                metrics.refused(listener, "oversized_message");
            }
            Ok(response.map(|body| Body::new(CountedBody { body, _open: open })))
        })
    }
}

/// Serves one connection until it ends, idles, spends its stream budget, or the collector stops.
async fn serve_connection<Io>(
    stream: Io,
    peer: PeerInfo,
    routes: tonic::service::Routes,
    listener: &Listener,
    mut stop: watch::Receiver<bool>,
) where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let usage = Arc::new(Usage::new());
    let service = ConnectionService {
        routes,
        peer,
        usage: usage.clone(),
        listener: listener.clone(),
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .header_table_size(limits::HEADER_TABLE_BYTES)
        .max_header_list_size(limits::HEADER_LIST_BYTES)
        .max_frame_size(limits::FRAME_BYTES)
        .initial_stream_window_size(limits::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(limits::CONNECTION_WINDOW_BYTES)
        .max_send_buf_size(limits::SEND_BUFFER_BYTES)
        .max_concurrent_streams(limits::CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(limits::PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(limits::LOCAL_ERROR_RESETS)
        .keep_alive_interval(limits::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(limits::KEEPALIVE_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut closing_by: Option<Instant> = None;
    loop {
        let idle_check = match (closing_by, usage.idle_deadline()) {
            (Some(by), _) => by,
            (None, Some(deadline)) => deadline,
            // A stream is open: look again later; the stream's end restarts the idle clock.
            (None, None) => Instant::now() + limits::IDLE,
        };
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(listener = listener.name, error = %e, "A connection ended with an error.");
                }
                return;
            }
            _ = tokio::time::sleep_until(idle_check) => {
                if closing_by.is_some() {
                    return;
                }
                if usage.idle_deadline().is_some_and(|deadline| deadline <= Instant::now()) {
                    listener.metrics.refused(listener.name, "idle_connection");
                    connection.as_mut().graceful_shutdown();
                    closing_by = Some(Instant::now() + limits::SHUTDOWN_GRACE);
                }
            }
            _ = usage.close.notified(), if closing_by.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing_by = Some(Instant::now() + limits::SHUTDOWN_GRACE);
            }
            _ = stop.wait_for(|stopping| *stopping), if closing_by.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing_by = Some(Instant::now() + limits::SHUTDOWN_GRACE);
            }
        }
    }
}
