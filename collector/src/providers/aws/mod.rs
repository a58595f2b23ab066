//! The AWS provider (seed 004): EC2 instances from a launch template or explicit settings, spread over the
//! configured subnets (availability zones), each with its launch's user data, tagged `ebb-cluster`,
//! `ebb-group`, `ebb-member`, `ebb-launch` and `Name`, launched with the launch id as ClientToken (and
//! looked for by its `ebb-launch` tag first) so a repeated launch never makes a second instance. When a subnet's zone has no capacity the next subnet is
//! tried. `lb::aws` puts members in an ELBv2 target group.

pub mod query;

use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use serde::Deserialize;

use self::query::{AwsError, EC2_VERSION, ELBV2_VERSION, Query, Service, child_text};
use super::{CloudError, Instance, InstanceState, LaunchSpec, Provider, TemplateUserData};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Default: AWS_REGION, or the profile's region.
    pub region: Option<String>,
    /// A profile of ~/.aws/config and ~/.aws/credentials; default: AWS_PROFILE, or `default`.
    pub profile: Option<String>,
    /// For EC2-compatible clouds and tests: the EC2 endpoint, also used for ELBv2 unless
    /// `elbv2_endpoint_url` is set.
    pub endpoint_url: Option<String>,
    pub elbv2_endpoint_url: Option<String>,
    /// A launch template, by id or by name, and its version (default `$Default`).
    pub launch_template_id: Option<String>,
    pub launch_template_name: Option<String>,
    #[serde(default = "default_template_version")]
    pub launch_template_version: String,
    /// Without a template (or to override it): the AMI and instance type.
    pub image_id: Option<String>,
    pub instance_type: Option<String>,
    /// Subnets in one or more availability zones; launches rotate over them and move on when one zone has
    /// no capacity.
    #[serde(default)]
    pub subnet_ids: Vec<String>,
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    pub key_name: Option<String>,
    /// An instance profile's name, or its ARN.
    pub iam_instance_profile: Option<String>,
    /// The operator's own user data, sent beside ebb's enrolment (default: the launch template's): a file, read when the configuration is
    /// loaded (a `#!` script, `#cloud-config`, a MIME multipart, or any of them gzipped), or the same inline.
    pub user_data_file: Option<std::path::PathBuf>,
    pub user_data: Option<String>,
    /// `cloud-config` (default; the image runs cloud-init) or `shell` (an image without cloud-init that runs
    /// a user-data script): ebb's enrolment is sent in this form.
    #[serde(default)]
    pub user_data_format: crate::userdata::UserDataFormat,
}

fn default_template_version() -> String {
    "$Default".into()
}

impl AwsConfig {
    /// Problems an operator must fix, for `validate`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let template = self.launch_template_id.is_some() || self.launch_template_name.is_some();
        if self.launch_template_id.is_some() && self.launch_template_name.is_some() {
            problems.push("provider: give launch_template_id or launch_template_name, not both".into());
        }
        if !template && (self.image_id.is_none() || self.instance_type.is_none()) {
            problems.push(
                "provider: give a launch template (launch_template_id or launch_template_name), or image_id and instance_type"
                    .into(),
            );
        }
        for (key, url) in [
            ("endpoint_url", &self.endpoint_url),
            ("elbv2_endpoint_url", &self.elbv2_endpoint_url),
        ] {
            if let Some(url) = url
                && !url.starts_with("https://")
                && !url.starts_with("http://")
            {
                problems.push(format!("provider.{key}: `{url}` must start with https:// or http://"));
            }
        }
        problems
    }

    /// The Query client, with region and credentials from AWS's chain.
    pub async fn connect(&self) -> Result<Aws, CloudError> {
        use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
        if let Some(region) = &self.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(profile) = &self.profile {
            loader = loader.profile_name(profile);
        }
        let sdk = loader.load().await;
        let region = sdk.region().map(|r| r.to_string()).ok_or_else(|| {
            CloudError::permanent(
                "no AWS region: set provider.region, AWS_REGION, or region in the profile of ~/.aws/config",
            )
        })?;
        let credentials = sdk
            .credentials_provider()
            .ok_or_else(|| CloudError::permanent("no AWS credentials provider could be set up"))?;
        let ec2 = Service {
            signing_name: "ec2",
            endpoint: self
                .endpoint_url
                .clone()
                .unwrap_or_else(|| format!("https://ec2.{region}.amazonaws.com/")),
            version: EC2_VERSION,
        };
        let elbv2 = Service {
            signing_name: "elasticloadbalancing",
            endpoint: self
                .elbv2_endpoint_url
                .clone()
                .or_else(|| self.endpoint_url.clone())
                .unwrap_or_else(|| format!("https://elasticloadbalancing.{region}.amazonaws.com/")),
            version: ELBV2_VERSION,
        };
        Ok(Aws {
            query: Query::new(region, credentials)?,
            ec2,
            elbv2,
        })
    }
}

/// A connection to one region's EC2 and ELBv2.
pub struct Aws {
    pub query: Query,
    pub ec2: Service,
    pub elbv2: Service,
}

impl Aws {
    pub async fn ec2(&self, action: &str, params: &[(String, String)]) -> Result<String, AwsError> {
        self.query.call(&self.ec2, action, params).await
    }

    pub async fn elbv2(&self, action: &str, params: &[(String, String)]) -> Result<String, AwsError> {
        self.query.call(&self.elbv2, action, params).await
    }
}

pub struct AwsProvider {
    aws: Arc<Aws>,
    config: AwsConfig,
    cluster_id: String,
    /// The launch template's user data as last read, and when: a scale-out of ten reads it once, and a
    /// new `$Default` or `$Latest` version is seen within [`TEMPLATE_USER_DATA_TTL`].
    template_user_data: tokio::sync::Mutex<Option<(std::time::Instant, Option<TemplateUserData>)>>,
}

/// How long a launch template's user data is used before it is read again.
const TEMPLATE_USER_DATA_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The user data of the launch template version in a DescribeLaunchTemplateVersions answer.
pub(crate) fn template_user_data_in(xml: &str) -> Result<Option<TemplateUserData>, CloudError> {
    let document = roxmltree::Document::parse(xml)
        .map_err(|e| CloudError::retryable(format!("EC2 answered with XML ebb cannot read: {e}")).caused_by(e))?;
    let Some(version) = document
        .descendants()
        .find(|n| n.has_tag_name("item") && child_text(*n, "versionNumber").is_some())
    else {
        return Err(CloudError::permanent(
            "DescribeLaunchTemplateVersions found no such launch template version: check \
             provider.launch_template_id (or _name) and launch_template_version",
        ));
    };
    let source = format!(
        "launch template {} version {}",
        child_text(version, "launchTemplateId").unwrap_or("?"),
        child_text(version, "versionNumber").unwrap_or("?")
    );
    let Some(encoded) = version
        .children()
        .find(|n| n.has_tag_name("launchTemplateData"))
        .and_then(|data| child_text(data, "userData"))
        .filter(|text| !text.trim().is_empty())
    else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| CloudError::permanent(format!("the user data of {source} is not base64: {e}")).caused_by(e))?;
    Ok(Some(TemplateUserData { source, bytes }))
}

fn pair(key: impl Into<String>, value: impl Into<String>) -> (String, String) {
    (key.into(), value.into())
}

/// The instances in a DescribeInstances or RunInstances answer.
pub(crate) fn instances_in(xml: &str) -> Result<Vec<Instance>, CloudError> {
    let document = roxmltree::Document::parse(xml)
        .map_err(|e| CloudError::retryable(format!("EC2 answered with XML ebb cannot read: {e}")).caused_by(e))?;
    Ok(document
        .descendants()
        .filter(|n| n.has_tag_name("item") && child_text(*n, "instanceId").is_some())
        .map(|item| {
            let tags: Vec<(String, String)> = item
                .children()
                .find(|n| n.has_tag_name("tagSet"))
                .map(|set| {
                    set.children()
                        .filter(|n| n.has_tag_name("item"))
                        .filter_map(|t| Some((child_text(t, "key")?.to_string(), child_text(t, "value")?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            let state = item
                .children()
                .find(|n| n.has_tag_name("instanceState"))
                .and_then(|s| child_text(s, "name"))
                .unwrap_or("unknown");
            Instance {
                id: child_text(item, "instanceId").unwrap_or_default().to_string(),
                member_id: tags
                    .iter()
                    .find(|(k, _)| k == "ebb-member")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                address: child_text(item, "privateIpAddress").and_then(|a| a.parse().ok()),
                state: match state {
                    "pending" => InstanceState::Pending,
                    "running" => InstanceState::Running,
                    other => InstanceState::Terminated {
                        reason: format!("the instance is {other}"),
                    },
                },
            }
        })
        .collect())
}

impl AwsProvider {
    pub fn new(config: AwsConfig, aws: Arc<Aws>, cluster_id: &str) -> Self {
        Self {
            aws,
            config,
            cluster_id: cluster_id.to_string(),
            template_user_data: tokio::sync::Mutex::new(None),
        }
    }

    fn run_params(&self, spec: &LaunchSpec, subnet: Option<&str>, token: &str) -> Vec<(String, String)> {
        let c = &self.config;
        let mut params = vec![
            pair("MinCount", "1"),
            pair("MaxCount", "1"),
            pair("ClientToken", token),
            pair(
                "UserData",
                base64::engine::general_purpose::STANDARD.encode(&spec.user_data),
            ),
            pair("TagSpecification.1.ResourceType", "instance"),
        ];
        let tags = [
            ("Name", spec.member_id.as_str()),
            ("ebb-cluster", spec.cluster_id.as_str()),
            ("ebb-group", spec.group.as_str()),
            ("ebb-member", spec.member_id.as_str()),
            ("ebb-launch", spec.launch_id.as_str()),
        ];
        for (i, (key, value)) in tags.iter().enumerate() {
            params.push(pair(format!("TagSpecification.1.Tag.{}.Key", i + 1), *key));
            params.push(pair(format!("TagSpecification.1.Tag.{}.Value", i + 1), *value));
        }
        if let Some(id) = &c.launch_template_id {
            params.push(pair("LaunchTemplate.LaunchTemplateId", id));
        }
        if let Some(name) = &c.launch_template_name {
            params.push(pair("LaunchTemplate.LaunchTemplateName", name));
        }
        if c.launch_template_id.is_some() || c.launch_template_name.is_some() {
            params.push(pair("LaunchTemplate.Version", &c.launch_template_version));
        }
        if let Some(image) = &c.image_id {
            params.push(pair("ImageId", image));
        }
        if let Some(kind) = &c.instance_type {
            params.push(pair("InstanceType", kind));
        }
        if let Some(subnet) = subnet {
            params.push(pair("SubnetId", subnet));
        }
        for (i, group) in c.security_group_ids.iter().enumerate() {
            params.push(pair(format!("SecurityGroupId.{}", i + 1), group));
        }
        if let Some(key) = &c.key_name {
            params.push(pair("KeyName", key));
        }
        if let Some(profile) = &c.iam_instance_profile {
            let key = if profile.starts_with("arn:") {
                "IamInstanceProfile.Arn"
            } else {
                "IamInstanceProfile.Name"
            };
            params.push(pair(key, profile));
        }
        params
    }

    async fn describe_filtered(&self, filters: &[(&str, Vec<String>)]) -> Result<Vec<Instance>, CloudError> {
        let mut params = Vec::new();
        for (i, (name, values)) in filters.iter().enumerate() {
            params.push(pair(format!("Filter.{}.Name", i + 1), *name));
            for (j, value) in values.iter().enumerate() {
                params.push(pair(format!("Filter.{}.Value.{}", i + 1, j + 1), value));
            }
        }
        instances_in(&self.aws.ec2("DescribeInstances", &params).await?)
    }
}

#[async_trait]
impl Provider for AwsProvider {
    /// RunInstances with `UserData` replaces the launch template's, so ebb reads the template's and sends it
    /// beside its enrolment.
    async fn template_user_data(&self) -> Result<Option<TemplateUserData>, CloudError> {
        let c = &self.config;
        let mut params = Vec::new();
        if let Some(id) = &c.launch_template_id {
            params.push(pair("LaunchTemplateId", id));
        } else if let Some(name) = &c.launch_template_name {
            params.push(pair("LaunchTemplateName", name));
        } else {
            return Ok(None);
        }
        params.push(pair("LaunchTemplateVersion.1", &c.launch_template_version));
        let mut cached = self.template_user_data.lock().await;
        if let Some((read_at, user_data)) = &*cached
            && read_at.elapsed() < TEMPLATE_USER_DATA_TTL
        {
            return Ok(user_data.clone());
        }
        let found = template_user_data_in(&self.aws.ec2("DescribeLaunchTemplateVersions", &params).await?)?;
        *cached = Some((std::time::Instant::now(), found.clone()));
        Ok(found)
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        // The ClientToken makes a repeated RunInstances harmless on EC2; EC2-compatible clouds (and moto)
        // may ignore it, so a launch first looks for its instance by tag.
        let existing = self
            .describe_filtered(&[
                ("tag:ebb-launch", vec![spec.launch_id.clone()]),
                ("instance-state-name", vec!["pending".into(), "running".into()]),
            ])
            .await?;
        if let Some(instance) = existing.into_iter().next() {
            return Ok(instance);
        }
        let subnets = &self.config.subnet_ids;
        // Members are numbered in launch order, so their numbers rotate over the subnets; and a retried
        // launch picks the same subnet, so its ClientToken means the same request.
        let first = spec
            .member_id
            .rsplit('-')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| spec.launch_id.bytes().map(usize::from).sum());
        let attempts = subnets.len().max(1);
        let mut last_error = None;
        for attempt in 0..attempts {
            let subnet = (!subnets.is_empty()).then(|| subnets[(first + attempt) % subnets.len()].as_str());
            // A different subnet is a different request: its own token, still derived from the launch.
            let token = if attempt == 0 {
                spec.launch_id.clone()
            } else {
                format!("{}-{attempt}", spec.launch_id)
            };
            match self
                .aws
                .ec2("RunInstances", &self.run_params(spec, subnet, &token))
                .await
            {
                Ok(xml) => {
                    return instances_in(&xml)?
                        .into_iter()
                        .next()
                        .ok_or_else(|| CloudError::retryable("RunInstances answered without an instance"));
                }
                Err(e) if e.is_capacity() && attempt + 1 < attempts => {
                    tracing::warn!(subnet = subnet.unwrap_or("-"), error = %e, "No capacity in this subnet's zone; trying the next subnet.");
                    last_error = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_error
            .map(CloudError::from)
            .unwrap_or_else(|| CloudError::retryable("no subnet could take the instance")))
    }

    async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceState>, CloudError> {
        let found = self.describe_filtered(&[("instance-id", ids.to_vec())]).await?;
        Ok(ids
            .iter()
            .map(|id| match found.iter().find(|i| &i.id == id) {
                Some(instance) => instance.state.clone(),
                None => InstanceState::Terminated {
                    reason: "EC2 knows no such instance".into(),
                },
            })
            .collect())
    }

    async fn terminate(&self, id: &str) -> Result<(), CloudError> {
        match self.aws.ec2("TerminateInstances", &[pair("InstanceId.1", id)]).await {
            Err(e) if e.code == "InvalidInstanceID.NotFound" => Ok(()),
            result => result.map(|_| ()).map_err(CloudError::from),
        }
    }

    async fn list(&self, group: &str) -> Result<Vec<Instance>, CloudError> {
        self.describe_filtered(&[
            ("tag:ebb-cluster", vec![self.cluster_id.clone()]),
            ("tag:ebb-group", vec![group.to_string()]),
        ])
        .await
    }
}
