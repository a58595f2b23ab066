//! The wire pieces both ends of ebb's own HTTP/2 share: the collector's Report server
//! (`collector/src/http2.rs`) and the agent's gRPC client (`agent/src/grpc.rs`).
//!
//! Only what RFC 9113 (HTTP/2), RFC 7541 (HPACK, the literal forms we write) and gRPC over HTTP/2 fix, with
//! no state: the frame layout, the codes, writing a frame, reading what a connection has, and
//! `grpc-message`'s percent-encoding. Each end keeps its own connection state and HPACK decoder.

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const FRAME_HEAD: usize = 9;
/// The largest frame payload before the peer raises it: the protocol's default, which ebb never raises.
pub const MAX_FRAME: usize = 16_384;
/// Every window starts at this size (RFC 9113 §6.9.2).
pub const INITIAL_WINDOW: i64 = 65_535;
/// Consumed bytes are given back to the peer's windows once this many have gathered.
pub const WINDOW_UPDATE_AT: u32 = 32_768;
/// The largest header block accepted (a gRPC call's are a few hundred bytes).
pub const MAX_HEADER_BLOCK: usize = 16_384;
/// Bytes asked of the connection per read.
const READ_CHUNK: usize = 4096;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The peer broke the protocol: the HTTP/2 error `code` to send it, and what it did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Violation {
    pub code: u32,
    pub message: &'static str,
}

pub fn violation(code: u32, message: &'static str) -> Violation {
    Violation { code, message }
}

pub struct FrameHead {
    pub length: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

/// The head of the frame `bytes` starts with, if they hold a whole head.
pub fn frame_head(bytes: &[u8]) -> Option<FrameHead> {
    let head = bytes.get(..FRAME_HEAD)?;
    Some(FrameHead {
        length: usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]),
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
    })
}

/// Appends one frame to `output`.
pub fn write_frame(output: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let length = (payload.len() as u32).to_be_bytes();
    output.extend_from_slice(&length[1..]);
    output.push(kind);
    output.push(flags);
    output.extend_from_slice(&stream.to_be_bytes());
    output.extend_from_slice(payload);
}

/// Frames waiting to be written, and how much of them is written (released once all are).
#[derive(Default)]
pub struct Output {
    bytes: Vec<u8>,
    written: usize,
}

impl Output {
    /// Bytes to go first, before any frame (a client's preface).
    pub fn starting_with(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.to_vec(),
            written: 0,
        }
    }

    /// Queues one frame.
    pub fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        write_frame(&mut self.bytes, kind, flags, stream, payload);
    }

    /// Writes everything queued to `io` and flushes it. Cancel-safe: what is not yet written stays queued.
    pub async fn write_to<Io: AsyncWrite + Unpin>(&mut self, io: &mut Io) -> io::Result<()> {
        if self.bytes.is_empty() {
            return Ok(());
        }
        while self.written < self.bytes.len() {
            let n = io.write(&self.bytes[self.written..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.written += n;
        }
        io.flush().await?;
        *self = Self::default();
        Ok(())
    }
}

/// A SETTINGS payload from `(identifier, value)` pairs.
pub fn settings_payload(settings: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(6 * settings.len());
    for (id, value) in settings {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    payload
}

/// The `(identifier, value)` pairs of a SETTINGS payload.
pub fn parse_settings(payload: &[u8]) -> Result<impl Iterator<Item = (u16, u32)> + '_, Violation> {
    if !payload.len().is_multiple_of(6) {
        return Err(violation(FRAME_SIZE_ERROR, "a malformed SETTINGS"));
    }
    Ok(payload.chunks_exact(6).map(|setting| {
        (
            u16::from_be_bytes([setting[0], setting[1]]),
            u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]),
        )
    }))
}

/// The increment of a WINDOW_UPDATE payload.
pub fn window_increment(payload: &[u8]) -> Result<i64, Violation> {
    let bytes: [u8; 4] = payload
        .try_into()
        .map_err(|_| violation(FRAME_SIZE_ERROR, "a malformed WINDOW_UPDATE"))?;
    Ok(i64::from(u32::from_be_bytes(bytes) & 0x7fff_ffff))
}

/// What the peer's SETTINGS said that matters for sending to it.
pub struct PeerSettings {
    /// `SETTINGS_INITIAL_WINDOW_SIZE`: each new stream's send window.
    pub initial_window: i64,
    /// `SETTINGS_MAX_FRAME_SIZE`: the largest frame it takes.
    pub max_frame: usize,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            initial_window: INITIAL_WINDOW,
            max_frame: MAX_FRAME,
        }
    }
}

impl PeerSettings {
    /// Applies a SETTINGS frame that is not an ACK (RFC 9113 §6.5.2); returns how much every open stream's
    /// send window changes. The caller then acknowledges it.
    pub fn apply(&mut self, head: &FrameHead, payload: &[u8]) -> Result<i64, Violation> {
        if head.stream != 0 {
            return Err(violation(PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        let mut change = 0;
        for (id, value) in parse_settings(payload)? {
            match id {
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    if value > i32::MAX as u32 {
                        return Err(violation(
                            FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE beyond 2^31-1",
                        ));
                    }
                    change += i64::from(value) - self.initial_window;
                    self.initial_window = i64::from(value);
                }
                SETTINGS_MAX_FRAME_SIZE => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return Err(violation(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range"));
                    }
                    self.max_frame = value as usize;
                }
                _ => {}
            }
        }
        Ok(change)
    }
}

/// Adds a WINDOW_UPDATE's increment to the send `window` it names.
pub fn widen(window: &mut i64, payload: &[u8]) -> Result<(), Violation> {
    *window += window_increment(payload)?;
    if *window > i64::from(i32::MAX) {
        return Err(violation(FLOW_CONTROL_ERROR, "a window beyond 2^31-1"));
    }
    Ok(())
}

/// A whole header block and the stream it is for.
pub struct HeaderBlock<'a> {
    pub stream: u32,
    /// The HEADERS frame ended the stream.
    pub end_stream: bool,
    pub block: Cow<'a, [u8]>,
}

/// Puts header blocks together from a HEADERS frame and the CONTINUATION frames after it.
#[derive(Default)]
pub struct HeaderBlocks {
    partial: Option<(u32, bool, Vec<u8>)>,
}

impl HeaderBlocks {
    /// Whether `head` belongs here: a HEADERS or CONTINUATION frame, or any frame while a block is
    /// unfinished (which only its CONTINUATION may interrupt).
    pub fn takes(&self, head: &FrameHead) -> bool {
        self.partial.is_some() || head.kind == HEADERS || head.kind == CONTINUATION
    }

    /// Takes a frame [`HeaderBlocks::takes`]; gives the block once it is whole.
    pub fn feed<'a>(&mut self, head: &FrameHead, payload: &'a [u8]) -> Result<Option<HeaderBlock<'a>>, Violation> {
        let Some((stream, end_stream, mut fragment)) = self.partial.take() else {
            if head.kind == CONTINUATION {
                return Err(violation(PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
            }
            if head.stream == 0 {
                return Err(violation(PROTOCOL_ERROR, "HEADERS on stream 0"));
            }
            let block = header_fragment(head.flags, payload)?;
            let end_stream = head.flags & END_STREAM != 0;
            if head.flags & END_HEADERS == 0 {
                self.partial = Some((head.stream, end_stream, block.to_vec()));
                return Ok(None);
            }
            return Ok(Some(HeaderBlock {
                stream: head.stream,
                end_stream,
                block: Cow::Borrowed(block),
            }));
        };
        if head.kind != CONTINUATION || head.stream != stream {
            return Err(violation(PROTOCOL_ERROR, "a header block interrupted"));
        }
        if fragment.len() + payload.len() > MAX_HEADER_BLOCK {
            return Err(violation(ENHANCE_YOUR_CALM, "a header block too large"));
        }
        fragment.extend_from_slice(payload);
        if head.flags & END_HEADERS == 0 {
            self.partial = Some((stream, end_stream, fragment));
            return Ok(None);
        }
        Ok(Some(HeaderBlock {
            stream,
            end_stream,
            block: Cow::Owned(fragment),
        }))
    }
}

/// The header block fragment of a HEADERS frame's payload, without padding and priority.
fn header_fragment(flags: u8, payload: &[u8]) -> Result<&[u8], Violation> {
    let fragment = without_padding(flags, payload)?;
    if flags & PRIORITY == 0 {
        return Ok(fragment);
    }
    fragment
        .get(5..)
        .ok_or(violation(FRAME_SIZE_ERROR, "HEADERS too short for its priority"))
}

/// A frame's payload without its padding (RFC 9113 §6.1), if it is padded.
pub fn without_padding(flags: u8, payload: &[u8]) -> Result<&[u8], Violation> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let (&padding, rest) = payload
        .split_first()
        .ok_or(violation(FRAME_SIZE_ERROR, "a padded frame without its pad length"))?;
    rest.len()
        .checked_sub(usize::from(padding))
        .map(|length| &rest[..length])
        .ok_or(violation(PROTOCOL_ERROR, "padding longer than the frame"))
}

/// Reads what `io` has into `input`, through a buffer on the stack: a connection waiting for its next
/// frame holds no buffer. `Ok(0)` at the end of the stream. Cancel-safe.
pub async fn read_into<Io: AsyncRead + Unpin>(io: &mut Io, input: &mut Vec<u8>) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut chunk = [0u8; READ_CHUNK];
        let mut buf = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut *io).poll_read(cx, &mut buf))?;
        input.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    })
    .await
}

/// Appends `message` to `output` as one gRPC message: uncompressed, with its 5-byte prefix.
pub fn grpc_frame(output: &mut Vec<u8>, message: &[u8]) {
    output.push(0);
    output.extend_from_slice(&(message.len() as u32).to_be_bytes());
    output.extend_from_slice(message);
}

/// A header as an HPACK literal with a new name, never indexed (RFC 7541 §6.2.2), without Huffman coding.
pub fn hpack_literal(block: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    block.push(0x10);
    for string in [name, value] {
        hpack_integer(block, string.len(), 7);
        block.extend_from_slice(string);
    }
}

/// An HPACK integer with a `prefix_bits` prefix in a new byte (RFC 7541 §5.1).
fn hpack_integer(block: &mut Vec<u8>, value: usize, prefix_bits: u32) {
    let limit = (1usize << prefix_bits) - 1;
    if value < limit {
        block.push(value as u8);
        return;
    }
    block.push(limit as u8);
    let mut rest = value - limit;
    while rest >= 128 {
        block.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    block.push(rest as u8);
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII, and `%` itself.
pub fn percent_encode(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// A `grpc-message` as sent; a `%` not followed by two hex digits stays as it is.
pub fn percent_decode(encoded: &[u8]) -> String {
    let mut decoded = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        let escaped = encoded
            .get(i + 1..i + 3)
            .filter(|_| encoded[i] == b'%')
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(encoded[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_percent_encoding() {
        let message = "token 'x' has expired: 100% sure, ünïcode\n";
        let encoded = percent_encode(message);
        assert!(encoded.bytes().all(|b| (0x20..0x7f).contains(&b)), "{encoded}");
        assert_eq!(percent_decode(encoded.as_bytes()), message);
        assert_eq!(percent_decode(b"50% off %zz"), "50% off %zz");
    }

    #[test]
    fn a_frame_reads_back_as_written() {
        let mut output = Vec::new();
        write_frame(&mut output, WINDOW_UPDATE, 0, 3, &70_000u32.to_be_bytes());
        let head = frame_head(&output).unwrap();
        assert_eq!(
            (head.length, head.kind, head.flags, head.stream),
            (4, WINDOW_UPDATE, 0, 3)
        );
        assert_eq!(window_increment(&output[FRAME_HEAD..]), Ok(70_000));
        assert!(frame_head(&output[..8]).is_none());
    }

    #[test]
    fn settings_read_back_and_a_torn_payload_is_refused() {
        let payload = settings_payload(&[(SETTINGS_ENABLE_PUSH, 0), (SETTINGS_MAX_FRAME_SIZE, 1 << 20)]);
        let settings: Vec<_> = parse_settings(&payload).unwrap().collect();
        assert_eq!(
            settings,
            [(SETTINGS_ENABLE_PUSH, 0), (SETTINGS_MAX_FRAME_SIZE, 1 << 20)]
        );
        assert!(parse_settings(&payload[..5]).is_err());
    }

    #[test]
    fn hpack_integers_continue_past_their_prefix() {
        let mut block = Vec::new();
        hpack_integer(&mut block, 1337, 5);
        // RFC 7541 §C.1.2.
        assert_eq!(block, [31, 154, 10]);
    }
}
