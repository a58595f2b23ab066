//! The collector's own metrics, in the Prometheus text format at `GET /metrics` on the HTTP port.
//! Label sets stay small and bounded: rejection reasons, group names, activity kinds and outcomes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Per-group gauges, replaced after every evaluation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupGauges {
    pub desired: u32,
    pub in_service: u32,
    pub pending: u32,
    /// Aggregated metric values by name (`cpu_avg_percent`, ...).
    pub values: BTreeMap<&'static str, f64>,
}

#[derive(Debug, Default)]
pub struct Metrics {
    samples_ingested: AtomicU64,
    samples_duplicate: AtomicU64,
    store_errors: AtomicU64,
    samples_rejected: Mutex<BTreeMap<&'static str, u64>>,
    agents_connected: AtomicI64,
    enrollments: AtomicU64,
    refused: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    groups: Mutex<BTreeMap<String, GroupGauges>>,
    activities: Mutex<BTreeMap<(String, &'static str, &'static str), u64>>,
}

impl Metrics {
    pub fn sample_ingested(&self) {
        self.samples_ingested.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sample_duplicate(&self) {
        self.samples_duplicate.fetch_add(1, Ordering::Relaxed);
    }

    pub fn store_error(&self) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sample_rejected(&self, reason: &'static str) {
        *self
            .samples_rejected
            .lock()
            .expect("metrics lock")
            .entry(reason)
            .or_default() += 1;
    }

    pub fn enrolled(&self) {
        self.enrollments.fetch_add(1, Ordering::Relaxed);
    }

    /// A request refused for who made it: `service` is `enroll`, `renew`, `report` or `admin`.
    pub fn refused(&self, service: &'static str, reason: &'static str) {
        *self
            .refused
            .lock()
            .expect("metrics lock")
            .entry((service, reason))
            .or_default() += 1;
    }

    /// Counts a connected agent until the returned guard is dropped.
    pub fn agent_connected(self: &Arc<Self>) -> ConnectedAgent {
        self.agents_connected.fetch_add(1, Ordering::Relaxed);
        ConnectedAgent(self.clone())
    }

    pub fn set_group(&self, group: &str, gauges: GroupGauges) {
        self.groups
            .lock()
            .expect("metrics lock")
            .insert(group.to_string(), gauges);
    }

    pub fn activity(&self, group: &str, kind: &'static str, outcome: &'static str) {
        *self
            .activities
            .lock()
            .expect("metrics lock")
            .entry((group.to_string(), kind, outcome))
            .or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "ebb_samples_ingested_total",
            "counter",
            "Samples validated and stored.",
        );
        let _ = writeln!(
            out,
            "ebb_samples_ingested_total {}",
            self.samples_ingested.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "ebb_samples_duplicate_total",
            "counter",
            "Samples dropped because their sequence number was already stored (replays).",
        );
        let _ = writeln!(
            out,
            "ebb_samples_duplicate_total {}",
            self.samples_duplicate.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "ebb_store_errors_total",
            "counter",
            "Reads and writes of the store that failed (disk full, unwritable); each is also logged at ERROR.",
        );
        let _ = writeln!(
            out,
            "ebb_store_errors_total {}",
            self.store_errors.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "ebb_samples_rejected_total",
            "counter",
            "Samples refused by validation, by reason; never stored.",
        );
        for (reason, count) in self.samples_rejected.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "ebb_samples_rejected_total{{reason=\"{reason}\"}} {count}");
        }
        header(
            &mut out,
            "ebb_agents_connected",
            "gauge",
            "Agents with an open telemetry stream.",
        );
        let _ = writeln!(
            out,
            "ebb_agents_connected {}",
            self.agents_connected.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "ebb_enrollments_total",
            "counter",
            "Certificates issued to enrolling agents.",
        );
        let _ = writeln!(
            out,
            "ebb_enrollments_total {}",
            self.enrollments.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "ebb_requests_refused_total",
            "counter",
            "Requests refused for their credentials (token, certificate, identity, rate), by service and reason.",
        );
        for ((service, reason), count) in self.refused.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "ebb_requests_refused_total{{service=\"{service}\",reason=\"{reason}\"}} {count}"
            );
        }
        let groups = self.groups.lock().expect("metrics lock").clone();
        let capacity_gauges: [(&str, &str, GaugeOf); 3] = [
            ("ebb_group_desired_capacity", "Members the group should have.", |g| {
                g.desired
            }),
            (
                "ebb_group_in_service",
                "Members registered with the load balancer.",
                |g| g.in_service,
            ),
            ("ebb_group_pending", "Members launched but not yet in service.", |g| {
                g.pending
            }),
        ];
        for (name, help, value) in capacity_gauges {
            header(&mut out, name, "gauge", help);
            for (group, gauges) in &groups {
                let _ = writeln!(out, "{name}{{group=\"{group}\"}} {}", value(gauges));
            }
        }
        header(
            &mut out,
            "ebb_group_metric",
            "gauge",
            "Aggregated member metrics over the last 10 s, by name.",
        );
        for (group, gauges) in &groups {
            for (name, value) in &gauges.values {
                let _ = writeln!(out, "ebb_group_metric{{group=\"{group}\",name=\"{name}\"}} {value}");
            }
        }
        header(
            &mut out,
            "ebb_activities_total",
            "counter",
            "Scaling and lifecycle activities, by kind and outcome.",
        );
        for ((group, kind, outcome), count) in self.activities.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "ebb_activities_total{{group=\"{group}\",kind=\"{kind}\",outcome=\"{outcome}\"}} {count}"
            );
        }
        out
    }
}

/// Reads one gauge of a group.
type GaugeOf = fn(&GroupGauges) -> u32;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Decrements the connected-agents gauge when dropped.
pub struct ConnectedAgent(Arc<Metrics>);

impl Drop for ConnectedAgent {
    fn drop(&mut self) {
        self.0.agents_connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads a request head: everything up to the blank line, at most 8 KiB; `None` if the client stops early.
async fn read_head(socket: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buffer).await.ok().filter(|&n| n > 0)?;
        head.extend_from_slice(&buffer[..n]);
        if head.len() > 8192 {
            return None;
        }
    }
    Some(head)
}

/// Serves `GET /metrics` (and 404 for anything else) until the listener's task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let Ok(Some(head)) = tokio::time::timeout(std::time::Duration::from_secs(5), read_head(&mut socket)).await
            else {
                return;
            };
            let head = String::from_utf8_lossy(&head);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, content_type, body) =
                if head.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
                    ("200 OK", "text/plain; version=0.0.4", metrics.render())
                } else {
                    (
                        "404 Not Found",
                        "text/plain",
                        "Only GET /metrics is served here.\n".to_string(),
                    )
                };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    /// A request written in pieces (as `write!` does) is read whole before it is answered.
    #[tokio::test]
    async fn a_request_in_pieces_is_read_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(Metrics::default())));
        let mut client = TcpStream::connect(address).await.unwrap();
        for piece in ["GET ", "/metrics", " HTTP/1.1\r\n", "Host: x\r\n", "\r\n"] {
            client.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut response = String::new();
        client.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("ebb_agents_connected 0"), "{response}");
    }
}
