//! The agent's configuration: `/etc/ebb/agent.toml` by default; `EBB_*` environment variables override the
//! file and command-line flags override both.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::cpu::CpuSource;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/ebb/agent.toml";

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
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    /// The values are well-formed but unusable.
    #[error("invalid agent configuration: {0}")]
    Invalid(String),
}

/// Reads a TOML file into `T`, naming the file, the key path and what was expected on error.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let syntax = |message: String| ConfigError::Syntax {
        path: path.to_path_buf(),
        message,
    };
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| syntax(e.to_string()))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let line = e
            .inner()
            .span()
            .map(|span| format!("line {}: ", text[..span.start].matches('\n').count() + 1))
            .unwrap_or_default();
        syntax(format!("{line}key `{}`: {}", e.path(), e.inner().message()))
    })
}

/// The file's schema. Every key has a default; an agent that is not enrolled yet needs `[enrollment]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The collector's enrolment and telemetry endpoint.
    #[serde(default = "default_collector_url")]
    pub collector_url: String,
    /// The group this VM expects to join; a token for another group is refused. Empty: the token's group.
    #[serde(default)]
    pub group: String,
    /// Where the key, the certificate and the CA are kept (owner-only).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    pub enrollment: Option<EnrollmentConfig>,
    /// Seconds between samples; the collector may change it.
    #[serde(default = "default_interval_secs")]
    pub interval_secs: u32,
    /// How many seconds of samples to keep while the collector is unreachable.
    #[serde(default = "default_buffer_secs")]
    pub buffer_secs: u32,
    #[serde(default)]
    pub cpu: CpuSource,
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// The operator's own metrics: name → a file whose content is one number, read at every sample
    /// (`queue_depth = "/run/app/queue_depth"`). Policies use them as `metric = "custom:queue_depth"`.
    #[serde(default)]
    pub custom_metrics: std::collections::BTreeMap<String, PathBuf>,
    /// Run when the collector says this member is leaving (it is already out of the load balancer), e.g. to
    /// finish queued work; the agent reports `drained` when it exits or after `pre_stop_timeout_secs`.
    #[serde(default)]
    pub pre_stop_command: Vec<String>,
    #[serde(default = "default_pre_stop_timeout_secs")]
    pub pre_stop_timeout_secs: u32,
    /// The file this came from, if any (the token is removed from it after enrolment).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// How a new VM joins: from its user data.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// The one-time join token; the agent removes it from this file once enrolled.
    pub token: Option<String>,
    /// SHA-256 of the collector's CA certificate (`ebb-collector ca show`): the only CA the agent trusts.
    #[serde(default)]
    pub ca_sha256: String,
    /// Without a token here: fetch this VM's user data (as ebb renders it) from the cloud's metadata service.
    pub user_data_source: Option<crate::metadata::UserDataSource>,
    /// The metadata service's base URL, if not the usual one (CloudStack: the default gateway).
    pub metadata_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    pub url: String,
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u32,
    /// Inclusive range of status codes that mean healthy.
    #[serde(default = "default_healthy_statuses")]
    pub healthy_statuses: [u16; 2],
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u32,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u32,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

fn default_collector_url() -> String {
    "https://127.0.0.1:7300".into()
}
/// Its own, not the collector's `/var/lib/ebb`: both may run on one machine, and both keep a `ca.pem`.
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/ebb-agent")
}
fn default_pre_stop_timeout_secs() -> u32 {
    60
}
fn default_interval_secs() -> u32 {
    1
}
fn default_buffer_secs() -> u32 {
    600
}
fn default_health_timeout_ms() -> u32 {
    2000
}
fn default_healthy_statuses() -> [u16; 2] {
    [200, 399]
}
fn default_initial_backoff_ms() -> u32 {
    500
}
fn default_max_backoff_ms() -> u32 {
    30_000
}

impl Default for AgentConfig {
    fn default() -> Self {
        parse_toml(Path::new("(defaults)"), "").expect("the empty file is a valid configuration")
    }
}

impl AgentConfig {
    /// Samples kept while disconnected: `buffer_secs` worth at the configured interval.
    pub fn buffer_samples(&self) -> usize {
        (self.buffer_secs / self.interval_secs.max(1)).max(1) as usize
    }

    pub fn health_timeout(&self) -> Option<Duration> {
        self.health_check
            .as_ref()
            .map(|h| Duration::from_millis(h.timeout_ms.into()))
    }

    /// Checks what the types cannot, reporting every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if !self.collector_url.starts_with("https://") {
            problems.push(format!(
                "`collector_url` must start with https:// (the agent speaks TLS only), not `{}`",
                self.collector_url
            ));
        }
        if self.interval_secs == 0 {
            problems.push("`interval_secs` must be at least 1".into());
        }
        if let Some(health) = &self.health_check {
            if health.timeout_ms == 0 {
                problems.push("`health_check.timeout_ms` must be at least 1".into());
            }
            if health.healthy_statuses[0] > health.healthy_statuses[1] {
                problems.push("`health_check.healthy_statuses` must be [lowest, highest]".into());
            }
        }
        if self.reconnect.initial_backoff_ms == 0 || self.reconnect.initial_backoff_ms > self.reconnect.max_backoff_ms {
            problems.push("`reconnect.initial_backoff_ms` must be between 1 and `reconnect.max_backoff_ms`".into());
        }
        for name in self.custom_metrics.keys() {
            if !ebb_proto::is_custom_metric_name(name) {
                problems.push(format!(
                    "`custom_metrics.{name}`: a name is a lowercase letter, then lowercase letters, digits and `_`"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }
}

/// `ebb-agent`: samples this machine and streams to the collector.
#[derive(Debug, Parser)]
#[command(name = "ebb-agent", version, about)]
pub struct Cli {
    /// The configuration file. A missing default file is not an error.
    #[arg(long, env = "EBB_CONFIG")]
    pub config: Option<PathBuf>,
    /// The collector's enrolment and telemetry endpoint (instead of `collector_url`).
    #[arg(long, env = "EBB_COLLECTOR_URL")]
    pub collector_url: Option<String>,
    /// Seconds between samples (instead of `interval_secs`); the collector may change it.
    #[arg(long, env = "EBB_INTERVAL_SECS")]
    pub interval_secs: Option<u32>,
    /// Where the key and certificate are kept.
    #[arg(long, env = "EBB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// A join token (instead of `[enrollment] token`).
    #[arg(long, env = "EBB_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// The collector CA's SHA-256 (instead of `[enrollment] ca_sha256`).
    #[arg(long, env = "EBB_CA_SHA256")]
    pub ca_sha256: Option<String>,
    /// URL of the HTTP health check (http:// only).
    #[arg(long, env = "EBB_HEALTH_URL")]
    pub health_url: Option<String>,
    /// Measure the CPU of this process and its descendants instead of the host.
    #[arg(long, env = "EBB_CPU_PID", conflicts_with = "cpu_cgroup")]
    pub cpu_pid: Option<u32>,
    /// With --cpu-pid: the CPUs the percentage is relative to (default: all online CPUs).
    #[arg(long, env = "EBB_CPU_CAPACITY", requires = "cpu_pid")]
    pub cpu_capacity: Option<f64>,
    /// Measure the CPU of the agent's own cgroup (v2) instead of the host.
    #[arg(long, env = "EBB_CPU_CGROUP")]
    pub cpu_cgroup: bool,
}

impl Cli {
    /// The file (if any), with environment and flags laid over it.
    pub fn load(&self) -> Result<AgentConfig, ConfigError> {
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => parse_toml(&path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.config.is_none() => AgentConfig::default(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        config.source = Some(path).filter(|p| p.exists());
        if let Some(dir) = &self.state_dir {
            config.state_dir = dir.clone();
        }
        if self.enroll_token.is_some() || self.ca_sha256.is_some() {
            let mut enrollment = config.enrollment.take().unwrap_or(EnrollmentConfig {
                token: None,
                ca_sha256: String::new(),
                user_data_source: None,
                metadata_url: None,
            });
            if let Some(token) = &self.enroll_token {
                enrollment.token = Some(token.clone());
            }
            if let Some(pin) = &self.ca_sha256 {
                enrollment.ca_sha256 = pin.clone();
            }
            config.enrollment = Some(enrollment);
        }
        if let Some(url) = &self.collector_url {
            config.collector_url = url.clone();
        }
        if let Some(interval) = self.interval_secs {
            config.interval_secs = interval;
        }
        if let Some(url) = &self.health_url {
            let mut health = config.health_check.take().unwrap_or(HealthCheckConfig {
                url: String::new(),
                timeout_ms: default_health_timeout_ms(),
                healthy_statuses: default_healthy_statuses(),
            });
            health.url = url.clone();
            config.health_check = Some(health);
        }
        if let Some(pid) = self.cpu_pid {
            config.cpu = CpuSource::Process {
                pid,
                cpus: self.cpu_capacity,
            };
        } else if self.cpu_cgroup {
            config.cpu = CpuSource::Cgroup;
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The example the packages install as /etc/ebb/agent.toml.example.
    #[test]
    fn the_packaged_example_parses() {
        let text = include_str!("../../packaging/agent.toml.example");
        let config: AgentConfig = parse_toml(Path::new("agent.toml.example"), text).unwrap();
        assert_eq!(config.group, "web");
        assert!(config.enrollment.unwrap().token.is_some());
        let uncommented: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|l| l.starts_with('[') || l.contains(" = "))
                    .unwrap_or(l)
            })
            .map(|l| format!("{l}\n"))
            .filter(|l| !l.starts_with("token") && !l.starts_with("ca_sha256"))
            .collect();
        let config: AgentConfig =
            parse_toml(Path::new("agent.toml.example"), &uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert!(config.health_check.is_some() && config.custom_metrics.contains_key("queue_depth"));
    }

    #[test]
    fn full_file() {
        let config: AgentConfig = parse_toml(
            Path::new("agent.toml"),
            r#"
            collector_url = "https://10.0.0.5:7300"
            group = "web"
            interval_secs = 2
            cpu = { type = "process", pid = 77, cpus = 1.0 }
            [health_check]
            url = "http://127.0.0.1/health"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.cpu,
            CpuSource::Process {
                pid: 77,
                cpus: Some(1.0)
            }
        );
        assert_eq!(config.health_check.unwrap().timeout_ms, 2000);
        assert_eq!(config.buffer_secs, 600);
    }

    #[test]
    fn a_typo_names_file_key_and_line() {
        let error = parse_toml::<AgentConfig>(Path::new("/etc/ebb/agent.toml"), "group = \"a\"\nintreval_secs = 2\n")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("/etc/ebb/agent.toml: line 2:"), "{error}");
        assert!(error.contains("unknown field `intreval_secs`"), "{error}");
    }

    #[test]
    fn a_wrong_type_names_the_key_path_and_expected_type() {
        let error = parse_toml::<AgentConfig>(
            Path::new("agent.toml"),
            "[health_check]\nurl = \"http://x/\"\ntimeout_ms = \"2s\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("key `health_check.timeout_ms`"), "{error}");
        assert!(error.contains("expected u32"), "{error}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "interval_secs = 5\n[enrollment]\nca_sha256 = \"from-file\"\ntoken = \"t\"\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "ebb-agent",
            "--config",
            path.to_str().unwrap(),
            "--ca-sha256",
            "from-flag",
            "--cpu-pid",
            "9",
        ]);
        let config = cli.load().unwrap();
        assert_eq!(config.enrollment.unwrap().ca_sha256, "from-flag");
        assert_eq!(config.source.as_deref(), Some(path.as_path()));
        assert_eq!(config.interval_secs, 5);
        assert_eq!(config.cpu, CpuSource::Process { pid: 9, cpus: None });
    }

    #[test]
    fn validation_reports_every_problem() {
        let config = AgentConfig {
            interval_secs: 0,
            collector_url: "10.0.0.5:7300".into(),
            ..AgentConfig::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("collector_url"), "{error}");
        assert!(error.contains("interval_secs"), "{error}");
    }

    #[test]
    fn an_explicit_missing_file_is_an_error() {
        let cli = Cli::parse_from(["ebb-agent", "--config", "/nonexistent/agent.toml"]);
        assert!(matches!(cli.load(), Err(ConfigError::Read { .. })));
    }
}
