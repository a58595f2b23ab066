//! The small HTTP/2 server that carries agents' `Telemetry.Report` streams.
//!
//! Every agent holds one connection open for as long as it runs, so what a connection costs at rest is
//! what the collector costs per agent. hyper's HTTP/2 keeps 24 KiB of fixed buffers per connection and
//! tonic a task or two more; this server keeps nothing between frames: what it reads is parsed and
//! released, what it writes is flushed and released. It serves one gRPC stream at a time (it announces
//! `SETTINGS_MAX_CONCURRENT_STREAMS` 1) and only what an agent's Report needs; every other connection stays
//! with tonic. [`Connection::read_first_request`] tells from a connection's first bytes which kind it is.
//!
//! The protocol is RFC 9113 (HTTP/2), with header blocks decoded by `loona-hpack` (RFC 7541) and ours
//! written without the dynamic table; gRPC adds a 5-byte prefix to each message and its status in the
//! trailers. The policy (who may report, what a message means) is the caller's:
//! [`crate::server::serve_report_connection`].

use std::borrow::Cow;
use std::io;
use std::time::Duration;

use ebb_http2::*;
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Responses held back by a client that stopped reading them, before its stream is ended.
const MAX_HELD_OUTPUT: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The client broke the protocol; a GOAWAY with `code` has been queued.
    #[error("HTTP/2 protocol error from the client: {message}")]
    Protocol { code: u32, message: &'static str },
    /// Responses pile up: the client's windows stay closed.
    #[error("the client has left {0} bytes of responses unread")]
    Stalled(usize),
}

fn protocol(code: u32, message: &'static str) -> Error {
    Error::Protocol { code, message }
}

impl From<Violation> for Error {
    fn from(violation: Violation) -> Self {
        protocol(violation.code, violation.message)
    }
}

/// What happened on the connection, for the caller to act on.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// The client opened a stream for `path`; answer with [`Connection::send`] and [`Connection::finish`].
    Request { path: String },
    /// One whole gRPC message of the open stream.
    Message(Vec<u8>),
    /// A gRPC message announced as larger than the limit; its bytes are discarded.
    TooLarge { length: usize },
    /// A compressed gRPC message (ebb's agents never compress); its bytes are discarded.
    Compressed,
    /// The client has sent everything it will on the open stream.
    Finished,
    /// The client reset the open stream; it is gone.
    Reset,
}

/// The `:path` of a header block, decoded with `decoder`.
fn decode_path(decoder: &mut Decoder<'static>, block: &[u8]) -> Result<String, Error> {
    let mut path = String::new();
    decoder
        .decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| {
            if &*name == b":path" {
                path = String::from_utf8_lossy(&value).into_owned();
            }
        })
        .map_err(|_| protocol(COMPRESSION_ERROR, "cannot decode a header block"))?;
    Ok(path)
}

/// What a connection's first bytes say about it ([`Connection::read_first_request`]).
#[derive(Debug, PartialEq)]
pub enum FirstRequest {
    /// No request within the wait.
    Undecided,
    /// Its first stream asks for this path.
    Path(String),
    /// Not HTTP/2 this server can read, or the client left.
    Unreadable,
}

/// The one open stream.
struct Stream {
    id: u32,
    /// How much more the client lets us send on it.
    send_window: i64,
    /// Bytes received on it and not yet given back with a WINDOW_UPDATE.
    unreturned: u32,
    /// Bytes of the gRPC message being received, prefix included.
    message: Vec<u8>,
    /// Bytes of a refused message still to be discarded.
    discarding: usize,
    /// The client sent END_STREAM.
    received_all: bool,
    /// [`Event::Finished`] has been given.
    finished_told: bool,
    headers_sent: bool,
    /// gRPC-framed response bytes waiting for the windows.
    outgoing: Vec<u8>,
    /// The trailers' header block, once [`Connection::finish`] was called.
    trailers: Option<Vec<u8>>,
}

/// One client's HTTP/2 connection.
pub struct Connection<Io> {
    io: Io,
    /// Bytes read and not yet parsed (released when empty).
    input: Vec<u8>,
    output: Output,
    decoder: Decoder<'static>,
    preface_read: bool,
    header_blocks: HeaderBlocks,
    /// The highest stream the client has opened.
    last_stream: u32,
    stream: Option<Stream>,
    peer: PeerSettings,
    /// The connection's send window, and received bytes not yet given back.
    send_window: i64,
    unreturned: u32,
    /// The largest gRPC message accepted.
    max_message: usize,
    /// Every byte read before the first [`Connection::next`], to hand back if the connection is not ours.
    recording: Option<Vec<u8>>,
    /// The first request, parsed while deciding, for [`Connection::next`] to give.
    pending: Option<Event>,
    /// The client said GOAWAY: no new streams will come.
    client_leaving: bool,
}

impl<Io: AsyncRead + AsyncWrite + Unpin> Connection<Io> {
    /// Starts serving `io`, a connection whose TLS handshake is done.
    pub fn new(io: Io, max_message: usize) -> Self {
        let mut connection = Self {
            io,
            input: Vec::new(),
            output: Output::default(),
            decoder: Decoder::new(),
            preface_read: false,
            header_blocks: HeaderBlocks::default(),
            last_stream: 0,
            stream: None,
            peer: PeerSettings::default(),
            send_window: INITIAL_WINDOW,
            unreturned: 0,
            max_message,
            recording: None,
            pending: None,
            client_leaving: false,
        };
        let settings = settings_payload(&[(SETTINGS_MAX_CONCURRENT_STREAMS, 1)]);
        connection.queue_frame(SETTINGS, 0, 0, &settings);
        connection
    }

    /// Parses what the client sends until its first request, for at most `wait` (a client that waits for the
    /// server to speak first stays undecided). Nothing is written meanwhile: if the connection is not for
    /// this server, [`Connection::into_parts`] gives back everything read.
    pub async fn read_first_request(&mut self, wait: Duration) -> FirstRequest {
        self.recording = Some(self.input.clone());
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.parse() {
                Ok(Some(Event::Request { path })) => {
                    self.pending = Some(Event::Request { path: path.clone() });
                    return FirstRequest::Path(path);
                }
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => return FirstRequest::Unreadable,
            }
            match tokio::time::timeout_at(deadline, self.read()).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return FirstRequest::Unreadable,
                Err(_) => return FirstRequest::Undecided,
            }
        }
    }

    /// The connection and every byte read from it, for another server to take over; only before
    /// [`Connection::next`].
    pub fn into_parts(self) -> (Io, Vec<u8>) {
        (self.io, self.recording.unwrap_or_default())
    }

    /// Reads what the client sent (and records it while deciding); `Ok(0)` at the end of the stream.
    async fn read(&mut self) -> io::Result<usize> {
        let before = self.input.len();
        let n = read_into(&mut self.io, &mut self.input).await?;
        if let Some(recording) = &mut self.recording {
            recording.extend_from_slice(&self.input[before..]);
        }
        Ok(n)
    }

    /// The next event; `Ok(None)` once the client has closed the connection or said GOAWAY and has no
    /// stream left. Cancel-safe: nothing read or written is lost if the future is dropped.
    pub async fn next(&mut self) -> Result<Option<Event>, Error> {
        // The connection is this server's now: nothing will be handed back.
        self.recording = None;
        if let Some(event) = self.pending.take() {
            return Ok(Some(event));
        }
        loop {
            match self.parse() {
                Ok(Some(event)) => return Ok(Some(event)),
                Ok(None) => {}
                Err(error) => {
                    if let Error::Protocol { code, message } = &error {
                        self.go_away(*code, message.as_bytes());
                        let _ = self.flush().await;
                    }
                    return Err(error);
                }
            }
            self.flush().await?;
            if self.client_leaving && self.stream.is_none() {
                return Ok(None);
            }
            if self.read().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Queues one gRPC message on the open stream (with the response headers first, if not yet sent).
    pub fn send(&mut self, message: &[u8]) -> Result<(), Error> {
        let Some(stream) = self.stream.as_mut().filter(|s| s.trailers.is_none()) else {
            return Ok(());
        };
        if !stream.headers_sent {
            stream.headers_sent = true;
            let id = stream.id;
            self.queue_frame(HEADERS, END_HEADERS, id, &response_headers());
        }
        let stream = self.stream.as_mut().expect("the stream is open");
        if stream.outgoing.len() + message.len() > MAX_HELD_OUTPUT {
            return Err(Error::Stalled(stream.outgoing.len()));
        }
        grpc_frame(&mut stream.outgoing, message);
        Ok(())
    }

    /// Ends the open stream with a gRPC status (`code` 0 is OK); what was sent before goes first.
    pub fn finish(&mut self, code: i32, message: &str) {
        let Some(stream) = self.stream.as_mut().filter(|s| s.trailers.is_none()) else {
            return;
        };
        let mut block = Vec::new();
        if !stream.headers_sent {
            // A "trailers-only" response: the status in the only header block.
            block = response_headers();
            stream.headers_sent = true;
        }
        hpack_literal(&mut block, b"grpc-status", code.to_string().as_bytes());
        if !message.is_empty() {
            hpack_literal(&mut block, b"grpc-message", percent_encode(message).as_bytes());
        }
        stream.trailers = Some(block);
        stream.message = Vec::new();
    }

    /// Writes everything queued that the windows allow, and flushes.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.queue_stream_output();
        self.output.write_to(&mut self.io).await
    }

    /// Tells the client the connection is closing, flushes and shuts it down.
    pub async fn close(&mut self) {
        self.go_away(NO_ERROR, b"");
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }

    /// Parses buffered frames until one makes an event or too few bytes are left.
    fn parse(&mut self) -> Result<Option<Event>, Error> {
        loop {
            if let Some(event) = self.buffered_event() {
                return Ok(Some(event));
            }
            if !self.preface_read {
                if !PREFACE.starts_with(&self.input[..self.input.len().min(PREFACE.len())]) {
                    return Err(protocol(PROTOCOL_ERROR, "not an HTTP/2 client preface"));
                }
                if self.input.len() < PREFACE.len() {
                    return Ok(None);
                }
                self.input.drain(..PREFACE.len());
                self.preface_read = true;
            }
            let Some(head) = frame_head(&self.input) else {
                return Ok(None);
            };
            if head.length > MAX_FRAME {
                return Err(protocol(
                    FRAME_SIZE_ERROR,
                    "a frame larger than SETTINGS_MAX_FRAME_SIZE",
                ));
            }
            if self.input.len() < FRAME_HEAD + head.length {
                return Ok(None);
            }
            let input = std::mem::take(&mut self.input);
            let event = self.frame(&head, &input[FRAME_HEAD..FRAME_HEAD + head.length]);
            self.input = input;
            self.input.drain(..FRAME_HEAD + head.length);
            if self.input.is_empty() {
                self.input = Vec::new();
            }
            if let Some(event) = event? {
                return Ok(Some(event));
            }
        }
    }

    /// A whole message or the end of the open stream, from what was already received.
    fn buffered_event(&mut self) -> Option<Event> {
        let stream = self.stream.as_mut().filter(|s| s.trailers.is_none())?;
        if stream.message.len() >= 5 {
            let compressed = stream.message[0] != 0;
            let length = u32::from_be_bytes([
                stream.message[1],
                stream.message[2],
                stream.message[3],
                stream.message[4],
            ]) as usize;
            if length > self.max_message || compressed {
                stream.discarding = 5 + length;
                let dropped = stream.discarding.min(stream.message.len());
                stream.message.drain(..dropped);
                stream.discarding -= dropped;
                return Some(if compressed {
                    Event::Compressed
                } else {
                    Event::TooLarge { length }
                });
            }
            if stream.message.len() >= 5 + length {
                let rest = stream.message.split_off(5 + length);
                let mut message = std::mem::replace(&mut stream.message, rest);
                message.drain(..5);
                return Some(Event::Message(message));
            }
            return None;
        }
        if stream.received_all && stream.message.is_empty() && !stream.finished_told {
            stream.finished_told = true;
            return Some(Event::Finished);
        }
        None
    }

    fn frame(&mut self, head: &FrameHead, payload: &[u8]) -> Result<Option<Event>, Error> {
        if self.header_blocks.takes(head) {
            return match self.header_blocks.feed(head, payload)? {
                Some(whole) => self.header_block(whole.stream, whole.end_stream, &whole.block),
                None => Ok(None),
            };
        }
        match head.kind {
            DATA => self.data(head, payload),
            RST_STREAM => {
                if self.stream.as_ref().is_some_and(|s| s.id == head.stream) {
                    self.stream = None;
                    return Ok(Some(Event::Reset));
                }
                Ok(None)
            }
            SETTINGS => self.settings(head, payload),
            PING => {
                if head.length != 8 || head.stream != 0 {
                    return Err(protocol(FRAME_SIZE_ERROR, "a malformed PING"));
                }
                if head.flags & ACK == 0 {
                    self.queue_frame(PING, ACK, 0, payload);
                }
                Ok(None)
            }
            GOAWAY => {
                self.client_leaving = true;
                Ok(None)
            }
            WINDOW_UPDATE => {
                let window = if head.stream == 0 {
                    Some(&mut self.send_window)
                } else {
                    self.stream
                        .as_mut()
                        .filter(|s| s.id == head.stream)
                        .map(|s| &mut s.send_window)
                };
                if let Some(window) = window {
                    widen(window, payload)?;
                }
                Ok(None)
            }
            PUSH_PROMISE => Err(protocol(PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            _ => Ok(None),
        }
    }

    fn data(&mut self, head: &FrameHead, payload: &[u8]) -> Result<Option<Event>, Error> {
        if head.stream == 0 || head.stream > self.last_stream {
            return Err(protocol(PROTOCOL_ERROR, "DATA on a stream never opened"));
        }
        // Flow control counts the whole payload, padding included, on any stream.
        self.unreturned += head.length as u32;
        if self.unreturned >= WINDOW_UPDATE_AT {
            let increment = std::mem::take(&mut self.unreturned);
            self.queue_frame(WINDOW_UPDATE, 0, 0, &increment.to_be_bytes());
        }
        let Some(stream) = self.stream.as_mut().filter(|s| s.id == head.stream) else {
            return Ok(None);
        };
        let data = without_padding(head.flags, payload)?;
        if stream.received_all {
            return Err(protocol(PROTOCOL_ERROR, "DATA after END_STREAM"));
        }
        stream.received_all = head.flags & END_STREAM != 0;
        if stream.trailers.is_some() {
            return Ok(None);
        }
        let skipped = stream.discarding.min(data.len());
        stream.discarding -= skipped;
        stream.message.extend_from_slice(&data[skipped..]);
        stream.unreturned += head.length as u32;
        if stream.unreturned >= WINDOW_UPDATE_AT && !stream.received_all {
            let (id, increment) = (stream.id, std::mem::take(&mut stream.unreturned));
            self.queue_frame(WINDOW_UPDATE, 0, id, &increment.to_be_bytes());
        }
        Ok(None)
    }

    fn header_block(&mut self, id: u32, end_stream: bool, block: &[u8]) -> Result<Option<Event>, Error> {
        // Decoded whatever happens next: the decoder's table must follow the client's encoder.
        let path = decode_path(&mut self.decoder, block)?;
        if let Some(stream) = self.stream.as_mut().filter(|s| s.id == id) {
            // Trailers from the client: gRPC sends none, but they would end its side.
            if !end_stream {
                return Err(protocol(PROTOCOL_ERROR, "a second header block without END_STREAM"));
            }
            stream.received_all = true;
            return Ok(None);
        }
        if id.is_multiple_of(2) || id <= self.last_stream {
            return Err(protocol(PROTOCOL_ERROR, "HEADERS on a stream that cannot be opened"));
        }
        self.last_stream = id;
        if self.stream.is_some() {
            self.queue_frame(RST_STREAM, 0, id, &REFUSED_STREAM.to_be_bytes());
            return Ok(None);
        }
        self.stream = Some(Stream {
            id,
            send_window: self.peer.initial_window,
            unreturned: 0,
            message: Vec::new(),
            discarding: 0,
            received_all: end_stream,
            finished_told: false,
            headers_sent: false,
            outgoing: Vec::new(),
            trailers: None,
        });
        Ok(Some(Event::Request { path }))
    }

    fn settings(&mut self, head: &FrameHead, payload: &[u8]) -> Result<Option<Event>, Error> {
        if head.flags & ACK == 0 {
            let change = self.peer.apply(head, payload)?;
            if let Some(stream) = &mut self.stream {
                stream.send_window += change;
            }
            self.queue_frame(SETTINGS, ACK, 0, &[]);
        }
        Ok(None)
    }

    /// Frames the open stream's waiting messages as far as the windows allow, then its trailers.
    fn queue_stream_output(&mut self) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let (id, received_all) = (stream.id, stream.received_all);
        let outgoing = std::mem::take(&mut stream.outgoing);
        let window = self.send_window.min(stream.send_window).max(0) as usize;
        let sendable = outgoing.len().min(window);
        self.send_window -= sendable as i64;
        stream.send_window -= sendable as i64;
        let trailers = if sendable == outgoing.len() {
            stream.trailers.take()
        } else {
            stream.outgoing = outgoing[sendable..].to_vec();
            None
        };
        for frame in outgoing[..sendable].chunks(self.peer.max_frame) {
            self.queue_frame(DATA, 0, id, frame);
        }
        if let Some(trailers) = trailers {
            self.queue_frame(HEADERS, END_HEADERS | END_STREAM, id, &trailers);
            if !received_all {
                // Ours is the last word; the client need not send the rest (RFC 9113 §8.1).
                self.queue_frame(RST_STREAM, 0, id, &NO_ERROR.to_be_bytes());
            }
            self.stream = None;
        }
    }

    fn go_away(&mut self, code: u32, debug: &[u8]) {
        let mut payload = Vec::with_capacity(8 + debug.len());
        payload.extend_from_slice(&self.last_stream.to_be_bytes());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(debug);
        self.queue_frame(GOAWAY, 0, 0, &payload);
    }

    fn queue_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.output.frame(kind, flags, stream, payload);
    }
}

/// `:status: 200` and gRPC's content type.
fn response_headers() -> Vec<u8> {
    // 0x88 is `:status: 200` in HPACK's static table.
    let mut block = vec![0x88];
    hpack_literal(&mut block, b"content-type", b"application/grpc");
    block
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;

    const PATH: &str = "/ebb.v1.Telemetry/Report";

    /// Serves `io` as the collector would, echoing each message; refuses messages over `max` with
    /// gRPC status 11 and compressed ones with 12; ends each stream OK when the client does.
    async fn echo_server(io: DuplexStream, max: usize) -> Vec<Event> {
        let mut connection = Connection::new(io, max);
        let mut events = Vec::new();
        while let Some(event) = connection.next().await.unwrap() {
            match &event {
                Event::Request { .. } | Event::Reset => {}
                Event::Message(message) => connection.send(message).unwrap(),
                Event::TooLarge { .. } => connection.finish(11, "message length too large"),
                Event::Compressed => connection.finish(12, "compressed messages are not accepted"),
                Event::Finished => connection.finish(0, ""),
            }
            events.push(event);
            connection.flush().await.unwrap();
        }
        events
    }

    /// A task's result, failing the test if it takes more than 10 s.
    async fn within<T>(task: tokio::task::JoinHandle<T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task ends within 10 s")
            .unwrap()
    }

    fn grpc_message(body: &[u8]) -> Bytes {
        let mut framed = vec![0];
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(body);
        framed.into()
    }

    async fn h2_client(io: DuplexStream) -> h2::client::SendRequest<Bytes> {
        let (client, connection) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(connection);
        client
    }

    fn report_request() -> http::Request<()> {
        http::Request::post(format!("https://collector{PATH}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    }

    /// Reads a whole response body, returning its capacity as it goes (so the server's windows reopen).
    async fn read_body(body: &mut h2::RecvStream) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            all.extend_from_slice(&chunk);
        }
        all
    }

    #[tokio::test]
    async fn a_grpc_stream_gets_its_messages_echoed_and_an_ok_status_in_trailers() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(echo_server(server_io, 1024 * 1024));
        let mut client = h2_client(client_io).await;
        let (response, mut send) = client.send_request(report_request(), false).unwrap();
        send.send_data(grpc_message(b"hello"), false).unwrap();
        send.send_data(grpc_message(b"world"), true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let mut body = response.into_body();
        let received = read_body(&mut body).await;
        assert_eq!(received, [grpc_message(b"hello"), grpc_message(b"world")].concat());
        let trailers = body.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        drop((client, send, body));
        let events = within(server).await;
        assert_eq!(
            events,
            [
                Event::Request { path: PATH.into() },
                Event::Message(b"hello".to_vec()),
                Event::Message(b"world".to_vec()),
                Event::Finished
            ]
        );
    }

    #[tokio::test]
    async fn messages_larger_than_every_window_pass_both_ways() {
        // 200 KB each way: more than the 64 KiB windows on either side, in many frames.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let server = tokio::spawn(echo_server(server_io, 1024 * 1024));
        let mut client = h2_client(client_io).await;
        let (response, mut send) = client.send_request(report_request(), false).unwrap();
        let framed = grpc_message(&big);
        let sender = tokio::spawn(async move {
            let mut rest = framed;
            while !rest.is_empty() {
                send.reserve_capacity(rest.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .unwrap()
                    .unwrap();
                let chunk = rest.split_to(granted.min(rest.len()));
                send.send_data(chunk, rest.is_empty()).unwrap();
            }
        });
        let mut body = response.await.unwrap().into_body();
        assert_eq!(read_body(&mut body).await, grpc_message(&big));
        assert_eq!(body.trailers().await.unwrap().unwrap()["grpc-status"], "0");
        within(sender).await;
        drop((client, body));
        assert!(within(server).await.contains(&Event::Message(big)));
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused_before_its_bytes_are_kept() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(echo_server(server_io, 100));
        let mut client = h2_client(client_io).await;
        let (response, mut send) = client.send_request(report_request(), false).unwrap();
        send.send_data(grpc_message(&[7; 101]), false).unwrap();
        let response = response.await.unwrap();
        // Trailers-only: the status comes in the response headers, and the stream ends there.
        assert_eq!(response.headers()["grpc-status"], "11");
        assert_eq!(response.headers()["grpc-message"], "message length too large");
        assert!(response.into_body().is_end_stream());
        drop((client, send));
        let events = within(server).await;
        assert_eq!(events[1], Event::TooLarge { length: 101 });
        assert_eq!(events.len(), 2, "{events:?}");
    }

    /// Writes `frames` after the client preface; returns every frame the server sends until it closes.
    async fn raw_exchange(frames: &[(u8, u8, u32, Vec<u8>)]) -> (Vec<(u8, u8, u32, Vec<u8>)>, Vec<Event>) {
        let (mut client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(echo_server(server_io, 1024));
        let mut bytes = PREFACE.to_vec();
        for (kind, flags, stream, payload) in frames {
            bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
            bytes.extend_from_slice(&[*kind, *flags]);
            bytes.extend_from_slice(&stream.to_be_bytes());
            bytes.extend_from_slice(payload);
        }
        client_io.write_all(&bytes).await.unwrap();
        client_io.shutdown().await.unwrap();
        let mut received = Vec::new();
        client_io.read_to_end(&mut received).await.unwrap();
        let mut frames = Vec::new();
        let mut at = 0;
        while let Some(head) = frame_head(&received[at..]) {
            let payload = received[at + FRAME_HEAD..at + FRAME_HEAD + head.length].to_vec();
            frames.push((head.kind, head.flags, head.stream, payload));
            at += FRAME_HEAD + head.length;
        }
        (frames, within(server).await)
    }

    fn request_block() -> Vec<u8> {
        let mut block = Vec::new();
        hpack_literal(&mut block, b":method", b"POST");
        hpack_literal(&mut block, b":path", PATH.as_bytes());
        block
    }

    #[tokio::test]
    async fn settings_and_pings_are_acknowledged_and_a_second_stream_is_refused() {
        let (frames, events) = raw_exchange(&[
            (
                SETTINGS,
                0,
                0,
                [&SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes()[..], &1000u32.to_be_bytes()].concat(),
            ),
            (PING, 0, 0, b"12345678".to_vec()),
            (HEADERS, END_HEADERS, 1, request_block()),
            (HEADERS, END_HEADERS, 3, request_block()),
            (DATA, END_STREAM, 1, grpc_message(b"x").to_vec()),
        ])
        .await;
        let kinds: Vec<(u8, u8, u32)> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(frames[0].3, [0, 3, 0, 0, 0, 1], "MAX_CONCURRENT_STREAMS 1");
        for expected in [
            (SETTINGS, ACK, 0),
            (PING, ACK, 0),
            (RST_STREAM, 0, 3),
            (HEADERS, END_HEADERS, 1),
            (DATA, 0, 1),
            (HEADERS, END_HEADERS | END_STREAM, 1),
        ] {
            assert!(kinds.contains(&expected), "{expected:?} in {kinds:?}");
        }
        let ping = frames.iter().find(|f| f.0 == PING).unwrap();
        assert_eq!(ping.3, b"12345678");
        let refused = frames.iter().find(|f| f.0 == RST_STREAM).unwrap();
        assert_eq!(refused.3, REFUSED_STREAM.to_be_bytes());
        assert_eq!(events.iter().filter(|e| matches!(e, Event::Request { .. })).count(), 1);
    }

    #[tokio::test]
    async fn a_header_block_may_continue_and_padding_is_removed() {
        let block = request_block();
        let (first, rest) = block.split_at(10);
        let mut padded_headers = vec![3];
        padded_headers.extend_from_slice(first);
        padded_headers.extend_from_slice(&[0; 3]);
        let mut padded_data = vec![2];
        padded_data.extend_from_slice(&grpc_message(b"abc"));
        padded_data.extend_from_slice(&[0; 2]);
        let (_, events) = raw_exchange(&[
            (HEADERS, PADDED, 1, padded_headers),
            (CONTINUATION, END_HEADERS, 1, rest.to_vec()),
            (DATA, PADDED | END_STREAM, 1, padded_data),
        ])
        .await;
        assert_eq!(
            events,
            [
                Event::Request { path: PATH.into() },
                Event::Message(b"abc".to_vec()),
                Event::Finished
            ]
        );
    }

    #[tokio::test]
    async fn a_protocol_error_ends_the_connection_with_goaway() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = Connection::new(server_io, 1024);
            connection.next().await
        });
        let mut client_io = client_io;
        let mut bytes = PREFACE.to_vec();
        // DATA on a stream that was never opened.
        bytes.extend_from_slice(&[0, 0, 1, DATA, 0, 0, 0, 0, 5, 0]);
        client_io.write_all(&bytes).await.unwrap();
        let error = within(server).await.unwrap_err();
        assert!(
            matches!(
                error,
                Error::Protocol {
                    code: PROTOCOL_ERROR,
                    ..
                }
            ),
            "{error}"
        );
        let mut received = Vec::new();
        client_io.read_to_end(&mut received).await.unwrap();
        let settings_length = FRAME_HEAD + 6;
        assert_eq!(received[settings_length + 3], GOAWAY);
    }

    /// What [`Connection::read_first_request`] makes of `bytes`, and what it would hand back.
    async fn first_request(bytes: &[u8]) -> (FirstRequest, Vec<u8>) {
        let (mut client_io, server_io) = tokio::io::duplex(64 * 1024);
        client_io.write_all(bytes).await.unwrap();
        let mut connection = Connection::new(server_io, 1024);
        let decided = connection.read_first_request(Duration::from_millis(50)).await;
        (decided, connection.into_parts().1)
    }

    #[tokio::test]
    async fn the_first_request_is_told_from_its_first_bytes_or_not_at_all() {
        let mut bytes = PREFACE.to_vec();
        assert_eq!(first_request(&bytes[..10]).await.0, FirstRequest::Undecided);
        assert_eq!(
            first_request(b"GET / HTTP/1.1\r\n\r\n").await.0,
            FirstRequest::Unreadable
        );
        bytes.extend_from_slice(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
        assert_eq!(first_request(&bytes).await, (FirstRequest::Undecided, bytes.clone()));
        let block = request_block();
        bytes.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
        bytes.extend_from_slice(&[HEADERS, END_HEADERS, 0, 0, 0, 1]);
        assert_eq!(
            first_request(&bytes).await,
            (FirstRequest::Undecided, bytes.clone()),
            "block not yet here; every byte read is handed back"
        );
        bytes.extend_from_slice(&block);
        assert_eq!(
            first_request(&bytes).await,
            (FirstRequest::Path(PATH.into()), bytes.clone()),
            "a request another server may take: all of it is handed back"
        );
    }

    #[tokio::test]
    async fn the_first_request_found_while_deciding_is_the_first_event() {
        let (mut client_io, server_io) = tokio::io::duplex(64 * 1024);
        let mut bytes = PREFACE.to_vec();
        let block = request_block();
        bytes.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
        bytes.extend_from_slice(&[HEADERS, END_HEADERS | END_STREAM, 0, 0, 0, 1]);
        bytes.extend_from_slice(&block);
        client_io.write_all(&bytes).await.unwrap();
        let mut connection = Connection::new(server_io, 1024);
        let decided = connection.read_first_request(Duration::from_secs(10)).await;
        assert_eq!(decided, FirstRequest::Path(PATH.into()));
        assert_eq!(
            connection.next().await.unwrap(),
            Some(Event::Request { path: PATH.into() })
        );
        assert_eq!(connection.next().await.unwrap(), Some(Event::Finished));
    }

    #[test]
    fn response_headers_decode_with_a_standard_decoder() {
        let mut block = response_headers();
        let long = "a message longer than one hundred and twenty-seven bytes, so that its length needs more than the prefix of seven bits: ünïcode %";
        hpack_literal(&mut block, b"grpc-message", percent_encode(long).as_bytes());
        let headers = Decoder::new().decode(&block).unwrap();
        assert_eq!(headers[0], (b":status".to_vec(), b"200".to_vec()));
        assert_eq!(headers[1], (b"content-type".to_vec(), b"application/grpc".to_vec()));
        let encoded = String::from_utf8(headers[2].1.clone()).unwrap();
        assert!(encoded.ends_with("%C3%BCn%C3%AFcode %25"), "{encoded}");
        assert!(encoded.len() > 127);
    }
}
