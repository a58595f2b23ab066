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

    /// The Prometheus text exposition: every family of [`FAMILIES`], in order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for family in FAMILIES {
            write_family(&mut out, family, &(family.series)(self));
        }
        out
    }
}

/// Whether a family only grows or goes up and down.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// One series of a family: its labels and its value.
type Series = (Vec<(&'static str, String)>, f64);

/// One metric family: its name, kind and help, and how its series are read.
struct Family {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    series: fn(&Metrics) -> Vec<Series>,
}

/// A family with a single unlabelled series.
fn one(value: f64) -> Vec<Series> {
    vec![(Vec::new(), value)]
}

/// Every metric the collector exposes, in the order `/metrics` lists them.
const FAMILIES: &[Family] = &[
    Family {
        name: "ebb_samples_ingested_total",
        kind: Kind::Counter,
        help: "Samples validated and stored.",
        series: |m| one(m.samples_ingested.load(Ordering::Relaxed) as f64),
    },
    Family {
        name: "ebb_samples_duplicate_total",
        kind: Kind::Counter,
        help: "Samples dropped because their sequence number was already stored (replays).",
        series: |m| one(m.samples_duplicate.load(Ordering::Relaxed) as f64),
    },
    Family {
        name: "ebb_store_errors_total",
        kind: Kind::Counter,
        help: "Reads and writes of the store that failed (disk full, unwritable); each is also logged at ERROR.",
        series: |m| one(m.store_errors.load(Ordering::Relaxed) as f64),
    },
    Family {
        name: "ebb_samples_rejected_total",
        kind: Kind::Counter,
        help: "Samples refused by validation, by reason; never stored.",
        series: |m| {
            let rejected = m.samples_rejected.lock().expect("metrics lock");
            rejected
                .iter()
                .map(|(reason, count)| (vec![("reason", reason.to_string())], *count as f64))
                .collect()
        },
    },
    Family {
        name: "ebb_agents_connected",
        kind: Kind::Gauge,
        help: "Agents with an open telemetry stream.",
        series: |m| one(m.agents_connected.load(Ordering::Relaxed) as f64),
    },
    Family {
        name: "ebb_enrollments_total",
        kind: Kind::Counter,
        help: "Certificates issued to enrolling agents.",
        series: |m| one(m.enrollments.load(Ordering::Relaxed) as f64),
    },
    Family {
        name: "ebb_requests_refused_total",
        kind: Kind::Counter,
        help: "Requests refused for their credentials (token, certificate, identity, rate), by service and reason.",
        series: |m| {
            let refused = m.refused.lock().expect("metrics lock");
            refused
                .iter()
                .map(|((service, reason), count)| {
                    let labels = vec![("service", service.to_string()), ("reason", reason.to_string())];
                    (labels, *count as f64)
                })
                .collect()
        },
    },
    Family {
        name: "ebb_group_desired_capacity",
        kind: Kind::Gauge,
        help: "Members the group should have.",
        series: |m| per_group(m, |g| g.desired),
    },
    Family {
        name: "ebb_group_in_service",
        kind: Kind::Gauge,
        help: "Members registered with the load balancer.",
        series: |m| per_group(m, |g| g.in_service),
    },
    Family {
        name: "ebb_group_pending",
        kind: Kind::Gauge,
        help: "Members launched but not yet in service.",
        series: |m| per_group(m, |g| g.pending),
    },
    Family {
        name: "ebb_group_metric",
        kind: Kind::Gauge,
        help: "Aggregated member metrics over the last 10 s, by name.",
        series: |m| {
            let groups = m.groups.lock().expect("metrics lock");
            groups
                .iter()
                .flat_map(|(group, gauges)| {
                    gauges
                        .values
                        .iter()
                        .map(move |(name, value)| (vec![("group", group.clone()), ("name", name.to_string())], *value))
                })
                .collect()
        },
    },
    Family {
        name: "ebb_activities_total",
        kind: Kind::Counter,
        help: "Scaling and lifecycle activities, by kind and outcome.",
        series: |m| {
            let activities = m.activities.lock().expect("metrics lock");
            activities
                .iter()
                .map(|((group, kind, outcome), count)| {
                    let labels = vec![
                        ("group", group.clone()),
                        ("kind", kind.to_string()),
                        ("outcome", outcome.to_string()),
                    ];
                    (labels, *count as f64)
                })
                .collect()
        },
    },
];

/// One of each group's capacity gauges.
fn per_group(metrics: &Metrics, gauge: fn(&GroupGauges) -> u32) -> Vec<Series> {
    let groups = metrics.groups.lock().expect("metrics lock");
    groups
        .iter()
        .map(|(group, gauges)| (vec![("group", group.clone())], f64::from(gauge(gauges))))
        .collect()
}

/// Writes one family in the Prometheus text format, label values escaped.
fn write_family(out: &mut String, family: &Family, series: &[Series]) {
    let kind = match family.kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
    };
    let _ = writeln!(
        out,
        "# HELP {} {}\n# TYPE {} {kind}",
        family.name, family.help, family.name
    );
    for (labels, value) in series {
        out.push_str(family.name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(name, value)| format!("{name}=\"{}\"", escape_label(value)))
                .collect();
            let _ = write!(out, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(out, " {value}");
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn escape_label(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', "\\n")
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

    /// Every family is announced once with its type, counters end in `_total`, and each series line
    /// belongs to the family announced before it.
    #[test]
    fn each_family_is_announced_once_and_its_series_follow_it() {
        let metrics = Metrics::default();
        metrics.sample_rejected("future");
        metrics.refused("enroll", "token");
        metrics.activity("web", "launch", "ok");
        let mut values = BTreeMap::new();
        values.insert("cpu_avg_percent", 42.5);
        metrics.set_group(
            "web",
            GroupGauges {
                desired: 3,
                in_service: 2,
                pending: 1,
                values,
            },
        );
        let text = metrics.render();
        let mut announced = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
                assert!(!announced.contains(&name), "{name} announced twice");
                announced.push(name);
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(Some(&name), announced.last(), "{line} outside its family");
            }
        }
        assert_eq!(announced.len(), FAMILIES.len());
        for expected in [
            "ebb_samples_rejected_total{reason=\"future\"} 1",
            "ebb_requests_refused_total{service=\"enroll\",reason=\"token\"} 1",
            "ebb_group_desired_capacity{group=\"web\"} 3",
            "ebb_group_in_service{group=\"web\"} 2",
            "ebb_group_pending{group=\"web\"} 1",
            "ebb_group_metric{group=\"web\",name=\"cpu_avg_percent\"} 42.5",
            "ebb_activities_total{group=\"web\",kind=\"launch\",outcome=\"ok\"} 1",
            "ebb_agents_connected 0",
        ] {
            assert!(text.lines().any(|l| l == expected), "{expected} missing from\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
