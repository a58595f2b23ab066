//! The collector's configuration (`/etc/ebb/collector.toml`): schema, defaults and validation.
//! Unknown keys are errors; validation reports every problem with its key path, never just one.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::engine::schedule::{Cron, ScheduledAction};
use crate::engine::{
    AdjustmentType, Comparison, Engine, HealthRules, MAX_CUSTOM_METRICS, Metric, OnMetricLoss, Policy, PredictiveMode,
    PredictivePolicy, RateLimit, Statistic, Step, StepPolicy, TargetPolicy, Termination,
};
use crate::userdata::{OperatorUserData, SizeLimit, UserDataFormat};

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
    /// The file this came from, for `reload`.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// `serve --state-dir` (or `EBB_STATE_DIR`), which replaces `server.state_dir`, also at `reload`.
    #[serde(skip)]
    pub state_dir_override: Option<PathBuf>,
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
    /// Connections open at once on the agents' port (gRPC), at most: one per agent, plus enrolments. Past it,
    /// new connections are refused and counted (`ebb_requests_refused_total{reason="connection_limit"}`).
    /// `serve` raises its open-file limit to fit, and warns when the system's hard limit is too low.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Enrolment attempts allowed per remote address per minute.
    #[serde(default = "default_enrollments_per_minute")]
    pub enrollments_per_minute: u32,
    /// Enrolment attempts allowed per minute from all addresses together: a boot storm of thousands of VMs
    /// fits; a flood from many addresses does not take the collector's CPU.
    #[serde(default = "default_enrollments_per_minute_total")]
    pub enrollments_per_minute_total: u32,
    /// How long evaluation explanations are kept (`ebb-collector explain`); default six weeks, like EC2's
    /// activity history.
    #[serde(default = "default_explanation_retention_secs")]
    pub explanation_retention_secs: u64,
    /// How long activities are kept in the store.
    #[serde(default = "default_activity_retention_days")]
    pub activity_retention_days: u32,
}

impl ServerConfig {
    /// The embedded store: `collector.db` in the state directory.
    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("collector.db")
    }

    /// The URL agents are told to connect to: `advertise_url`, else the agents' listener at `grpc_address`
    /// (the address bound, which differs from `grpc_listen` when its port is 0).
    pub fn collector_url(&self, grpc_address: SocketAddr) -> String {
        self.advertise_url
            .clone()
            .unwrap_or_else(|| format!("https://{grpc_address}"))
    }

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
    /// Starting capacity; `min_size` when absent.
    pub desired_capacity: Option<u32>,
    /// Default for both cooldowns.
    #[serde(default = "default_cooldown_secs")]
    pub cooldown_secs: u32,
    /// After a scale-out, no further scale-out for this long (default `cooldown_secs`).
    pub scale_out_cooldown_secs: Option<u32>,
    /// After any scaling, no scale-in for this long (default `cooldown_secs`).
    pub scale_in_cooldown_secs: Option<u32>,
    /// A member in service for less than this feeds no aggregate and absorbs repeated scale-out alarms.
    #[serde(default = "default_warmup_secs")]
    pub warmup_secs: u32,
    /// At most this many launches in flight (members not yet in service).
    #[serde(default = "default_max_surge")]
    pub max_surge: u32,
    #[serde(default)]
    pub termination_policy: Termination,
    /// For `termination_policy = "closest_to_billing_hour"`.
    #[serde(default = "default_billing_period_secs")]
    pub billing_period_secs: u32,
    #[serde(default)]
    pub on_metric_loss: OnMetricLoss,
    /// Decide and explain, but never launch, terminate or change the load balancer.
    #[serde(default)]
    pub dry_run: bool,
    /// A leaving member is out of the load balancer this long (its agent may report drained sooner)
    /// before it is terminated: the deregistration delay.
    #[serde(default = "default_drain_secs")]
    pub drain_secs: u32,
    /// How often the provider's instances and the load balancer's members are compared with the group's.
    #[serde(default = "default_reconcile_interval_secs")]
    pub reconcile_interval_secs: u32,
    /// An instance tagged for the group that no member owns is terminated after this long...
    #[serde(default = "default_orphan_grace_secs")]
    pub orphan_grace_secs: u32,
    /// ... unless this is false: then it is only reported.
    #[serde(default = "default_true")]
    pub terminate_orphans: bool,
    /// How often the agents sample.
    #[serde(default = "default_agent_interval_secs")]
    pub agent_interval_secs: u32,
    /// The port members serve on (load balancer target and health check).
    #[serde(default = "default_member_port")]
    pub member_port: u16,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    pub provider: ProviderConfig,
    pub load_balancer: LoadBalancerConfig,
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    #[serde(default)]
    pub schedules: Vec<ScheduleConfig>,
    #[serde(default)]
    pub lifecycle_hooks: Vec<crate::hooks::HookConfig>,
    /// The operator's user data (`provider.user_data_file` or `provider.user_data`), read and checked when
    /// the configuration is loaded.
    #[serde(skip)]
    pub operator_user_data: Option<crate::userdata::OperatorUserData>,
    /// The `[groups.provider]` table as the file writes it, canonical (keys sorted, no layout): what the
    /// launch specification's fingerprint covers, so that a provider setting the operator did not write
    /// (one a new version adds with a default) does not make every member outdated.
    #[serde(skip)]
    pub provider_as_written: String,
}

impl GroupConfig {
    /// How launches of this group get their user data: the form ebb's enrolment takes and the cloud's
    /// size limit; `None` for providers that take no user data (local, fake).
    pub fn user_data_rules(&self) -> Option<(UserDataFormat, SizeLimit)> {
        self.user_data_settings().map(|s| (s.format, s.limit))
    }

    /// The provider's user data keys, with the form and the cloud's limit they are sent in.
    fn user_data_settings(&self) -> Option<UserDataSettings<'_>> {
        match &self.provider {
            ProviderConfig::Cloudstack(c) => Some(UserDataSettings::new(
                &c.user_data_file,
                &c.user_data,
                c.user_data_format,
                SizeLimit::CLOUDSTACK,
            )),
            ProviderConfig::Aws(c) => Some(UserDataSettings::new(
                &c.user_data_file,
                &c.user_data,
                c.user_data_format,
                SizeLimit::EC2,
            )),
            ProviderConfig::Openstack(c) => Some(UserDataSettings::new(
                &c.user_data_file,
                &c.user_data,
                c.user_data_format,
                SizeLimit::NOVA,
            )),
            ProviderConfig::Qemu(c) => Some(UserDataSettings::new(
                &c.user_data_file,
                &c.user_data,
                c.user_data_format,
                SizeLimit::NOCLOUD_SEED,
            )),
            ProviderConfig::Local(_) => None,
            #[cfg(feature = "fake-cloud")]
            ProviderConfig::Fake(_) => None,
        }
    }

    /// The collector's URL as this group's VMs reach it (`server.collector_url`, or the qemu guests' own).
    pub fn collector_url(&self, server: &ServerConfig, grpc_address: SocketAddr) -> String {
        match &self.provider {
            ProviderConfig::Qemu(qemu) => qemu.guest_collector_url(grpc_address),
            _ => server.collector_url(grpc_address),
        }
    }

    /// Reads and checks the operator's user data; problems are keyed by their path under `at`.
    fn load_operator_user_data(&mut self, at: &str, collector_url: &str) -> Vec<String> {
        // The local and fake providers have no user data keys at all.
        let Some(UserDataSettings {
            file,
            inline,
            format,
            limit,
        }) = self.user_data_settings()
        else {
            return Vec::new();
        };
        let (bytes, key) = match (file, inline) {
            (Some(_), Some(_)) => {
                return vec![format!("{at}.provider: give user_data_file or user_data, not both")];
            }
            (Some(path), None) => match read_operator_bytes(path, MAX_SMALL_FILE_BYTES) {
                Ok(bytes) => (bytes, "user_data_file"),
                Err(e) => {
                    return vec![format!(
                        "{at}.provider.user_data_file: cannot read {}: {e}",
                        path.display()
                    )];
                }
            },
            (None, Some(text)) => (text.as_bytes().to_vec(), "user_data"),
            (None, None) => return Vec::new(),
        };
        let operator = match OperatorUserData::parse(&bytes).and_then(|u| u.check_format(format).map(|()| u)) {
            Ok(operator) => operator,
            Err(e) => return vec![format!("{at}.provider.{key}: {e}")],
        };
        // The enrolment part of a launch has a known size: the whole must fit the cloud's limit now, not at
        // the first scale-out.
        let agent_config = crate::userdata::agent_config_of_launch_size(collector_url, &self.name);
        let fits = crate::userdata::compose(format, &agent_config, Some(&operator))
            .and_then(|text| crate::userdata::fit(text, format, limit));
        if let Err(e) = fits {
            return vec![format!("{at}.provider.{key}: {e}")];
        }
        self.operator_user_data = Some(operator);
        Vec::new()
    }
    /// The group's rules as the engine takes them; call on a validated configuration.
    pub fn engine(&self) -> Engine {
        let health = &self.health_check;
        Engine {
            scale_out_cooldown_secs: self.scale_out_cooldown_secs.unwrap_or(self.cooldown_secs),
            scale_in_cooldown_secs: self.scale_in_cooldown_secs.unwrap_or(self.cooldown_secs),
            warmup_secs: self.warmup_secs,
            policies: self.policies.iter().map(PolicyConfig::to_policy).collect(),
            health: HealthRules {
                unhealthy_threshold: health.unhealthy_threshold,
                healthy_threshold: health.healthy_threshold,
                grace_period_secs: health.grace_period_secs,
                silent_secs: health.silent_secs,
                launch_timeout_secs: health.launch_timeout_secs,
                replace_unhealthy: health.replace_unhealthy,
            },
            on_metric_loss: self.on_metric_loss,
            termination: self.termination_policy,
            billing_period_secs: self.billing_period_secs,
        }
    }

    /// The scheduled actions; call on a validated configuration.
    pub fn scheduled_actions(&self) -> Vec<ScheduledAction> {
        self.schedules
            .iter()
            .filter_map(|s| {
                Some(ScheduledAction {
                    name: s.name.clone(),
                    cron: Cron::parse(&s.cron).ok()?,
                    zone: jiff::tz::TimeZone::get(&s.time_zone).ok()?,
                    min_size: s.min_size,
                    max_size: s.max_size,
                    desired_capacity: s.desired_capacity,
                })
            })
            .collect()
    }
}

/// A cloud provider's user data keys, with the form and size limit they are sent in.
struct UserDataSettings<'a> {
    file: Option<&'a Path>,
    inline: Option<&'a str>,
    format: UserDataFormat,
    limit: SizeLimit,
}

impl<'a> UserDataSettings<'a> {
    fn new(file: &'a Option<PathBuf>, inline: &'a Option<String>, format: UserDataFormat, limit: SizeLimit) -> Self {
        Self {
            file: file.as_deref(),
            inline: inline.as_deref(),
            format,
            limit,
        }
    }
}

/// The agent's HTTP check of its own service, and how its results are judged.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u32,
    /// No health judgement this long after launch.
    #[serde(default = "default_grace_period_secs")]
    pub grace_period_secs: u32,
    /// Failed checks in a row that make an in-service member unhealthy.
    #[serde(default = "default_threshold")]
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that make an unhealthy member healthy again.
    #[serde(default = "default_threshold")]
    pub healthy_threshold: u32,
    /// An in-service member not heard from for this long is unhealthy (while others still report).
    #[serde(default = "default_silent_secs")]
    pub silent_secs: u32,
    /// A member not healthy this long after launch is unhealthy.
    #[serde(default = "default_launch_timeout_secs")]
    pub launch_timeout_secs: u32,
    /// Replace unhealthy members (a new one first, then the unhealthy one goes).
    #[serde(default = "default_true")]
    pub replace_unhealthy: bool,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        toml::from_str("").expect("every health_check key has a default")
    }
}

/// A scaling policy: `type = "step"` (a threshold alarm with step adjustments, the default) or
/// `type = "target_tracking"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: PolicyKind,
    pub metric: Metric,
    #[serde(default = "default_period_secs")]
    pub period_secs: u32,
    // Step policies.
    pub statistic: Option<Statistic>,
    pub evaluation_periods: Option<u32>,
    /// M of the N evaluation periods must breach; N when absent.
    pub datapoints_to_alarm: Option<u32>,
    pub comparison: Option<Comparison>,
    pub threshold: Option<f64>,
    pub adjustment_type: Option<AdjustmentType>,
    /// A single step: members to add (positive) or remove, or the capacity or percentage.
    pub adjustment: Option<i32>,
    /// Different adjustments for different breach sizes, bounds relative to the threshold.
    pub steps: Option<Vec<Step>>,
    pub min_adjustment_step: Option<u32>,
    // Target tracking.
    pub target: Option<f64>,
    pub scale_out_tolerance: Option<f64>,
    pub scale_in_tolerance: Option<f64>,
    pub stabilization_secs: Option<u32>,
    pub disable_scale_in: Option<bool>,
    pub scale_out_limit: Option<RateLimit>,
    pub scale_in_limit: Option<RateLimit>,
    // Predictive policies (and `target`).
    pub mode: Option<PredictiveMode>,
    pub scheduling_buffer_secs: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    #[default]
    Step,
    TargetTracking,
    Predictive,
}

impl PolicyConfig {
    /// Call on a validated configuration.
    pub fn to_policy(&self) -> Policy {
        match self.kind {
            PolicyKind::Step => {
                let evaluation_periods = self.evaluation_periods.unwrap_or(1);
                Policy::Step(StepPolicy {
                    name: self.name.clone(),
                    metric: self.metric,
                    statistic: self.statistic.unwrap_or(Statistic::Avg),
                    period_secs: self.period_secs,
                    evaluation_periods,
                    datapoints_to_alarm: self.datapoints_to_alarm.unwrap_or(evaluation_periods),
                    comparison: self.comparison.unwrap_or(Comparison::Gt),
                    threshold: self.threshold.unwrap_or_default(),
                    adjustment_type: self.adjustment_type.unwrap_or(AdjustmentType::ChangeInCapacity),
                    steps: self.steps.clone().unwrap_or_else(|| {
                        vec![Step {
                            lower: None,
                            upper: None,
                            adjustment: self.adjustment.unwrap_or_default(),
                        }]
                    }),
                    min_adjustment_step: self.min_adjustment_step.unwrap_or(0),
                })
            }
            PolicyKind::Predictive => Policy::Predictive(PredictivePolicy {
                name: self.name.clone(),
                metric: self.metric,
                target: self.target.unwrap_or(1.0),
                mode: self.mode.unwrap_or_default(),
                scheduling_buffer_secs: self.scheduling_buffer_secs,
            }),
            PolicyKind::TargetTracking => Policy::TargetTracking(TargetPolicy {
                name: self.name.clone(),
                metric: self.metric,
                target: self.target.unwrap_or(1.0),
                period_secs: self.period_secs,
                scale_out_tolerance: self.scale_out_tolerance.unwrap_or(0.1),
                scale_in_tolerance: self.scale_in_tolerance.unwrap_or(0.1),
                stabilization_secs: self.stabilization_secs.unwrap_or(300),
                disable_scale_in: self.disable_scale_in.unwrap_or(false),
                scale_out_limit: self.scale_out_limit,
                scale_in_limit: self.scale_in_limit,
            }),
        }
    }

    /// Every problem with this policy, each with its key path under `at`.
    fn problems(&self, at: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, text: String| problems.push(format!("{at}.{key}: {text}"));
        if self.period_secs == 0 {
            problem("period_secs", "must be at least 1".into());
        }
        let step_keys = [
            ("statistic", self.statistic.is_some()),
            ("evaluation_periods", self.evaluation_periods.is_some()),
            ("datapoints_to_alarm", self.datapoints_to_alarm.is_some()),
            ("comparison", self.comparison.is_some()),
            ("threshold", self.threshold.is_some()),
            ("adjustment_type", self.adjustment_type.is_some()),
            ("adjustment", self.adjustment.is_some()),
            ("steps", self.steps.is_some()),
            ("min_adjustment_step", self.min_adjustment_step.is_some()),
        ];
        let target_keys = [
            ("target", self.target.is_some()),
            ("scale_out_tolerance", self.scale_out_tolerance.is_some()),
            ("scale_in_tolerance", self.scale_in_tolerance.is_some()),
            ("stabilization_secs", self.stabilization_secs.is_some()),
            ("disable_scale_in", self.disable_scale_in.is_some()),
            ("scale_out_limit", self.scale_out_limit.is_some()),
            ("scale_in_limit", self.scale_in_limit.is_some()),
        ];
        let predictive_keys = [
            ("mode", self.mode.is_some()),
            ("scheduling_buffer_secs", self.scheduling_buffer_secs.is_some()),
        ];
        let foreign: Vec<(&str, &str)> = match self.kind {
            PolicyKind::Step => [
                (&target_keys[..], "target_tracking"),
                (&predictive_keys[..], "predictive"),
            ]
            .to_vec(),
            PolicyKind::TargetTracking => [(&step_keys[..], "step"), (&predictive_keys[..], "predictive")].to_vec(),
            PolicyKind::Predictive => [(&step_keys[..], "step"), (&target_keys[1..], "target_tracking")].to_vec(),
        }
        .into_iter()
        .flat_map(|(keys, kind)| keys.iter().filter(|(_, set)| *set).map(move |(key, _)| (*key, kind)))
        .collect();
        for (key, kind) in foreign {
            problem(key, format!("applies to `type = \"{kind}\"` policies only"));
        }
        match self.kind {
            PolicyKind::Step => {
                let periods = self.evaluation_periods.unwrap_or(1);
                if periods == 0 {
                    problem("evaluation_periods", "must be at least 1".into());
                }
                if let Some(m) = self.datapoints_to_alarm
                    && (m == 0 || m > periods)
                {
                    problem("datapoints_to_alarm", "must be between 1 and evaluation_periods".into());
                }
                if self.comparison.is_none() {
                    problem("comparison", "missing: one of gt, ge, lt, le".into());
                }
                match self.threshold {
                    None => problem("threshold", "missing".into()),
                    Some(t) if !t.is_finite() => problem("threshold", "must be a finite number".into()),
                    Some(_) => {}
                }
                let exact = self.adjustment_type == Some(AdjustmentType::ExactCapacity);
                match (&self.adjustment, &self.steps) {
                    (None, None) => problem("adjustment", "missing: give `adjustment` or `steps`".into()),
                    (Some(_), Some(_)) => problem("steps", "give `adjustment` or `steps`, not both".into()),
                    (Some(0), None) if !exact => problem("adjustment", "0 would never change anything".into()),
                    (Some(a), None) if exact && *a < 0 => {
                        problem("adjustment", "an exact capacity cannot be negative".into())
                    }
                    (None, Some(steps)) => {
                        for problem_text in step_problems(steps, exact) {
                            problem("steps", problem_text);
                        }
                        for (k, s) in steps.iter().enumerate() {
                            if let (Some(l), Some(u)) = (s.lower, s.upper)
                                && l >= u
                            {
                                problem(&format!("steps[{k}]"), format!("lower {l} is not below upper {u}"));
                            }
                            if s.lower.is_none() && s.upper.is_none() {
                                problem(
                                    &format!("steps[{k}]"),
                                    "has neither lower nor upper bound (EC2 refuses it too): for one adjustment at any breach, give `adjustment`".into(),
                                );
                            }
                        }
                    }
                    _ => {}
                }
            }
            PolicyKind::Predictive => {
                match self.target {
                    None => problem("target", "missing: the metric's value each member is planned at".into()),
                    Some(t) if !t.is_finite() || t <= 0.0 => problem("target", "must be greater than 0".into()),
                    Some(_) => {}
                }
                if self.scheduling_buffer_secs.is_some_and(|b| b > 3600) {
                    problem(
                        "scheduling_buffer_secs",
                        "at most 3600: capacity is raised at most an hour ahead".into(),
                    );
                }
            }
            PolicyKind::TargetTracking => {
                match self.target {
                    None => problem("target", "missing: the metric's value to keep".into()),
                    Some(t) if !t.is_finite() || t <= 0.0 => problem("target", "must be greater than 0".into()),
                    Some(_) => {}
                }
                for (key, value) in [
                    ("scale_out_tolerance", self.scale_out_tolerance),
                    ("scale_in_tolerance", self.scale_in_tolerance),
                ] {
                    if value.is_some_and(|v| !(0.0..1.0).contains(&v)) {
                        problem(key, "must be a fraction from 0 up to 1 (0.1 is 10%)".into());
                    }
                }
                for (key, limit) in [
                    ("scale_out_limit", self.scale_out_limit),
                    ("scale_in_limit", self.scale_in_limit),
                ] {
                    if let Some(limit) = limit {
                        if limit.period_secs == 0 {
                            problem(&format!("{key}.period_secs"), "must be at least 1".into());
                        }
                        if limit.members.is_none() && limit.percent.is_none() {
                            problem(key, "give `members`, `percent` or both".into());
                        }
                    }
                }
            }
        }
        problems
    }
}

/// A scheduled action: at the cron expression's minutes, in the time zone, set what is given.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: String,
    pub cron: String,
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    pub min_size: Option<u32>,
    pub max_size: Option<u32>,
    pub desired_capacity: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProviderConfig {
    /// Instances are local process groups; see `providers::local`.
    Local(LocalProviderConfig),
    /// A fake cloud in a directory, for fault tests and benchmarks; see `providers::fake::dir`. Only in
    /// builds with the `fake-cloud` feature.
    #[cfg(feature = "fake-cloud")]
    Fake(crate::providers::fake::dir::DirCloudConfig),
    /// CloudStack (IDCF Cloud and others); see `providers::cloudstack`.
    Cloudstack(crate::providers::cloudstack::CloudStackConfig),
    /// AWS EC2 (and EC2-compatible clouds); see `providers::aws`.
    Aws(crate::providers::aws::AwsConfig),
    /// OpenStack Nova (Red Hat OpenStack, FUJITSU K5, …); see `providers::openstack`.
    Openstack(crate::providers::openstack::OpenStackConfig),
    /// Real VMs on this machine under qemu; see `providers::qemu`.
    Qemu(crate::providers::qemu::QemuConfig),
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
    /// A CloudStack load-balancer rule, with the group's CloudStack provider's keys; see `lb::cloudstack`.
    Cloudstack { rule_id: String },
    /// An ELBv2 target group, with the group's AWS provider's credentials; see `lb::aws`.
    AwsTargetGroup {
        target_group_arn: String,
        /// The target group's target type is `ip`: members are registered by address and port.
        #[serde(default)]
        ip_targets: bool,
    },
    /// An Octavia pool, with the group's OpenStack provider's credentials; see `lb::octavia`.
    Octavia {
        pool_id: String,
        /// The subnet members are reached on; default: the load balancer's VIP subnet.
        subnet_id: Option<String>,
        weight: Option<u32>,
    },
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
fn default_max_connections() -> u32 {
    20_000
}
fn default_enrollments_per_minute() -> u32 {
    crate::pki::EnrollmentLimits::default().per_address_per_minute
}
fn default_enrollments_per_minute_total() -> u32 {
    crate::pki::EnrollmentLimits::default().total_per_minute
}
fn default_activity_retention_days() -> u32 {
    42
}
fn default_explanation_retention_secs() -> u64 {
    42 * 24 * 3600
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
fn default_drain_secs() -> u32 {
    30
}
fn default_reconcile_interval_secs() -> u32 {
    60
}
fn default_orphan_grace_secs() -> u32 {
    600
}
fn default_max_surge() -> u32 {
    10
}
fn default_billing_period_secs() -> u32 {
    3600
}
fn default_grace_period_secs() -> u32 {
    120
}
fn default_threshold() -> u32 {
    3
}
fn default_silent_secs() -> u32 {
    30
}
fn default_launch_timeout_secs() -> u32 {
    900
}
fn default_true() -> bool {
    true
}
fn default_period_secs() -> u32 {
    60
}
fn default_time_zone() -> String {
    "UTC".into()
}

/// EC2's rules for a step policy's steps (PutScalingPolicy's StepAdjustment), plus ebb's one: the steps that
/// change capacity all add, or all remove (a step of 0, as the EC2 guide's first step, is neither).
fn step_problems(steps: &[Step], exact: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if steps.is_empty() {
        return vec!["needs at least one step".into()];
    }
    let signs: std::collections::HashSet<bool> = steps
        .iter()
        .filter(|s| s.adjustment != 0)
        .map(|s| s.adjustment > 0)
        .collect();
    if !exact && signs.len() > 1 {
        problems.push("the steps that change capacity must all add members, or all remove them".into());
    }
    let open_lower = steps.iter().filter(|s| s.lower.is_none()).count();
    let open_upper = steps.iter().filter(|s| s.upper.is_none()).count();
    if open_lower > 1 {
        problems.push("at most one step may leave out `lower` (unbounded below)".into());
    }
    if open_upper > 1 {
        problems.push("at most one step may leave out `upper` (unbounded above)".into());
    }
    if open_lower == 0 && steps.iter().any(|s| s.lower.is_some_and(|l| l < 0.0)) {
        problems.push("a step has a negative `lower`, so one step must leave `lower` out (as EC2 requires)".into());
    }
    if open_upper == 0 && steps.iter().any(|s| s.upper.is_some_and(|u| u > 0.0)) {
        problems.push("a step has a positive `upper`, so one step must leave `upper` out (as EC2 requires)".into());
    }
    let mut sorted: Vec<&Step> = steps.iter().collect();
    sorted.sort_by(|a, b| {
        a.lower
            .unwrap_or(f64::NEG_INFINITY)
            .total_cmp(&b.lower.unwrap_or(f64::NEG_INFINITY))
    });
    for pair in sorted.windows(2) {
        match (pair[0].upper, pair[1].lower) {
            (Some(upper), Some(lower)) if lower > upper => {
                problems.push(format!(
                    "a gap between steps: nothing applies from {upper} to {lower} (EC2 refuses gaps)"
                ));
                break;
            }
            (Some(upper), Some(lower)) if lower == upper => {}
            _ => {
                problems.push("step ranges overlap".into());
                break;
            }
        }
    }
    problems
}

/// Reads and validates a configuration file.
/// The longest group or policy name: it appears in member ids, instance names, tags and metric labels.
pub const MAX_NAME_LEN: usize = 63;

/// A group's or policy's name: 1 to [`MAX_NAME_LEN`] letters, digits, `-` or `_`.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err("must be letters, digits, `-` or `_`".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is {} characters long; at most {MAX_NAME_LEN}", name.len()));
    }
    Ok(())
}

/// A valid group or policy name made from another system's (a Heat resource name): other characters
/// become `_`, and it is cut to [`MAX_NAME_LEN`].
pub fn name_from(foreign: &str) -> String {
    let name: String = foreign
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    if name.is_empty() { "unnamed".into() } else { name }
}

/// The largest configuration file read (a config of hundreds of groups is a few hundred KB).
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// The largest file `import` reads (an `.idcfrc`, a Heat template) or a credentials file.
pub const MAX_SMALL_FILE_BYTES: u64 = 1024 * 1024;

/// Reads an operator's file as UTF-8 text: a regular file (not a device, a pipe or a directory) of at
/// most `max_bytes`, so that `--config /dev/zero` is an error, not memory running out.
pub fn read_operator_file(path: &Path, max_bytes: u64) -> std::io::Result<String> {
    let bytes = read_operator_bytes(path, max_bytes)?;
    String::from_utf8(bytes).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// As [`read_operator_file`], for a file that need not be text.
pub fn read_operator_bytes(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a device, a pipe or a directory cannot be read as one)",
        ));
    }
    let mut bytes = Vec::new();
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max_bytes} bytes, the most read from such a file"),
        ));
    }
    Ok(bytes)
}

pub fn load(path: &Path) -> Result<CollectorConfig, ConfigError> {
    let text = read_operator_file(path, MAX_CONFIG_BYTES).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut config = parse(path, &text)?;
    config.source = Some(path.to_path_buf());
    Ok(config)
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
    let mut config = config;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| syntax(e.to_string()))?;
    if let Some(written) = table.get("groups").and_then(toml::Value::as_array) {
        for (group, written) in config.groups.iter_mut().zip(written) {
            group.provider_as_written = written.get("provider").map(canonical_toml).unwrap_or_default();
        }
    }
    config.assign_custom_slots();
    let mut problems = config.problems();
    for (i, group) in config.groups.iter_mut().enumerate() {
        let collector_url = group.collector_url(&config.server, config.server.grpc_listen);
        problems.extend(group.load_operator_user_data(&format!("groups[{i}]"), &collector_url));
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }
}

/// `value` in one spelling whatever its layout in the file: tables with their keys sorted, scalars as TOML
/// writes them.
fn canonical_toml(value: &toml::Value) -> String {
    match value {
        toml::Value::Table(table) => {
            let mut keys: Vec<&String> = table.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|key| format!("{key:?}={}", canonical_toml(&table[key])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_toml).collect();
            format!("[{}]", items.join(","))
        }
        scalar => scalar.to_string(),
    }
}

impl CollectorConfig {
    /// Puts the state in `dir` whatever the file says (`serve --state-dir`).
    pub fn override_state_dir(&mut self, dir: Option<&Path>) {
        if let Some(dir) = dir {
            self.server.state_dir = dir.to_path_buf();
            self.state_dir_override = Some(dir.to_path_buf());
        }
    }

    /// The custom metrics the policies use, in the order of their slots (first use first).
    pub fn custom_metrics(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        for policy in self.groups.iter().flat_map(|g| &g.policies) {
            if let Metric::Custom { name, .. } = policy.metric
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
        names
    }

    /// How long the ingest keeps samples: at least two minutes, and as long as the furthest-looking policy
    /// needs plus a minute.
    pub fn sample_retention_ms(&self) -> i64 {
        const MIN_RETENTION_MS: i64 = 2 * 60 * 1000;
        self.groups
            .iter()
            .map(|g| g.engine().lookback_ms() + 60_000)
            .fold(MIN_RETENTION_MS, i64::max)
    }

    /// The custom metrics the ingest keeps, each in its slot.
    pub fn custom_metric_slots(&self) -> Vec<Metric> {
        (0u8..)
            .zip(self.custom_metrics())
            .map(|(slot, name)| Metric::Custom { slot, name })
            .collect()
    }

    /// Gives each custom metric its slot in the stored samples.
    fn assign_custom_slots(&mut self) {
        let names = self.custom_metrics();
        for policy in self.groups.iter_mut().flat_map(|g| &mut g.policies) {
            if let Metric::Custom { name, .. } = policy.metric
                && let Some(slot) = names
                    .iter()
                    .position(|n| *n == name)
                    .filter(|s| *s < MAX_CUSTOM_METRICS)
            {
                policy.metric = Metric::Custom { slot: slot as u8, name };
            }
        }
    }

    /// Every problem the types cannot catch, each with its key path.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let custom = self.custom_metrics();
        if custom.len() > MAX_CUSTOM_METRICS {
            problems.push(format!(
                "groups: the policies use {} custom metrics ({}); one collector keeps at most {MAX_CUSTOM_METRICS}",
                custom.len(),
                custom.join(", ")
            ));
        }
        if let Some(url) = &self.server.advertise_url
            && !url.starts_with("http://")
            && !url.starts_with("https://")
        {
            problems.push(format!(
                "server.advertise_url: must start with http:// or https://, not `{url}`"
            ));
        }
        if self.server.max_connections == 0 {
            problems.push(
                "server.max_connections: must be at least 1 (the default, 20000, fits a fleet of that many agents)"
                    .to_string(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, group) in self.groups.iter().enumerate() {
            let at = format!("groups[{i}]");
            if let Err(problem) = check_name(&group.name) {
                problems.push(format!("{at}.name: `{}` {problem}", group.name.escape_debug()));
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
            match (&group.provider, &group.load_balancer) {
                (ProviderConfig::Cloudstack(_), LoadBalancerConfig::Cloudstack { .. })
                | (ProviderConfig::Aws(_), LoadBalancerConfig::AwsTargetGroup { .. })
                | (ProviderConfig::Openstack(_), LoadBalancerConfig::Octavia { .. })
                | (_, LoadBalancerConfig::Builtin { .. }) => {}
                (_, LoadBalancerConfig::Cloudstack { .. }) => problems.push(format!(
                    "{at}.load_balancer: type \"cloudstack\" needs the group's provider to be type \"cloudstack\" (it uses its keys)"
                )),
                (_, LoadBalancerConfig::Octavia { .. }) => problems.push(format!(
                    "{at}.load_balancer: type \"octavia\" needs the group's provider to be type \"openstack\" (it uses its credentials)"
                )),
                (_, LoadBalancerConfig::AwsTargetGroup { .. }) => problems.push(format!(
                    "{at}.load_balancer: type \"aws_target_group\" needs the group's provider to be type \"aws\" (it uses its credentials)"
                )),
            }
            if let LoadBalancerConfig::AwsTargetGroup { target_group_arn, .. } = &group.load_balancer
                && !target_group_arn.starts_with("arn:")
            {
                problems.push(format!(
                    "{at}.load_balancer.target_group_arn: `{target_group_arn}` must be an ARN (arn:aws:elasticloadbalancing:…)"
                ));
            }
            if let LoadBalancerConfig::Cloudstack { rule_id } = &group.load_balancer
                && rule_id.trim().is_empty()
            {
                problems.push(format!("{at}.load_balancer.rule_id: must not be empty"));
            }
            match &group.provider {
                #[cfg(feature = "fake-cloud")]
                ProviderConfig::Fake(_) => {}
                ProviderConfig::Cloudstack(cloudstack) => {
                    problems.extend(cloudstack.problems().into_iter().map(|p| format!("{at}.{p}")));
                }
                ProviderConfig::Aws(aws) => {
                    problems.extend(aws.problems().into_iter().map(|p| format!("{at}.{p}")));
                }
                ProviderConfig::Openstack(openstack) => {
                    problems.extend(openstack.problems().into_iter().map(|p| format!("{at}.{p}")));
                }
                ProviderConfig::Qemu(qemu) => {
                    let problems_here = qemu.problems(self.server.grpc_listen);
                    problems.extend(problems_here.into_iter().map(|p| format!("{at}.{p}")));
                }
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
            if group.max_surge == 0 {
                problems.push(format!(
                    "{at}.max_surge: must be at least 1, or nothing would ever launch"
                ));
            }
            if group.billing_period_secs == 0 {
                problems.push(format!("{at}.billing_period_secs: must be at least 1"));
            }
            let health = &group.health_check;
            for (key, value) in [
                ("unhealthy_threshold", health.unhealthy_threshold),
                ("healthy_threshold", health.healthy_threshold),
                ("silent_secs", health.silent_secs),
            ] {
                if value == 0 {
                    problems.push(format!("{at}.health_check.{key}: must be at least 1"));
                }
            }
            let mut policy_names = std::collections::HashSet::new();
            for (j, policy) in group.policies.iter().enumerate() {
                let at = format!("{at}.policies[{j}]");
                if let Err(problem) = check_name(&policy.name) {
                    problems.push(format!("{at}.name: `{}` {problem}", policy.name.escape_debug()));
                }
                if !policy_names.insert(&policy.name) {
                    problems.push(format!(
                        "{at}.name: `{}` is used by an earlier policy of this group",
                        policy.name
                    ));
                }
                problems.extend(policy.problems(&at));
            }
            for (out, inward) in opposing_step_policies(group) {
                if inward.threshold >= out.threshold {
                    problems.push(format!(
                        "{at}.policies: `{}` scales in at {} {} but `{}` scales out at {} {}: the group would flap; keep the scale-in threshold below the scale-out one",
                        inward.name,
                        out.metric.name(),
                        inward.threshold,
                        out.name,
                        out.metric.name(),
                        out.threshold
                    ));
                }
            }
            let mut hook_names = std::collections::HashSet::new();
            for (j, hook) in group.lifecycle_hooks.iter().enumerate() {
                let at = format!("{at}.lifecycle_hooks[{j}]");
                if !hook_names.insert(&hook.name) {
                    problems.push(format!("{at}.name: `{}` is used by an earlier hook", hook.name));
                }
                match (&hook.url, hook.command.is_empty()) {
                    (None, true) => problems.push(format!("{at}: give `command` or `url`")),
                    (Some(_), false) => problems.push(format!("{at}: give `command` or `url`, not both")),
                    (Some(url), true) if !url.starts_with("http://") && !url.starts_with("https://") => {
                        problems.push(format!("{at}.url: `{url}` must start with http:// or https://"))
                    }
                    _ => {}
                }
                if let Some(ca_file) = &hook.ca_file {
                    if !hook.url.as_deref().is_some_and(|u| u.starts_with("https://")) {
                        problems.push(format!("{at}.ca_file: only for an https:// url"));
                    } else if let Err(e) = crate::http::client(Some(ca_file)) {
                        problems.push(format!("{at}.ca_file: {e}"));
                    }
                }
                if hook.timeout_secs == 0 {
                    problems.push(format!("{at}.timeout_secs: must be at least 1"));
                }
            }
            let mut schedule_names = std::collections::HashSet::new();
            for (j, schedule) in group.schedules.iter().enumerate() {
                let at = format!("{at}.schedules[{j}]");
                if !schedule_names.insert(&schedule.name) {
                    problems.push(format!("{at}.name: `{}` is used by an earlier schedule", schedule.name));
                }
                if let Err(e) = Cron::parse(&schedule.cron) {
                    problems.push(format!("{at}.cron: {e}"));
                }
                if jiff::tz::TimeZone::get(&schedule.time_zone).is_err() {
                    problems.push(format!(
                        "{at}.time_zone: `{}` is not a known time zone; use an IANA name like `Asia/Tokyo` or `UTC`",
                        schedule.time_zone
                    ));
                }
                if schedule.min_size.is_none() && schedule.max_size.is_none() && schedule.desired_capacity.is_none() {
                    problems.push(format!(
                        "{at}: sets nothing; give min_size, max_size or desired_capacity"
                    ));
                }
                if let (Some(min), Some(max)) = (schedule.min_size, schedule.max_size)
                    && min > max
                {
                    problems.push(format!("{at}.min_size: {min} is greater than max_size {max}"));
                }
            }
        }
        problems
    }

    /// What is valid but likely a mistake, each with its key path.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (i, group) in self.groups.iter().enumerate() {
            for (out, inward) in opposing_step_policies(group) {
                let gap = out.threshold - inward.threshold;
                if gap > 0.0 && gap < 0.2 * out.threshold.abs() {
                    warnings.push(format!(
                        "groups[{i}].policies: `{}` at {} and `{}` at {} are close: one scale-out lowers the average by about 1/N and can cross the scale-in threshold, so the group may flap; keep them further apart",
                        out.name, out.threshold, inward.name, inward.threshold
                    ));
                }
            }
            if group.policies.is_empty() && group.schedules.is_empty() {
                warnings.push(format!(
                    "groups[{i}]: no policies and no schedules; the group stays at its desired capacity"
                ));
            }
        }
        warnings
    }
}

/// Pairs of step policies on the same metric and statistic where the first scales out on high values and
/// the second scales in on low values.
fn opposing_step_policies(group: &GroupConfig) -> Vec<(StepPolicy, StepPolicy)> {
    let steps: Vec<StepPolicy> = group
        .policies
        .iter()
        .filter(|p| p.problems("").is_empty())
        .filter_map(|p| match p.to_policy() {
            Policy::Step(step) => Some(step),
            Policy::TargetTracking(_) | Policy::Predictive(_) => None,
        })
        .collect();
    let mut pairs = Vec::new();
    for out in steps.iter().filter(|p| !p.scales_in() && p.comparison.is_upward()) {
        for inward in steps.iter().filter(|p| p.scales_in() && !p.comparison.is_upward()) {
            if out.metric == inward.metric && out.statistic == inward.statistic {
                pairs.push((out.clone(), inward.clone()));
            }
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_as_written_ignores_layout_but_not_values() {
        let parsed = |text: &str| {
            parse(Path::new("c.toml"), text).unwrap().groups[0]
                .provider_as_written
                .clone()
        };
        let written = parsed(LOCAL_EXAMPLE);
        assert!(written.contains("\"address_prefix\"=\"127.0.1\""), "{written}");
        let reordered = LOCAL_EXAMPLE.replace(
            "type = \"local\"\naddress_prefix = \"127.0.1\"",
            "address_prefix = \"127.0.1\"   # moved\n\ntype = \"local\"",
        );
        assert_ne!(reordered, LOCAL_EXAMPLE);
        assert_eq!(
            parsed(&reordered),
            written,
            "order, comments and blank lines do not count"
        );
        let changed = LOCAL_EXAMPLE.replace("instance_cpus = 1.0", "instance_cpus = 2.0");
        assert_ne!(parsed(&changed), written);
    }

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

    /// An AWS group with `extra` lines in its provider table.
    fn aws_group(extra: &str) -> String {
        format!(
            r#"
            [[groups]]
            name = "web"
            min_size = 1
            max_size = 2
            [groups.provider]
            type = "aws"
            image_id = "ami-1"
            instance_type = "t3.micro"
            {extra}
            [groups.load_balancer]
            type = "builtin"
            listen = "127.0.0.1:8080"
            "#
        )
    }

    fn user_data_problems(extra: &str) -> Vec<String> {
        match parse(Path::new("c.toml"), &aws_group(extra)) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_operators_user_data_is_read_and_checked_when_the_configuration_loads() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("start.sh");
        std::fs::write(
            &script,
            "#!/bin/bash
systemctl start httpd
",
        )
        .unwrap();
        let config = parse(
            Path::new("c.toml"),
            &aws_group(&format!("user_data_file = \"{}\"", script.display())),
        )
        .unwrap();
        let read = config.groups[0].operator_user_data.as_ref().unwrap();
        assert_eq!(read.text(), "#!/bin/bash\nsystemctl start httpd\n");
        let inline = parse(
            Path::new("c.toml"),
            &aws_group("user_data = \"#cloud-config\\npackages: [httpd]\\n\""),
        )
        .unwrap();
        assert_eq!(
            inline.groups[0].operator_user_data.as_ref().unwrap().describe(),
            "cloud-config"
        );

        for (extra, expected) in [
            (
                "user_data_file = \"/nonexistent/start.sh\"".to_string(),
                "groups[0].provider.user_data_file: cannot read /nonexistent/start.sh",
            ),
            (
                format!("user_data_file = \"{}\"\nuser_data = \"#!/bin/sh\"", script.display()),
                "groups[0].provider: give user_data_file or user_data, not both",
            ),
            (
                "user_data = \"yum install httpd\"".into(),
                "groups[0].provider.user_data: starts with `yum install httpd`, which cloud-init ignores",
            ),
            (
                "user_data = \"#cloud-config\\npackages: [httpd]\\n\"\nuser_data_format = \"shell\"".into(),
                "groups[0].provider.user_data: is cloud-config, which needs cloud-init",
            ),
            (
                format!(
                    "user_data = \"#!/bin/sh\\n# {}\"\nuser_data_format = \"shell\"",
                    "x".repeat(17_000)
                ),
                "EC2 takes at most 16384",
            ),
        ] {
            let problems = user_data_problems(&extra);
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected}: {problems:?}"
            );
        }
        // The local provider hands its agents their configuration: it has no user data keys at all.
        let error = parse(
            Path::new("c.toml"),
            &LOCAL_EXAMPLE.replacen(
                "[groups.provider]\n",
                "[groups.provider]\nuser_data = \"#!/bin/sh\"\n",
                1,
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("unknown field `user_data`"), "{error}");
    }

    const QUEUE_GROUP: &str = r#"
        [[groups]]
        name = "workers"
        min_size = 1
        max_size = 5
        warmup_secs = 0
        [groups.provider]
        type = "local"
        [groups.load_balancer]
        type = "builtin"
        listen = "127.0.0.1:0"
        [[groups.policies]]
        name = "queue-target"
        type = "target_tracking"
        metric = "custom:queue_depth"
        target = 10.0
        period_secs = 60
    "#;

    #[test]
    fn a_custom_metric_gets_a_slot_and_drives_a_policy_from_a_snapshot() {
        let config = parse(Path::new("c.toml"), QUEUE_GROUP).unwrap();
        assert_eq!(config.custom_metrics(), ["queue_depth"]);
        let group = &config.groups[0];
        assert!(matches!(
            group.policies[0].metric,
            Metric::Custom {
                slot: 0,
                name: "queue_depth"
            }
        ));
        let snapshot = crate::engine::snapshot::Snapshot::parse(
            r#"{"now": "2026-01-01T00:10:00Z", "desired": 1,
                "members": [{"id": "w1", "state": "in_service", "launched": "2026-01-01T00:00:00Z",
                             "samples": [{"t": "2026-01-01T00:09:30Z", "cpu": 5.0, "custom": {"queue_depth": 35.0}}]}]}"#,
        )
        .unwrap();
        let engine = group.engine();
        let evaluation = engine.evaluate(&snapshot.input(&engine, group.min_size, group.max_size));
        // 35 jobs for one worker at a target of 10 each: 4 workers.
        assert_eq!(
            (evaluation.action, evaluation.desired),
            (crate::engine::Action::ScaleOut, 4)
        );
        assert!(
            evaluation.explanation.contains("avg queue_depth 35"),
            "{}",
            evaluation.explanation
        );
    }

    #[test]
    fn custom_metric_names_and_count_are_checked() {
        let text = QUEUE_GROUP.replace("custom:queue_depth", "custom:Queue");
        let error = parse(Path::new("c.toml"), &text).unwrap_err().to_string();
        assert!(
            error.contains("groups[0].policies[0].metric") && error.contains("not a custom metric name"),
            "{error}"
        );
        let mut text = QUEUE_GROUP.to_string();
        for i in 0..4 {
            text += &format!(
                "[[groups.policies]]\nname = \"p{i}\"\ntype = \"target_tracking\"\nmetric = \"custom:m{i}\"\ntarget = 1.0\n"
            );
        }
        let Err(ConfigError::Invalid { problems, .. }) = parse(Path::new("c.toml"), &text) else {
            panic!("five custom metrics must be refused")
        };
        assert!(
            problems
                .iter()
                .any(|p| p.contains("5 custom metrics") && p.contains("at most 4")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_predictive_policy_takes_a_target_a_mode_and_a_buffer_only() {
        let group = |policy: &str| {
            crate::testing::GroupToml::local("web")
                .table(&format!(
                    "[[groups.policies]]\nname = \"daily\"\ntype = \"predictive\"\nmetric = \"cpu\"\n{policy}"
                ))
                .to_toml()
        };
        let config = parse(
            Path::new("c.toml"),
            &group("target = 55.0\nmode = \"forecast_and_scale\"\nscheduling_buffer_secs = 240"),
        )
        .unwrap();
        let Policy::Predictive(policy) = config.groups[0].policies[0].to_policy() else {
            panic!("not predictive")
        };
        assert_eq!(
            (policy.target, policy.mode, policy.scheduling_buffer_secs),
            (55.0, PredictiveMode::ForecastAndScale, Some(240))
        );
        let only = parse(Path::new("c.toml"), &group("target = 55.0")).unwrap();
        let Policy::Predictive(policy) = only.groups[0].policies[0].to_policy() else {
            panic!("not predictive")
        };
        assert_eq!(
            policy.mode,
            PredictiveMode::ForecastOnly,
            "EC2's default: judge the forecast first"
        );
        for (keys, expected) in [
            ("", "target: missing"),
            (
                "target = 50.0\nstabilization_secs = 60",
                "stabilization_secs: applies to `type = \"target_tracking\"`",
            ),
            (
                "target = 50.0\nthreshold = 5.0",
                "threshold: applies to `type = \"step\"`",
            ),
            (
                "target = 50.0\nscheduling_buffer_secs = 7200",
                "scheduling_buffer_secs: at most 3600",
            ),
            ("target = 50.0\nmode = \"guess\"", "unknown variant `guess`"),
        ] {
            let problems = match parse(Path::new("c.toml"), &group(keys)).unwrap_err() {
                ConfigError::Invalid { problems, .. } => problems.join("\n"),
                other => other.to_string(),
            };
            assert!(problems.contains(expected), "{keys}: {problems}");
        }
        // On a step policy, the predictive keys are refused.
        let text = QUEUE_GROUP.replace("target = 10.0", "target = 10.0\nmode = \"forecast_only\"");
        let Err(ConfigError::Invalid { problems, .. }) = parse(Path::new("c.toml"), &text) else {
            panic!()
        };
        assert!(
            problems
                .iter()
                .any(|p| p.contains("mode: applies to `type = \"predictive\"`")),
            "{problems:?}"
        );
    }

    #[test]
    fn policy_keys_of_the_other_kind_and_bad_steps_are_refused() {
        let text = QUEUE_GROUP.replace("target = 10.0", "target = 10.0\nthreshold = 5.0");
        let Err(ConfigError::Invalid { problems, .. }) = parse(Path::new("c.toml"), &text) else {
            panic!()
        };
        assert!(
            problems
                .iter()
                .any(|p| p.contains("policies[0].threshold: applies to `type = \"step\"`")),
            "{problems:?}"
        );
        let steps = LOCAL_EXAMPLE.replacen(
            "adjustment = 2",
            "steps = [{lower = 0, upper = 20, adjustment = 1}, {lower = 10, adjustment = 3}]",
            1,
        );
        let Err(ConfigError::Invalid { problems, .. }) = parse(Path::new("c.toml"), &steps) else {
            panic!()
        };
        assert!(
            problems.iter().any(|p| p.contains("step ranges overlap")),
            "{problems:?}"
        );
        let flapping = LOCAL_EXAMPLE.replacen("threshold = 20.0", "threshold = 60.0", 1);
        let Err(ConfigError::Invalid { problems, .. }) = parse(Path::new("c.toml"), &flapping) else {
            panic!()
        };
        assert!(
            problems.iter().any(|p| p.contains("the group would flap")),
            "{problems:?}"
        );
    }

    #[test]
    fn steps_follow_ec2s_rules() {
        let problems_of = |steps: &str| {
            let text = LOCAL_EXAMPLE.replacen("adjustment = 2", &format!("steps = [{steps}]"), 1);
            match parse(Path::new("c.toml"), &text) {
                Ok(_) => Vec::new(),
                Err(ConfigError::Invalid { problems, .. }) => problems,
                Err(e) => panic!("{e}"),
            }
        };
        // The EC2 guide's policy: a first step of 0, then +1 and +3 above it.
        assert_eq!(
            problems_of(
                "{lower = 0, upper = 10, adjustment = 0}, {lower = 10, upper = 20, adjustment = 1}, {lower = 20, adjustment = 3}"
            ),
            Vec::<String>::new()
        );
        for (steps, expected) in [
            (
                "{lower = 0, upper = 10, adjustment = 1}, {lower = 20, adjustment = 3}",
                "a gap between steps: nothing applies from 10 to 20",
            ),
            (
                "{lower = 0, upper = 20, adjustment = 1}, {lower = 10, adjustment = 3}",
                "step ranges overlap",
            ),
            (
                "{lower = 0, upper = 10, adjustment = 1}, {lower = 10, upper = 20, adjustment = 3}",
                "one step must leave `upper` out",
            ),
            (
                "{lower = 0, adjustment = 1}, {lower = 10, adjustment = 3}",
                "at most one step may leave out `upper`",
            ),
            (
                "{lower = -5, upper = 0, adjustment = 1}, {lower = 0, adjustment = 3}",
                "one step must leave `lower` out",
            ),
            ("{adjustment = 1}", "has neither lower nor upper bound"),
            (
                "{lower = 0, upper = 10, adjustment = -1}, {lower = 10, adjustment = 3}",
                "must all add members, or all remove them",
            ),
        ] {
            let problems = problems_of(steps);
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{steps}: {expected}: {problems:?}"
            );
        }
    }

    #[test]
    fn close_thresholds_and_a_bad_schedule_are_reported() {
        let close = LOCAL_EXAMPLE.replacen("threshold = 20.0", "threshold = 55.0", 1);
        let warnings = parse(Path::new("c.toml"), &close).unwrap().warnings();
        assert!(warnings.iter().any(|w| w.contains("are close")), "{warnings:?}");
        assert!(parse(Path::new("c.toml"), LOCAL_EXAMPLE).unwrap().warnings().is_empty());
        let schedule = format!(
            "{LOCAL_EXAMPLE}\n[[groups.schedules]]\nname = \"s\"\ncron = \"0 25 * * *\"\ntime_zone = \"Mars/Olympus\"\n"
        );
        let Err(ConfigError::Invalid { problems, .. }) = parse(Path::new("c.toml"), &schedule) else {
            panic!()
        };
        for expected in [
            "schedules[0].cron: hour: 25",
            "schedules[0].time_zone: `Mars/Olympus`",
            "schedules[0]: sets nothing",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected} in {problems:?}"
            );
        }
    }

    #[test]
    fn a_lifecycle_hook_needs_a_command_or_an_http_url() {
        let hook = |body: &str| {
            format!("{LOCAL_EXAMPLE}\n[[groups.lifecycle_hooks]]\nname = \"h\"\ntransition = \"launching\"\n{body}\n")
        };
        assert!(parse(Path::new("c.toml"), &hook("url = \"http://127.0.0.1:9000/hook\"")).is_ok());
        assert!(parse(Path::new("c.toml"), &hook("url = \"https://hooks.example/x\"")).is_ok());
        let not_pem = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_pem.path(), "not a certificate").unwrap();
        let not_pem = format!("url = \"https://a/b\"\nca_file = \"{}\"", not_pem.path().display());
        for (body, expected) in [
            ("", "give `command` or `url`"),
            ("url = \"ftp://hooks.example/x\"", "must start with http:// or https://"),
            ("url = \"http://a/b\"\ncommand = [\"true\"]", "not both"),
            (
                "url = \"http://a/b\"\nca_file = \"/etc/hostname\"",
                "only for an https:// url",
            ),
            (
                "url = \"https://a/b\"\nca_file = \"/nonexistent/ca.pem\"",
                "cannot read the CA file",
            ),
            (not_pem.as_str(), "holds no PEM certificate"),
        ] {
            let Err(ConfigError::Invalid { problems, .. }) = parse(Path::new("c.toml"), &hook(body)) else {
                panic!("{body} must be refused")
            };
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected} in {problems:?}"
            );
        }
    }
}
