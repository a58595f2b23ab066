//! The `ebb-collector` command line: the daemon (`serve`), the `demo`, configuration helpers (`validate`,
//! `gen-config`) and the operator commands that talk to a running collector's Admin API.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use ebb_proto::v1::admin_client::AdminClient;
use ebb_proto::v1::{
    CreateTokenRequest, ExplainRequest, ListActivitiesRequest, ListGroupsRequest, ListMembersRequest,
    ListTokensRequest, RefreshRequest, ReloadRequest, RevokeMemberRequest, RevokeTokenRequest,
    SetDesiredCapacityRequest, SetProtectedRequest, SetSuspendedRequest,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config;
use crate::demo::DemoArgs;
use crate::pki::{self, Pki};
use crate::userdata::{self, UserDataFormat};
use crate::workload::WorkloadArgs;

#[derive(Debug, Parser)]
#[command(name = "ebb-collector", version, about = "Keeps groups of VMs sized to their load.")]
pub struct Cli {
    #[command(flatten)]
    pub connection: AdminConnection,
    #[command(subcommand)]
    pub command: Command,
}

/// How operator commands reach the Admin API: TLS with an admin certificate.
#[derive(Debug, Clone, Args)]
pub struct AdminConnection {
    /// The collector's Admin API: `https://host:port` or `unix:/path`; default: `<state-dir>/admin.sock`.
    #[arg(long, global = true, env = "EBB_SERVER")]
    pub server: Option<String>,
    /// The collector's state directory: `ca.pem`, `admin.pem` and `admin.key` are read from it unless given;
    /// for `serve`, it replaces `server.state_dir`. Default: /var/lib/ebb.
    #[arg(long, global = true, env = "EBB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The collector's CA certificate.
    #[arg(long, global = true, env = "EBB_CA")]
    pub ca: Option<PathBuf>,
    /// An admin certificate (`ebb-collector admin-cert`).
    #[arg(long, global = true, env = "EBB_CERT")]
    pub cert: Option<PathBuf>,
    /// The admin certificate's private key.
    #[arg(long, global = true, env = "EBB_KEY")]
    pub key: Option<PathBuf>,
}

impl AdminConnection {
    /// `--state-dir`, or the packages' default.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/ebb"))
    }

    fn path(&self, given: &Option<PathBuf>, default: &str) -> PathBuf {
        given.clone().unwrap_or_else(|| self.state_dir().join(default))
    }

    pub fn ca_path(&self) -> PathBuf {
        self.path(&self.ca, "ca.pem")
    }

    async fn client(&self) -> anyhow::Result<AdminClient<Channel>> {
        let read = |path: PathBuf| {
            config::read_operator_file(&path, config::MAX_SMALL_FILE_BYTES).map_err(|e| {
                anyhow::anyhow!("cannot read {}: {e}; give --ca/--cert/--key or --state-dir (an admin certificate comes from `ebb-collector admin-cert`)", path.display())
            })
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(self.ca_path())?))
            .identity(Identity::from_pem(
                read(self.path(&self.cert, "admin.pem"))?,
                read(self.path(&self.key, "admin.key"))?,
            ));
        let socket = match self.server.as_deref() {
            None => Some(self.state_dir().join("admin.sock")),
            Some(server) => server.strip_prefix("unix:").map(PathBuf::from),
        };
        let target = socket.as_ref().map_or_else(
            || self.server.clone().unwrap_or_default(),
            |s| format!("unix:{}", s.display()),
        );
        let unreachable = |e: tonic::transport::Error| {
            anyhow::anyhow!(
                "cannot reach the collector's Admin API at {target}: {e}; is it running? (--server / EBB_SERVER, --state-dir)"
            )
        };
        let channel = match socket {
            // TLS over the Unix socket too: the server certificate names `localhost`.
            Some(path) => Endpoint::from_static("https://localhost")
                .tls_config(tls.domain_name("localhost"))?
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(unreachable)?,
            None => Endpoint::from_shared(target.clone())?
                .tls_config(tls)?
                .connect()
                .await
                .map_err(unreachable)?,
        };
        Ok(AdminClient::new(channel))
    }
}

/// A join token to mint: for `token create` and `user-data`.
#[derive(Debug, Clone, Args)]
pub struct TokenOptions {
    #[arg(long)]
    pub group: String,
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u32,
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
    /// Members enrolled with it are never chosen for scale-in.
    #[arg(long)]
    pub protected: bool,
}

async fn set_protected(client: &mut AdminClient<Channel>, member_id: String, protected: bool) -> anyhow::Result<()> {
    let group = client
        .set_protected(SetProtectedRequest {
            member_id: member_id.clone(),
            protected,
        })
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .into_inner()
        .group;
    let now = if protected {
        "protected from"
    } else {
        "no longer protected from"
    };
    crate::outln!("member {member_id} of group {group} is {now} scale-in");
    Ok(())
}

impl TokenOptions {
    /// Mints the token; the secret is in the answer, once.
    async fn create(self, client: &mut AdminClient<Channel>) -> anyhow::Result<ebb_proto::v1::CreateTokenResponse> {
        let request = CreateTokenRequest {
            group: self.group,
            ttl_secs: self.ttl_secs,
            uses: self.uses,
            protected: self.protected,
        };
        Ok(client
            .create_token(request)
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))?
            .into_inner())
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a join token for VMs ebb did not launch. The secret is printed once.
    Create(TokenOptions),
    /// The tokens not yet expired (ids only, never secrets).
    List,
    /// Revoke a token by its id.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Deny a member's certificate at once and close its stream.
    Revoke { member_id: String },
    /// Never choose this member for scale-in (EC2's scale-in protection); kept across restarts.
    Protect { member_id: String },
    /// Let scale-in choose this member again.
    Unprotect { member_id: String },
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// An ssh_scale.py `.idcfrc` (IDCF Cloud / CloudStack).
    Idcfrc {
        path: PathBuf,
        /// The group's name.
        #[arg(long, default_value = "web")]
        group: String,
    },
    /// A Heat template's autoscaling group, policies and alarms (OpenStack, FUJITSU K5).
    Heat {
        path: PathBuf,
        /// The group's name.
        #[arg(long, default_value = "web")]
        group: String,
    },
}

/// The providers `gen-config` has an example for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExampleProvider {
    /// Local processes: the demo, no cloud and no root.
    Local,
    /// CloudStack (IDCF Cloud), as ssh_scale.py ran it (seeds 000/001).
    Cloudstack,
    /// AWS EC2 with a target group and target tracking (seed 004).
    Aws,
    /// OpenStack Nova with an Octavia pool, from a Heat template (seed 002).
    Openstack,
    /// Real VMs on this machine under qemu, from the template `cargo xtask image` bakes.
    Qemu,
}

impl ExampleProvider {
    pub fn example(self) -> &'static str {
        match self {
            ExampleProvider::Local => config::LOCAL_EXAMPLE,
            ExampleProvider::Cloudstack => include_str!("../../examples/cloudstack-idcf.toml"),
            ExampleProvider::Aws => include_str!("../../examples/aws-target-tracking.toml"),
            ExampleProvider::Openstack => include_str!("../../examples/openstack-heat.toml"),
            ExampleProvider::Qemu => include_str!("../../examples/qemu.toml"),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA's SHA-256 fingerprint, which agents pin.
    Show,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[arg(long, env = "EBB_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[arg(long)]
    pub group: String,
    /// `time,demand` lines: time in seconds or RFC 3339, demand in the unit of --member-capacity.
    #[arg(long)]
    pub trace: PathBuf,
    /// What one member serves, in the trace's unit (requests per second, ...).
    #[arg(long)]
    pub member_capacity: f64,
    /// From launch to serving: boot, agent up, health check passed.
    #[arg(long, default_value_t = 120.0)]
    pub boot_secs: f64,
    /// Each boot takes boot-secs × (1 ± this), uniformly.
    #[arg(long, default_value_t = 0.0)]
    pub boot_jitter: f64,
    /// The share of launch calls the cloud refuses.
    #[arg(long, default_value_t = 0.0)]
    pub launch_failure_rate: f64,
    /// CPUs per member (load averages are per member: load1 2 is a busy 2-CPU VM).
    #[arg(long, default_value_t = 2.0)]
    pub member_cpus: f64,
    /// Seconds between evaluations (the collector evaluates every second).
    #[arg(long, default_value_t = 10)]
    pub step_secs: u32,
    /// Divides the time between the trace's points: 30 replays half-hour points one a minute.
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Anchors to run beside the group, comma-separated: ec2-target, ec2-step, heat, k5, ssh-scale, hpa,
    /// or all.
    #[arg(long, value_delimiter = ',')]
    pub compare: Vec<String>,
    /// The oracle's utilisation in percent; default: the group's CPU target, or 50.
    #[arg(long)]
    pub oracle_target: Option<f64>,
    /// Seeds boot jitter and launch failures: the same seed gives the same run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the figures as JSON: one record per policy.
    #[arg(long)]
    pub json: bool,
    /// Also write a chart of demand and each policy's capacity here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the collector.
    Serve {
        #[arg(long, env = "EBB_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Watch a local group scale out under load and back in, with no cloud and no root.
    Demo(DemoArgs),
    /// Check a configuration file and report every problem.
    Validate {
        #[arg(long, env = "EBB_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print a commented example configuration for a provider (the files in `examples/`).
    GenConfig {
        #[arg(long, value_enum, default_value = "local")]
        provider: ExampleProvider,
    },
    /// Turn another tool's configuration into an ebb configuration on stdout; what changes in meaning
    /// goes to stderr.
    Import {
        #[command(subcommand)]
        from: ImportCommand,
    },
    /// List the groups with their capacity and latest evaluation.
    Groups,
    /// List a group's members.
    Members { group: String },
    /// List recent activities, newest first.
    Activities {
        /// Only this group's.
        group: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Set a group's desired capacity.
    Scale {
        group: String,
        #[arg(long)]
        to: u32,
    },
    /// Why a group did, or did not, scale: its evaluations, newest last.
    Explain {
        group: String,
        /// From this moment: `2026-11-23T14:02:00Z`, `14:02` (today, this machine's time zone) or `10m` ago.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Each evaluation as JSON, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate one decision offline from a snapshot of a group, with the engine the collector runs.
    Evaluate {
        #[arg(long, env = "EBB_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        group: String,
        /// A JSON snapshot: now, desired, last_scale_out, last_scale_in, members with their samples.
        #[arg(long)]
        snapshot: PathBuf,
        /// Print the evaluation as JSON (desired, action, explanation, verdicts, ...).
        #[arg(long)]
        json: bool,
    },
    /// Replay a demand trace through a group's policies in virtual time, beside the systems operators
    /// come from (--compare), on a simulated cloud: under-provisioned time, unserved demand,
    /// instance-hours and their slack over a perfect-foresight oracle.
    Simulate(SimulateArgs),
    /// Suspend a group's processes until `resume`: all of them, or those named with --process (decide,
    /// launch, terminate, replace_unhealthy, scheduled_actions, add_to_load_balancer).
    Suspend {
        group: String,
        #[arg(long = "process")]
        processes: Vec<String>,
    },
    /// Resume a group's suspended processes: all of them, or those named with --process.
    Resume {
        group: String,
        #[arg(long = "process")]
        processes: Vec<String>,
    },
    /// Re-read the configuration file and apply it to the running groups (as SIGHUP does).
    Reload,
    /// Replace, by rolling, the members launched with older provider settings: each replacement serves
    /// before the member it replaces leaves.
    Refresh {
        group: String,
        /// Healthy capacity kept, percent of desired; bounds how many are replaced at once.
        #[arg(long, default_value_t = 90)]
        min_healthy_pct: u32,
    },
    /// The collector's certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// One member.
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
    /// Issue an admin certificate (needs the CA key: run it on the collector's host).
    AdminCert {
        /// Writes admin.pem, admin.key and ca.pem here.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "operator")]
        name: String,
        #[arg(long, default_value_t = 90)]
        days: u32,
    },
    /// Print user data for a VM ebb did not launch: mints a token for it.
    UserData {
        #[command(flatten)]
        token: TokenOptions,
        #[arg(long, value_enum, default_value = "cloud-config")]
        format: UserDataFormat,
        /// The address agents reach the collector at.
        #[arg(long, default_value = "https://127.0.0.1:7300")]
        collector_url: String,
    },
    /// The built-in workload that local instances run.
    #[command(hide = true)]
    Workload(WorkloadArgs),
}

/// The SHA-256 fingerprint of the CA certificate in `path`.
pub fn ca_fingerprint(path: &Path) -> anyhow::Result<String> {
    let der = CertificateDer::from_pem_file(path)
        .map_err(|e| anyhow::anyhow!("cannot read the CA certificate {}: {e}", path.display()))?;
    Ok(pki::fingerprint(&der))
}

/// Runs a command that works on local files only.
pub fn local(connection: &AdminConnection, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ca {
            command: CaCommand::Show,
        } => {
            let path = connection.ca_path();
            crate::outln!("{}  {}", ca_fingerprint(&path)?, path.display());
        }
        Command::AdminCert { out, name, days } => {
            let ca = connection.ca_path();
            let ca_key = connection.state_dir().join("ca.key");
            let pki = Pki::from_files(
                &ca,
                &ca_key,
                &["localhost".into()],
                std::time::Duration::from_secs(3600),
            )?;
            let lifetime = std::time::Duration::from_secs(u64::from(days) * 24 * 3600);
            let (cert, key) = pki.issue_admin(&name, crate::clock::now_ms(), lifetime)?;
            std::fs::create_dir_all(&out)?;
            pki::write_private(&out.join("admin.key"), &key)?;
            pki::write_private(&out.join("admin.pem"), &cert.pem)?;
            pki::write_private(&out.join("ca.pem"), pki.ca_pem())?;
            crate::outln!(
                "wrote {0}/admin.pem, {0}/admin.key and {0}/ca.pem; use --state-dir {0}",
                out.display()
            );
        }
        Command::Evaluate {
            config,
            group,
            snapshot,
            json,
        } => {
            let config = config::load(&config)?;
            let group = find_group(&config, &group)?;
            let snapshot_path = snapshot;
            let text = config::read_operator_file(&snapshot_path, MAX_SNAPSHOT_BYTES)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", snapshot_path.display()))?;
            let snapshot = crate::engine::snapshot::Snapshot::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", snapshot_path.display()))?;
            let engine = group.engine();
            let input = snapshot.input(&engine, group.min_size, group.max_size);
            anyhow::ensure!(
                input.min_size <= input.max_size,
                "{}: min_size {} is above max_size {}; a group's limits must allow at least one capacity",
                snapshot_path.display(),
                input.min_size,
                input.max_size
            );
            let evaluation = engine.evaluate(&input);
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&evaluation)?);
            } else {
                crate::outln!("{}", evaluation.explanation);
            }
        }
        Command::Simulate(args) => simulate(args)?,
        _ => unreachable!("not a local command"),
    }
    Ok(())
}

fn find_group<'a>(config: &'a config::CollectorConfig, name: &str) -> anyhow::Result<&'a config::GroupConfig> {
    config.groups.iter().find(|g| g.name == name).ok_or_else(|| {
        let names: Vec<&str> = config.groups.iter().map(|g| g.name.as_str()).collect();
        anyhow::anyhow!("no group named `{name}`; the groups are: {}", names.join(", "))
    })
}

fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    use crate::simulate::{Options, anchors, fleet::CloudModel, trace};
    let config = config::load(&args.config)?;
    let group = find_group(&config, &args.group)?;
    let text = config::read_operator_file(&args.trace, trace::MAX_TRACE_BYTES)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.trace.display()))?;
    let trace =
        trace::Trace::parse(&text, args.speedup).map_err(|e| anyhow::anyhow!("{}: {e}", args.trace.display()))?;
    let compare = if args.compare.iter().any(|c| c == "all") {
        anchors::NAMES.iter().map(|n| n.to_string()).collect()
    } else {
        args.compare
    };
    let options = Options {
        cloud: CloudModel {
            boot_secs: args.boot_secs,
            jitter: args.boot_jitter,
            failure_rate: args.launch_failure_rate,
            member_capacity: args.member_capacity,
            member_cpus: args.member_cpus,
            seed: args.seed,
        },
        step_secs: args.step_secs,
        compare,
        oracle_target_percent: args.oracle_target,
    };
    let report = crate::simulate::simulate(group, &trace, &options).map_err(anyhow::Error::msg)?;
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::out!("{}", report.table());
    }
    if let Some(path) = &args.svg {
        let svg = report.svg().map_err(anyhow::Error::msg)?;
        std::fs::write(path, svg).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The largest snapshot `evaluate` reads (a group of thousands of members with minutes of samples).
const MAX_SNAPSHOT_BYTES: u64 = 64 * 1024 * 1024;

/// Suspends or resumes processes of `group` and says which are suspended now.
async fn suspension(
    client: &mut AdminClient<Channel>,
    group: String,
    processes: Vec<String>,
    suspended: bool,
) -> anyhow::Result<()> {
    let request = SetSuspendedRequest {
        group: group.clone(),
        suspended,
        processes,
    };
    let now = client.set_suspended(request).await?.into_inner().suspended;
    if now.is_empty() {
        crate::outln!("{group}: every process runs");
    } else {
        crate::outln!(
            "{group}: suspended: {}; `ebb-collector resume {group}` resumes them",
            now.join(", ")
        );
    }
    Ok(())
}

/// `--since` for `explain`: an RFC 3339 time, `HH:MM[:SS]` today in this machine's time zone, or a
/// duration ago (`90s`, `10m`, `2h`, `1d`).
pub fn parse_since(text: &str, now: jiff::Timestamp) -> Result<i64, String> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Ok(t.as_millisecond());
    }
    if let Some((number, unit)) = text.split_at_checked(text.len().saturating_sub(1))
        && let Ok(n) = number.parse::<i64>()
    {
        let secs = match unit {
            "s" => Some(n),
            "m" => Some(n * 60),
            "h" => Some(n * 3600),
            "d" => Some(n * 86_400),
            _ => None,
        };
        if let Some(secs) = secs {
            return Ok(now.as_millisecond() - secs * 1000);
        }
    }
    if let Ok(time) = text.parse::<jiff::civil::Time>() {
        let zone = jiff::tz::TimeZone::system();
        let today = zone.to_datetime(now).date();
        return zone
            .to_timestamp(today.to_datetime(time))
            .map(|t| t.as_millisecond())
            .map_err(|e| e.to_string());
    }
    Err(format!(
        "`{text}` is not a time: use 2026-11-23T14:02:00Z, 14:02 (today) or a duration ago like 10m"
    ))
}

/// Runs an operator command against the Admin API and prints the answer.
pub async fn admin(connection: &AdminConnection, command: Command) -> anyhow::Result<()> {
    let mut client = connection.client().await?;
    match command {
        Command::Groups => {
            let groups = client.list_groups(ListGroupsRequest {}).await?.into_inner().groups;
            if groups.is_empty() {
                crate::outln!("no groups: add a [[groups]] table to the configuration, then `ebb-collector reload`");
                return Ok(());
            }
            crate::outln!(
                "{:<16} {:>4} {:>4} {:>8} {:>10} {:>8} {:>8}",
                "GROUP",
                "MIN",
                "MAX",
                "DESIRED",
                "IN_SERVICE",
                "PENDING",
                "CPU_AVG"
            );
            for g in &groups {
                let cpu = g.cpu_avg_percent.map_or("-".into(), |c| format!("{c:.1}%"));
                crate::outln!(
                    "{:<16} {:>4} {:>4} {:>8} {:>10} {:>8} {:>8}",
                    g.name,
                    g.min_size,
                    g.max_size,
                    g.desired_capacity,
                    g.in_service,
                    g.pending,
                    cpu
                );
            }
            for g in &groups {
                crate::outln!("\n{}: {}", g.name, g.last_evaluation);
            }
        }
        Command::Members { group } => {
            let members = client
                .list_members(ListMembersRequest { group })
                .await?
                .into_inner()
                .members;
            crate::outln!(
                "{:<16} {:<12} {:<22} {:>7} {:>6} {:>10} {:<9}  HEALTH",
                "MEMBER",
                "STATE",
                "ADDRESS",
                "CPU",
                "LOAD1",
                "LB_CONNS",
                "PROTECTED"
            );
            if members.is_empty() {
                crate::outln!("(no members)");
            }
            for m in members {
                let cpu = m.cpu_busy_percent.map_or("-".into(), |c| format!("{c:.1}%"));
                let load = m.load1.map_or("-".into(), |l| format!("{l:.2}"));
                let health = m.health.map_or("-".into(), |h| {
                    let status = ebb_proto::v1::health_check::Status::try_from(h.status)
                        .map_or("unknown".to_string(), |s| {
                            s.as_str_name().trim_start_matches("STATUS_").to_lowercase()
                        });
                    if h.reason.is_empty() {
                        status
                    } else {
                        format!("{status}: {}", h.reason)
                    }
                });
                let protected = if m.protected { "yes" } else { "-" };
                crate::outln!(
                    "{:<16} {:<12} {:<22} {:>7} {:>6} {:>10} {protected:<9}  {health}",
                    m.id,
                    m.state,
                    m.address,
                    cpu,
                    load,
                    m.lb_connections
                );
            }
        }
        Command::Activities { group, limit } => {
            let request = ListActivitiesRequest {
                group: group.unwrap_or_default(),
                limit,
            };
            let scope = match &request.group {
                group if group.is_empty() => "any group".to_string(),
                group => format!("group `{group}`"),
            };
            let activities = client.list_activities(request).await?.into_inner().activities;
            if activities.is_empty() {
                crate::outln!("no activities for {scope} yet (launches, terminations and their causes appear here)");
            }
            for a in activities {
                let member = if a.member_id.is_empty() {
                    String::new()
                } else {
                    format!(" {}", a.member_id)
                };
                let detail = if a.detail.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", a.detail)
                };
                crate::outln!(
                    "#{} {} {}{} {} {}→{}: {}{}",
                    a.id,
                    a.group,
                    a.kind,
                    member,
                    a.outcome,
                    a.from_capacity,
                    a.to_capacity,
                    a.cause,
                    detail
                );
            }
        }
        Command::Explain {
            group,
            since,
            limit,
            json,
        } => {
            let since_ms = match since {
                Some(text) => parse_since(&text, jiff::Timestamp::now()).map_err(|e| anyhow::anyhow!(e))?,
                None => 0,
            };
            let request = ExplainRequest {
                group: group.clone(),
                since_ms,
                limit,
            };
            let explanations = client.explain(request).await?.into_inner().explanations;
            if explanations.is_empty() && !json {
                let when = if since_ms > 0 { " in that time" } else { " yet" };
                crate::outln!(
                    "no evaluations of `{group}`{when}: the group evaluates every second once it has members reporting"
                );
            }
            for e in explanations {
                if json {
                    crate::outln!("{}", e.json);
                    continue;
                }
                let time = |ms| crate::engine::snapshot::format_time(ms);
                let span = if e.evaluations > 1 {
                    format!(
                        "{} – {} ({} evaluations)",
                        time(e.from_ms),
                        time(e.until_ms),
                        e.evaluations
                    )
                } else {
                    time(e.from_ms)
                };
                let dry = if e.dry_run { " [dry run: not carried out]" } else { "" };
                crate::outln!("{span}{dry}\n  {}\n", e.text.replace('\n', "\n  "));
            }
        }
        Command::Refresh { group, min_healthy_pct } => {
            let request = RefreshRequest {
                group: group.clone(),
                min_healthy_percent: min_healthy_pct,
            };
            let outdated = client.refresh(request).await?.into_inner().outdated;
            crate::outln!(
                "{group}: refreshing {outdated} member(s); `ebb-collector activities {group}` shows progress"
            );
        }
        Command::Reload => {
            let changes = client.reload(ReloadRequest {}).await?.into_inner().changes;
            if changes.is_empty() {
                crate::outln!("reloaded: nothing changed");
            }
            for change in changes {
                crate::outln!("reloaded: {change}");
            }
        }
        Command::Suspend { group, processes } => suspension(&mut client, group, processes, true).await?,
        Command::Resume { group, processes } => suspension(&mut client, group, processes, false).await?,
        Command::Scale { group, to } => {
            let response = client
                .set_desired_capacity(SetDesiredCapacityRequest {
                    group,
                    desired_capacity: to,
                })
                .await
                .map_err(|status| anyhow::anyhow!("{}", status.message()))?
                .into_inner();
            if let Some(g) = response.group {
                crate::outln!(
                    "{}: desired capacity {} ({} in service, {} pending)",
                    g.name,
                    g.desired_capacity,
                    g.in_service,
                    g.pending
                );
            }
        }
        Command::Token { command } => match command {
            TokenCommand::Create(options) => {
                let created = options.create(&mut client).await?;
                let info = created.info.unwrap_or_default();
                crate::outln!("{}", created.token);
                eprintln!(
                    "token {} for group {}: {} use(s), expires at {} (ms); shown once",
                    info.id, info.group, info.uses_left, info.expires_at_ms
                );
            }
            TokenCommand::List => {
                crate::outln!(
                    "{:<14} {:<16} {:>5} {:>10} {:<16} EXPIRES_AT_MS",
                    "ID",
                    "GROUP",
                    "USES",
                    "PROTECTED",
                    "BOUND_MEMBER"
                );
                let tokens = client.list_tokens(ListTokensRequest {}).await?.into_inner().tokens;
                if tokens.is_empty() {
                    crate::outln!(
                        "(no tokens: launches mint their own; `token create` makes one for a VM ebb did not launch)"
                    );
                }
                for t in tokens {
                    crate::outln!(
                        "{:<14} {:<16} {:>5} {:>10} {:<16} {}",
                        t.id,
                        t.group,
                        t.uses_left,
                        t.protected,
                        t.bound_member_id,
                        t.expires_at_ms
                    );
                }
            }
            TokenCommand::Revoke { id } => {
                client
                    .revoke_token(RevokeTokenRequest { id: id.clone() })
                    .await
                    .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
                crate::outln!("revoked token {id}");
            }
        },
        Command::Member { command } => match command {
            MemberCommand::Revoke { member_id } => {
                client
                    .revoke_member(RevokeMemberRequest {
                        member_id: member_id.clone(),
                    })
                    .await
                    .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
                crate::outln!("revoked member {member_id}: its certificate is denied and its stream closed");
            }
            MemberCommand::Protect { member_id } => set_protected(&mut client, member_id, true).await?,
            MemberCommand::Unprotect { member_id } => set_protected(&mut client, member_id, false).await?,
        },
        Command::UserData {
            token,
            format,
            collector_url,
        } => {
            let fingerprint = ca_fingerprint(&connection.ca_path())?;
            let group = token.group.clone();
            let created = token.create(&mut client).await?;
            let agent_config = userdata::agent_config(&collector_url, &fingerprint, &created.token, &group);
            crate::out!("{}", userdata::render(format, &agent_config));
        }
        _ => unreachable!("not an admin command"),
    }
    Ok(())
}

#[cfg(test)]
mod since_tests {
    use super::*;

    #[test]
    fn since_takes_times_and_durations() {
        let now: jiff::Timestamp = "2026-11-23T14:10:00Z".parse().unwrap();
        let at = |s: &str| parse_since(s, now).unwrap();
        assert_eq!(at("2026-11-23T14:02:00Z"), now.as_millisecond() - 8 * 60_000);
        assert_eq!(at("10m"), now.as_millisecond() - 600_000);
        assert_eq!(at("2h"), now.as_millisecond() - 7_200_000);
        assert!(parse_since("14:02", now).is_ok());
        assert!(parse_since("yesterday", now).unwrap_err().contains("is not a time"));
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
