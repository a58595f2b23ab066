//! The OpenStack provider (seeds 002 and 003: Red Hat OpenStack, FUJITSU K5): Nova servers from an image
//! and a flavor on networks (each given by name or id), with the launch's user data, marked as ebb's by
//! metadata (`ebb-cluster`, `ebb-group`, `ebb-member`, `ebb-launch`). A launch waits for BUILD to end: ACTIVE
//! is running, ERROR is a failed launch with Nova's fault message, and the server is deleted. `lb::octavia`
//! puts members in an Octavia pool.

pub mod keystone;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use self::keystone::{Cloud, Keystone, refusal};
use super::{CloudError, Instance, InstanceState, LaunchSpec, Provider};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenStackConfig {
    /// A clouds.yaml entry; default: OS_CLOUD, else the OS_* variables.
    pub cloud: Option<String>,
    /// Overrides the cloud's region.
    pub region: Option<String>,
    /// Image and flavor by name or id.
    pub image: String,
    pub flavor: String,
    /// Networks by name or id.
    #[serde(default)]
    pub networks: Vec<String>,
    pub key_name: Option<String>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// Server metadata (Heat's `metadata`), beside ebb's own `ebb-*` keys.
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    pub availability_zone: Option<String>,
    /// The operator's own user data, sent beside ebb's enrolment: a file, read when the configuration is
    /// loaded (a `#!` script, `#cloud-config`, a MIME multipart, or any of them gzipped), or the same inline.
    pub user_data_file: Option<std::path::PathBuf>,
    pub user_data: Option<String>,
    /// `cloud-config` (default; the image runs cloud-init) or `shell` (an image without cloud-init that runs
    /// a user-data script): ebb's enrolment is sent in this form.
    #[serde(default)]
    pub user_data_format: crate::userdata::UserDataFormat,
    /// How long a server may stay in BUILD.
    #[serde(default = "default_build_timeout_secs")]
    pub build_timeout_secs: u32,
}

fn default_build_timeout_secs() -> u32 {
    600
}

impl OpenStackConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, value) in [("image", &self.image), ("flavor", &self.flavor)] {
            if value.trim().is_empty() {
                problems.push(format!("provider.{key}: must not be empty"));
            }
        }
        if self.build_timeout_secs == 0 {
            problems.push("provider.build_timeout_secs: must be at least 1".into());
        }
        // Nova's limits on server metadata: 128 items, keys and values of at most 255 characters.
        if self.metadata.len() > 128 {
            problems.push("provider.metadata: Nova takes at most 128 items".into());
        }
        for (key, value) in &self.metadata {
            if key.starts_with("ebb-") {
                problems.push(format!(
                    "provider.metadata.{key}: keys starting with `ebb-` are ebb's own"
                ));
            }
            if key.is_empty() || key.len() > 255 || value.len() > 255 {
                problems.push(format!(
                    "provider.metadata.{key}: Nova takes keys of 1 to 255 and values of at most 255 characters"
                ));
            }
        }
        problems
    }

    pub fn keystone(&self) -> Result<Keystone, CloudError> {
        let mut cloud = Cloud::load(self.cloud.as_deref()).map_err(CloudError::permanent)?;
        if let Some(region) = &self.region {
            cloud.region = Some(region.clone());
        }
        Keystone::new(cloud)
    }
}

/// Whether `text` is an OpenStack id (a UUID) rather than a name.
fn is_id(text: &str) -> bool {
    text.len() == 36 && text.bytes().filter(|&b| b == b'-').count() == 4
}

/// The ids the launch needs, resolved from names once.
struct Resolved {
    image: String,
    flavor: String,
    networks: Vec<String>,
}

pub struct OpenStackProvider {
    keystone: Arc<Keystone>,
    config: OpenStackConfig,
    cluster_id: String,
    resolved: OnceCell<Resolved>,
    /// How often a building server is looked at.
    poll: Duration,
}

pub(crate) fn server_instance(server: &Value) -> Instance {
    let status = server["status"].as_str().unwrap_or_default();
    let address = server["addresses"]
        .as_object()
        .into_iter()
        .flat_map(|networks| networks.values())
        .flat_map(|addresses| addresses.as_array().cloned().unwrap_or_default())
        .find(|a| a["OS-EXT-IPS:type"] != "floating")
        .and_then(|a| a["addr"].as_str().and_then(|ip| ip.parse().ok()));
    Instance {
        id: server["id"].as_str().unwrap_or_default().to_string(),
        member_id: server["metadata"]["ebb-member"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        address,
        state: match status {
            "ACTIVE" => InstanceState::Running,
            "BUILD" => InstanceState::Pending,
            other => InstanceState::Terminated {
                reason: format!(
                    "the server is {}",
                    if other.is_empty() { "in no known state" } else { other }
                ),
            },
        },
    }
}

impl OpenStackProvider {
    pub fn new(config: OpenStackConfig, keystone: Arc<Keystone>, cluster_id: &str) -> Self {
        Self {
            keystone,
            config,
            cluster_id: cluster_id.to_string(),
            resolved: OnceCell::new(),
            poll: Duration::from_secs(2),
        }
    }

    /// For tests: look at building servers this often.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    async fn get(&self, service: &str, path: &str) -> Result<Value, CloudError> {
        match self.keystone.call(service, Method::GET, path, None, &[]).await? {
            (200, body) => Ok(body),
            (status, body) => Err(refusal(&format!("{service} GET {path}"), status, &body)),
        }
    }

    /// The id of the one `kind` named `name` (or `name` itself if it is an id).
    async fn id_of(&self, service: &str, path: &str, key: &str, name: &str) -> Result<String, CloudError> {
        if is_id(name) {
            return Ok(name.to_string());
        }
        let listed = self.get(service, &format!("{path}?name={name}")).await?;
        let matches: Vec<&Value> = listed[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|item| item["name"] == name)
            .collect();
        match matches.as_slice() {
            [one] => Ok(one["id"].as_str().unwrap_or_default().to_string()),
            [] => Err(CloudError::permanent(format!(
                "no {key} named `{name}`: give its id or an existing name"
            ))),
            _ => Err(CloudError::permanent(format!(
                "several {key} are named `{name}`: give the id"
            ))),
        }
    }

    async fn resolved(&self) -> Result<&Resolved, CloudError> {
        self.resolved
            .get_or_try_init(|| async {
                let image = self.id_of("image", "/v2/images", "images", &self.config.image).await?;
                let flavor = self
                    .id_of("compute", "/flavors/detail", "flavors", &self.config.flavor)
                    .await?;
                let mut networks = Vec::new();
                for network in &self.config.networks {
                    networks.push(self.id_of("network", "/v2.0/networks", "networks", network).await?);
                }
                Ok(Resolved {
                    image,
                    flavor,
                    networks,
                })
            })
            .await
    }

    /// This collector's servers (Nova cannot filter by metadata, so it is done here).
    async fn ours(&self) -> Result<Vec<Value>, CloudError> {
        let listed = self.get("compute", "/servers/detail").await?;
        Ok(listed["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["metadata"]["ebb-cluster"] == self.cluster_id.as_str())
            .cloned()
            .collect())
    }

    async fn delete(&self, id: &str) -> Result<(), CloudError> {
        match self
            .keystone
            .call("compute", Method::DELETE, &format!("/servers/{id}"), None, &[])
            .await?
        {
            (200..=299 | 404, _) => Ok(()),
            (status, body) => Err(refusal(&format!("delete server {id}"), status, &body)),
        }
    }
}

#[async_trait]
impl Provider for OpenStackProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        // A launch retried after a lost answer finds its server.
        if let Some(server) = self
            .ours()
            .await?
            .into_iter()
            .find(|s| s["metadata"]["ebb-launch"] == spec.launch_id.as_str() && s["status"] != "ERROR")
        {
            return Ok(server_instance(&server));
        }
        let resolved = self.resolved().await?;
        let c = &self.config;
        let mut server = json!({
            "name": spec.member_id,
            "imageRef": resolved.image,
            "flavorRef": resolved.flavor,
            "user_data": base64::engine::general_purpose::STANDARD.encode(&spec.user_data),
            "metadata": {
                "ebb-cluster": spec.cluster_id,
                "ebb-group": spec.group,
                "ebb-member": spec.member_id,
                "ebb-launch": spec.launch_id,
            },
            "tags": ["ebb", format!("ebb-group={}", spec.group)],
            "networks": resolved.networks.iter().map(|id| json!({ "uuid": id })).collect::<Vec<_>>(),
        });
        if resolved.networks.is_empty() {
            server["networks"] = json!("auto");
        }
        for (key, value) in &c.metadata {
            if !key.starts_with("ebb-") {
                server["metadata"][key] = json!(value);
            }
        }
        if let Some(key) = &c.key_name {
            server["key_name"] = json!(key);
        }
        if !c.security_groups.is_empty() {
            server["security_groups"] = json!(
                c.security_groups
                    .iter()
                    .map(|g| json!({ "name": g }))
                    .collect::<Vec<_>>()
            );
        }
        if let Some(zone) = &c.availability_zone {
            server["availability_zone"] = json!(zone);
        }
        // Server tags need microversion 2.52.
        let (status, body) = self
            .keystone
            .call(
                "compute",
                Method::POST,
                "/servers",
                Some(&json!({ "server": server })),
                &[("OpenStack-API-Version", "compute 2.52")],
            )
            .await?;
        if status != 202 {
            return Err(refusal("create server", status, &body));
        }
        let id = body["server"]["id"].as_str().unwrap_or_default().to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.config.build_timeout_secs.into());
        loop {
            let server = self.get("compute", &format!("/servers/{id}")).await?["server"].clone();
            match server["status"].as_str() {
                Some("ACTIVE") => return Ok(server_instance(&server)),
                Some("ERROR") => {
                    let fault = server["fault"]["message"]
                        .as_str()
                        .unwrap_or("no fault message")
                        .to_string();
                    let deleted = self.delete(&id).await;
                    return Err(CloudError::retryable(format!(
                        "server {id} went to ERROR: {fault}{}",
                        if deleted.is_ok() {
                            " (deleted)"
                        } else {
                            " (and could not be deleted)"
                        }
                    )));
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(CloudError::retryable(format!(
                        "server {id} still building after {} s; ebb stopped waiting (it is found again by listing)",
                        self.config.build_timeout_secs
                    )));
                }
                _ => tokio::time::sleep(self.poll).await,
            }
        }
    }

    async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceState>, CloudError> {
        let ours = self.ours().await?;
        Ok(ids
            .iter()
            .map(|id| match ours.iter().find(|s| s["id"] == id.as_str()) {
                Some(server) => server_instance(server).state,
                None => InstanceState::Terminated {
                    reason: "Nova lists no such server".into(),
                },
            })
            .collect())
    }

    async fn terminate(&self, id: &str) -> Result<(), CloudError> {
        self.delete(id).await
    }

    async fn list(&self, group: &str) -> Result<Vec<Instance>, CloudError> {
        Ok(self
            .ours()
            .await?
            .iter()
            .filter(|s| s["metadata"]["ebb-group"] == group)
            .map(server_instance)
            .collect())
    }
}
