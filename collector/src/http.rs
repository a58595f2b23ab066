//! The HTTP client for every call the collector makes out (lifecycle hooks; the cloud APIs): rustls with
//! the system's CA certificates plus any the operator names, and bounded timeouts, so a dead endpoint
//! never holds a group.

use std::path::Path;
use std::time::Duration;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole request may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client trusting the system's CAs and, if given, the PEM certificates in `extra_ca`.
pub fn client(extra_ca: Option<&Path>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("ebb-collector/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    if let Some(path) = extra_ca {
        let pem = crate::config::read_operator_file(path, crate::config::MAX_SMALL_FILE_BYTES)
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| format!("{} holds no PEM certificate: {e}", path.display()))?;
        if certificates.is_empty() {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build()
        .map_err(|e| format!("cannot set up the HTTP client: {e}"))
}

/// The most of a cloud API's answer ebb reads: far above any real answer (a CloudStack listing of thousands of
/// VMs is a few MB), low enough that a broken or hostile endpoint cannot make the collector run out of memory.
pub const MAX_ANSWER_BYTES: usize = 32 << 20;

/// Why an answer's body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    #[error("the answer is larger than {} KiB; ebb stops reading there", .0 / 1024)]
    TooLarge(usize),
}

/// `response`'s body as text (invalid UTF-8 replaced), at most `limit` bytes: past it, an error, having
/// buffered no more than `limit` and one chunk.
pub async fn text_capped(mut response: reqwest::Response, limit: usize) -> Result<String, BodyError> {
    if response.content_length().is_some_and(|length| length > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `value` percent-encoded for a query string or form: RFC 3986's unreserved characters stay, every other
/// byte of the UTF-8 is `%XX`.
pub fn encode(value: &str) -> String {
    percent_encode(value, |b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// `value` with every byte that `keep` refuses written `%XX` (upper-case hex).
pub fn percent_encode(value: &str, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The host (and port, if given) of `url`, to name where a failed call went; never the path or query,
/// which may hold a signature.
pub fn host_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_string(),
            (None, _) => "(no host)".into(),
        },
        Err(_) => "(not a URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one answer of `body_bytes` bytes on loopback, chunked (no length announced) or with its length.
    async fn serve_once(body_bytes: usize, chunked: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let head = if chunked {
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {body_bytes}\r\n\r\n")
            };
            let _ = socket.write_all(head.as_bytes()).await;
            let mut left = body_bytes;
            while left > 0 {
                let n = left.min(4096);
                let piece = "x".repeat(n);
                let data = if chunked {
                    format!("{n:x}\r\n{piece}\r\n")
                } else {
                    piece
                };
                if socket.write_all(data.as_bytes()).await.is_err() {
                    return;
                }
                left -= n;
            }
            if chunked {
                let _ = socket.write_all(b"0\r\n\r\n").await;
            }
        });
        format!("http://{address}/")
    }

    #[tokio::test]
    async fn an_answer_past_the_cap_is_refused_whether_announced_or_not() {
        let client = super::client(None).unwrap();
        for chunked in [true, false] {
            let url = serve_once(10_000, chunked).await;
            let response = client.get(&url).send().await.unwrap();
            assert_eq!(super::text_capped(response, 20_000).await.unwrap().len(), 10_000);
            let url = serve_once(100_000, chunked).await;
            let response = client.get(&url).send().await.unwrap();
            let error = super::text_capped(response, 20_000).await.unwrap_err();
            assert!(matches!(error, super::BodyError::TooLarge(20_000)), "{error}");
            assert_eq!(
                error.to_string(),
                "the answer is larger than 19 KiB; ebb stops reading there"
            );
        }
    }

    /// A peer that announces a body and then trickles it is cut off by the client's request timeout, which
    /// covers the body as well as the head: reading an answer is bounded in time, not only in size.
    #[tokio::test]
    async fn a_trickling_answer_ends_at_the_request_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                .await;
            for _ in 0..1000 {
                if socket.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        });
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(500))
            .build()
            .unwrap();
        let response = client.get(format!("http://{address}/")).send().await.unwrap();
        let error = super::text_capped(response, 20_000).await.unwrap_err();
        // Without the timeout the whole body would arrive (in 50 s) and the read succeed.
        assert!(
            matches!(&error, super::BodyError::Transport(e) if e.is_timeout()),
            "{error:?}"
        );
    }

    #[test]
    fn host_of_names_host_and_port_only() {
        assert_eq!(
            super::host_of("https://ec2.us-east-1.amazonaws.com/"),
            "ec2.us-east-1.amazonaws.com"
        );
        assert_eq!(
            super::host_of("http://127.0.0.1:8080/client/api?signature=secret"),
            "127.0.0.1:8080"
        );
        assert_eq!(super::host_of("nonsense"), "(not a URL)");
    }
}
