//! The CloudStack provider (seeds 000/001, IDCF Cloud): VMs deployed from a template with a service
//! offering in a zone, each carrying its launch's user data.
//!
//! A VM is recognisable as ebb's three ways: its display name `ebb.<cluster>.<member_id>` (set by the
//! deploy call itself, so even a VM whose tagging was cut short by a crash is found), and its tags
//! `ebb-cluster`, `ebb-group`, `ebb-member`, `ebb-launch` (for operators and for listing). A launch first
//! looks for a VM with its display name, so a launch retried after a lost answer never makes a second VM.

pub mod api;
pub mod credentials;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use self::api::{Api, SignatureVersion, id_text};
use super::{CloudError, Instance, InstanceState, LaunchSpec, Provider};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudStackConfig {
    /// `https://HOST/client/api`; default: the endpoint found with the keys.
    pub endpoint: Option<String>,
    /// An owner-only file with the keys: an ssh_scale.py `.idcfrc`, a `.cloudstack.ini` or a cloudmonkey
    /// config. Default: `CLOUDSTACK_ENDPOINT`/`CLOUDSTACK_KEY`/`CLOUDSTACK_SECRET`, else `~/.cloudstack.ini`.
    pub credentials_file: Option<PathBuf>,
    pub zone_id: String,
    pub template_id: String,
    pub service_offering_id: String,
    #[serde(default)]
    pub network_ids: Vec<String>,
    /// An SSH key pair registered in CloudStack.
    pub keypair: Option<String>,
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    #[serde(default)]
    pub affinity_group_ids: Vec<String>,
    /// Destroy with expunge (the account must be allowed to); otherwise CloudStack expunges later.
    #[serde(default)]
    pub expunge: bool,
    /// 3 (default: signed with an expiry) or 1.
    #[serde(default = "default_signature_version")]
    pub signature_version: u8,
    /// The operator's own user data, sent beside ebb's enrolment: a file, read when the configuration is
    /// loaded (a `#!` script, `#cloud-config`, a MIME multipart, or any of them gzipped), or the same inline.
    pub user_data_file: Option<PathBuf>,
    pub user_data: Option<String>,
    /// `cloud-config` (default; the image runs cloud-init) or `shell` (an image without cloud-init that runs
    /// a user-data script): ebb's enrolment is sent in this form.
    #[serde(default)]
    pub user_data_format: crate::userdata::UserDataFormat,
    /// How long a deploy, destroy or load-balancer job may run.
    #[serde(default = "default_job_timeout_secs")]
    pub job_timeout_secs: u32,
}

fn default_signature_version() -> u8 {
    3
}

fn default_job_timeout_secs() -> u32 {
    600
}

impl CloudStackConfig {
    /// Problems an operator must fix, for `validate`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("zone_id", &self.zone_id),
            ("template_id", &self.template_id),
            ("service_offering_id", &self.service_offering_id),
        ] {
            if value.trim().is_empty() {
                problems.push(format!("provider.{key}: must not be empty"));
            }
        }
        if ![1, 3].contains(&self.signature_version) {
            problems.push("provider.signature_version: must be 1 or 3".into());
        }
        if self.job_timeout_secs == 0 {
            problems.push("provider.job_timeout_secs: must be at least 1".into());
        }
        problems
    }

    /// The API client, with the keys found as [`credentials::load`] says.
    pub fn api(&self) -> Result<Api, CloudError> {
        let credentials = credentials::load(self.credentials_file.as_deref(), self.endpoint.as_deref())
            .map_err(CloudError::permanent)?;
        let signature = if self.signature_version == 1 {
            SignatureVersion::V1
        } else {
            SignatureVersion::V3
        };
        Api::new(
            credentials,
            signature,
            Duration::from_secs(self.job_timeout_secs.into()),
        )
    }
}

pub struct CloudStackProvider {
    api: Arc<Api>,
    config: CloudStackConfig,
    cluster_id: String,
}

/// What ebb reads of a CloudStack VM.
pub(crate) struct Vm {
    id: String,
    display_name: String,
    state: String,
    address: Option<IpAddr>,
    tags: Vec<(String, String)>,
}

impl Vm {
    pub(crate) fn parse(value: &Value) -> Option<Self> {
        let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
        let nics = value.get("nic").and_then(Value::as_array).cloned().unwrap_or_default();
        let nic = nics
            .iter()
            .find(|n| n.get("isdefault").and_then(Value::as_bool) == Some(true))
            .or(nics.first());
        Some(Self {
            id: id_text(value.get("id")?)?,
            display_name: text("displayname"),
            state: text("state"),
            address: nic
                .and_then(|n| n.get("ipaddress"))
                .and_then(Value::as_str)
                .and_then(|a| a.parse().ok()),
            tags: value
                .get("tags")
                .and_then(Value::as_array)
                .map(|tags| {
                    tags.iter()
                        .filter_map(|t| {
                            Some((
                                t.get("key")?.as_str()?.to_string(),
                                t.get("value")?.as_str()?.to_string(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn instance_state(&self) -> InstanceState {
        match self.state.as_str() {
            "Running" => InstanceState::Running,
            "Starting" | "Creating" | "Migrating" => InstanceState::Pending,
            other => InstanceState::Terminated {
                reason: format!(
                    "the VM is {}",
                    if other.is_empty() { "in no known state" } else { other }
                ),
            },
        }
    }
}

impl CloudStackProvider {
    pub fn new(config: CloudStackConfig, api: Arc<Api>, cluster_id: &str) -> Self {
        Self {
            api,
            config,
            cluster_id: cluster_id.to_string(),
        }
    }

    fn display_name(&self, member_id: &str) -> String {
        format!("ebb.{}.{member_id}", self.cluster_id)
    }

    /// The member a VM of ours serves as, from its display name.
    fn member_of(&self, vm: &Vm) -> Option<String> {
        vm.display_name
            .strip_prefix(&format!("ebb.{}.", self.cluster_id))
            .map(str::to_string)
    }

    /// Every VM of this collector: those whose display name says so (which covers those not yet tagged)
    /// and those tagged for it.
    async fn ours(&self) -> Result<Vec<Vm>, CloudError> {
        let by_name = self
            .api
            .read(
                "listVirtualMachines",
                &[("keyword", format!("ebb.{}.", self.cluster_id))],
            )
            .await?;
        let by_tag = self
            .api
            .read(
                "listVirtualMachines",
                &[
                    ("tags[0].key", "ebb-cluster".into()),
                    ("tags[0].value", self.cluster_id.clone()),
                ],
            )
            .await?;
        let mut vms: Vec<Vm> = Vec::new();
        for answer in [by_name, by_tag] {
            for vm in answer
                .get("virtualmachine")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Vm::parse)
            {
                if self.member_of(&vm).is_some() && !vms.iter().any(|v| v.id == vm.id) {
                    vms.push(vm);
                }
            }
        }
        Ok(vms)
    }

    fn instance(&self, vm: &Vm) -> Instance {
        Instance {
            id: vm.id.clone(),
            member_id: self.member_of(vm).unwrap_or_default(),
            address: vm.address,
            state: vm.instance_state(),
        }
    }

    async fn tag(&self, vm_id: &str, spec: &LaunchSpec) {
        let tags = [
            ("ebb-cluster", spec.cluster_id.as_str()),
            ("ebb-group", spec.group.as_str()),
            ("ebb-member", spec.member_id.as_str()),
            ("ebb-launch", spec.launch_id.as_str()),
        ];
        let mut params = vec![
            ("resourceids", vm_id.to_string()),
            ("resourcetype", "UserVm".to_string()),
        ];
        let names: Vec<(String, String)> = tags
            .iter()
            .enumerate()
            .flat_map(|(i, (k, v))| {
                [
                    (format!("tags[{i}].key"), k.to_string()),
                    (format!("tags[{i}].value"), v.to_string()),
                ]
            })
            .collect();
        params.extend(names.iter().map(|(k, v)| (k.as_str(), v.clone())));
        if let Err(e) = self.api.change("createTags", &params).await {
            // The display name still marks it as ours.
            tracing::warn!(vm = vm_id, error = %e.text, "Cannot tag a new CloudStack VM; it is still recognised by its name.");
        }
    }
}

#[async_trait]
impl Provider for CloudStackProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        let name = self.display_name(&spec.member_id);
        let existing = self.ours().await?;
        if let Some(vm) = existing
            .iter()
            .find(|vm| vm.display_name == name && !matches!(vm.instance_state(), InstanceState::Terminated { .. }))
        {
            return Ok(self.instance(vm));
        }
        let c = &self.config;
        let mut params = vec![
            ("zoneid", c.zone_id.clone()),
            ("templateid", c.template_id.clone()),
            ("serviceofferingid", c.service_offering_id.clone()),
            ("displayname", name),
            (
                "userdata",
                base64::engine::general_purpose::STANDARD.encode(&spec.user_data),
            ),
        ];
        for (key, ids) in [
            ("networkids", &c.network_ids),
            ("securitygroupids", &c.security_group_ids),
            ("affinitygroupids", &c.affinity_group_ids),
        ] {
            if !ids.is_empty() {
                params.push((key, ids.join(",")));
            }
        }
        if let Some(keypair) = &c.keypair {
            params.push(("keypair", keypair.clone()));
        }
        let result = self.api.change("deployVirtualMachine", &params).await?;
        let vm = result
            .get("virtualmachine")
            .and_then(Vm::parse)
            .ok_or_else(|| CloudError::retryable("deployVirtualMachine's job gave no virtual machine"))?;
        self.tag(&vm.id, spec).await;
        Ok(self.instance(&vm))
    }

    async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceState>, CloudError> {
        let ours = self.ours().await?;
        Ok(ids
            .iter()
            .map(|id| match ours.iter().find(|vm| &vm.id == id) {
                Some(vm) => vm.instance_state(),
                None => InstanceState::Terminated {
                    reason: "CloudStack lists no such VM".into(),
                },
            })
            .collect())
    }

    async fn terminate(&self, id: &str) -> Result<(), CloudError> {
        let mut params = vec![("id", id.to_string())];
        if self.config.expunge {
            params.push(("expunge", "true".into()));
        }
        match self.api.change("destroyVirtualMachine", &params).await {
            Err(e) if e.is_not_found() => Ok(()),
            result => result.map(|_| ()).map_err(CloudError::from),
        }
    }

    async fn list(&self, group: &str) -> Result<Vec<Instance>, CloudError> {
        Ok(self
            .ours()
            .await?
            .iter()
            .filter(|vm| match vm.tag("ebb-group") {
                Some(tagged) => tagged == group,
                // Not tagged yet: its member id names the group (`<group>-<n>`).
                None => self.member_of(vm).is_some_and(|member| {
                    member
                        .strip_prefix(group)
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                }),
            })
            .map(|vm| self.instance(vm))
            .collect())
    }
}
