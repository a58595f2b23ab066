//! Where traffic goes: one folder per kind of load balancer behind the [`LoadBalancer`] trait. A load
//! balancer knows nothing of policies; the reconciler registers a member once its health check passes and
//! deregisters it before the member is stopped.

pub mod aws;
pub mod builtin;
pub mod cloudstack;
#[cfg(feature = "fake-cloud")]
pub mod fake;
pub mod octavia;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::LoadBalancerConfig;
use crate::providers::{CloudClient, CloudError};

impl LoadBalancerConfig {
    /// The load balancer these settings describe, through the group's cloud client (`cloud`), and where
    /// the built-in one listens. Validation has made sure a cloud's load balancer has its cloud's provider.
    pub async fn build(
        &self,
        cloud: &CloudClient,
        cluster_id: &str,
    ) -> Result<(Arc<dyn LoadBalancer>, Option<SocketAddr>), CloudError> {
        let mismatch = || CloudError::permanent("the load balancer needs its own cloud's provider");
        Ok(match (self, cloud) {
            (LoadBalancerConfig::Builtin { listen }, _) => {
                let lb = builtin::BuiltinLoadBalancer::bind(*listen).await.map_err(|e| {
                    CloudError::permanent(format!("cannot listen on load_balancer.listen {listen}: {e}"))
                })?;
                let front = lb.front();
                (Arc::new(lb), Some(front))
            }
            (LoadBalancerConfig::Cloudstack { rule_id }, CloudClient::CloudStack(api)) => (
                Arc::new(cloudstack::CloudStackLoadBalancer::new(
                    api.clone(),
                    rule_id,
                    cluster_id,
                )),
                None,
            ),
            (
                LoadBalancerConfig::Octavia {
                    pool_id,
                    subnet_id,
                    weight,
                },
                CloudClient::OpenStack(keystone),
            ) => (
                Arc::new(octavia::OctaviaPool::new(
                    keystone.clone(),
                    pool_id,
                    subnet_id.clone(),
                    *weight,
                )),
                None,
            ),
            (
                LoadBalancerConfig::AwsTargetGroup {
                    target_group_arn,
                    ip_targets,
                },
                CloudClient::Aws(aws),
            ) => (
                Arc::new(aws::AwsTargetGroup::new(aws.clone(), target_group_arn, *ip_targets).await?),
                None,
            ),
            _ => return Err(mismatch()),
        })
    }
}

/// A member as the load balancer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// Empty where the load balancer knows members only by instance or address (an ELBv2 target group).
    pub member_id: String,
    /// The instance (or, for an `ip` target group, the address) the load balancer names; may be empty.
    pub instance_id: String,
    pub address: SocketAddr,
    /// Connections forwarded to it so far, where the load balancer counts them.
    pub connections: u64,
}

/// A member as the reconciler puts it behind a load balancer: clouds' balancers name it by instance, the
/// built-in one by address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Registration<'a> {
    pub member_id: &'a str,
    pub instance_id: &'a str,
    pub address: SocketAddr,
}

#[async_trait]
pub trait LoadBalancer: Send + Sync {
    /// Starts sending new traffic to the member. Registering a registered member changes nothing.
    async fn register(&self, member: &Registration<'_>) -> Result<(), CloudError>;
    /// Stops sending new traffic to the member; connections already open may finish. Deregistering a
    /// member that is not registered succeeds.
    async fn deregister(&self, member_id: &str, instance_id: &str) -> Result<(), CloudError>;
    /// The registered members, asked of the load balancer (a cloud API call for a cloud's).
    async fn members(&self) -> Result<Vec<Backend>, CloudError>;
    /// Connections sent to each member so far, where this load balancer counts them locally; asked every
    /// second for `members` and the metrics, so it never calls a cloud API.
    fn connections(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
    /// How long the load balancer keeps sending a deregistered member its open requests; a leaving member
    /// drains at least this long.
    fn deregistration_delay_secs(&self) -> u32 {
        0
    }
}
