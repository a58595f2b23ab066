//! How members join: launches (intent first, then every call of a scale-out at once), their user data
//! and agent settings, VMs enrolling with an operator's token, and the launch specification's fingerprint.

use std::net::SocketAddr;

use ebb_proto::v1::AgentSettings;

use super::GroupController;
use crate::activity::ActivityKind;
use crate::config::GroupConfig;
use crate::engine::MemberState;
use crate::engine::Millis;
use crate::model::Member;
use crate::providers::{CloudError, Instance, LaunchSpec};
use crate::store::{Intent, IntentKind};
use crate::userdata::{self, OperatorUserData};

impl GroupController {
    /// Launches `count` members at once: each one's intent is on disk first, then every launch call is in
    /// flight together (a scale-out of ten takes one call's time, not ten). False if any failed.
    pub(super) async fn launch(&mut self, count: u32, now: Millis, cause: &str) -> bool {
        let mut calls = tokio::task::JoinSet::new();
        let mut launches = Vec::new();
        for _ in 0..count {
            let Some((intent, spec)) = self.prepare_launch(now).await else {
                break;
            };
            let index = launches.len();
            match spec {
                Ok((spec, user_data)) => {
                    let provider = self.deps.provider.clone();
                    calls.spawn(async move { (index, provider.launch(&spec).await) });
                    launches.push((intent, user_data, None));
                }
                // The user data could not be made: the cloud never hears of this launch.
                Err(e) => launches.push((intent, String::new(), Some(Err(e)))),
            }
        }
        let prepared = launches.len() as u32;
        while let Some(call) = calls.join_next().await {
            let (index, result) = call.expect("a launch call does not panic");
            launches[index].2 = Some(result);
        }
        let mut all_launched = prepared == count;
        for (intent, user_data, result) in launches {
            let result = result.expect("every launch call was awaited");
            all_launched &= result.is_ok();
            self.finish_launch(&intent, result, &user_data, now, cause).await;
        }
        all_launched
    }

    /// Takes the next member id and writes the launch's intent, registers the member with ingest and mints
    /// its token, then makes the launch's user data (with what it holds, for the activity); `None` if the
    /// store refuses writes (nothing is launched without its intent).
    #[allow(clippy::type_complexity)]
    pub(super) async fn prepare_launch(
        &mut self,
        now: Millis,
    ) -> Option<(Intent, Result<(LaunchSpec, String), CloudError>)> {
        self.launches += 1;
        let member_id = format!("{}-{}", self.config.name, self.launches);
        let launch_id = format!("{member_id}-{now}");
        // The counter and the intent are on disk before the cloud hears of the launch: after a crash the
        // instance is adopted, or the launch known not to have happened; its member id is never reused.
        let intent = Intent {
            key: launch_id.clone(),
            group: self.config.name.clone(),
            kind: IntentKind::Launch,
            member_id: member_id.clone(),
            instance_id: String::new(),
            created_at: now,
        };
        if !self.save() || !self.write_intent(&intent) {
            return None;
        }
        // Allowed to report before the instance exists: its agent may be quicker than the launch call.
        let settings = self.agent_settings(&Member::pending(&member_id, "", None, now));
        self.deps.services.ingest.register(&member_id, settings).await;
        // This launch's own token: single use, bound to this member id.
        let authority = &self.deps.services.authority;
        let (token, _) = authority.tokens.create(
            &self.config.name,
            now,
            authority.launch_token_ttl_secs,
            1,
            false,
            Some(member_id.clone()),
        );
        let agent_config = userdata::agent_config(
            &self.deps.collector_url,
            &authority.pki.fingerprint(),
            &token,
            &self.config.name,
        );
        let spec = self.user_data(&agent_config).await.map(|(user_data, holds)| {
            let spec = LaunchSpec {
                group: self.config.name.clone(),
                member_id,
                cluster_id: self.deps.services.cluster_id.clone(),
                launch_id,
                service_port: self.config.member_port,
                user_data,
                agent_config,
            };
            (spec, holds)
        });
        Some((intent, spec))
    }

    /// One launch's user data: ebb's enrolment beside the operator's (the group's, else what the cloud's
    /// launch settings hold, such as an EC2 launch template's), and what it holds, said for the activity.
    pub(super) async fn user_data(&self, agent_config: &str) -> Result<(Vec<u8>, String), CloudError> {
        let Some((format, limit)) = self.config.user_data_rules() else {
            // The local and fake providers hand the agent its configuration directly.
            return Ok((Vec::new(), String::new()));
        };
        let operator = self.operator_user_data().await?;
        let text = userdata::compose(format, agent_config, operator.as_ref().map(|(o, _)| o))
            .map_err(CloudError::permanent)?;
        let bytes = userdata::fit(text, format, limit).map_err(CloudError::permanent)?;
        Ok((bytes, user_data_holds(operator.as_ref())))
    }

    /// The operator's part of launches' user data and where it comes from: the group's `user_data`, else
    /// the provider's launch settings (an EC2 launch template's).
    pub(super) async fn operator_user_data(&self) -> Result<Option<(OperatorUserData, String)>, CloudError> {
        if let Some(operator) = &self.config.operator_user_data {
            return Ok(Some((operator.clone(), "the group's user data".into())));
        }
        let Some(found) = self.deps.provider.template_user_data().await? else {
            return Ok(None);
        };
        let operator = OperatorUserData::parse(&found.bytes).map_err(|e| {
            CloudError::permanent(format!(
                "the user data of {} {e}; ebb would have sent it beside its enrolment",
                found.source
            ))
        })?;
        Ok(Some((operator, format!("the user data of {}", found.source))))
    }

    /// Takes in the launched member (or forgets it, if the call failed), records the activity, and marks the
    /// intent done once the member is saved.
    pub(super) async fn finish_launch(
        &mut self,
        intent: &Intent,
        result: Result<Instance, CloudError>,
        user_data: &str,
        now: Millis,
        cause: &str,
    ) {
        let member_id = &intent.member_id;
        let size = self.members.len() as u32;
        match &result {
            Ok(instance) => {
                let address = instance.address.map(|ip| SocketAddr::new(ip, self.config.member_port));
                let member = Member {
                    launch_spec: self.launch_spec.clone(),
                    ..Member::pending(member_id, &instance.id, address, now)
                };
                self.add_pending(member).await;
            }
            Err(_) => {
                self.deps.services.ingest.unregister(member_id).await;
                self.deps.services.authority.revoke_member(member_id);
            }
        }
        let detail = result
            .as_ref()
            .map(|i| match user_data {
                "" => format!("instance {}", i.id),
                holds => format!("instance {}, user data: {holds}", i.id),
            })
            .map_err(Clone::clone);
        let new_size = self.members.len() as u32;
        let outcome = match &detail {
            Ok(instance) => format!("launched {instance}"),
            Err(e) => format!("failed: {e}"),
        };
        self.record(
            ActivityKind::Launch,
            cause.to_string(),
            detail,
            member_id,
            (size, new_size),
        );
        // The member is saved before its intent is marked done.
        if self.save() {
            self.finish_intent(&intent.key, now, &outcome);
        }
    }

    /// Adds a member that waits for its first healthy check, telling ingest what its agent should check.
    pub(super) async fn add_pending(&mut self, member: Member) {
        self.deps
            .services
            .ingest
            .register(&member.id, self.agent_settings(&member))
            .await;
        self.members.push(member);
    }

    /// What `member`'s agent is told: its interval, its health check, and whether it is leaving.
    pub(super) fn agent_settings(&self, member: &Member) -> AgentSettings {
        AgentSettings {
            interval_secs: self.config.agent_interval_secs,
            health_check_url: member
                .address
                .map(|a| format!("http://{a}{}", self.config.health_check.path))
                .unwrap_or_default(),
            health_check_timeout_ms: self.config.health_check.timeout_ms,
            drain: member.state == MemberState::Draining,
        }
    }
}

/// The version prefix of [`launch_spec`]'s fingerprints.
const LAUNCH_SPEC_VERSION: &str = "v2:";

/// A short fingerprint of what members are launched with: the provider table as the operator wrote it
/// (canonical) and the operator's user data; versioned (`v2:` and 12 hex digits).
pub(super) fn launch_spec(config: &GroupConfig) -> String {
    let mut settings = config.provider_as_written.clone();
    if let Some(operator) = &config.operator_user_data {
        settings.push('\n');
        settings.push_str(operator.text());
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, settings.as_bytes());
    format!("{LAUNCH_SPEC_VERSION}{}", crate::pki::hex(&digest.as_ref()[..6]))
}

/// The fingerprint collectors before `v2` gave (of the provider settings' Debug text, which changes
/// whenever a setting is added); only to recognise, at start, members launched with today's settings.
pub(super) fn launch_spec_v1(config: &GroupConfig) -> String {
    let mut settings = format!("{:?}", config.provider);
    if let Some(operator) = &config.operator_user_data {
        settings.push_str(operator.text());
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, settings.as_bytes());
    crate::pki::hex(&digest.as_ref()[..6])
}

/// Members an older collector stamped with the v1 fingerprint of the settings in force now are stamped
/// with today's: they are not outdated. Any other old fingerprint stays, and `refresh` replaces them.
pub(super) fn migrate_launch_specs(config: &GroupConfig, members: &mut [Member], spec: &str) {
    let legacy = launch_spec_v1(config);
    for member in members {
        if !member.launch_spec.starts_with(LAUNCH_SPEC_VERSION) && member.launch_spec == legacy {
            member.launch_spec = spec.to_string();
        }
    }
}

/// What a launch's user data holds, in words.
pub(super) fn user_data_holds(operator: Option<&(OperatorUserData, String)>) -> String {
    match operator {
        Some((operator, source)) => format!("ebb's enrolment and {source} ({})", operator.describe()),
        None => "ebb's enrolment only".to_string(),
    }
}
