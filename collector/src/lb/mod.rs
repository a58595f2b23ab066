//! Where traffic goes: one folder per kind of load balancer behind the [`LoadBalancer`] trait. A load
//! balancer knows nothing of policies; the reconciler registers a member once its health check passes and
//! deregisters it before the member is stopped.

pub mod builtin;
pub mod fake;

use std::net::SocketAddr;

use async_trait::async_trait;

use crate::providers::CloudError;

/// A member as the load balancer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub member_id: String,
    pub address: SocketAddr,
    /// Connections forwarded to it so far, where the load balancer counts them.
    pub connections: u64,
}

#[async_trait]
pub trait LoadBalancer: Send + Sync {
    /// Starts sending new traffic to the member. Registering a registered member changes nothing.
    async fn register(&self, member_id: &str, address: SocketAddr) -> Result<(), CloudError>;
    /// Stops sending new traffic to the member; connections already open may finish.
    async fn deregister(&self, member_id: &str) -> Result<(), CloudError>;
    /// The registered members.
    async fn members(&self) -> Result<Vec<Backend>, CloudError>;
}
