//! The agent's gRPC client: one HTTP/2 connection to the collector carrying one call at a time, the Report
//! stream or an enrolment call.
//!
//! The agent runs on every VM, so what a sample costs to send is what ebb costs each VM. This client keeps
//! only what the call needs: a sample is encoded, framed and written in one system call, an acknowledgement
//! read and decoded in one, with no task, channel or buffer in between. It speaks RFC 9113 (HTTP/2), with
//! header blocks decoded by `loona-hpack` (RFC 7541) and ours written as literals, and gRPC's 5-byte message
//! prefix and trailers. The wire pieces it shares with the collector's server are in `ebb-http2`.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ebb_http2::*;
use loona_hpack::Decoder;
use prost::Message;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

/// The largest gRPC message accepted from the collector (its answers are a few hundred bytes).
const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// Connecting and the TLS handshake together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle time before TCP probes the connection, and the longest sent data may stay unacknowledged by the
/// collector's host before the connection counts as lost.
const TCP_TIMEOUT: Duration = Duration::from_secs(30);

/// The collector's methods the agent calls.
pub mod path {
    pub const REPORT: &str = "/ebb.v1.Telemetry/Report";
    pub const ENROLL: &str = "/ebb.v1.Enrollment/Enroll";
    pub const RENEW: &str = "/ebb.v1.Enrollment/Renew";
}

/// gRPC status codes the agent acts on.
pub mod code {
    pub const OK: i32 = 0;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// How a call ended: a gRPC status code and the collector's message.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub code: i32,
    pub message: String,
}

impl Status {
    /// gRPC's name for the code.
    pub fn code_name(&self) -> &'static str {
        const NAMES: [&str; 17] = [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ];
        usize::try_from(self.code)
            .ok()
            .and_then(|i| NAMES.get(i))
            .copied()
            .unwrap_or("UNKNOWN")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code_name(), self.code, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The collector ended the call with a status other than OK.
    #[error("{0}")]
    Status(Status),
    #[error("the collector broke HTTP/2: {0}")]
    Protocol(&'static str),
    #[error("the collector reset the call (HTTP/2 error {0})")]
    Reset(u32),
    #[error("the collector closed the connection (HTTP/2 GOAWAY, error {code}{debug})")]
    GoAway { code: u32, debug: String },
    #[error("the collector closed the connection")]
    Closed,
    #[error("the collector sent a message that does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Connects to the collector at `url` (`https://host:port`) with `tls`, and starts HTTP/2 on the connection.
pub async fn connect(url: &str, tls: rustls::ClientConfig) -> Result<Client<TlsStream<TcpStream>>, ConnectError> {
    connect_from(url, tls, None).await
}

/// [`connect`] from the local address `from` (any port), or from the one the system picks.
pub async fn connect_from(
    url: &str,
    tls: rustls::ClientConfig,
    from: Option<IpAddr>,
) -> Result<Client<TlsStream<TcpStream>>, ConnectError> {
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let (stream, authority) = tls_connect(url, tls, from).await?;
    Ok(Client::new(stream, &authority))
}

/// A TLS connection to the collector at `url` with `tls`, from `from` if given, within the connect timeout;
/// and the `host:port` it reached.
pub async fn tls_connect(
    url: &str,
    tls: rustls::ClientConfig,
    from: Option<IpAddr>,
) -> Result<(TlsStream<TcpStream>, String), ConnectError> {
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
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| ConnectError::Unreachable(format!("no TLS connection within {} s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
    Ok((stream, authority))
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

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL cannot be used; an operator must fix it.
    #[error("{0}")]
    Invalid(String),
    /// The network or TLS failed; worth trying again.
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

/// The one call in progress.
struct Call {
    id: u32,
    /// How much more the collector lets us send on it.
    send_window: i64,
    /// Bytes received on it and not yet given back with a WINDOW_UPDATE.
    unreturned: u32,
    /// gRPC-framed request bytes waiting for the windows.
    outgoing: Vec<u8>,
    /// END_STREAM is to follow the outgoing bytes; `sent_end` once it has.
    ending: bool,
    sent_end: bool,
    /// Bytes of the gRPC message being received, prefix included.
    message: Vec<u8>,
    /// The status from the trailers: the collector has sent everything.
    status: Option<Status>,
}

/// One HTTP/2 connection to the collector.
pub struct Client<Io> {
    io: Io,
    authority: String,
    /// Bytes read and not yet parsed (released when empty).
    input: Vec<u8>,
    output: Output,
    decoder: Decoder<'static>,
    header_blocks: HeaderBlocks,
    next_stream: u32,
    call: Option<Call>,
    peer: PeerSettings,
    /// The connection's send window, and received bytes not yet given back.
    send_window: i64,
    unreturned: u32,
    /// The collector said GOAWAY: the error code, its debug text and the last stream it will serve.
    going_away: Option<(u32, String, u32)>,
}

impl<Io: AsyncRead + AsyncWrite + Unpin> Client<Io> {
    /// Starts HTTP/2 on `io` (TLS done, `h2` agreed); `authority` is the collector's `host:port`.
    pub fn new(io: Io, authority: &str) -> Self {
        let mut output = Output::starting_with(PREFACE);
        output.frame(SETTINGS, 0, 0, &settings_payload(&[(SETTINGS_ENABLE_PUSH, 0)]));
        Self {
            io,
            authority: authority.to_string(),
            input: Vec::new(),
            output,
            decoder: Decoder::new(),
            header_blocks: HeaderBlocks::default(),
            next_stream: 1,
            call: None,
            peer: PeerSettings::default(),
            send_window: INITIAL_WINDOW,
            unreturned: 0,
            going_away: None,
        }
    }

    /// Starts a call of `path` (`/package.Service/Method`); only after the previous one has ended.
    pub fn start(&mut self, path: &str) {
        assert!(self.call.is_none(), "one call at a time");
        let id = self.next_stream;
        self.next_stream += 2;
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", &self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", concat!("ebb-agent/", env!("CARGO_PKG_VERSION"))),
        ] {
            hpack_literal(&mut block, name.as_bytes(), value.as_bytes());
        }
        self.output.frame(HEADERS, END_HEADERS, id, &block);
        self.call = Some(Call {
            id,
            send_window: self.peer.initial_window,
            unreturned: 0,
            outgoing: Vec::new(),
            ending: false,
            sent_end: false,
            message: Vec::new(),
            status: None,
        });
    }

    /// Queues one message of the call, encoded straight into the outgoing bytes; [`Client::flush`] sends it.
    pub fn send(&mut self, message: &impl Message) {
        if let Some(call) = self.call.as_mut().filter(|c| !c.ending) {
            // gRPC's prefix: uncompressed, then the length.
            call.outgoing.push(0);
            call.outgoing
                .extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
            message.encode(&mut call.outgoing).expect("a Vec grows as needed");
        }
        self.queue_call_output();
    }

    /// Says the call sends nothing more, after what is queued.
    pub fn end_sending(&mut self) {
        if let Some(call) = &mut self.call {
            call.ending = true;
        }
    }

    /// Request bytes held back because the collector's windows are closed.
    pub fn unsent(&self) -> usize {
        self.call.as_ref().map_or(0, |c| c.outgoing.len())
    }

    /// Writes everything queued that the windows allow, and flushes. Cancel-safe.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.queue_call_output();
        self.output.write_to(&mut self.io).await
    }

    /// The call's next message from the collector; `Ok(None)` once it ended the call with OK. Sends what is
    /// queued meanwhile. Cancel-safe: nothing read or written is lost if the future is dropped.
    pub async fn next<M: Message + Default>(&mut self) -> Result<Option<M>, Error> {
        loop {
            if let Err(violation) = self.parse() {
                self.output.frame(GOAWAY, 0, 0, &go_away_payload(violation.code));
                let _ = self.flush().await;
                return Err(Error::Protocol(violation.message));
            }
            if let Some(outcome) = self.call_outcome()? {
                return Ok(outcome);
            }
            self.flush().await?;
            if read_into(&mut self.io, &mut self.input).await? == 0 {
                return Err(match self.going_away.take() {
                    Some((code, debug, _)) => Error::GoAway { code, debug },
                    None => Error::Closed,
                });
            }
        }
    }

    /// One unary call: `request` to `path`, the one answer back.
    pub async fn call<Answer: Message + Default>(
        &mut self,
        path: &str,
        request: &impl Message,
    ) -> Result<Answer, Error> {
        self.start(path);
        self.send(request);
        self.end_sending();
        let answer = self
            .next()
            .await?
            .ok_or(Error::Protocol("a unary call answered with no message"))?;
        while self.next::<Answer>().await?.is_some() {}
        Ok(answer)
    }

    /// Says goodbye to the collector and closes the connection.
    pub async fn close(&mut self) {
        self.output.frame(GOAWAY, 0, 0, &go_away_payload(NO_ERROR));
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }

    /// What the call has for the caller: a whole message, its end, or nothing yet.
    fn call_outcome<M: Message + Default>(&mut self) -> Result<Option<Option<M>>, Error> {
        let Some(call) = &mut self.call else {
            return Err(Error::Protocol("no call in progress"));
        };
        if call.message.len() >= 5 {
            if call.message[0] != 0 {
                return Err(Error::Protocol("a compressed message, which the agent never asks for"));
            }
            let length = u32::from_be_bytes([call.message[1], call.message[2], call.message[3], call.message[4]]);
            let length = length as usize;
            if length > MAX_MESSAGE {
                return Err(Error::Protocol("a message larger than 4 MiB"));
            }
            if call.message.len() >= 5 + length {
                let message = M::decode(&call.message[5..5 + length])?;
                call.message.drain(..5 + length);
                return Ok(Some(Some(message)));
            }
        }
        if let Some(status) = call.status.clone() {
            if !call.message.is_empty() {
                return Err(Error::Protocol("the call ended inside a message"));
            }
            self.call = None;
            return match status.code {
                code::OK => Ok(Some(None)),
                _ => Err(Error::Status(status)),
            };
        }
        if let Some((code, debug, last_stream)) = &self.going_away
            && (call.id > *last_stream || *code != NO_ERROR)
        {
            return Err(Error::GoAway {
                code: *code,
                debug: debug.clone(),
            });
        }
        Ok(None)
    }

    /// Handles every whole frame read.
    fn parse(&mut self) -> Result<(), Violation> {
        while let Some(head) = frame_head(&self.input) {
            if head.length > MAX_FRAME {
                return Err(violation(
                    FRAME_SIZE_ERROR,
                    "a frame larger than SETTINGS_MAX_FRAME_SIZE",
                ));
            }
            if self.input.len() < FRAME_HEAD + head.length {
                break;
            }
            let input = std::mem::take(&mut self.input);
            let handled = self.frame(&head, &input[FRAME_HEAD..FRAME_HEAD + head.length]);
            self.input = input;
            self.input.drain(..FRAME_HEAD + head.length);
            handled?;
        }
        if self.input.is_empty() {
            self.input = Vec::new();
        }
        Ok(())
    }

    fn frame(&mut self, head: &FrameHead, payload: &[u8]) -> Result<(), Violation> {
        if self.header_blocks.takes(head) {
            return match self.header_blocks.feed(head, payload)? {
                Some(whole) => self.header_block(whole.stream, whole.end_stream, &whole.block),
                None => Ok(()),
            };
        }
        match head.kind {
            DATA => self.data(head, payload),
            RST_STREAM => {
                if let Some(call) = self.call.as_mut().filter(|c| c.id == head.stream && c.status.is_none()) {
                    let code = be_u32(payload, 0).unwrap_or(PROTOCOL_ERROR);
                    call.status = Some(Status {
                        code: if code == REFUSED_STREAM {
                            code::UNAVAILABLE
                        } else {
                            code::UNKNOWN
                        },
                        message: format!("the collector reset the call (HTTP/2 error {code})"),
                    });
                }
                Ok(())
            }
            SETTINGS => self.settings(head, payload),
            PING => {
                if head.length != 8 || head.stream != 0 {
                    return Err(violation(FRAME_SIZE_ERROR, "a malformed PING"));
                }
                if head.flags & ACK == 0 {
                    self.output.frame(PING, ACK, 0, payload);
                }
                Ok(())
            }
            GOAWAY => {
                let last_stream = be_u32(payload, 0).map_or(0, |id| id & 0x7fff_ffff);
                let code = be_u32(payload, 4).unwrap_or(PROTOCOL_ERROR);
                let debug = payload
                    .get(8..)
                    .filter(|d| !d.is_empty())
                    .map(|d| format!(": {}", String::from_utf8_lossy(d)))
                    .unwrap_or_default();
                self.going_away = Some((code, debug, last_stream));
                Ok(())
            }
            WINDOW_UPDATE => {
                let window = if head.stream == 0 {
                    Some(&mut self.send_window)
                } else {
                    self.call
                        .as_mut()
                        .filter(|c| c.id == head.stream)
                        .map(|c| &mut c.send_window)
                };
                match window {
                    Some(window) => widen(window, payload),
                    None => Ok(()),
                }
            }
            PUSH_PROMISE => Err(violation(PROTOCOL_ERROR, "PUSH_PROMISE, which the agent disabled")),
            _ => Ok(()),
        }
    }

    fn data(&mut self, head: &FrameHead, payload: &[u8]) -> Result<(), Violation> {
        if head.stream == 0 || head.stream >= self.next_stream {
            return Err(violation(PROTOCOL_ERROR, "DATA on a stream never opened"));
        }
        // Flow control counts the whole payload, padding included, on any stream.
        self.unreturned += head.length as u32;
        if self.unreturned >= WINDOW_UPDATE_AT {
            let increment = std::mem::take(&mut self.unreturned);
            self.output.frame(WINDOW_UPDATE, 0, 0, &increment.to_be_bytes());
        }
        let Some(call) = self.call.as_mut().filter(|c| c.id == head.stream && c.status.is_none()) else {
            return Ok(());
        };
        call.message.extend_from_slice(without_padding(head.flags, payload)?);
        if head.flags & END_STREAM != 0 {
            // gRPC always ends with trailers; a plain end is a call that failed somewhere in between.
            call.status = Some(Status {
                code: code::UNKNOWN,
                message: "the call ended without a gRPC status".into(),
            });
            return Ok(());
        }
        call.unreturned += head.length as u32;
        if call.unreturned >= WINDOW_UPDATE_AT {
            let (id, increment) = (call.id, std::mem::take(&mut call.unreturned));
            self.output.frame(WINDOW_UPDATE, 0, id, &increment.to_be_bytes());
        }
        Ok(())
    }

    /// Response headers (`:status`) or trailers (`grpc-status`); both when the call ends at once.
    fn header_block(&mut self, id: u32, end_stream: bool, block: &[u8]) -> Result<(), Violation> {
        // Decoded whatever happens next: the decoder's table must follow the collector's encoder.
        let (mut http_status, mut grpc_status, mut grpc_message) = (None, None, String::new());
        self.decoder
            .decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| match &*name {
                b":status" => http_status = std::str::from_utf8(&value).ok().and_then(|v| v.parse::<u16>().ok()),
                b"grpc-status" => grpc_status = std::str::from_utf8(&value).ok().and_then(|v| v.parse::<i32>().ok()),
                b"grpc-message" => grpc_message = percent_decode(&value),
                _ => {}
            })
            .map_err(|_| violation(COMPRESSION_ERROR, "cannot decode a header block"))?;
        let Some(call) = self.call.as_mut().filter(|c| c.id == id && c.status.is_none()) else {
            return Ok(());
        };
        if let Some(status) = http_status.filter(|&s| s != 200) {
            // Not gRPC's answer: a proxy or a server that does not serve this path.
            let code = if matches!(status, 502..=504) {
                code::UNAVAILABLE
            } else {
                code::UNKNOWN
            };
            call.status = Some(Status {
                code,
                message: format!("HTTP status {status}"),
            });
            return Ok(());
        }
        if end_stream {
            call.status = Some(match grpc_status {
                Some(code) => Status {
                    code,
                    message: grpc_message,
                },
                None => Status {
                    code: code::UNKNOWN,
                    message: "the call ended without a gRPC status".into(),
                },
            });
        }
        Ok(())
    }

    fn settings(&mut self, head: &FrameHead, payload: &[u8]) -> Result<(), Violation> {
        if head.flags & ACK == 0 {
            let change = self.peer.apply(head, payload)?;
            if let Some(call) = &mut self.call {
                call.send_window += change;
            }
            self.output.frame(SETTINGS, ACK, 0, &[]);
        }
        Ok(())
    }

    /// Frames the call's waiting request bytes as far as the windows allow, then its end.
    fn queue_call_output(&mut self) {
        let Some(call) = self.call.as_mut().filter(|c| !c.sent_end) else {
            return;
        };
        let window = self.send_window.min(call.send_window).max(0) as usize;
        let sendable = call.outgoing.len().min(window);
        if sendable > 0 {
            self.send_window -= sendable as i64;
            call.send_window -= sendable as i64;
            for frame in call.outgoing[..sendable].chunks(self.peer.max_frame) {
                self.output.frame(DATA, 0, call.id, frame);
            }
            call.outgoing.drain(..sendable);
            if call.outgoing.is_empty() {
                call.outgoing = Vec::new();
            }
        }
        if call.ending && call.outgoing.is_empty() {
            self.output.frame(DATA, END_STREAM, call.id, &[]);
            call.sent_end = true;
        }
    }
}

/// A GOAWAY's payload: no stream of the collector's was processed (it opens none), and `code`.
fn go_away_payload(code: u32) -> [u8; 8] {
    let mut payload = [0u8; 8];
    payload[4..].copy_from_slice(&code.to_be_bytes());
    payload
}

/// The big-endian `u32` at `at`, if `bytes` hold one there.
fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;

    const PATH: &str = "/ebb.v1.Telemetry/Report";

    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .expect("done within 10 s")
    }

    fn client(io: DuplexStream) -> Client<DuplexStream> {
        Client::new(io, "collector:7300")
    }

    /// A gRPC server on hyper's `h2`, granting windows of `window` bytes: it checks the request's headers,
    /// echoes each message back and ends with `grpc-status: 0`.
    async fn echo_server(io: DuplexStream, window: u32) {
        let mut connection = h2::server::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window)
            .handshake::<_, Bytes>(io)
            .await
            .unwrap();
        let (request, mut respond) = connection.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while connection.accept().await.is_some() {} });
        assert_eq!(request.method(), "POST");
        assert_eq!(request.uri().path(), PATH);
        assert_eq!(request.uri().authority().unwrap().as_str(), "collector:7300");
        assert_eq!(request.headers()["content-type"], "application/grpc");
        assert_eq!(request.headers()["te"], "trailers");
        let mut body = request.into_body();
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let mut send = respond.send_response(response, false).unwrap();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            send.reserve_capacity(chunk.len());
            send.send_data(chunk, false).unwrap();
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        send.send_trailers(trailers).unwrap();
        std::future::pending::<()>().await;
    }

    #[tokio::test]
    async fn messages_larger_than_every_window_pass_both_ways_and_the_call_ends_ok() {
        let (client_io, server_io) = tokio::io::duplex(4096);
        let server = tokio::spawn(echo_server(server_io, 1000));
        let mut client = client(client_io);
        client.start(PATH);
        client.send(&"hello".to_string());
        assert_eq!(within(client.next::<String>()).await.unwrap().unwrap(), "hello");
        // The server's SETTINGS have arrived: the windows are 1000 bytes now.
        let large: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
        client.send(&large);
        assert!(client.unsent() > 40_000, "held back: {}", client.unsent());
        client.send(&"after".to_string());
        client.end_sending();
        assert_eq!(within(client.next::<Vec<u8>>()).await.unwrap().unwrap(), large);
        assert_eq!(within(client.next::<String>()).await.unwrap().unwrap(), "after");
        assert_eq!(within(client.next::<String>()).await.unwrap(), None);
        assert_eq!(client.unsent(), 0);
        server.abort();
    }

    #[tokio::test]
    async fn a_refusal_in_trailers_only_is_the_status_with_its_message() {
        let (client_io, server_io) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let (_, mut respond) = connection.accept().await.unwrap().unwrap();
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "7")
                .header(
                    "grpc-message",
                    percent_encode("the token has already been used: 100% sure"),
                )
                .body(())
                .unwrap();
            respond.send_response(response, true).unwrap();
            while connection.accept().await.is_some() {}
        });
        let refused = within(client(client_io).call::<String>(path::ENROLL, &"request".to_string())).await;
        match refused {
            Err(Error::Status(status)) => {
                assert_eq!(status.code, code::PERMISSION_DENIED);
                assert_eq!(status.message, "the token has already been used: 100% sure");
                assert_eq!(
                    status.to_string(),
                    "PERMISSION_DENIED (7): the token has already been used: 100% sure"
                );
            }
            other => panic!("{other:?}"),
        }
        server.abort();
    }

    /// The frames a peer wrote, as (kind, flags, stream, payload), after the client preface if there is one.
    fn frames_of(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut at = if bytes.starts_with(PREFACE) { PREFACE.len() } else { 0 };
        let mut frames = Vec::new();
        while let Some(head) = frame_head(&bytes[at..]) {
            frames.push((
                head.kind,
                head.flags,
                head.stream,
                bytes[at + FRAME_HEAD..at + FRAME_HEAD + head.length].to_vec(),
            ));
            at += FRAME_HEAD + head.length;
        }
        frames
    }

    /// Runs a call against a server that writes `frames` and closes; what the call ended with, and the
    /// frames the client wrote by its next flush.
    async fn against(
        frames: &[(u8, u8, u32, Vec<u8>)],
    ) -> (Result<Option<Vec<u8>>, Error>, Vec<(u8, u8, u32, Vec<u8>)>) {
        let (client_io, mut server_io) = tokio::io::duplex(64 * 1024);
        let mut bytes = Vec::new();
        for (kind, flags, stream, payload) in frames {
            write_frame(&mut bytes, *kind, *flags, *stream, payload);
        }
        server_io.write_all(&bytes).await.unwrap();
        server_io.shutdown().await.unwrap();
        let mut client = client(client_io);
        client.start(PATH);
        let outcome = within(client.next::<Vec<u8>>()).await;
        // What the client queued meanwhile (acknowledgements) goes out with its next write.
        let _ = client.flush().await;
        drop(client);
        let mut written = Vec::new();
        server_io.read_to_end(&mut written).await.unwrap();
        (outcome, frames_of(&written))
    }

    #[tokio::test]
    async fn pings_and_settings_are_acknowledged_and_goaway_ends_the_call_with_its_reason() {
        let mut goaway = 0u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        goaway.extend_from_slice(b"too many connections");
        let (outcome, written) = against(&[
            (
                SETTINGS,
                0,
                0,
                settings_payload(&[(SETTINGS_MAX_CONCURRENT_STREAMS, 1)]),
            ),
            (PING, 0, 0, b"12345678".to_vec()),
            (GOAWAY, 0, 0, goaway),
        ])
        .await;
        match outcome {
            Err(Error::GoAway { code, debug }) => {
                assert_eq!(code, ENHANCE_YOUR_CALM);
                assert_eq!(debug, ": too many connections");
            }
            other => panic!("{other:?}"),
        }
        let kinds: Vec<(u8, u8, u32)> = written.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            written[0],
            (SETTINGS, 0, 0, settings_payload(&[(SETTINGS_ENABLE_PUSH, 0)]))
        );
        for expected in [(HEADERS, END_HEADERS, 1), (SETTINGS, ACK, 0), (PING, ACK, 0)] {
            assert!(kinds.contains(&expected), "{expected:?} in {kinds:?}");
        }
        assert_eq!(written.iter().find(|f| f.0 == PING).unwrap().3, b"12345678");
    }

    #[tokio::test]
    async fn a_reset_ends_the_call_and_a_protocol_violation_the_connection() {
        let (outcome, _) = against(&[(RST_STREAM, 0, 1, REFUSED_STREAM.to_be_bytes().to_vec())]).await;
        match outcome {
            Err(Error::Status(status)) => assert_eq!(status.code, code::UNAVAILABLE, "{status}"),
            other => panic!("{other:?}"),
        }

        let (outcome, written) = against(&[(PUSH_PROMISE, END_HEADERS, 1, vec![0, 0, 0, 2])]).await;
        assert!(matches!(outcome, Err(Error::Protocol(_))), "{outcome:?}");
        let goaway = written.iter().find(|f| f.0 == GOAWAY).expect("a GOAWAY");
        assert_eq!(goaway.3[4..8], PROTOCOL_ERROR.to_be_bytes());

        let (outcome, _) = against(&[]).await;
        assert!(matches!(outcome, Err(Error::Closed)), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_call_split_over_continuations_and_padded_frames_reads_whole() {
        let mut headers = Vec::new();
        hpack_literal(&mut headers, b":status", b"200");
        hpack_literal(&mut headers, b"content-type", b"application/grpc");
        let (first, rest) = headers.split_at(5);
        let mut message = Vec::new();
        grpc_frame(&mut message, &"ack".to_string().encode_to_vec());
        let mut padded = vec![3];
        padded.extend_from_slice(&message[..4]);
        padded.extend_from_slice(&[0, 0, 0]);
        let mut trailers = Vec::new();
        hpack_literal(&mut trailers, b"grpc-status", b"0");
        let frames = [
            (HEADERS, 0, 1, first.to_vec()),
            (CONTINUATION, END_HEADERS, 1, rest.to_vec()),
            (DATA, PADDED, 1, padded),
            (DATA, 0, 1, message[4..].to_vec()),
            (HEADERS, END_HEADERS | END_STREAM, 1, trailers),
        ];
        let (client_io, mut server_io) = tokio::io::duplex(64 * 1024);
        let mut bytes = Vec::new();
        for (kind, flags, stream, payload) in &frames {
            write_frame(&mut bytes, *kind, *flags, *stream, payload);
        }
        server_io.write_all(&bytes).await.unwrap();
        let mut client = client(client_io);
        client.start(PATH);
        assert_eq!(within(client.next::<String>()).await.unwrap().unwrap(), "ack");
        assert_eq!(within(client.next::<String>()).await.unwrap(), None);
    }

    #[test]
    fn urls_need_https_and_a_port() {
        assert_eq!(
            authority_of("https://10.0.0.5:7300").unwrap(),
            ("10.0.0.5:7300".to_string(), "10.0.0.5".to_string())
        );
        assert_eq!(authority_of("https://[::1]:7300/").unwrap().1, "::1");
        assert!(authority_of("http://10.0.0.5:7300").is_err());
        assert!(authority_of("https://collector").is_err());
    }
}
