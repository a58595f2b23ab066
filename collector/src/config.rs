//! The collector's configuration (`/etc/ebb/collector.toml`): schema, defaults and validation.
//! Unknown keys are errors; validation reports every problem with its key path, never just one.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::engine::{Comparison, Metric, Policy, Statistic};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/ebb/collector.toml";

/// The example that `gen-config` prints and `demo` runs; `examples/local.toml` is the same file.
pub const LOCAL_EXAMPLE: &str = include_str!("../../examples/local.toml");

/// A configuration that cannot be used; the message says where and what to change.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type.
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    /// Well-formed but unusable values; one line per problem.
    #[error("{path}: invalid configuration:\n  {}", problems.join("\n  "))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC over TLS: agents' enrolment and telemetry.
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    /// The Admin API (TLS, an admin certificate required) on a Unix socket; default `<state_dir>/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// The Admin API on TCP as well, for operators on other machines; off unless set.
    pub admin_listen: Option<SocketAddr>,
    /// HTTP: Prometheus `/metrics`.
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    /// The URL agents connect to; default: `https://` + the gRPC listen address.
    pub advertise_url: Option<String>,
    /// The CA, its key and the admin certificate live here (owner-only files).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Names and addresses in the server certificate; agents connect to one of them.
    #[serde(default = "default_tls_names")]
    pub tls_names: Vec<String>,
    /// The operator's CA certificate and key (PEM), instead of the collector's own.
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// Lifetime of member certificates; agents renew at about two thirds of it.
    #[serde(default = "default_member_cert_lifetime_secs")]
    pub member_cert_lifetime_secs: u32,
    /// How long the join token minted for each launch is good for.
    #[serde(default = "default_launch_token_ttl_secs")]
    pub launch_token_ttl_secs: u32,
    /// Enrolment attempts allowed per remote address per minute.
    #[serde(default = "default_enrollments_per_minute")]
    pub enrollments_per_minute: u32,
}

impl ServerConfig {
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("admin.sock"))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        toml::from_str("").expect("every server key has a default")
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    pub min_size: u32,
    pub max_size: u32,
    /// The capacity at start; default `min_size`.
    pub desired_capacity: Option<u32>,
    /// After a scaling activity, no policy scales the group again for this long.
    #[serde(default = "default_cooldown_secs")]
    pub cooldown_secs: u32,
    /// A member's metrics count in the group's aggregates only once it has been in service this long.
    #[serde(default = "default_warmup_secs")]
    pub warmup_secs: u32,
    /// The sampling interval the collector asks this group's agents to use.
    #[serde(default = "default_agent_interval_secs")]
    pub agent_interval_secs: u32,
    /// Port the members serve on; the load balancer forwards to it.
    #[serde(default = "default_member_port")]
    pub member_port: u16,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    pub provider: ProviderConfig,
    pub load_balancer: LoadBalancerConfig,
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
}

/// The HTTP check each member's agent runs against its own service.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: default_health_path(),
            timeout_ms: default_health_timeout_ms(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProviderConfig {
    /// Instances are local process groups; see `providers::local`.
    Local(LocalProviderConfig),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalProviderConfig {
    /// The instance's program and arguments. `{address}`, `{port}`, `{member_id}` and `{ebb_collector}`
    /// (this executable) are replaced. Default: the built-in CPU-burning HTTP workload.
    #[serde(default = "default_local_command")]
    pub command: Vec<String>,
    /// Instances get the addresses `<address_prefix>.1` to `<address_prefix>.254`, one each.
    #[serde(default = "default_address_prefix")]
    pub address_prefix: String,
    /// The agent to start beside each instance; default: `ebb-agent` next to this executable.
    pub agent_path: Option<PathBuf>,
    /// The CPUs each instance's agent measures against (an instance is a VM of this many vCPUs).
    #[serde(default = "default_instance_cpus")]
    pub instance_cpus: f64,
    /// After SIGTERM, how long an instance has before SIGKILL.
    #[serde(default = "default_stop_grace_secs")]
    pub stop_grace_secs: u32,
    /// If set, each instance's and agent's standard error go to `<log_dir>/<member_id>.{workload,agent}.log`.
    pub log_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LoadBalancerConfig {
    /// The built-in TCP round-robin balancer; see `lb::builtin`.
    Builtin { listen: SocketAddr },
}

/// A threshold alarm and the step it takes; the engine's [`Policy`] with config defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    pub metric: Metric,
    #[serde(default = "default_statistic")]
    pub statistic: Statistic,
    pub period_secs: u32,
    #[serde(default = "default_evaluation_periods")]
    pub evaluation_periods: u32,
    /// How many of the evaluation periods must breach; default all of them.
    pub datapoints_to_alarm: Option<u32>,
    pub comparison: Comparison,
    pub threshold: f64,
    /// Members to add (positive) or remove (negative) when the alarm fires.
    pub adjustment: i32,
}

impl PolicyConfig {
    pub fn to_policy(&self) -> Policy {
        Policy {
            name: self.name.clone(),
            metric: self.metric,
            statistic: self.statistic,
            period_secs: self.period_secs,
            evaluation_periods: self.evaluation_periods,
            datapoints_to_alarm: self.datapoints_to_alarm.unwrap_or(self.evaluation_periods),
            comparison: self.comparison,
            threshold: self.threshold,
            adjustment: self.adjustment,
        }
    }
}

fn default_grpc_listen() -> SocketAddr {
    "127.0.0.1:7300".parse().unwrap()
}
fn default_http_listen() -> SocketAddr {
    "127.0.0.1:7301".parse().unwrap()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/ebb")
}
fn default_tls_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_member_cert_lifetime_secs() -> u32 {
    24 * 3600
}
fn default_launch_token_ttl_secs() -> u32 {
    30 * 60
}
fn default_enrollments_per_minute() -> u32 {
    600
}
fn default_cooldown_secs() -> u32 {
    300
}
fn default_warmup_secs() -> u32 {
    60
}
fn default_agent_interval_secs() -> u32 {
    1
}
fn default_member_port() -> u16 {
    80
}
fn default_health_path() -> String {
    "/health".into()
}
fn default_health_timeout_ms() -> u32 {
    2000
}
fn default_local_command() -> Vec<String> {
    [
        "{ebb_collector}",
        "workload",
        "--listen",
        "{address}:{port}",
        "--member-id",
        "{member_id}",
    ]
    .map(String::from)
    .to_vec()
}
fn default_address_prefix() -> String {
    "127.0.1".into()
}
fn default_instance_cpus() -> f64 {
    1.0
}
fn default_stop_grace_secs() -> u32 {
    10
}
fn default_statistic() -> Statistic {
    Statistic::Avg
}
fn default_evaluation_periods() -> u32 {
    1
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<CollectorConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and validates configuration text; `path` only names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<CollectorConfig, ConfigError> {
    let syntax = |message: String| ConfigError::Syntax {
        path: path.to_path_buf(),
        message,
    };
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| syntax(e.to_string()))?;
    let config: CollectorConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let line = e
            .inner()
            .span()
            .map(|span| format!("line {}: ", text[..span.start].matches('\n').count() + 1))
            .unwrap_or_default();
        syntax(format!("{line}key `{}`: {}", e.path(), e.inner().message()))
    })?;
    let problems = config.problems();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }
}

impl CollectorConfig {
    /// Every problem the types cannot catch, each with its key path.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(url) = &self.server.advertise_url
            && !url.starts_with("http://")
            && !url.starts_with("https://")
        {
            problems.push(format!(
                "server.advertise_url: must start with http:// or https://, not `{url}`"
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, group) in self.groups.iter().enumerate() {
            let at = format!("groups[{i}]");
            if group.name.is_empty()
                || !group
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(format!(
                    "{at}.name: `{}` must be letters, digits, `-` or `_`",
                    group.name
                ));
            }
            if !names.insert(&group.name) {
                problems.push(format!("{at}.name: `{}` is used by an earlier group", group.name));
            }
            if group.min_size > group.max_size {
                problems.push(format!(
                    "{at}.min_size: {} is greater than max_size {}",
                    group.min_size, group.max_size
                ));
            }
            if let Some(desired) = group.desired_capacity
                && !(group.min_size..=group.max_size).contains(&desired)
            {
                problems.push(format!(
                    "{at}.desired_capacity: {desired} is outside min_size..max_size ({}..{})",
                    group.min_size, group.max_size
                ));
            }
            if group.agent_interval_secs == 0 {
                problems.push(format!("{at}.agent_interval_secs: must be at least 1"));
            }
            if !group.health_check.path.starts_with('/') {
                problems.push(format!("{at}.health_check.path: must start with `/`"));
            }
            match &group.provider {
                ProviderConfig::Local(local) => {
                    if local.command.is_empty() {
                        problems.push(format!("{at}.provider.command: must name a program"));
                    }
                    if format!("{}.1", local.address_prefix)
                        .parse::<IpAddr>()
                        .map_or(true, |ip| !ip.is_loopback())
                    {
                        problems.push(format!(
                            "{at}.provider.address_prefix: `{}` must be three octets of a loopback address, like `127.0.1`",
                            local.address_prefix
                        ));
                    }
                    if !local.instance_cpus.is_finite() || local.instance_cpus <= 0.0 {
                        problems.push(format!("{at}.provider.instance_cpus: must be greater than 0"));
                    }
                }
            }
            let mut policy_names = std::collections::HashSet::new();
            for (j, policy) in group.policies.iter().enumerate() {
                let at = format!("{at}.policies[{j}]");
                if !policy_names.insert(&policy.name) {
                    problems.push(format!(
                        "{at}.name: `{}` is used by an earlier policy of this group",
                        policy.name
                    ));
                }
                if policy.period_secs == 0 {
                    problems.push(format!("{at}.period_secs: must be at least 1"));
                }
                if policy.evaluation_periods == 0 {
                    problems.push(format!("{at}.evaluation_periods: must be at least 1"));
                }
                if let Some(m) = policy.datapoints_to_alarm
                    && (m == 0 || m > policy.evaluation_periods)
                {
                    problems.push(format!(
                        "{at}.datapoints_to_alarm: must be between 1 and evaluation_periods"
                    ));
                }
                if policy.adjustment == 0 {
                    problems.push(format!("{at}.adjustment: 0 would never change anything"));
                }
                if !policy.threshold.is_finite() {
                    problems.push(format!("{at}.threshold: must be a finite number"));
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_a_server_table_gets_the_defaults() {
        let config = parse(Path::new("c.toml"), "").unwrap();
        assert_eq!(config.server.grpc_listen, default_grpc_listen());
        assert_eq!(config.server.state_dir, PathBuf::from("/var/lib/ebb"));
        assert!(config.groups.is_empty());
    }

    #[test]
    fn the_local_example_is_valid() {
        let config = parse(Path::new("examples/local.toml"), LOCAL_EXAMPLE).unwrap();
        assert_eq!(config.groups.len(), 1);
        assert!(!config.groups[0].policies.is_empty());
    }

    #[test]
    fn a_typo_names_file_line_and_key() {
        let text = LOCAL_EXAMPLE.replacen("cooldown_secs", "cooldown_sec", 1);
        let error = parse(Path::new("/etc/ebb/collector.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("/etc/ebb/collector.toml: line "), "{error}");
        assert!(error.contains("key `groups[0].cooldown_sec`"), "{error}");
        assert!(error.contains("unknown field `cooldown_sec`"), "{error}");
    }

    #[test]
    fn a_wrong_type_names_the_expected_type() {
        let text = LOCAL_EXAMPLE.replacen("max_size = 4", "max_size = \"four\"", 1);
        let error = parse(Path::new("c.toml"), &text).unwrap_err().to_string();
        assert!(error.contains("key `groups[0].max_size`"), "{error}");
        assert!(error.contains("expected u32"), "{error}");
    }

    #[test]
    fn validation_collects_every_problem_with_its_path() {
        let text =
            LOCAL_EXAMPLE
                .replacen("min_size = 1", "min_size = 9", 1)
                .replacen("period_secs = 5", "period_secs = 0", 1);
        let Err(ConfigError::Invalid { problems, .. }) = parse(Path::new("c.toml"), &text) else {
            panic!("expected validation errors");
        };
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("groups[0].min_size: 9 is greater")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("groups[0].policies[0].period_secs")),
            "{problems:?}"
        );
    }
}
