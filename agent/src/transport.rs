//! The connection to the collector: TCP (keepalive, user timeout), TLS (rustls, the pinned CA), HTTP/2 from
//! hyper's client with every limit set here on purpose, and gRPC from tonic's generated clients on top.
//!
//! One connection carries the calls of one job (the Report stream, or an Enroll or Renew call) and closes
//! when the [`Channel`] is dropped. We do not maintain our own HTTP/2: h2 has years of hardening against
//! hostile peers that ours lacked.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tonic::body::Body;
use tonic::codegen::http;

/// Connecting and the TLS handshake together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle time before TCP probes the connection, and the longest sent data may stay unacknowledged by the
/// collector's host before the connection counts as lost.
const TCP_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP/2 limits of the agent's side, each chosen for what the collector sends: a few hundred bytes
/// per answer on one stream.
pub mod limits {
    use std::time::Duration;

    /// The largest gRPC message accepted from the collector (its answers are a few hundred bytes; an
    /// enrolment answer with a certificate chain a few KiB).
    pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
    /// HPACK dynamic table the collector may use (RFC 7541's default; a larger size update is refused by h2).
    pub const HEADER_TABLE_BYTES: u32 = 4096;
    /// Decoded header list of one response or its trailers.
    pub const HEADER_LIST_BYTES: u32 = 16 * 1024;
    /// Flow-control windows: what the collector may send before the agent has read it.
    pub const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
    pub const CONNECTION_WINDOW_BYTES: u32 = 128 * 1024;
    /// Bytes queued to send before a call waits (a replay of 100 samples is about 10 KB).
    pub const SEND_BUFFER_BYTES: usize = 128 * 1024;
    /// Streams the agent accepts from the collector (it opens its own; servers push none).
    pub const CONCURRENT_STREAMS: u32 = 4;
    /// A PING every interval, answered within the timeout, or the connection is dead: a partition is noticed
    /// within about a minute even when no sample is due.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL cannot be used; an operator must fix it.
    #[error("{0}")]
    Invalid(String),
    /// The network, TLS or HTTP/2 failed; worth trying again.
    #[error("{0}")]
    Unreachable(String),
}

/// `host:port` and host of an `https://` URL.
pub fn authority_of(url: &str) -> Result<(String, String), ConnectError> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| ConnectError::Invalid(format!("collector_url `{url}` must start with https://")))?;
    let authority = rest.split('/').next().unwrap_or_default().to_string();
    match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => {
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            Ok((authority, host))
        }
        _ => Err(ConnectError::Invalid(format!("collector_url `{url}` must name a port"))),
    }
}

/// A TLS connection to the collector at `url` with `tls`, from `from` if given, within the connect timeout.
pub async fn tls_connect(
    url: &str,
    tls: rustls::ClientConfig,
    from: Option<IpAddr>,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let (authority, host) = authority_of(url)?;
    let name = ServerName::try_from(host)
        .map_err(|e| ConnectError::Invalid(format!("collector_url `{url}`: the host is not a name: {e}")))?;
    let connecting = async {
        let tcp = tcp_connect(&authority, from).await?;
        tcp.set_nodelay(true)?;
        let socket = socket2::SockRef::from(&tcp);
        socket.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_TIMEOUT))?;
        socket.set_tcp_user_timeout(Some(TCP_TIMEOUT))?;
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| ConnectError::Unreachable(format!("no TLS connection within {} s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|e| ConnectError::Unreachable(e.to_string()))
}

/// A TCP connection to the first of `authority`'s addresses that answers.
async fn tcp_connect(authority: &str, from: Option<IpAddr>) -> io::Result<TcpStream> {
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, format!("{authority} has no address"));
    for address in tokio::net::lookup_host(authority).await? {
        let socket = match address {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(from) = from {
            socket.bind(SocketAddr::new(from, 0))?;
        }
        match socket.connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// One HTTP/2 connection to the collector, for tonic's clients (`TelemetryClient::with_origin(channel,
/// channel.origin())`). The connection closes when every clone is dropped.
#[derive(Clone)]
pub struct Channel {
    requests: SendRequest<Body>,
    origin: http::Uri,
}

impl Channel {
    /// The collector's `https://host:port`, which tonic puts in each request.
    pub fn origin(&self) -> http::Uri {
        self.origin.clone()
    }
}

/// Connects to the collector at `url` (`https://host:port`) with `tls` and starts HTTP/2.
pub async fn connect(url: &str, tls: rustls::ClientConfig) -> Result<Channel, ConnectError> {
    connect_from(url, tls, None).await
}

/// [`connect`] from the local address `from` (any port), or from the one the system picks.
pub async fn connect_from(url: &str, tls: rustls::ClientConfig, from: Option<IpAddr>) -> Result<Channel, ConnectError> {
    let (authority, _) = authority_of(url)?;
    let origin = http::Uri::builder()
        .scheme("https")
        .authority(authority.as_str())
        .path_and_query("/")
        .build()
        .map_err(|e| ConnectError::Invalid(format!("collector_url `{url}`: {e}")))?;
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let stream = tls_connect(url, tls, from).await?;
    let (requests, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .header_table_size(limits::HEADER_TABLE_BYTES)
        .max_header_list_size(limits::HEADER_LIST_BYTES)
        .initial_stream_window_size(limits::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(limits::CONNECTION_WINDOW_BYTES)
        .max_send_buf_size(limits::SEND_BUFFER_BYTES)
        .max_concurrent_streams(limits::CONCURRENT_STREAMS)
        .keep_alive_interval(limits::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(limits::KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Unreachable(format!("HTTP/2 with {url}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "The connection to the collector ended.");
        }
    });
    Ok(Channel { requests, origin })
}

impl tower_service::Service<http::Request<Body>> for Channel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.requests.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.requests.send_request(request))
    }
}

/// Whether the collector's refusal is worth retrying as is: it is busy, stopping or slow.
pub fn is_retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::DeadlineExceeded
    )
}

/// Whether a status is tonic's report of the connection failing under the call (reset, GOAWAY, a protocol
/// error), not the collector's answer: only those carry the transport's error as their source.
pub fn is_transport_failure(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_proto::v1::EnrollRequest;
    use ebb_proto::v1::enrollment_client::EnrollmentClient;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS server on loopback speaking just enough HTTP/2 to answer the first request's headers with
    /// `header_block`, then holding the connection open; the URL and a client config that trusts it.
    async fn collector_answering(header_block: Vec<u8>) -> (String, rustls::ClientConfig) {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
            )
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
                let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
                out.extend([kind, flags]);
                out.extend(stream.to_be_bytes());
                out.extend(payload);
                out
            };
            // The client's preface, SETTINGS and request arrive together; then SETTINGS, its ack, and the
            // answer's headers on stream 1.
            let mut read = vec![0u8; 4096];
            let _ = tls.read(&mut read).await;
            let mut answer = frame(4, 0, 0, &[]);
            answer.extend(frame(4, 1, 0, &[]));
            answer.extend(frame(1, 0x4, 1, &header_block));
            tls.write_all(&answer).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (url, client)
    }

    /// Whether an Enroll call to a collector that answers with `header_block` ends within `wait`.
    async fn call_ends_within(header_block: Vec<u8>, wait: Duration) -> Option<tonic::Status> {
        let (url, tls) = collector_answering(header_block).await;
        let channel = connect(&url, tls).await.unwrap();
        let origin = channel.origin();
        let mut client = EnrollmentClient::with_origin(channel, origin);
        match tokio::time::timeout(wait, client.enroll(EnrollRequest::default())).await {
            Ok(Err(status)) => Some(status),
            Ok(Ok(_)) => panic!("no answer was sent"),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn a_collector_that_sends_an_hpack_table_size_bomb_is_refused() {
        // `:status: 200` from the static table: a valid answer whose body never comes, so the call waits.
        assert!(call_ends_within(vec![0x88], Duration::from_secs(1)).await.is_none());
        // The same after a dynamic table size update to 2^28: the connection fails at once.
        let bomb = vec![0x3f, 0xe1, 0xff, 0xff, 0x7f, 0x88];
        let status = call_ends_within(bomb, Duration::from_secs(5))
            .await
            .expect("the call fails, not waits");
        assert!(is_transport_failure(&status), "{status:?}");
    }

    #[test]
    fn urls_need_https_and_a_port() {
        assert_eq!(
            authority_of("https://10.0.0.5:7300").unwrap(),
            ("10.0.0.5:7300".into(), "10.0.0.5".into())
        );
        assert_eq!(
            authority_of("https://[::1]:7300/").unwrap(),
            ("[::1]:7300".into(), "::1".into())
        );
        assert!(authority_of("http://10.0.0.5:7300").is_err());
        assert!(authority_of("https://collector").is_err());
    }
}
