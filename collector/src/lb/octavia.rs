//! An Octavia pool (seeds 002/003: the load balancer in front of the Heat or K5 group). A member is added
//! with its address and port (and subnet, weight), named after ebb's member; a busy load balancer (409, or
//! the member PENDING_*) is waited out with a growing wait, bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Backend, LoadBalancer, Registration};
use crate::providers::CloudError;
use crate::providers::openstack::keystone::{Keystone, refusal};

/// Attempts in all while the load balancer answers 409 (immutable while PENDING_UPDATE).
const BUSY_ATTEMPTS: u32 = 8;

pub struct OctaviaPool {
    keystone: Arc<Keystone>,
    pool_id: String,
    subnet_id: Option<String>,
    weight: Option<u32>,
    /// The first wait on a busy load balancer; it doubles up to 5 s.
    first_wait: Duration,
}

impl OctaviaPool {
    pub fn new(keystone: Arc<Keystone>, pool_id: &str, subnet_id: Option<String>, weight: Option<u32>) -> Self {
        Self {
            keystone,
            pool_id: pool_id.to_string(),
            subnet_id,
            weight,
            first_wait: Duration::from_secs(1),
        }
    }

    /// For tests: wait this long first on a busy load balancer.
    pub fn with_first_wait(mut self, first_wait: Duration) -> Self {
        self.first_wait = first_wait;
        self
    }

    fn members_path(&self) -> String {
        format!("/v2/lbaas/pools/{}/members", self.pool_id)
    }

    /// Calls Octavia, waiting out 409s; the final answer.
    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<(u16, Value), CloudError> {
        let mut wait = self.first_wait;
        for attempt in 1..=BUSY_ATTEMPTS {
            let (status, answer) = self
                .keystone
                .call("load-balancer", method.clone(), path, body, &[])
                .await?;
            if status != 409 || attempt == BUSY_ATTEMPTS {
                return Ok((status, answer));
            }
            tracing::debug!(path, attempt, "The load balancer is busy; waiting.");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        unreachable!("the last attempt returns")
    }

    async fn list(&self) -> Result<Vec<Value>, CloudError> {
        match self.call(Method::GET, &self.members_path(), None).await? {
            (200, body) => Ok(body["members"].as_array().cloned().unwrap_or_default()),
            (status, body) => Err(refusal("Octavia: list pool members", status, &body)),
        }
    }

    /// Waits until the member's provisioning status leaves PENDING_* (bounded).
    async fn settle(&self, member: &str) -> Result<(), CloudError> {
        let mut wait = self.first_wait;
        for _ in 0..BUSY_ATTEMPTS {
            let (status, body) = self
                .call(Method::GET, &format!("{}/{member}", self.members_path()), None)
                .await?;
            let state = body["member"]["provisioning_status"].as_str().unwrap_or_default();
            match (status, state) {
                (200, "ACTIVE") | (404, _) => return Ok(()),
                (200, "ERROR") => {
                    return Err(CloudError::retryable(format!("pool member {member} went to ERROR")));
                }
                (200, _) => {}
                (status, _) => return Err(refusal("Octavia: read a pool member", status, &body)),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        Err(CloudError::retryable(format!(
            "pool member {member} is still PENDING; ebb stopped waiting"
        )))
    }
}

#[async_trait]
impl LoadBalancer for OctaviaPool {
    async fn register(&self, member: &Registration<'_>) -> Result<(), CloudError> {
        if self.list().await?.iter().any(|m| m["name"] == member.member_id) {
            return Ok(());
        }
        let mut body = json!({ "member": {
            "name": member.member_id,
            "address": member.address.ip().to_string(),
            "protocol_port": member.address.port(),
        }});
        if let Some(subnet) = &self.subnet_id {
            body["member"]["subnet_id"] = json!(subnet);
        }
        if let Some(weight) = self.weight {
            body["member"]["weight"] = json!(weight);
        }
        match self.call(Method::POST, &self.members_path(), Some(&body)).await? {
            (201, answer) => self.settle(answer["member"]["id"].as_str().unwrap_or_default()).await,
            (status, answer) => Err(refusal("Octavia: add a pool member", status, &answer)),
        }
    }

    async fn deregister(&self, member_id: &str, _instance_id: &str) -> Result<(), CloudError> {
        let members = self.list().await?;
        let Some(id) = members
            .iter()
            .find(|m| m["name"] == member_id)
            .and_then(|m| m["id"].as_str())
        else {
            return Ok(());
        };
        match self
            .call(Method::DELETE, &format!("{}/{id}", self.members_path()), None)
            .await?
        {
            (204 | 404, _) => Ok(()),
            (status, answer) => Err(refusal("Octavia: remove a pool member", status, &answer)),
        }
    }

    async fn members(&self) -> Result<Vec<Backend>, CloudError> {
        Ok(self
            .list()
            .await?
            .iter()
            .filter(|m| m["provisioning_status"] != "PENDING_DELETE")
            .filter_map(|m| {
                let ip = m["address"].as_str()?.parse().ok()?;
                let port = m["protocol_port"].as_u64()? as u16;
                Some(Backend {
                    member_id: m["name"].as_str().unwrap_or_default().to_string(),
                    instance_id: String::new(),
                    address: SocketAddr::new(ip, port),
                    connections: 0,
                })
            })
            .collect())
    }
}
