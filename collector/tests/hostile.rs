//! Hostile members and strangers against a real collector on loopback, while a real agent streams: each attack
//! gets the stated answer, the collector's memory stays bounded, and the agent's samples keep arriving.
//!
//! The HTTP/2 frames of the attacks are written by hand here (a few bytes each, RFC 9113 and RFC 7541), so
//! that they can break the rules no real client breaks.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Harness, report};
use ebb_proto::v1::{ReportRequest, Sample, SampleBatch, report_request, report_response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const PROTOCOL_ERROR: u32 = 0x1;

/// The memory the test process may gain during one attack (the collector runs in it). The attacks this
/// bounds took the collector from 15 MB to 1.46 GB (HPACK) and 461 MB (PING flood) before.
const RSS_GROWTH_MAX_MB: u64 = 150;

/// The floods take the machine's cores and measure the process's memory: under `cargo test`, where the tests
/// of this file share one process, they run one at a time.
static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `high`.
fn hpack_integer(high: u8, n: u32, value: u64, out: &mut Vec<u8>) {
    let max = (1u64 << n) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

fn hpack_string(value: &[u8], out: &mut Vec<u8>) {
    hpack_integer(0, 7, value.len() as u64, out);
    out.extend_from_slice(value);
}

/// A gRPC request's header block for `path`, every field a literal without indexing.
fn request_headers(path: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x87]; // :method POST, :scheme https (static table)
    block.push(0x04); // :path, name from the static table
    hpack_string(path.as_bytes(), &mut block);
    block.push(0x01); // :authority
    hpack_string(b"collector", &mut block);
    hpack_integer(0, 4, 31, &mut block); // content-type
    hpack_string(b"application/grpc", &mut block);
    block.push(0x00); // a new name
    hpack_string(b"te", &mut block);
    hpack_string(b"trailers", &mut block);
    block
}

/// One gRPC message as it goes in DATA frames: the 5-byte prefix, then the message.
fn grpc_message(request: &ReportRequest) -> Vec<u8> {
    let bytes = prost::Message::encode_to_vec(request);
    let mut framed = vec![0u8];
    framed.extend((bytes.len() as u32).to_be_bytes());
    framed.extend(bytes);
    framed
}

fn batch_of(seq: u64) -> ReportRequest {
    ReportRequest {
        message: Some(report_request::Message::Batch(SampleBatch {
            samples: vec![Sample {
                seq,
                timestamp_ms: ebb_agent::now_ms(),
                cpu_busy_percent: Some(5.0),
                ..Sample::default()
            }],
        })),
    }
}

/// A Report stream's opening on stream 1: its headers, the Hello of `member` (run 1) and sample 1.
fn report_start(member: &str) -> Vec<u8> {
    let mut body = grpc_message(&ReportRequest {
        message: Some(report_request::Message::Hello(ebb_proto::v1::Hello {
            member_id: member.to_string(),
            run_id: 1,
            ..Default::default()
        })),
    });
    body.extend(grpc_message(&batch_of(1)));
    let mut request = frame(HEADERS, END_HEADERS, 1, &request_headers("/ebb.v1.Telemetry/Report"));
    request.extend(frame(DATA, 0, 1, &body));
    request
}

/// What the attacker's connection heard from the collector.
#[derive(Default, Debug)]
struct Heard {
    goaway: Option<u32>,
    closed: bool,
}

/// A hand-driven HTTP/2 connection: the preface and SETTINGS exchanged, then frames written as the test
/// likes while a task reads what comes back.
struct Raw {
    writer: tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    heard: Arc<std::sync::Mutex<Heard>>,
    reading: Option<tokio::task::JoinHandle<()>>,
}

impl Raw {
    async fn open(h: &Harness, client: Option<(&str, &str)>, read: bool) -> Self {
        Self::open_with(h, client, read, &[]).await
    }

    /// [`Raw::open`], sending `settings` (SETTINGS payload: 2-byte ids, 4-byte values).
    async fn open_with(h: &Harness, client: Option<(&str, &str)>, read: bool, settings: &[u8]) -> Self {
        let mut tls = h.tls(h.collector.grpc_address, client).await;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        tls.write_all(&frame(SETTINGS, 0, 0, settings)).await.unwrap();
        // The collector's SETTINGS, acknowledged as a client must.
        loop {
            let mut head = [0u8; 9];
            tls.read_exact(&mut head).await.unwrap();
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; length];
            tls.read_exact(&mut payload).await.unwrap();
            if head[3] == SETTINGS && head[4] & ACK == 0 {
                break;
            }
        }
        tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
        let (mut reader, writer) = tokio::io::split(tls);
        let heard = Arc::new(std::sync::Mutex::new(Heard::default()));
        let reading = read.then(|| {
            let heard = heard.clone();
            tokio::spawn(async move {
                loop {
                    let mut head = [0u8; 9];
                    if reader.read_exact(&mut head).await.is_err() {
                        break;
                    }
                    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; length];
                    if reader.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                    if head[3] == GOAWAY && payload.len() >= 8 {
                        heard.lock().unwrap().goaway =
                            Some(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
                    }
                }
                heard.lock().unwrap().closed = true;
            })
        });
        Self { writer, heard, reading }
    }

    /// Writes `bytes`; false once the collector no longer takes them (closed, or stopped reading for 5 s).
    async fn send(&mut self, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.writer.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// Waits up to `wait` for the collector to close the connection; what it said before.
    async fn closed_within(&mut self, wait: Duration) -> Heard {
        let reading = self.reading.take().expect("a reading connection");
        let _ = tokio::time::timeout(wait, reading).await;
        std::mem::take(&mut *self.heard.lock().unwrap())
    }
}

/// A real member streaming a sample every 100 ms on its own connection, and the highest sequence acknowledged.
struct RealAgent {
    acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RealAgent {
    async fn start(h: &Harness) -> Self {
        let member = h.enroll().await;
        let channel = h
            .channel(h.collector.grpc_address, Some((&member.cert_pem, &member.key_pem)))
            .await;
        let (mut responses, requests) = report(channel, &member.member_id).await.unwrap();
        let acked = Arc::new(AtomicU64::new(0));
        let seen = acked.clone();
        let task = tokio::spawn(async move {
            let mut seq = 1u64;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        seq += 1;
                        let sample = Sample { seq, timestamp_ms: ebb_agent::now_ms(), cpu_busy_percent: Some(20.0), ..Sample::default() };
                        let batch = ReportRequest { message: Some(report_request::Message::Batch(SampleBatch { samples: vec![sample] })) };
                        if requests.send(batch).await.is_err() { return; }
                    }
                    message = responses.message() => match message {
                        Ok(Some(message)) => if let Some(report_response::Message::Ack(ack)) = message.message {
                            seen.fetch_max(ack.highest_seq, Ordering::Relaxed);
                        },
                        _ => return,
                    }
                }
            }
        });
        let agent = Self { acked, task };
        agent.keeps_reporting("before the attack").await;
        agent
    }

    /// Ten more samples acknowledged within 10 s.
    async fn keeps_reporting(&self, when: &str) {
        let before = self.acked.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.acked.load(Ordering::Relaxed) < before + 10 {
            assert!(
                Instant::now() < deadline && !self.task.is_finished(),
                "the real agent's samples stopped being acknowledged {when} (at {before})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_table_size_bomb_is_refused_and_costs_no_memory() {
    let _one_at_a_time = FLOODS.lock().await;
    let h = Harness::start("").await;
    let agent = RealAgent::start(&h).await;
    let member = h.enroll().await;
    let client = Some((member.cert_pem.as_str(), member.key_pem.as_str()));
    // The same request without the bomb is served: the refusal below is the table size's.
    let mut control = Raw::open(&h, client, true).await;
    assert!(
        control
            .send(&frame(
                HEADERS,
                END_HEADERS,
                1,
                &request_headers("/ebb.v1.Telemetry/Report")
            ))
            .await
    );
    assert!(!control.closed_within(Duration::from_secs(1)).await.closed);

    let rss_before = rss_mb();
    // Three connections, each: a dynamic table size update to 2^28, then header fields of 15 KB each, to be
    // added to that table.
    let value = vec![b'a'; 15 * 1024];
    for _ in 0..3 {
        let mut attacker = Raw::open(&h, client, true).await;
        let mut streams = 0;
        for i in 0..2000u32 {
            let mut block = Vec::new();
            if i == 0 {
                hpack_integer(0x20, 5, 1 << 28, &mut block);
            }
            block.extend(request_headers("/ebb.v1.Telemetry/Report"));
            block.push(0x40); // literal with incremental indexing, a new name
            hpack_string(format!("x-bomb-{i}").as_bytes(), &mut block);
            hpack_string(&value, &mut block);
            if !attacker.send(&frame(HEADERS, END_HEADERS, 2 * i + 1, &block)).await {
                break;
            }
            streams += 1;
        }
        let heard = attacker.closed_within(Duration::from_secs(10)).await;
        assert!(heard.closed, "the collector closes the connection");
        assert_eq!(
            heard.goaway,
            Some(PROTOCOL_ERROR),
            "h2 refuses the size update: {heard:?}"
        );
        assert!(streams < 2000, "all {streams} header blocks were taken");
    }
    let grown = rss_mb().saturating_sub(rss_before);
    assert!(grown < RSS_GROWTH_MAX_MB, "the collector grew by {grown} MB");
    agent.keeps_reporting("after an HPACK bomb").await;
    h.collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_before_any_request_costs_no_memory_and_starves_no_one() {
    let _one_at_a_time = FLOODS.lock().await;
    let h = Harness::start("").await;
    let agent = RealAgent::start(&h).await;
    let rss_before = rss_mb();
    // Without a certificate, and never reading the answers: 300,000 PINGs (5 MB), 1,000 to a write.
    let mut attacker = Raw::open(&h, None, false).await;
    let pings: Vec<u8> = (0..1000u64).flat_map(|i| frame(PING, 0, 0, &i.to_be_bytes())).collect();
    let started = Instant::now();
    let mut sent = 0;
    while sent < 300 && started.elapsed() < Duration::from_secs(15) {
        if !attacker.send(&pings).await {
            break;
        }
        sent += 1;
    }
    let grown = rss_mb().saturating_sub(rss_before);
    assert!(
        grown < RSS_GROWTH_MAX_MB,
        "the collector grew by {grown} MB after {sent}k PINGs"
    );
    agent.keeps_reporting("during a PING flood").await;
    let metrics = scrape_metrics(&h).await;
    assert!(metrics.contains("ebb_agents_connected 1"), "{metrics}");
    h.collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_closes_the_connection() {
    let _one_at_a_time = FLOODS.lock().await;
    let h = Harness::start("").await;
    let agent = RealAgent::start(&h).await;
    let member = h.enroll().await;
    let mut attacker = Raw::open(&h, Some((&member.cert_pem, &member.key_pem)), true).await;
    let headers = request_headers("/ebb.v1.Telemetry/Report");
    let mut streams = 0u32;
    for i in 0..100_000u32 {
        let id = 2 * i + 1;
        let mut pair = frame(HEADERS, END_HEADERS, id, &headers);
        pair.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes())); // CANCEL
        if !attacker.send(&pair).await {
            break;
        }
        streams += 1;
    }
    let heard = attacker.closed_within(Duration::from_secs(10)).await;
    assert!(
        heard.closed,
        "the collector closes the connection after {streams} streams"
    );
    let budget = h.metric("ebb_requests_refused_total{service=\"grpc\",reason=\"stream_budget\"}");
    assert!(
        heard.goaway == Some(ENHANCE_YOUR_CALM) || budget >= 1,
        "closed for rapid reset ({heard:?}, stream budget refusals {budget})"
    );
    assert!(streams < 100_000, "every one of {streams} streams was taken");
    agent.keeps_reporting("after rapid reset").await;
    h.collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_streams_past_the_budget_closes_the_connection() {
    let h = Harness::start("").await;
    let member = h.enroll().await;
    let mut attacker = Raw::open(&h, Some((&member.cert_pem, &member.key_pem)), true).await;
    // Health checks, each a whole request, one after another: more than a connection may open.
    let headers = request_headers("/grpc.health.v1.Health/Check");
    for i in 0..300u32 {
        let id = 2 * i + 1;
        let mut request = frame(HEADERS, END_HEADERS, id, &headers);
        request.extend(frame(DATA, END_STREAM, id, &[0, 0, 0, 0, 0]));
        if !attacker.send(&request).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let heard = attacker.closed_within(Duration::from_secs(10)).await;
    assert!(heard.closed, "the connection is closed");
    assert!(
        h.metric("ebb_requests_refused_total{service=\"grpc\",reason=\"stream_budget\"}") >= 1,
        "{}",
        h.collector.metrics.render()
    );
    h.collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_continuation_frames_is_refused() {
    let _one_at_a_time = FLOODS.lock().await;
    let h = Harness::start("").await;
    let agent = RealAgent::start(&h).await;
    let mut attacker = Raw::open(&h, None, true).await;
    assert!(
        attacker
            .send(&frame(HEADERS, 0, 1, &request_headers("/ebb.v1.Enrollment/Enroll")))
            .await
    );
    let empty: Vec<u8> = (0..10_000).flat_map(|_| frame(CONTINUATION, 0, 1, &[])).collect();
    let mut sent = 0;
    while sent < 2_000 {
        if !attacker.send(&empty).await {
            break;
        }
        sent += 1;
    }
    let heard = attacker.closed_within(Duration::from_secs(10)).await;
    assert!(heard.closed, "closed after {sent}0,000 CONTINUATION frames");
    assert_eq!(heard.goaway, Some(ENHANCE_YOUR_CALM), "{heard:?}");
    assert!(sent < 2_000, "all 20 M frames were taken");
    agent.keeps_reporting("after a CONTINUATION flood").await;
    h.collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_open_no_stream_are_closed() {
    let h = Harness::start("").await;
    let agent = RealAgent::start(&h).await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(h.tls(h.collector.grpc_address, None).await);
    }
    let started = Instant::now();
    for mut connection in idle {
        let mut byte = [0u8; 1];
        // The server's SETTINGS and GOAWAY, then the end.
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match connection.read(&mut byte).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "an idle connection is still open after {:?}",
            started.elapsed()
        );
    }
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed too early to be the idle deadline"
    );
    assert!(h.metric("ebb_requests_refused_total{service=\"grpc\",reason=\"idle_connection\"}") >= 20);
    agent.keeps_reporting("after idle connections").await;
    h.collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_trickled_in_ends_its_stream_at_the_deadline() {
    let h = Harness::start("").await;
    let member = h.enroll().await;
    let tls = h
        .tls(h.collector.grpc_address, Some((&member.cert_pem, &member.key_pem)))
        .await;
    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post("https://collector/ebb.v1.Telemetry/Report")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let hello = prost::Message::encode_to_vec(&ReportRequest {
        message: Some(report_request::Message::Hello(ebb_proto::v1::Hello {
            member_id: member.member_id.clone(),
            run_id: 7,
            ..Default::default()
        })),
    });
    let mut message = vec![0u8];
    message.extend((hello.len() as u32).to_be_bytes());
    message.extend(hello);
    // Then the start of a message of 255 KiB, of which a little arrives every 500 ms.
    message.extend([0u8, 0, 3, 0xfc, 0]);
    body.send_data(message.into(), false).unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..120 {
            if body.send_data(bytes::Bytes::from(vec![0u8; 100]), false).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let started = Instant::now();
    let mut answers = response.await.unwrap().into_body();
    let trailers = tokio::time::timeout(Duration::from_secs(40), async {
        while answers.data().await.is_some() {}
        answers.trailers().await
    })
    .await
    .expect("the stream ends within 40 s")
    .unwrap()
    .expect("trailers with a status");
    assert_eq!(trailers["grpc-status"], "4", "DEADLINE_EXCEEDED: {trailers:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        h.metric("ebb_requests_refused_total{service=\"report\",reason=\"message_deadline\"}"),
        1
    );
    trickle.abort();
    h.collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_ones_are_refused_and_the_admin_api_still_answers() {
    let h = Harness::start("max_connections = 10").await;
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(tokio::net::TcpStream::connect(h.collector.grpc_address).await.unwrap());
    }
    // The eleventh is closed at once.
    let mut eleventh = tokio::net::TcpStream::connect(h.collector.grpc_address).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(3), eleventh.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(h.metric("ebb_requests_refused_total{service=\"grpc\",reason=\"connection_limit\"}") >= 1);
    // Operators are not locked out.
    let (cert, key) = h.admin_identity();
    let admin = h.channel(h.collector.admin_address.unwrap(), Some((&cert, &key))).await;
    let groups = ebb_proto::v1::admin_client::AdminClient::new(admin)
        .list_groups(ebb_proto::v1::ListGroupsRequest::default())
        .await
        .unwrap();
    assert_eq!(groups.into_inner().groups.len(), 2);
    assert!(scrape_metrics(&h).await.contains("connection_limit"));
    // Places come back as connections go.
    drop(held);
    common::wait_until("a place is free", || {
        std::net::TcpStream::connect(h.collector.grpc_address).is_ok_and(|mut s| {
            use std::io::Read;
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            // Held open (no EOF) until the handshake deadline: accepted.
            matches!(s.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
    })
    .await;
    h.collector.shutdown().await;
}

/// Waits until `ebb_agents_connected` is `count`, failing after `within`.
async fn agents_connected_becomes(h: &Harness, count: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while h.metric("ebb_agents_connected ") != count {
        assert!(
            Instant::now() < deadline,
            "ebb_agents_connected is {}, not {count}, after {within:?}",
            h.metric("ebb_agents_connected ")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/metrics` over HTTP, as Prometheus scrapes it.
async fn scrape_metrics(h: &Harness) -> String {
    let mut tcp = tokio::net::TcpStream::connect(h.collector.http_address).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut text))
        .await
        .expect("/metrics answers within 10 s")
        .unwrap();
    text
}

/// A member whose VM froze or whose network drops everything: its connection stays open at the TCP level
/// but sends and answers nothing. The stream's message deadline (or HTTP/2 keepalive, whichever comes
/// first) ends it, and `ebb_agents_connected` counts it no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_answering_is_dropped_and_no_longer_counted() {
    let h = Harness::start("").await;
    let member = h.enroll().await;
    let mut frozen = Raw::open(&h, Some((&member.cert_pem, &member.key_pem)), false).await;
    assert!(frozen.send(&report_start(&member.member_id)).await);
    agents_connected_becomes(&h, 1, Duration::from_secs(10)).await;
    // From now on it reads and writes nothing: no samples, and the keepalive PINGs go unanswered.
    agents_connected_becomes(&h, 0, Duration::from_secs(75)).await;
    drop(frozen);
    h.collector.shutdown().await;
}

/// A member that keeps sending samples but lets the collector send nothing back (a zero flow-control window)
/// and answers no PING: it is not held forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_zero_window_is_not_held_forever() {
    let h = Harness::start("").await;
    let member = h.enroll().await;
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: no DATA may come back on any stream.
    let settings = [0, 4, 0, 0, 0, 0];
    let mut stuck = Raw::open_with(&h, Some((&member.cert_pem, &member.key_pem)), false, &settings).await;
    assert!(stuck.send(&report_start(&member.member_id)).await);
    agents_connected_becomes(&h, 1, Duration::from_secs(10)).await;
    let started = Instant::now();
    let mut seq = 2;
    let closed = loop {
        if h.metric("ebb_agents_connected ") == 0 && seq > 10 {
            break true;
        }
        if started.elapsed() > Duration::from_secs(75) {
            break false;
        }
        // Samples keep coming, so no message deadline ends it.
        let _ = stuck.send(&frame(DATA, 0, 1, &grpc_message(&batch_of(seq)))).await;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(closed, "still connected after {:?}", started.elapsed());
    h.collector.shutdown().await;
}
