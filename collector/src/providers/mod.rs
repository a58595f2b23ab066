//! Where members come from: one folder per cloud behind the [`Provider`] trait. A provider knows nothing of
//! policies; it launches, describes, lists and terminates instances, and maps its cloud's errors to
//! [`CloudError`].

pub mod aws;
pub mod cloudstack;
#[cfg(feature = "fake-cloud")]
pub mod fake;
pub mod local;
pub mod openstack;
mod process;
pub mod qemu;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::ProviderConfig;

/// A cloud call that failed, said once for providers and load balancers alike: what an operator reads,
/// whether it is worth retrying, and the error underneath it (an I/O or HTTP error), kept for logs and for
/// code that looks deeper.
#[derive(Debug, Clone)]
pub struct CloudError {
    retryable: bool,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl CloudError {
    /// Worth trying again later: throttling, a timeout, a temporary capacity shortage.
    pub fn retryable(message: impl Into<String>) -> Self {
        CloudError {
            retryable: true,
            message: message.into(),
            source: None,
        }
    }

    /// Will fail the same way until an operator changes something: credentials, quota, configuration.
    pub fn permanent(message: impl Into<String>) -> Self {
        CloudError {
            retryable: false,
            message: message.into(),
            source: None,
        }
    }

    /// The same error, keeping `source` as the error underneath it.
    pub fn caused_by(self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        CloudError {
            source: Some(Arc::new(source)),
            ..self
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl std::fmt::Display for CloudError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if self.retryable {
            f.write_str(" (temporary; ebb will retry)")?;
        }
        Ok(())
    }
}

impl std::error::Error for CloudError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Two errors are the same if they say the same and are retried the same; their sources are not compared.
impl PartialEq for CloudError {
    fn eq(&self, other: &Self) -> bool {
        (self.retryable, &self.message) == (other.retryable, &other.message)
    }
}

/// The cloud API client a group's provider talks through, which its load balancer (a CloudStack rule, an
/// ELBv2 target group, an Octavia pool) uses too.
#[derive(Clone)]
pub enum CloudClient {
    /// The local, qemu and fake providers talk to no cloud.
    None,
    CloudStack(Arc<cloudstack::api::Api>),
    OpenStack(Arc<openstack::keystone::Keystone>),
    Aws(Arc<aws::Aws>),
}

impl ProviderConfig {
    /// The provider these settings describe, and the client it talks through. The local and qemu providers
    /// keep their records under `state_dir`; a cloud's provider tags what it launches with `cluster_id`.
    pub async fn build(
        &self,
        state_dir: &Path,
        cluster_id: &str,
    ) -> Result<(Arc<dyn Provider>, CloudClient), CloudError> {
        Ok(match self {
            ProviderConfig::Local(config) => (
                Arc::new(local::LocalProvider::new(config.clone(), state_dir.join("local"))?),
                CloudClient::None,
            ),
            ProviderConfig::Qemu(config) => (
                Arc::new(qemu::QemuProvider::new(config.clone(), state_dir.join("qemu"))?),
                CloudClient::None,
            ),
            #[cfg(feature = "fake-cloud")]
            ProviderConfig::Fake(config) => (Arc::new(fake::dir::DirCloud::new(config.clone())?), CloudClient::None),
            ProviderConfig::Cloudstack(config) => {
                let api = Arc::new(config.api()?);
                let provider = cloudstack::CloudStackProvider::new(config.clone(), api.clone(), cluster_id);
                (Arc::new(provider), CloudClient::CloudStack(api))
            }
            ProviderConfig::Openstack(config) => {
                let keystone = Arc::new(config.keystone()?);
                let provider = openstack::OpenStackProvider::new(config.clone(), keystone.clone(), cluster_id);
                (Arc::new(provider), CloudClient::OpenStack(keystone))
            }
            ProviderConfig::Aws(config) => {
                let aws = Arc::new(config.connect().await?);
                let provider = aws::AwsProvider::new(config.clone(), aws.clone(), cluster_id);
                (Arc::new(provider), CloudClient::Aws(aws))
            }
        })
    }
}

/// What to launch.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchSpec {
    pub group: String,
    /// ebb's name for the member, which its agent reports as.
    pub member_id: String,
    /// The collector's identity: with the group and the launch id, the tags that let a restarted
    /// collector find what it launched.
    pub cluster_id: String,
    /// Unique per launch attempt; clouds that take an idempotency key get this.
    pub launch_id: String,
    /// The port the member serves on.
    pub service_port: u16,
    /// `/etc/ebb/agent.toml` for the new VM, with its one-time join token. A secret: never log it.
    pub agent_config: String,
    /// The user data sent: ebb's enrolment with the agent config, beside the operator's user data if any
    /// (`userdata::compose`), gzipped if the cloud's limit needs it.
    pub user_data: Vec<u8>,
}

/// User data that came with the cloud's launch settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateUserData {
    /// Where it came from, for activities: "launch template lt-0abc version 3".
    pub source: String,
    /// As the cloud stores it (base64 decoded).
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum InstanceState {
    /// Launched, not running yet.
    Pending,
    Running,
    /// Gone, with the cloud's reason.
    Terminated {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The cloud's id.
    pub id: String,
    pub member_id: String,
    pub address: Option<IpAddr>,
    pub state: InstanceState,
}

/// The one trait every cloud implements.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Starts one instance for `spec`.
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, CloudError>;
    /// The current state of each instance, in the order asked; an unknown id is `Terminated`.
    async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceState>, CloudError>;
    /// Stops an instance for good; terminating an unknown or already terminated instance succeeds.
    async fn terminate(&self, id: &str) -> Result<(), CloudError>;
    /// Every instance this provider holds for `group`.
    async fn list(&self, group: &str) -> Result<Vec<Instance>, CloudError>;
    /// User data the cloud itself would give the group's instances, which ebb's must not replace: an EC2
    /// launch template's. ebb sends it beside its enrolment when the group configures none of its own.
    async fn template_user_data(&self) -> Result<Option<TemplateUserData>, CloudError> {
        Ok(None)
    }
    /// The end of the instance's console output, for the activity of a launch that never became healthy.
    async fn console_tail(&self, _id: &str) -> Option<String> {
        None
    }
    /// Called once when the collector stops normally. Cloud instances keep running; the local and qemu
    /// providers stop their processes and VMs, so the demo leaves nothing running on the machine (after a crash they keep
    /// running, and the next start adopts them).
    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::CloudError;

    #[test]
    fn a_cloud_error_says_its_message_and_keeps_the_error_underneath() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let error = CloudError::permanent("cannot write /x: denied").caused_by(io);
        assert_eq!(error.to_string(), "cannot write /x: denied");
        let source = std::error::Error::source(&error).expect("kept");
        let io = source.downcast_ref::<std::io::Error>().expect("the io error itself");
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            error,
            CloudError::permanent("cannot write /x: denied"),
            "sources are not compared"
        );
        let retry = CloudError::retryable("throttled");
        assert_eq!(retry.to_string(), "throttled (temporary; ebb will retry)");
        assert!(retry.is_retryable() && !error.is_retryable());
        assert!(std::error::Error::source(&retry).is_none());
    }
}
