//! The `ebb-collector` command line: the daemon (`serve`), the `demo`, configuration helpers (`validate`,
//! `gen-config`) and the operator commands that talk to a running collector's Admin API.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ebb_proto::v1::admin_client::AdminClient;
use ebb_proto::v1::{
    ListActivitiesRequest, ListGroupsRequest, ListMembersRequest, SetDesiredCapacityRequest,
};

use crate::config;
use crate::demo::DemoArgs;
use crate::workload::WorkloadArgs;

#[derive(Debug, Parser)]
#[command(
    name = "ebb-collector",
    version,
    about = "Keeps groups of VMs sized to their load."
)]
pub struct Cli {
    /// The collector's gRPC address, for the operator commands.
    #[arg(
        long,
        global = true,
        env = "EBB_SERVER",
        default_value = "http://127.0.0.1:7300"
    )]
    pub server: String,
    #[command(subcommand)]
    pub command: Command,
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
    /// Print a commented example configuration.
    GenConfig,
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
    /// The built-in workload that local instances run.
    #[command(hide = true)]
    Workload(WorkloadArgs),
}

/// Runs an operator command against the Admin API and prints the answer.
pub async fn admin(server: &str, command: Command) -> anyhow::Result<()> {
    let mut client = AdminClient::connect(server.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the collector at {server}: {e}; is it running? (--server / EBB_SERVER)"))?;
    match command {
        Command::Groups => {
            let groups = client
                .list_groups(ListGroupsRequest {})
                .await?
                .into_inner()
                .groups;
            println!(
                "{:<16} {:>4} {:>4} {:>8} {:>10} {:>8} {:>8}",
                "GROUP", "MIN", "MAX", "DESIRED", "IN_SERVICE", "PENDING", "CPU_AVG"
            );
            for g in &groups {
                let cpu = g.cpu_avg_percent.map_or("-".into(), |c| format!("{c:.1}%"));
                println!(
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
                println!("\n{}: {}", g.name, g.last_evaluation);
            }
        }
        Command::Members { group } => {
            let members = client
                .list_members(ListMembersRequest { group })
                .await?
                .into_inner()
                .members;
            println!(
                "{:<16} {:<12} {:<22} {:>7} {:>6} {:>10}  HEALTH",
                "MEMBER", "STATE", "ADDRESS", "CPU", "LOAD1", "LB_CONNS"
            );
            for m in members {
                let cpu = m
                    .cpu_busy_percent
                    .map_or("-".into(), |c| format!("{c:.1}%"));
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
                println!(
                    "{:<16} {:<12} {:<22} {:>7} {:>6} {:>10}  {health}",
                    m.id, m.state, m.address, cpu, load, m.lb_connections
                );
            }
        }
        Command::Activities { group, limit } => {
            let request = ListActivitiesRequest {
                group: group.unwrap_or_default(),
                limit,
            };
            for a in client
                .list_activities(request)
                .await?
                .into_inner()
                .activities
            {
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
                println!(
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
                println!(
                    "{}: desired capacity {} ({} in service, {} pending)",
                    g.name, g.desired_capacity, g.in_service, g.pending
                );
            }
        }
        _ => unreachable!("not an admin command"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
