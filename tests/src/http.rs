//! Just enough HTTP/1.1 for the fake clouds: read one request, answer it, relay one to a real server.

use std::collections::BTreeMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub struct Request {
    pub method: String,
    pub target: String,
    pub body: String,
    /// The request as it came, to relay it.
    pub raw: Vec<u8>,
}

/// One message's bytes: its head, then as many bytes as its Content-Length says.
async fn read_message(stream: &mut (impl AsyncRead + Unpin)) -> Option<(Vec<u8>, usize)> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_end, length) = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&chunk[..n]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            break (end + 4, length);
        }
    };
    while data.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&chunk[..n]);
    }
    Some((data, head_end))
}

pub async fn read_request(stream: &mut (impl AsyncRead + Unpin)) -> Option<Request> {
    let (raw, head_end) = read_message(stream).await?;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut words = head.split_whitespace();
    let method = words.next()?.to_string();
    let target = words.next()?.to_string();
    let body = String::from_utf8_lossy(&raw[head_end..]).into_owned();
    Some(Request {
        method,
        target,
        body,
        raw,
    })
}

/// Sends `request` to `upstream` and returns its answer's status and bytes (its Content-Length honoured).
pub async fn relay(upstream: std::net::SocketAddr, request: &Request) -> Option<(u16, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(upstream).await.ok()?;
    stream.write_all(&request.raw).await.ok()?;
    let (answer, head_end) = read_message(&mut stream).await?;
    let head = String::from_utf8_lossy(&answer[..head_end]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, answer))
}

pub async fn respond(stream: &mut (impl AsyncWrite + Unpin), status: u16, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// `a=1&b=x%20y` as a map, decoded.
pub fn form(text: &str) -> BTreeMap<String, String> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn url_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves one connection.
pub type Handler =
    std::sync::Arc<dyn Fn(tokio::net::TcpStream) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A loopback server on its own thread and runtime, so it serves async tests and plain ones alike; stopped,
/// with the local stand-ins it ran, when dropped.
pub struct Background {
    pub address: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    pub fn start(
        handler: Handler,
        local: Option<std::sync::Arc<ebb_collector::providers::local::LocalProvider>>,
    ) -> Self {
        use ebb_collector::providers::Provider;
        let (ready, address) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                ready.send(listener.local_addr().unwrap()).unwrap();
                let serve = async {
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(handler(stream));
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
                if let Some(local) = local {
                    local.close().await;
                }
            });
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        });
        Self {
            address: address.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
