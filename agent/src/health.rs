//! The HTTP health check: `GET` a URL; a status in the expected range within the timeout is healthy,
//! anything else is unhealthy with the reason. The whole exchange (resolve, connect, request, response
//! head) runs under one timeout, so a server that never answers costs one timeout and never a hang. Each
//! check connects afresh (a server that stops accepting connections fails it) and closes with a reset.

use std::time::Duration;

use ebb_proto::v1::HealthCheck;
use ebb_proto::v1::health_check::Status;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A health-check URL that cannot be used.
#[derive(Debug, Error, PartialEq)]
#[error("health-check URL `{url}` is not usable: {reason}")]
pub struct UrlError {
    url: String,
    reason: &'static str,
}

/// What to check, parsed once from the configured URL.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthTarget {
    /// `host:port` to connect to.
    pub authority: String,
    pub path: String,
    /// The request, built once: it is the same every check.
    request: String,
    pub timeout: Duration,
    /// Inclusive range of healthy status codes.
    pub healthy_statuses: (u16, u16),
}

impl HealthTarget {
    /// Parses `http://host[:port][/path]`. HTTPS is not supported by the agent's check.
    pub fn parse(url: &str, timeout: Duration, healthy_statuses: (u16, u16)) -> Result<Self, UrlError> {
        let error = |reason| UrlError {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| error("only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(error("no host"));
        }
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
            && !authority.ends_with(']');
        Ok(Self {
            authority: if has_port {
                authority.to_string()
            } else {
                format!("{authority}:80")
            },
            path: path.to_string(),
            request: format!(
                "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ebb-agent\r\nConnection: close\r\n\r\n"
            ),
            timeout,
            healthy_statuses,
        })
    }

    /// Runs the check once.
    pub async fn check(&self) -> HealthCheck {
        let started = tokio::time::Instant::now();
        let outcome = tokio::time::timeout(self.timeout, self.fetch_status()).await;
        let latency_ms = started.elapsed().as_millis().min(u32::MAX as u128) as u32;
        let (status, reason) = match outcome {
            Err(_) => (
                Status::Unhealthy,
                format!("no answer within {} ms", self.timeout.as_millis()),
            ),
            Ok(Err(e)) => (Status::Unhealthy, e),
            Ok(Ok(code)) if (self.healthy_statuses.0..=self.healthy_statuses.1).contains(&code) => {
                (Status::Healthy, String::new())
            }
            Ok(Ok(code)) => (
                Status::Unhealthy,
                format!(
                    "status {code}, expected {}-{}",
                    self.healthy_statuses.0, self.healthy_statuses.1
                ),
            ),
        };
        HealthCheck {
            status: status as i32,
            reason,
            latency_ms,
        }
    }

    async fn fetch_status(&self) -> Result<u16, String> {
        let mut stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.authority))?;
        stream
            .write_all(self.request.as_bytes())
            .await
            .map_err(|e| format!("cannot send the request: {e}"))?;
        // The status line, from the first 1 KiB of the response.
        let mut head = [0u8; 1024];
        let mut len = 0;
        while len < head.len() && !head[..len].contains(&b'\n') {
            match stream.read(&mut head[len..]).await {
                Ok(0) => break,
                Ok(read) => len += read,
                Err(e) => return Err(format!("cannot read the response: {e}")),
            }
        }
        // Done with the connection: close it with a reset, as load balancers close their checks. The web
        // server then keeps no TIME_WAIT socket per check (one a second at the default interval), and
        // neither kernel runs the closing handshake.
        let _ = stream.set_zero_linger();
        drop(stream);
        let status_line = String::from_utf8_lossy(head[..len].split(|b| *b == b'\n').next().unwrap_or_default());
        parse_status_line(&status_line).ok_or_else(|| {
            format!(
                "not an HTTP response: `{}`",
                status_line.trim_end().chars().take(60).collect::<String>()
            )
        })
    }
}

fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// The report for an agent without a configured check.
pub fn not_configured() -> HealthCheck {
    HealthCheck {
        status: Status::NotConfigured as i32,
        reason: String::new(),
        latency_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const HEALTHY: (u16, u16) = (200, 399);

    #[test]
    fn parses_urls() {
        let target = HealthTarget::parse("http://127.0.1.3:8080/health", Duration::from_secs(1), HEALTHY).unwrap();
        assert_eq!(target.authority, "127.0.1.3:8080");
        assert_eq!(target.path, "/health");
        let target = HealthTarget::parse("http://web", Duration::from_secs(1), HEALTHY).unwrap();
        assert_eq!((target.authority.as_str(), target.path.as_str()), ("web:80", "/"));
        assert_eq!(
            target.request,
            "GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: ebb-agent\r\nConnection: close\r\n\r\n"
        );
        assert!(HealthTarget::parse("https://web/", Duration::from_secs(1), HEALTHY).is_err());
        assert!(HealthTarget::parse("http:///x", Duration::from_secs(1), HEALTHY).is_err());
    }

    /// Serves one canned answer per connection.
    async fn server(answer: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{address}/health")
    }

    #[tokio::test]
    async fn healthy_and_unhealthy_statuses() {
        let ok = server("HTTP/1.1 204 No Content\r\n\r\n").await;
        let target = HealthTarget::parse(&ok, Duration::from_secs(2), HEALTHY).unwrap();
        assert_eq!(target.check().await.status, Status::Healthy as i32);

        let failing = server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let result = HealthTarget::parse(&failing, Duration::from_secs(2), HEALTHY)
            .unwrap()
            .check()
            .await;
        assert_eq!(result.status, Status::Unhealthy as i32);
        assert_eq!(result.reason, "status 503, expected 200-399");

        let garbage = server("SSH-2.0-OpenSSH\r\n").await;
        let result = HealthTarget::parse(&garbage, Duration::from_secs(2), HEALTHY)
            .unwrap()
            .check()
            .await;
        assert!(result.reason.starts_with("not an HTTP response"), "{}", result.reason);
    }

    #[tokio::test]
    async fn a_status_line_split_over_several_packets_is_read_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            for part in ["HTTP/1.1 2", "04 No Content", "\r\n\r\n"] {
                socket.write_all(part.as_bytes()).await.unwrap();
                socket.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let result = HealthTarget::parse(&url, Duration::from_secs(5), HEALTHY)
            .unwrap()
            .check()
            .await;
        assert_eq!(result.status, Status::Healthy as i32, "{}", result.reason);
    }

    #[tokio::test]
    async fn the_check_closes_its_connection_with_a_reset() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            // What the server sees after its answer: a reset, not an orderly end of stream.
            socket.read(&mut request).await.map_err(|e| e.kind())
        });
        let result = HealthTarget::parse(&url, Duration::from_secs(5), HEALTHY)
            .unwrap()
            .check()
            .await;
        assert_eq!(result.status, Status::Healthy as i32, "{}", result.reason);
        let after_answer = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after_answer, Err(std::io::ErrorKind::ConnectionReset));
    }

    #[tokio::test]
    async fn refused_connection_is_unhealthy() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        drop(listener);
        let result = HealthTarget::parse(&url, Duration::from_secs(2), HEALTHY)
            .unwrap()
            .check()
            .await;
        assert_eq!(result.status, Status::Unhealthy as i32);
        assert!(result.reason.contains("cannot connect"), "{}", result.reason);
    }

    #[tokio::test]
    async fn a_server_that_never_answers_costs_one_timeout() {
        // Accepts connections and reads, but never writes.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let target = HealthTarget::parse(&url, Duration::from_millis(300), HEALTHY).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(30), target.check())
            .await
            .expect("the check returns after its own timeout instead of hanging");
        assert_eq!(result.status, Status::Unhealthy as i32);
        assert_eq!(result.reason, "no answer within 300 ms");
    }
}
