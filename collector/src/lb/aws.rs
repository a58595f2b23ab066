//! An ELBv2 target group (an ALB's or NLB's, as in seed 004): members are registered by instance id (or by
//! address for an `ip` target group); the target group's deregistration delay is honoured by draining at
//! least that long before a member is terminated.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;

use super::{Backend, LoadBalancer, Registration};
use crate::providers::CloudError;
use crate::providers::aws::Aws;
use crate::providers::aws::query::child_text;

pub struct AwsTargetGroup {
    aws: Arc<Aws>,
    arn: String,
    /// Register the member's address instead of its instance (an `ip` target group).
    ip_targets: bool,
    /// The target group's `deregistration_delay.timeout_seconds`.
    deregistration_delay_secs: u32,
}

impl AwsTargetGroup {
    /// Reads the target group's deregistration delay; a target group that cannot be read is an error
    /// now, not at the first scale-out.
    pub async fn new(aws: Arc<Aws>, arn: &str, ip_targets: bool) -> Result<Self, CloudError> {
        let xml = aws
            .elbv2(
                "DescribeTargetGroupAttributes",
                &[("TargetGroupArn".into(), arn.into())],
            )
            .await?;
        let document = roxmltree::Document::parse(&xml)
            .map_err(|e| CloudError::retryable(format!("ELBv2 answered with XML ebb cannot read: {e}")).caused_by(e))?;
        let deregistration_delay_secs = document
            .descendants()
            .filter(|n| n.has_tag_name("member"))
            .find(|n| child_text(*n, "Key") == Some("deregistration_delay.timeout_seconds"))
            .and_then(|n| child_text(n, "Value"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        Ok(Self {
            aws,
            arn: arn.to_string(),
            ip_targets,
            deregistration_delay_secs,
        })
    }

    fn target(&self, instance_id: &str, address: Option<SocketAddr>) -> Vec<(String, String)> {
        let mut params = vec![("TargetGroupArn".to_string(), self.arn.clone())];
        match (self.ip_targets, address) {
            (true, Some(address)) => {
                params.push(("Targets.member.1.Id".into(), address.ip().to_string()));
                params.push(("Targets.member.1.Port".into(), address.port().to_string()));
            }
            _ => params.push(("Targets.member.1.Id".into(), instance_id.to_string())),
        }
        params
    }
}

#[async_trait]
impl LoadBalancer for AwsTargetGroup {
    async fn register(&self, member: &Registration<'_>) -> Result<(), CloudError> {
        let params = self.target(member.instance_id, Some(member.address));
        self.aws.elbv2("RegisterTargets", &params).await?;
        Ok(())
    }

    async fn deregister(&self, _member_id: &str, instance_id: &str) -> Result<(), CloudError> {
        // An ip target is found by its id alone only if the port is the group's; ebb registers ip targets
        // with the member's port, so it looks the target up first.
        let params = if self.ip_targets {
            let targets = self.members().await?;
            let Some(target) = targets
                .iter()
                .find(|t| t.instance_id == instance_id || t.member_id == instance_id)
            else {
                return Ok(());
            };
            self.target(instance_id, Some(target.address))
        } else {
            self.target(instance_id, None)
        };
        match self.aws.elbv2("DeregisterTargets", &params).await {
            Err(e) if e.code == "InvalidTarget" => Ok(()),
            result => result.map(|_| ()).map_err(CloudError::from),
        }
    }

    async fn members(&self) -> Result<Vec<Backend>, CloudError> {
        let xml = self
            .aws
            .elbv2("DescribeTargetHealth", &[("TargetGroupArn".into(), self.arn.clone())])
            .await?;
        let document = roxmltree::Document::parse(&xml)
            .map_err(|e| CloudError::retryable(format!("ELBv2 answered with XML ebb cannot read: {e}")).caused_by(e))?;
        Ok(document
            .descendants()
            .filter(|n| n.has_tag_name("member") && n.children().any(|c| c.has_tag_name("Target")))
            .filter(|n| {
                // A draining target is on its way out.
                n.children()
                    .find(|c| c.has_tag_name("TargetHealth"))
                    .and_then(|h| child_text(h, "State"))
                    != Some("draining")
            })
            .filter_map(|n| {
                let target = n.children().find(|c| c.has_tag_name("Target"))?;
                let id = child_text(target, "Id")?.to_string();
                let port: u16 = child_text(target, "Port").and_then(|p| p.parse().ok()).unwrap_or(0);
                let ip = id.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
                Some(Backend {
                    member_id: String::new(),
                    instance_id: id,
                    address: SocketAddr::new(ip, port),
                    connections: 0,
                })
            })
            .collect())
    }

    fn deregistration_delay_secs(&self) -> u32 {
        self.deregistration_delay_secs
    }
}
