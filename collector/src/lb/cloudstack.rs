//! A CloudStack load-balancer rule (the virtual router's, as in seeds 000/001): members are assigned to
//! and removed from the rule by VM id; the rule's instances are listed for the periodic inventory.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::{Backend, LoadBalancer, Registration};
use crate::providers::CloudError;
use crate::providers::cloudstack::api::{Api, ApiError, id_text};

pub struct CloudStackLoadBalancer {
    api: Arc<Api>,
    rule_id: String,
    cluster_id: String,
}

impl CloudStackLoadBalancer {
    pub fn new(api: Arc<Api>, rule_id: &str, cluster_id: &str) -> Self {
        Self {
            api,
            rule_id: rule_id.to_string(),
            cluster_id: cluster_id.to_string(),
        }
    }

    async fn change(&self, command: &str, vm_id: &str) -> Result<(), ApiError> {
        let params = [("id", self.rule_id.clone()), ("virtualmachineids", vm_id.to_string())];
        self.api.change(command, &params).await.map(|_| ())
    }
}

#[async_trait]
impl LoadBalancer for CloudStackLoadBalancer {
    async fn register(&self, member: &Registration<'_>) -> Result<(), CloudError> {
        match self.change("assignToLoadBalancerRule", member.instance_id).await {
            Err(e) if e.text.contains("already") => Ok(()),
            result => result.map_err(CloudError::from),
        }
    }

    async fn deregister(&self, _member_id: &str, instance_id: &str) -> Result<(), CloudError> {
        match self.change("removeFromLoadBalancerRule", instance_id).await {
            Err(e) if e.is_not_found() || e.text.contains("not assigned") => Ok(()),
            result => result.map_err(CloudError::from),
        }
    }

    async fn members(&self) -> Result<Vec<Backend>, CloudError> {
        let answer = self
            .api
            .read("listLoadBalancerRuleInstances", &[("id", self.rule_id.clone())])
            .await?;
        let prefix = format!("ebb.{}.", self.cluster_id);
        Ok(answer
            .get("loadbalancerruleinstance")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|vm| {
                let name = vm.get("displayname").and_then(Value::as_str).unwrap_or_default();
                let ip = vm
                    .get("nic")
                    .and_then(Value::as_array)
                    .and_then(|nics| nics.first())
                    .and_then(|nic| nic.get("ipaddress"))
                    .and_then(Value::as_str)
                    .and_then(|ip| ip.parse().ok())?;
                Some(Backend {
                    // A VM ebb did not launch (the seeds' monitored VM) keeps its own name.
                    member_id: name.strip_prefix(&prefix).unwrap_or(name).to_string(),
                    instance_id: id_text(vm.get("id")?)?,
                    address: SocketAddr::new(ip, 0),
                    connections: 0,
                })
            })
            .collect())
    }
}
