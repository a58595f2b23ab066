//! The controller against the fake provider and load balancer: every behaviour of a group, step by step.

use super::launch::launch_spec_v1;
use super::*;
use crate::activity::ActivityKind;
use crate::clock::now_ms;
use crate::lb::fake::FakeLoadBalancer;
use crate::providers::fake::FakeProvider;
use crate::providers::{CloudError, LaunchSpec};
use crate::store::{Intent, IntentKind};
use crate::testing::GroupToml;
use ebb_proto::v1::AgentSettings;
use ebb_proto::v1::health_check::Status as HealthStatus;
use ebb_proto::v1::{HealthCheck, Hello, Sample};
use tokio::sync::oneshot;

/// The test group: one to three local members, no cooldowns, warm-up or drain, a CPU scale-in policy.
fn group() -> GroupToml {
    GroupToml::local("web")
        .set("min_size", 1)
        .set("cooldown_secs", 0)
        .set("warmup_secs", 0)
        .set("drain_secs", 0)
        .set("member_port", 8080)
        .cpu_policy("cpu-low", "lt", 20.0, -1)
}

struct Harness {
    controller: GroupController,
    handle: GroupHandle,
    provider: FakeProvider,
    lb: FakeLoadBalancer,
    ingest: IngestHandle,
    activities: ActivityLog,
    seq: u64,
}

async fn harness() -> Harness {
    harness_with(|group| group).await
}

/// A harness for the test group with its TOML changed by `edit`.
async fn harness_with(edit: impl FnOnce(GroupToml) -> GroupToml) -> Harness {
    let store = Arc::new(Store::in_memory());
    harness_on(edit, store, FakeProvider::default(), FakeLoadBalancer::default()).await
}

/// A harness whose state lives in `store`, with these cloud fakes (a restart keeps all three).
async fn harness_on(
    edit: impl FnOnce(GroupToml) -> GroupToml,
    store: Arc<Store>,
    provider: FakeProvider,
    lb: FakeLoadBalancer,
) -> Harness {
    let config = crate::config::parse(std::path::Path::new("test.toml"), &edit(group()).to_toml()).unwrap();
    let metrics = Arc::new(Metrics::default());
    let ingest = IngestHandle::spawn(metrics.clone(), 600_000, Vec::new());
    let activities = ActivityLog::new(metrics.clone(), store.clone(), 42);
    let pki_dir = tempfile::tempdir().unwrap();
    let deps = Dependencies {
        provider: Arc::new(provider.clone()),
        load_balancer: Arc::new(lb.clone()),
        services: Services {
            ingest: ingest.clone(),
            activities: activities.clone(),
            metrics,
            authority: Arc::new(
                Authority::new(
                    crate::pki::tests::pki(pki_dir.path()),
                    1800,
                    Default::default(),
                    store.clone(),
                )
                .unwrap(),
            ),
            explanations: ExplanationLog::new(store.clone(), 3600),
            store: store.clone(),
            cluster_id: "test".into(),
            clock: Arc::new(crate::clock::SystemClock),
        },
        collector_url: "https://127.0.0.1:7300".into(),
    };
    let (controller, handle, _commands) = GroupController::new(config.groups[0].clone(), deps).await.unwrap();
    Harness {
        controller,
        handle,
        provider,
        lb,
        ingest,
        activities,
        seq: 0,
    }
}

impl Harness {
    /// One sample from `member` at `at` with this CPU and health.
    async fn report(&mut self, member: &str, at: Millis, cpu: f64, healthy: bool) {
        self.report_sample(member, at, cpu, healthy, false).await;
    }

    /// A sample that may say the agent has drained; returns the settings the agent is sent back.
    async fn report_sample(
        &mut self,
        member: &str,
        at: Millis,
        cpu: f64,
        healthy: bool,
        drained: bool,
    ) -> Option<AgentSettings> {
        self.seq += 1;
        let hello = Hello {
            member_id: member.into(),
            run_id: 1,
            ..Hello::default()
        };
        self.ingest.hello(hello).await.unwrap();
        let status = if healthy {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        };
        let sample = Sample {
            seq: self.seq,
            timestamp_ms: at,
            cpu_busy_percent: Some(cpu),
            health: Some(HealthCheck {
                status: status as i32,
                ..HealthCheck::default()
            }),
            drained,
            ..Sample::default()
        };
        self.ingest.batch(member, 1, vec![sample], at).await.unwrap().settings
    }

    fn kinds(&self) -> Vec<String> {
        self.activities
            .since(0, "")
            .iter()
            .map(|a| format!("{} {}", a.kind.as_str(), a.member_id).trim().to_string())
            .collect()
    }
}

#[tokio::test]
async fn a_member_joins_the_load_balancer_only_once_healthy() {
    let mut h = harness().await;
    let now = now_ms();
    h.controller.step(now).await;
    assert_eq!(h.provider.running(), ["web-1"]);
    assert!(h.lb.registered().is_empty());

    h.report("web-1", now + 500, 50.0, false).await;
    h.controller.step(now + 1000).await;
    assert!(h.lb.registered().is_empty(), "unhealthy: not registered");

    h.report("web-1", now + 1500, 50.0, true).await;
    h.controller.step(now + 2000).await;
    assert_eq!(h.lb.registered(), ["web-1"]);
    assert_eq!(h.handle.status().in_service(), 1);
    // The test group's cooldown of 0 s is shorter than this member's 2 s boot: said once.
    assert_eq!(h.kinds(), ["launch web-1", "register web-1", "warning"]);
    let warning = h.activities.newest("web", 1).remove(0);
    assert!(
        warning.cause.contains("longer than scale_out_cooldown_secs (0 s)"),
        "{}",
        warning.cause
    );
}

#[tokio::test]
async fn scale_in_deregisters_before_it_terminates() {
    let mut h = harness().await;
    let now = now_ms();
    h.controller.capacity.desired = 2;
    h.controller.step(now).await;
    for member in ["web-1", "web-2"] {
        h.report(member, now + 100, 50.0, true).await;
    }
    h.controller.step(now + 200).await;
    assert_eq!(h.lb.registered(), ["web-1", "web-2"]);
    // Ten idle seconds from both.
    for at in (1..=10).map(|s| now + 200 + s * 1000) {
        h.report("web-1", at, 2.0, true).await;
        h.report("web-2", at, 4.0, true).await;
    }
    h.controller.step(now + 10_300).await;
    assert_eq!(h.handle.status().desired, 1);
    let activities = h.activities.since(0, "web");
    let kinds: Vec<&str> = activities.iter().map(|a| a.kind.as_str()).collect();
    let deregister = kinds.iter().position(|k| *k == "deregister").unwrap();
    let terminate = kinds.iter().position(|k| *k == "terminate").unwrap();
    assert!(deregister < terminate, "{kinds:?}");
    assert_eq!(
        activities[deregister].member_id, "web-2",
        "the newest member goes first"
    );
    let scale_in = activities.iter().find(|a| a.kind == ActivityKind::ScaleIn).unwrap();
    assert!(
        scale_in
            .cause
            .contains("policy cpu-low: avg cpu < 20%: cpu 3% over 10 s"),
        "{}",
        scale_in.cause
    );
    assert_eq!(h.lb.registered(), ["web-1"]);
    assert_eq!(h.provider.running(), ["web-1"]);
}

#[tokio::test]
async fn a_failed_launch_is_recorded_and_retried_later_not_every_second() {
    let mut h = harness().await;
    h.provider
        .fail_next_launch(CloudError::permanent("quota exceeded: 20 instances"));
    let now = now_ms();
    h.controller.step(now).await;
    let failed = h.activities.since(0, "web");
    assert_eq!(failed[0].outcome, "failed");
    assert!(failed[0].detail.contains("quota exceeded"), "{:?}", failed[0]);
    h.controller.step(now + 1000).await;
    assert_eq!(h.provider.calls(), ["launch web-1"], "no retry within the retry delay");
    h.controller.step(now + LAUNCH_RETRY_MS).await;
    assert_eq!(h.provider.calls(), ["launch web-1", "launch web-2"]);
    assert_eq!(h.provider.running(), ["web-2"]);
}

#[tokio::test(start_paused = true)]
async fn a_scale_out_of_ten_sends_all_ten_launch_calls_at_once() {
    let mut h = harness_with(|g| g.set("min_size", 0).set("max_size", 20)).await;
    h.controller.step(now_ms()).await;
    assert!(h.provider.running().is_empty());
    h.provider.set_latency(Duration::from_secs(2));
    let started = tokio::time::Instant::now();
    send(&mut h, |reply| Command::SetDesired { desired: 10, reply }).await;
    assert_eq!(h.provider.running().len(), 10);
    assert_eq!(
        h.provider.most_launches_in_flight(),
        10,
        "every launch in flight together"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "one call's latency, not ten: {:?} of (paused) time",
        started.elapsed()
    );
    let launched: Vec<_> = h
        .activities
        .since(0, "web")
        .into_iter()
        .filter(|a| a.kind == ActivityKind::Launch)
        .collect();
    assert_eq!(launched.len(), 10, "each launch has its own activity");
    assert!(launched.iter().all(|a| a.outcome == "ok"), "{launched:?}");
}

#[tokio::test]
async fn a_failed_launch_among_several_is_recorded_and_the_others_join() {
    let mut h = harness_with(|g| g.set("max_size", 20)).await;
    h.controller.step(now_ms()).await;
    h.provider
        .fail_next_launch(CloudError::permanent("quota exceeded: 3 instances"));
    send(&mut h, |reply| Command::SetDesired { desired: 4, reply }).await;
    assert_eq!(
        h.provider.running().len(),
        3,
        "the first instance and two of the three launches"
    );
    let failed: Vec<_> = h
        .activities
        .since(0, "web")
        .into_iter()
        .filter(|a| a.outcome == "failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].detail.contains("quota exceeded"));
    assert_eq!(
        h.handle.status().members.len(),
        3,
        "the failed launch leaves no member behind"
    );
}

#[tokio::test]
async fn the_cloud_is_asked_about_the_instances_every_ten_seconds_not_every_tick() {
    let mut h = harness().await;
    let now = now_ms();
    for second in 0..60 {
        let at = now + second * 1000;
        h.controller.step(at).await;
        h.report("web-1", at + 100, 50.0, true).await;
    }
    // The first tick has no member to ask about yet; then 10, 20, 30, 40 and 50 s.
    assert_eq!(h.provider.describes(), 5, "one call per 10 s, not one per second");
}

#[tokio::test]
async fn a_lost_instance_leaves_the_load_balancer_and_is_replaced() {
    let mut h = harness().await;
    let now = now_ms();
    h.controller.step(now).await;
    h.report("web-1", now + 100, 50.0, true).await;
    h.controller.step(now + 200).await;
    h.provider.kill("web-1", "the hypervisor failed");
    h.controller.step(now + 1200).await;
    assert!(
        !h.kinds().contains(&"instance_lost web-1".to_string()),
        "the cloud is not asked every second"
    );
    h.controller.step(now + 10_200).await;
    assert_eq!(
        h.kinds(),
        [
            "launch web-1",
            "register web-1",
            "instance_lost web-1",
            "deregister web-1",
            "terminate web-1",
            "launch web-2"
        ]
    );
    assert_eq!(
        h.provider.calls(),
        ["launch web-1", "terminate fake-1", "launch web-2"],
        "whatever is left of the instance is terminated"
    );
    let lost = h
        .activities
        .since(0, "web")
        .into_iter()
        .find(|a| a.kind == ActivityKind::InstanceLost)
        .unwrap();
    assert_eq!(lost.cause, "the hypervisor failed");
    assert!(h.lb.registered().is_empty());
}

#[tokio::test]
async fn a_stopped_instance_that_cannot_be_terminated_yet_stays_until_it_is_and_is_replaced_once() {
    let mut h = harness().await;
    let now = now_ms();
    h.controller.step(now).await;
    h.report("web-1", now + 100, 50.0, true).await;
    h.controller.step(now + 200).await;
    h.provider.kill("web-1", "the VM is Stopped");
    h.provider
        .fail_next_terminate(CloudError::retryable("the cloud is busy"));
    h.controller.step(now + 10_200).await;
    assert_eq!(
        h.provider.calls(),
        ["launch web-1", "terminate fake-1"],
        "no replacement while the stopped VM may still come back"
    );
    assert_eq!(h.controller.members.len(), 1);
    h.controller.step(now + 20_200).await;
    assert_eq!(
        h.provider.calls(),
        ["launch web-1", "terminate fake-1", "terminate fake-1", "launch web-2"]
    );
    h.controller.step(now + 30_200).await;
    assert_eq!(h.provider.calls().len(), 4, "replaced once");
    assert!(h.lb.registered().is_empty());
}

async fn send(
    h: &mut Harness,
    command: impl FnOnce(oneshot::Sender<Result<GroupStatus, ControlError>>) -> Command,
) -> GroupStatus {
    let (reply, answer) = oneshot::channel();
    h.controller.handle(command(reply), now_ms()).await;
    answer.await.unwrap().unwrap()
}

async fn join(h: &mut Harness, protected: bool) -> String {
    let (reply, answer) = oneshot::channel();
    let facts = ebb_proto::v1::InstanceFacts {
        hostname: "monitored".into(),
        addresses: vec!["10.1.1.1".into()],
        instance_id: "i-hand-made".into(),
    };
    h.controller
        .handle(
            Command::JoinExternal {
                facts,
                protected,
                reply,
            },
            now_ms(),
        )
        .await;
    answer.await.unwrap().unwrap()
}

#[tokio::test]
async fn joins_queued_together_are_answered_together_and_the_command_behind_them_is_carried_out() {
    let mut h = harness().await;
    h.controller.step(now_ms()).await;
    let (queue, mut commands) = mpsc::channel(8);
    let mut joined = Vec::new();
    for n in 0..3 {
        let (reply, answer) = oneshot::channel();
        let facts = ebb_proto::v1::InstanceFacts {
            hostname: format!("hand-made-{n}"),
            addresses: vec![format!("10.1.1.{n}")],
            instance_id: format!("i-hand-made-{n}"),
        };
        queue
            .try_send(Command::JoinExternal {
                facts,
                protected: false,
                reply,
            })
            .unwrap();
        joined.push(answer);
    }
    let (reply, mut protected) = oneshot::channel();
    queue
        .try_send(Command::SetProtected {
            member_id: "web-1".into(),
            protected: true,
            reply,
        })
        .unwrap();
    let first = commands.try_recv().unwrap();
    h.controller.handle_queued(first, &mut commands).await;

    // Answered by the time the first command's handling returns: none left waiting in the queue.
    let answers: Vec<_> = joined.into_iter().map(|mut a| a.try_recv().unwrap()).collect();
    let status = h.handle.status();
    let ids: Vec<&str> = status.members.iter().map(|m| m.member.id.as_str()).collect();
    assert_eq!(ids, ["web-1", "web-2", "web-3"]);
    assert_eq!(answers[0], Ok("web-2".to_string()));
    assert_eq!(answers[1], Ok("web-3".to_string()));
    assert!(
        matches!(&answers[2], Err(ControlError::Refused(why)) if why.contains("max_size 3")),
        "{answers:?}"
    );
    assert_eq!(
        protected.try_recv().unwrap(),
        Ok(()),
        "the command queued behind the joins"
    );
    assert!(h.handle.status().members[0].member.protected);
}

#[tokio::test]
async fn protected_members_are_never_scaled_in_and_hand_made_ones_are_never_terminated() {
    let mut h = harness().await;
    h.controller.step(now_ms()).await;
    let monitored = join(&mut h, true).await;
    let extra = join(&mut h, false).await;
    assert_eq!(h.handle.status().members.len(), 3);
    assert_eq!(h.controller.capacity.desired, 3, "joined members count toward capacity");

    // Down to 1: the unprotected hand-made member leaves (and keeps running), then ebb's own is terminated.
    send(&mut h, |reply| Command::SetDesired { desired: 1, reply }).await;
    let members: Vec<String> = h.handle.status().members.iter().map(|m| m.member.id.clone()).collect();
    assert_eq!(
        members,
        std::slice::from_ref(&monitored),
        "only the protected member is left"
    );
    assert_eq!(
        h.provider.calls(),
        ["launch web-1", "terminate fake-1"],
        "the provider never hears of hand-made VMs"
    );
    let kinds = h.kinds();
    assert!(kinds.contains(&format!("leave {extra}")), "{kinds:?}");

    // The protected member stays even when desired is below what protection allows.
    h.controller.config.min_size = 0;
    h.controller.capacity.min_size = 0;
    send(&mut h, |reply| Command::SetDesired { desired: 0, reply }).await;
    assert_eq!(h.handle.status().members.len(), 1);
    assert!(h.handle.status().members[0].member.protected);
}

#[tokio::test]
async fn an_operator_protects_a_member_from_scale_in_and_lifts_it() {
    async fn protect(h: &mut Harness, member_id: &str, protected: bool) -> Result<(), ControlError> {
        let (reply, answer) = oneshot::channel();
        let member_id = member_id.to_string();
        let command = Command::SetProtected {
            member_id,
            protected,
            reply,
        };
        h.controller.handle(command, now_ms()).await;
        answer.await.unwrap()
    }
    let mut h = harness().await;
    h.controller.step(now_ms()).await;
    send(&mut h, |reply| Command::SetDesired { desired: 2, reply }).await;
    assert_eq!(protect(&mut h, "web-1", true).await, Ok(()));
    assert_eq!(
        protect(&mut h, "web-9", true).await,
        Err(ControlError::NotFound("group web has no member web-9".into()))
    );

    // A change the store cannot keep is refused, not half made.
    h.controller.deps.services.store.refuse_writes(true);
    let refused = protect(&mut h, "web-1", false).await.unwrap_err();
    assert!(
        matches!(&refused, ControlError::Unavailable(why) if why.contains("the store refuses writes")),
        "{refused}"
    );
    h.controller.deps.services.store.refuse_writes(false);
    assert!(h.controller.members.iter().any(|m| m.id == "web-1" && m.protected));

    // The oldest member would go first; protected, it stays whatever the policy says.
    h.controller.engine.termination = crate::engine::Termination::Oldest;
    send(&mut h, |reply| Command::SetDesired { desired: 1, reply }).await;
    let ids: Vec<String> = h.handle.status().members.iter().map(|m| m.member.id.clone()).collect();
    assert_eq!(ids, ["web-1"]);
    assert!(h.kinds().contains(&"protection web-1".to_string()), "{:?}", h.kinds());

    assert_eq!(protect(&mut h, "web-1", false).await, Ok(()));
    h.controller.config.min_size = 0;
    h.controller.capacity.min_size = 0;
    send(&mut h, |reply| Command::SetDesired { desired: 0, reply }).await;
    assert!(h.handle.status().members.is_empty(), "unprotected, it can go");
}

#[tokio::test]
async fn operators_set_desired_within_the_limits_only() {
    let mut h = harness().await;
    let now = now_ms();
    let (reply, answer) = oneshot::channel();
    h.controller
        .handle(Command::SetDesired { desired: 5, reply }, now)
        .await;
    let error = answer.await.unwrap().unwrap_err();
    assert!(
        matches!(&error, ControlError::Refused(why) if why.contains("outside group web's min_size..max_size (1..3)")),
        "{error}"
    );

    let (reply, answer) = oneshot::channel();
    h.controller
        .handle(Command::SetDesired { desired: 3, reply }, now)
        .await;
    let status = answer.await.unwrap().unwrap();
    assert_eq!(
        (status.desired, status.pending()),
        (3, 3),
        "the answer shows the new state"
    );
    assert_eq!(h.provider.running(), ["web-1", "web-2", "web-3"]);
    assert_eq!(h.kinds()[0], "set_desired");
}

/// Reports from each of `members` every second from `from` up to `to` (exclusive), healthy or not.
async fn report_span(h: &mut Harness, members: &[(&str, bool)], from: Millis, to: Millis) {
    for at in (from..to).step_by(1000) {
        for (member, healthy) in members {
            h.report(member, at, 50.0, *healthy).await;
        }
    }
}

#[tokio::test]
async fn an_unhealthy_member_is_replaced_new_one_first() {
    let mut h = harness_with(|g| {
        g.set("min_size", 2)
            .table("[groups.health_check]\ngrace_period_secs = 0\nunhealthy_threshold = 3\n")
    })
    .await;
    let now = now_ms();
    h.controller.capacity.desired = 2;
    h.controller.step(now).await;
    report_span(&mut h, &[("web-1", true), ("web-2", true)], now + 100, now + 1100).await;
    h.controller.step(now + 1200).await;
    assert_eq!(h.lb.registered(), ["web-1", "web-2"]);

    // web-2 fails three checks in a row.
    report_span(&mut h, &[("web-1", true), ("web-2", false)], now + 2000, now + 5000).await;
    h.controller.step(now + 5100).await;
    assert_eq!(h.lb.registered(), ["web-1"], "out of the load balancer at once");
    assert_eq!(
        h.provider.running(),
        ["web-1", "web-2", "web-3"],
        "the replacement launches first"
    );
    let states: Vec<&str> = h
        .handle
        .status()
        .members
        .iter()
        .map(|m| m.member.state_name())
        .collect();
    assert_eq!(states, ["in_service", "replacing", "pending"]);

    // Once the replacement serves, the unhealthy one goes.
    report_span(&mut h, &[("web-1", true), ("web-3", true)], now + 5200, now + 6200).await;
    h.controller.step(now + 6300).await;
    assert_eq!(h.lb.registered(), ["web-1", "web-3"]);
    assert_eq!(h.provider.running(), ["web-1", "web-3"]);
    let kinds = h.kinds();
    let position = |k: &str| {
        kinds
            .iter()
            .position(|x| x == k)
            .unwrap_or_else(|| panic!("{k} in {kinds:?}"))
    };
    assert!(position("unhealthy web-2") < position("launch web-3"), "{kinds:?}");
    assert!(position("launch web-3") < position("terminate web-2"), "{kinds:?}");
    assert_eq!(h.handle.status().desired, 2);
}

#[tokio::test]
async fn dry_run_decides_and_explains_but_never_calls_the_cloud() {
    let mut h = harness_with(|g| g.set("dry_run", true)).await;
    let now = now_ms();
    h.controller.step(now).await;
    assert!(h.provider.running().is_empty());
    assert_eq!(h.handle.status().desired, 1);
    let records = h.controller.deps.services.explanations.since("web", 0, 10);
    assert!(records.iter().all(|r| r.dry_run), "{records:?}");
    assert!(h.handle.status().last_evaluation.starts_with("dry run: "));
}

#[tokio::test]
async fn in_dry_run_an_unhealthy_member_is_judged_once_and_the_load_balancer_left_alone() {
    let mut h = harness_with(|g| {
        g.set("dry_run", true)
            .table("[groups.health_check]\ngrace_period_secs = 0\n")
    })
    .await;
    // A hand-made member, healthy, then failing.
    let id = join(&mut h, false).await;
    let now = now_ms();
    report_span(&mut h, &[(id.as_str(), true)], now, now + 1000).await;
    h.controller.step(now + 1000).await;
    assert_eq!(h.handle.status().members[0].member.state_name(), "in_service");
    report_span(&mut h, &[(id.as_str(), false)], now + 2000, now + 6000).await;
    for t in 0..3 {
        h.controller.step(now + 6000 + t * 1000).await;
    }
    let unhealthy = h.kinds().iter().filter(|k| k.starts_with("unhealthy")).count();
    assert_eq!(unhealthy, 1, "{:?}", h.kinds());
    assert!(h.lb.registered().is_empty(), "a dry run leaves the load balancer alone");
    assert_eq!(h.handle.status().members[0].member.state_name(), "unhealthy");
    assert!(h.provider.running().is_empty());
}

#[tokio::test]
async fn max_surge_bounds_launches_in_flight() {
    let mut h = harness_with(|g| g.set("max_size", 10).set("max_surge", 2)).await;
    let now = now_ms();
    h.controller.capacity.desired = 5;
    h.controller.step(now).await;
    assert_eq!(h.provider.running().len(), 2);
    h.controller.step(now + 1000).await;
    assert_eq!(h.provider.running().len(), 2, "both still launching");
    report_span(&mut h, &[("web-1", true), ("web-2", true)], now + 1100, now + 2100).await;
    h.controller.step(now + 2200).await;
    assert_eq!(h.provider.running().len(), 4);
}

/// ssh_scale.py (seed 001) adds one VM per run while the group is below min_size; with max_surge = 1
/// ebb does the same, one launch at a time, until min_size.
#[tokio::test]
async fn below_min_one_launch_at_a_time_with_max_surge_one() {
    let mut h = harness_with(|g| g.set("min_size", 2).set("max_surge", 1)).await;
    let now = now_ms();
    h.controller.capacity.desired = 2;
    h.controller.step(now).await;
    assert_eq!(h.provider.running(), ["web-1"]);
    report_span(&mut h, &[("web-1", true)], now + 100, now + 1100).await;
    h.controller.step(now + 1200).await;
    assert_eq!(h.provider.running(), ["web-1", "web-2"]);
    report_span(&mut h, &[("web-1", true), ("web-2", true)], now + 1300, now + 2300).await;
    h.controller.step(now + 2400).await;
    assert_eq!(h.provider.running(), ["web-1", "web-2"], "no further than min_size");
}

#[tokio::test]
async fn a_scheduled_action_sets_the_limits_and_desired() {
    let mut h = harness_with(|g| {
        g.set("max_size", 10)
            .table("[[groups.schedules]]\nname = \"every-minute\"\ncron = \"* * * * *\"\ntime_zone = \"Asia/Tokyo\"\nmin_size = 3\n")
    }).await;
    let minute = 60_000;
    let start = (now_ms() / minute) * minute + 100;
    h.controller.step(start).await;
    assert_eq!(
        h.handle.status().min_size,
        1,
        "the first evaluation only starts the clock"
    );
    h.controller.step(start + minute).await;
    let status = h.handle.status();
    assert_eq!((status.min_size, status.max_size, status.desired), (3, 10, 3));
    assert!(h.kinds().contains(&"scheduled".to_string()), "{:?}", h.kinds());
}

#[tokio::test]
async fn a_suspended_group_launches_nothing() {
    let mut h = harness().await;
    let now = now_ms();
    suspend(&mut h, Suspended::ALL, true, now).await;
    h.controller.step(now).await;
    assert!(h.provider.running().is_empty());
    let records = h.controller.deps.services.explanations.since("web", 0, 1);
    assert_eq!(records[0].reason, "suspended");
    suspend(&mut h, Suspended::ALL, false, now).await;
    h.controller.step(now + 1000).await;
    assert_eq!(h.provider.running(), ["web-1"]);
}

#[tokio::test]
async fn a_restart_keeps_members_flags_capacity_and_the_launch_counter() {
    let store = Arc::new(Store::in_memory());
    let (provider, lb) = (FakeProvider::default(), FakeLoadBalancer::default());
    let four = |g: GroupToml| g.set("max_size", 4);
    let mut h = harness_on(four, store.clone(), provider.clone(), lb.clone()).await;
    let now = now_ms();
    h.controller.capacity.desired = 2;
    h.controller.step(now).await;
    report_span(&mut h, &[("web-1", true), ("web-2", true)], now + 100, now + 1100).await;
    h.controller.step(now + 1200).await;
    let hand_made = join(&mut h, true).await;
    suspend(&mut h, Suspended::ALL, true, now + 1300).await;
    let before = h.handle.status();
    drop(h);

    let mut h = harness_on(four, store, provider, lb).await;
    let after = h.handle.status();
    assert_eq!(after.desired, before.desired);
    let members = |s: &GroupStatus| s.members.iter().map(|m| m.member.clone()).collect::<Vec<_>>();
    assert_eq!(members(&after), members(&before));
    assert!(
        after
            .members
            .iter()
            .any(|m| m.member.id == hand_made && m.member.protected)
    );
    // Still suspended: nothing launches.
    h.controller.capacity.desired = 4;
    h.controller.step(now + 2000).await;
    assert_eq!(h.provider.running().len(), 2);
    suspend(&mut h, Suspended::ALL, false, now + 2100).await;
    h.controller.step(now + 2200).await;
    // The next member id follows the ones before the restart.
    assert_eq!(h.provider.running(), ["web-1", "web-2", "web-4"]);
    // The members' agents are known to ingest again, so they carry on reporting.
    report_span(&mut h, &[("web-1", true)], now + 2300, now + 2400).await;
}

#[tokio::test]
async fn decisions_pause_while_the_store_refuses_writes() {
    let mut h = harness().await;
    let now = now_ms();
    h.controller.deps.services.store.refuse_writes(true);
    h.controller.capacity.desired = 3;
    for t in 0..3 {
        h.controller.step(now + t * 1000).await;
    }
    // No launch without its intent on disk.
    assert!(h.provider.calls().is_empty(), "{:?}", h.provider.calls());
    assert!(
        h.handle
            .status()
            .last_evaluation
            .starts_with("paused: the store refuses writes")
    );
    h.controller.deps.services.store.refuse_writes(false);
    // Resumed once the store accepts writes (after the failed launch's retry delay).
    h.controller.step(now + LAUNCH_RETRY_MS + 3000).await;
    assert_eq!(h.provider.running().len(), 3);
}

/// The intent a launch of `member_id` writes at `at`; returns its key.
fn launch_intent(store: &Store, member_id: &str, at: Millis) -> String {
    let key = format!("{member_id}-{at}");
    let intent = Intent {
        key: key.clone(),
        group: "web".into(),
        kind: IntentKind::Launch,
        member_id: member_id.into(),
        instance_id: String::new(),
        created_at: at,
    };
    store.begin_intent(&intent).unwrap();
    key
}

/// The stored group had launched once and wanted one member.
fn one_launch_before_the_crash(store: &Store) {
    let record = GroupRecord {
        desired: 1,
        launches: 1,
        ..GroupRecord::default()
    };
    store.save_group("web", &record, &[]).unwrap();
}

/// A launch the cloud carried out but the collector never recorded, as a crash between the two leaves it.
async fn interrupted_launch(store: &Store, provider: &FakeProvider, member_id: &str, now: Millis) {
    let key = launch_intent(store, member_id, now);
    let spec = LaunchSpec {
        group: "web".into(),
        member_id: member_id.into(),
        cluster_id: "test".into(),
        launch_id: key,
        service_port: 8080,
        agent_config: String::new(),
        user_data: Vec::new(),
    };
    provider.launch(&spec).await.unwrap();
}

#[tokio::test]
async fn after_a_crash_a_launch_that_happened_is_adopted_not_repeated() {
    let (store, provider) = (Arc::new(Store::in_memory()), FakeProvider::default());
    let now = now_ms();
    // The group's counter reached 1 before the crash; the cloud has web-1, the store does not.
    one_launch_before_the_crash(&store);
    interrupted_launch(&store, &provider, "web-1", now - 5000).await;
    let mut h = harness_on(|g| g, store.clone(), provider.clone(), FakeLoadBalancer::default()).await;
    h.controller.step(now).await;
    assert_eq!(provider.calls(), ["launch web-1"], "no second launch");
    assert_eq!(h.handle.status().members[0].member.id, "web-1");
    assert!(h.kinds().contains(&"adopt web-1".to_string()), "{:?}", h.kinds());
    assert!(store.open_intents("web").unwrap().is_empty());
    // The next launch takes a new id.
    h.controller.capacity.desired = 2;
    h.controller.step(now + 1000).await;
    assert_eq!(provider.running(), ["web-1", "web-2"]);
}

#[tokio::test]
async fn after_a_crash_a_launch_that_did_not_happen_is_dropped_and_capacity_reconciled() {
    let (store, provider) = (Arc::new(Store::in_memory()), FakeProvider::default());
    let now = now_ms();
    one_launch_before_the_crash(&store);
    launch_intent(&store, "web-1", now - 5000);
    let mut h = harness_on(|g| g, store.clone(), provider.clone(), FakeLoadBalancer::default()).await;
    h.controller.step(now).await;
    assert_eq!(
        provider.running(),
        ["web-2"],
        "one launch for desired 1, under a new id"
    );
    assert!(store.open_intents("web").unwrap().is_empty());
}

/// A group of two members (web-1, web-2) whose collector wrote the intent to terminate web-2 and died with
/// `desired` saved and both members still recorded; web-2's record.
async fn crashed_with_a_termination_intent(
    store: &Arc<Store>,
    provider: &FakeProvider,
    lb: &FakeLoadBalancer,
    desired: u32,
    now: Millis,
) -> Member {
    let mut h = harness_on(|g| g, store.clone(), provider.clone(), lb.clone()).await;
    h.controller.capacity.desired = 2;
    h.controller.step(now).await;
    let member = h.controller.members[1].clone();
    drop(h);
    let record = GroupRecord {
        desired,
        launches: 2,
        ..GroupRecord::default()
    };
    store
        .save_group("web", &record, &[h_member(store, "web-1"), member.clone()])
        .unwrap();
    store
        .begin_intent(&Intent {
            key: "terminate-web-2".into(),
            group: "web".into(),
            kind: IntentKind::Terminate,
            member_id: member.id.clone(),
            instance_id: member.instance_id.clone(),
            created_at: now,
        })
        .unwrap();
    member
}

#[tokio::test]
async fn after_a_crash_an_interrupted_termination_is_finished() {
    let (store, provider, lb) = (
        Arc::new(Store::in_memory()),
        FakeProvider::default(),
        FakeLoadBalancer::default(),
    );
    let now = now_ms();
    // The collector decided web-2 goes, wrote its intent, and died before the call.
    // Desired stays 2: only the intent, not a scale-in, can make web-2 go.
    let member = crashed_with_a_termination_intent(&store, &provider, &lb, 2, now).await;
    let mut h = harness_on(|g| g, store.clone(), provider.clone(), lb).await;
    h.controller.step(now + 1000).await;
    assert!(
        provider.calls().contains(&format!("terminate {}", member.instance_id)),
        "{:?}",
        provider.calls()
    );
    assert_eq!(
        provider.running(),
        ["web-1", "web-3"],
        "finished, then refilled to desired"
    );
    assert!(store.open_intents("web").unwrap().is_empty());
    let terminations = |p: &FakeProvider| p.calls().iter().filter(|c| c.starts_with("terminate")).count();
    assert_eq!(terminations(&provider), 1, "{:?}", provider.calls());
    assert!(
        !h.kinds().iter().any(|k| k.starts_with("orphan")),
        "the instance just terminated is no orphan: {:?}",
        h.kinds()
    );
}

#[tokio::test]
async fn after_a_crash_a_termination_the_cloud_carried_out_is_not_repeated() {
    let (store, provider, lb) = (
        Arc::new(Store::in_memory()),
        FakeProvider::default(),
        FakeLoadBalancer::default(),
    );
    let now = now_ms();
    // The intent was written and the cloud terminated web-2, then the collector died before saving that.
    let member = crashed_with_a_termination_intent(&store, &provider, &lb, 1, now).await;
    provider.terminate(&member.instance_id).await.unwrap();
    let calls_before = provider.calls().len();
    // Two restarts in a row.
    for _ in 0..2 {
        let mut h = harness_on(|g| g, store.clone(), provider.clone(), lb.clone()).await;
        h.controller.step(now + 1000).await;
        assert_eq!(
            provider.calls().len(),
            calls_before,
            "no cloud call: {:?}",
            provider.calls()
        );
        assert!(
            !h.kinds()
                .iter()
                .any(|k| k.starts_with("terminate") || k.starts_with("orphan")),
            "{:?}",
            h.kinds()
        );
        assert_eq!(h.handle.status().members.len(), 1);
    }
    assert_eq!(provider.running(), ["web-1"]);
    assert!(store.open_intents("web").unwrap().is_empty());
}

/// The stored record of `id`, as the previous run saved it.
fn h_member(store: &Store, id: &str) -> Member {
    store
        .load_group("web")
        .unwrap()
        .unwrap()
        .1
        .into_iter()
        .find(|m| m.id == id)
        .unwrap()
}

#[tokio::test]
async fn orphans_are_reported_then_terminated_after_their_grace() {
    let (store, provider) = (Arc::new(Store::in_memory()), FakeProvider::default());
    let now = now_ms();
    // Tagged for the group, launched by nobody the store knows (no intent either).
    let spec = LaunchSpec {
        group: "web".into(),
        member_id: "web-77".into(),
        cluster_id: "test".into(),
        launch_id: "web-77-1".into(),
        service_port: 8080,
        agent_config: String::new(),
        user_data: Vec::new(),
    };
    provider.launch(&spec).await.unwrap();
    let edit = |g: GroupToml| g.set("orphan_grace_secs", 30).set("reconcile_interval_secs", 10);
    let mut h = harness_on(edit, store, provider.clone(), FakeLoadBalancer::default()).await;
    h.controller.step(now).await;
    assert!(h.kinds().contains(&"orphan web-77".to_string()), "{:?}", h.kinds());
    assert!(
        provider.running().contains(&"web-77".to_string()),
        "not before its grace"
    );
    h.controller.step(now + 20_000).await;
    assert!(provider.running().contains(&"web-77".to_string()));
    h.controller.step(now + 31_000).await;
    assert!(
        !provider.running().contains(&"web-77".to_string()),
        "{:?}",
        provider.running()
    );
    assert_eq!(
        h.kinds().iter().filter(|k| k.as_str() == "orphan web-77").count(),
        1,
        "reported once"
    );
}

#[tokio::test]
async fn orphans_are_only_reported_when_so_configured() {
    let (store, provider) = (Arc::new(Store::in_memory()), FakeProvider::default());
    interrupted_launch(&store, &provider, "stray-1", 0).await;
    store.finish_intent("stray-1-0", 1, "test").unwrap();
    let edit = |g: GroupToml| g.set("orphan_grace_secs", 0).set("terminate_orphans", false);
    let mut h = harness_on(edit, store, provider.clone(), FakeLoadBalancer::default()).await;
    h.controller.step(now_ms()).await;
    assert!(provider.running().contains(&"stray-1".to_string()));
    assert!(h.kinds().contains(&"orphan stray-1".to_string()), "{:?}", h.kinds());
}

#[tokio::test]
async fn a_load_balancer_membership_removed_by_hand_is_restored() {
    let edit = |g: GroupToml| g.set("reconcile_interval_secs", 10);
    let mut h = harness_with(edit).await;
    let now = now_ms();
    h.controller.step(now).await;
    report_span(&mut h, &[("web-1", true)], now + 100, now + 1100).await;
    h.controller.step(now + 1200).await;
    assert_eq!(h.lb.registered(), ["web-1"]);
    h.lb.deregister("web-1", "fake-1").await.unwrap();
    h.controller.step(now + 11_000).await;
    assert_eq!(h.lb.registered(), ["web-1"]);
    let restored = h.activities.newest("web", 1).remove(0);
    assert!(
        restored.cause.contains("removed outside ebb; restored"),
        "{}",
        restored.cause
    );
    // The next inventory finds it registered and leaves it alone.
    h.controller.step(now + 22_000).await;
    let restorations = h
        .activities
        .newest("web", 100)
        .iter()
        .filter(|a| a.cause.contains("restored"))
        .count();
    assert_eq!(restorations, 1);
}

/// Two members in service, then an operator scales to one: web-2 starts leaving.
async fn two_in_service_then_one(h: &mut Harness, now: Millis) {
    h.controller.capacity.desired = 2;
    h.controller.step(now).await;
    report_span(h, &[("web-1", true), ("web-2", true)], now + 100, now + 1100).await;
    h.controller.step(now + 1200).await;
    send(h, |reply| Command::SetDesired { desired: 1, reply }).await;
}

#[tokio::test]
async fn scale_in_drains_before_it_terminates_and_the_agent_is_told() {
    let mut h = harness_with(|g| g.set("drain_secs", 30)).await;
    let now = now_ms();
    two_in_service_then_one(&mut h, now).await;
    // Out of the load balancer at once, still running.
    assert_eq!(h.lb.registered(), ["web-1"]);
    assert_eq!(h.provider.running(), ["web-1", "web-2"]);
    assert_eq!(h.handle.status().members[1].member.state_name(), "draining");
    let settings = h.report_sample("web-2", now + 1300, 1.0, true, false).await.unwrap();
    assert!(settings.drain, "the agent is told to drain");
    // It does not count toward capacity: nothing is launched in its place.
    h.controller.step(now + 2000).await;
    assert_eq!(h.provider.running(), ["web-1", "web-2"]);
    // Its identity still works while it drains (its agent must hear "drain" and report back)...
    let bound = |h: &Harness| {
        let tokens = h.controller.deps.services.authority.tokens.list(now);
        tokens.iter().any(|t| t.bound_member.as_deref() == Some("web-2"))
    };
    assert!(bound(&h));
    // At the deadline it goes, and only then is it revoked.
    h.controller.step(now + 1300 + 30_000).await;
    assert_eq!(h.provider.running(), ["web-1"]);
    assert!(!bound(&h), "revoked once terminated");
    let terminate = h.activities.newest("web", 1).remove(0);
    assert_eq!(
        (terminate.kind, terminate.cause.as_str()),
        (ActivityKind::Terminate, "drain time is up")
    );
}

#[tokio::test]
async fn a_drained_agent_lets_its_member_go_before_the_deadline() {
    let mut h = harness_with(|g| g.set("drain_secs", 300)).await;
    let now = now_ms();
    two_in_service_then_one(&mut h, now).await;
    h.report_sample("web-2", now + 2000, 1.0, true, true).await;
    h.controller.step(now + 2100).await;
    assert_eq!(h.provider.running(), ["web-1"]);
    let terminate = h.activities.newest("web", 1).remove(0);
    assert_eq!(terminate.cause, "drained: its agent finished");
}

#[tokio::test]
async fn a_pending_member_scaled_in_goes_at_once_without_the_drain_or_deregistration_delay() {
    let mut h = harness_with(|g| g.set("drain_secs", 300).set("min_size", 0)).await;
    h.lb.set_deregistration_delay_secs(300);
    let now = now_ms();
    h.controller.capacity.desired = 1;
    h.controller.step(now).await;
    assert_eq!(h.provider.running(), ["web-1"]);
    assert_eq!(h.lb.registered(), Vec::<String>::new(), "pending: never registered");
    send(&mut h, |reply| Command::SetDesired { desired: 0, reply }).await;
    assert_eq!(
        h.provider.running(),
        Vec::<String>::new(),
        "terminated in the same step"
    );
    let newest = h.activities.newest("web", 2);
    assert_eq!(
        (newest[0].kind, newest[0].cause.as_str()),
        (ActivityKind::Terminate, "never in service")
    );
    assert_eq!(newest[1].kind, ActivityKind::Drain);
    assert_eq!(newest[1].detail, "never in service: terminated at once");
}

/// Suspends (or resumes) `processes` as an operator would; the processes suspended afterwards.
async fn suspend(h: &mut Harness, processes: Suspended, suspend: bool, now: Millis) -> Suspended {
    let (reply, answer) = oneshot::channel();
    let command = Command::SetSuspended {
        processes,
        suspend,
        reply,
    };
    h.controller.handle(command, now).await;
    answer.await.unwrap()
}

#[tokio::test]
async fn processes_are_suspended_one_by_one() {
    let mut h = harness().await;
    let now = now_ms();
    let now_suspended = suspend(&mut h, Suspended::of(&[Process::AddToLoadBalancer]), true, now).await;
    assert_eq!(now_suspended.names(), ["add_to_load_balancer"]);
    // Launching still works; the healthy member is kept out of the load balancer.
    h.controller.step(now).await;
    report_span(&mut h, &[("web-1", true)], now + 100, now + 1100).await;
    h.controller.step(now + 1200).await;
    assert_eq!(h.provider.running(), ["web-1"]);
    assert!(h.lb.registered().is_empty());
    // Launch suspended too: a higher desired capacity waits.
    suspend(&mut h, Suspended::of(&[Process::Launch]), true, now + 1300).await;
    h.controller.capacity.desired = 2;
    h.controller.step(now + 2000).await;
    assert_eq!(h.provider.running(), ["web-1"]);
    // Resumed: both happen.
    let left = suspend(&mut h, Suspended::ALL, false, now + 2100).await;
    assert!(left.names().is_empty());
    h.controller.step(now + 3000).await;
    assert_eq!(h.lb.registered(), ["web-1"]);
    assert_eq!(h.provider.running(), ["web-1", "web-2"]);
    // Terminate suspended: scale-in waits.
    suspend(&mut h, Suspended::of(&[Process::Terminate]), true, now + 3100).await;
    h.controller.capacity.desired = 1;
    h.controller.step(now + 4000).await;
    assert_eq!(h.provider.running(), ["web-1", "web-2"]);
    assert!(
        Process::parse("launches")
            .unwrap_err()
            .contains("the processes are: decide, launch")
    );
}

#[tokio::test]
async fn after_a_restart_members_get_time_to_reconnect_before_they_are_judged() {
    let (store, provider) = (Arc::new(Store::in_memory()), FakeProvider::default());
    let now = now_ms();
    let mut saved = Vec::new();
    for id in ["web-1", "web-2"] {
        interrupted_launch(&store, &provider, id, now).await;
        store.finish_intent(&format!("{id}-{now}"), now, "test").unwrap();
        let instance = provider.list("web").await.unwrap().pop().unwrap();
        saved.push(Member {
            state: MemberState::InService,
            in_service_since: Some(now - 3_600_000),
            ..Member::pending(
                id,
                &instance.id,
                Some("10.0.0.1:8080".parse().unwrap()),
                now - 3_700_000,
            )
        });
    }
    let record = GroupRecord {
        desired: 2,
        launches: 2,
        ..GroupRecord::default()
    };
    store.save_group("web", &record, &saved).unwrap();
    let edit = |g: GroupToml| g.table("[groups.health_check]\ngrace_period_secs = 0\nsilent_secs = 30\n");
    let mut h = harness_on(edit, store, provider.clone(), FakeLoadBalancer::default()).await;
    // web-1's agent is back at once; web-2's takes 20 s, within silent_secs of the restart.
    report_span(&mut h, &[("web-1", true)], now, now + 20_000).await;
    h.controller.step(now + 20_000).await;
    assert!(!h.kinds().iter().any(|k| k.starts_with("unhealthy")), "{:?}", h.kinds());
    // Still silent 31 s after the restart: now it is judged.
    report_span(&mut h, &[("web-1", true)], now + 20_000, now + 32_000).await;
    h.controller.step(now + 32_000).await;
    assert!(h.kinds().contains(&"unhealthy web-2".to_string()), "{:?}", h.kinds());
}

/// Steps until `done` holds, a little real time apart, for hooks that run as processes (bounded).
async fn step_until(h: &mut Harness, now: Millis, done: impl Fn(&Harness) -> bool) {
    for k in 0..200 {
        h.report("web-1", now + k, 50.0, true).await;
        h.controller.step(now + k).await;
        if done(h) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not done within 4 s: {:?}", h.kinds());
}

#[tokio::test]
async fn a_launching_hook_holds_the_member_out_of_the_load_balancer_until_it_confirms() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let script = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
    let edit = move |g: GroupToml| {
        g.table(&format!(
            "[[groups.lifecycle_hooks]]\nname = \"warm-cache\"\ntransition = \"launching\"\ncommand = [\"sh\", \"-c\", \"{script}\"]\ntimeout_secs = 60\n"
        ))
    };
    let mut h = harness_with(edit).await;
    let now = now_ms();
    h.controller.step(now).await;
    for k in 1..5 {
        h.report("web-1", now + k * 100, 50.0, true).await;
        h.controller.step(now + k * 100).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h.lb.registered().is_empty(), "healthy, but held by its hook");
    std::fs::write(&gate, "").unwrap();
    step_until(&mut h, now + 1000, |h| !h.lb.registered().is_empty()).await;
    assert!(h.kinds().contains(&"hook web-1".to_string()), "{:?}", h.kinds());
}

#[tokio::test]
async fn an_abandoning_launching_hook_terminates_the_member() {
    let edit = |g: GroupToml| {
        g.table("[[groups.lifecycle_hooks]]\nname = \"check\"\ntransition = \"launching\"\ncommand = [\"false\"]\n")
    };
    let mut h = harness_with(edit).await;
    let now = now_ms();
    h.controller.step(now).await;
    step_until(&mut h, now + 100, |h| h.kinds().iter().any(|k| k == "terminate web-1")).await;
    assert!(h.lb.registered().is_empty());
    let hook = h
        .activities
        .since(0, "web")
        .into_iter()
        .find(|a| a.kind == ActivityKind::Hook)
        .unwrap();
    assert_eq!(hook.cause, "lifecycle hook check abandoned (non-zero exit)");
}

#[tokio::test]
async fn a_terminating_hook_runs_before_the_member_is_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let flushed = dir.path().join("flushed");
    let script = format!("sleep 0.2; echo {{member_id}} > {}", flushed.display());
    let edit = move |g: GroupToml| {
        g.table(&format!(
            "[[groups.lifecycle_hooks]]\nname = \"flush-logs\"\ntransition = \"terminating\"\ncommand = [\"sh\", \"-c\", \"{script}\"]\n"
        ))
    };
    let mut h = harness_with(edit).await;
    let now = now_ms();
    two_in_service_then_one(&mut h, now).await;
    assert_eq!(h.provider.running(), ["web-1", "web-2"], "held by its hook");
    step_until(&mut h, now + 2000, |h| h.provider.running() == ["web-1"]).await;
    assert_eq!(std::fs::read_to_string(&flushed).unwrap(), "web-2\n");
    let kinds = h.kinds();
    let hook = kinds.iter().position(|k| k == "hook web-2").unwrap();
    let terminate = kinds.iter().position(|k| k == "terminate web-2").unwrap();
    assert!(hook < terminate, "{kinds:?}");
}

#[tokio::test]
async fn an_instance_refresh_replaces_old_members_one_by_one_never_below_desired() {
    let mut h = harness().await;
    let now = now_ms();
    h.controller.capacity.desired = 2;
    h.controller.step(now).await;
    report_span(&mut h, &[("web-1", true), ("web-2", true)], now + 100, now + 1100).await;
    h.controller.step(now + 1200).await;
    // The provider settings changed (a restart with a new template, say).
    h.controller.launch_spec = "new-template".into();
    let (reply, answer) = oneshot::channel();
    let command = Command::Refresh {
        min_healthy_percent: 50,
        reply,
    };
    h.controller.handle(command, now + 1300).await;
    assert_eq!(answer.await.unwrap(), 2);
    let mut t = now + 2000;
    for _ in 0..10 {
        h.controller.step(t).await;
        assert!(
            h.lb.registered().len() >= 2,
            "healthy capacity never drops: {:?}",
            h.lb.registered()
        );
        let running = h.provider.running();
        let running: Vec<(&str, bool)> = running.iter().map(|m| (m.as_str(), true)).collect();
        report_span(&mut h, &running, t + 100, t + 1100).await;
        t += 2000;
    }
    assert_eq!(h.provider.running(), ["web-3", "web-4"]);
    assert!(h.controller.refresh.is_none(), "finished");
    let refreshes = h.kinds().iter().filter(|k| k.starts_with("refresh")).count();
    assert_eq!(refreshes, 4, "started, two replaced, finished: {:?}", h.kinds());
}

#[tokio::test]
async fn a_failed_termination_keeps_the_member_and_its_identity() {
    let mut h = harness().await;
    let now = now_ms();
    h.provider
        .fail_next_terminate(CloudError::retryable("the cloud is busy"));
    two_in_service_then_one(&mut h, now).await;
    let bound = |h: &Harness| {
        let tokens = h.controller.deps.services.authority.tokens.list(now);
        tokens.iter().any(|t| t.bound_member.as_deref() == Some("web-2"))
    };
    assert_eq!(h.provider.running(), ["web-1", "web-2"]);
    assert!(bound(&h), "its agent can still report while ebb retries");
    h.controller.step(now + 3000).await;
    assert_eq!(h.provider.running(), ["web-1"]);
    assert!(!bound(&h), "revoked once terminated");
}

#[test]
fn a_failure_repeated_every_step_is_said_once_then_once_a_minute() {
    let mut warnings = RepeatedWarnings::default();
    const LIST: &str = "Cannot list the group's instances.";
    let refused = "listVirtualMachines: cannot connect (cloud.example:443)";
    assert!(warnings.failed("web", LIST, refused, 0), "the first is said");
    assert!(
        (1..60).all(|s| !warnings.failed("web", LIST, refused, s * 1000)),
        "repeats are counted"
    );
    assert!(warnings.failed("web", LIST, refused, 60_000), "a minute on, a summary");
    assert!(!warnings.failed("web", LIST, refused, 61_000));
    assert!(
        warnings.failed("web", LIST, "a different error", 62_000),
        "a new failure is said at once"
    );
    assert!(warnings.succeeded("web", LIST), "the end of the run is said");
    assert!(!warnings.succeeded("web", LIST), "a success after a success is not");
    assert!(warnings.failed("web", LIST, refused, 63_000), "a new run starts over");
}

/// A member removed in the middle of a step (its launching hook abandoned it) must not hand its figures to
/// the members after it: the evaluation of that same step sees each member's own CPU and health.
#[tokio::test]
async fn a_member_abandoned_mid_step_does_not_lend_its_figures_to_the_next() {
    let edit = |g: GroupToml| {
        g.table(
            "[[groups.lifecycle_hooks]]\nname = \"only-web-2\"\ntransition = \"launching\"\n\
             command = [\"sh\", \"-c\", \"test {member_id} = web-2\"]\n",
        )
    };
    let mut h = harness_with(edit).await;
    let now = now_ms();
    h.controller.capacity.desired = 2;
    h.controller.step(now).await;
    assert_eq!(h.provider.running(), ["web-1", "web-2"]);
    // web-2 serves, busy; web-1 has not reported yet.
    let mut at = now + 100;
    for _ in 0..200 {
        h.report("web-2", at, 90.0, true).await;
        h.controller.step(at).await;
        if h.lb.registered() == ["web-2"] {
            break;
        }
        at += 50;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.lb.registered(), ["web-2"]);
    // web-1, idle, comes up healthy; its hook abandons it. Every step must judge web-2 on its own 90 %.
    for _ in 0..200 {
        h.report("web-1", at, 1.0, true).await;
        h.report("web-2", at, 90.0, true).await;
        h.controller.step(at).await;
        if h.kinds().iter().any(|k| k == "terminate web-1") {
            break;
        }
        at += 50;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kinds = h.kinds();
    assert!(kinds.iter().any(|k| k == "terminate web-1"), "{kinds:?}");
    assert!(
        !kinds.iter().any(|k| k.starts_with("scale_in")),
        "web-2 at 90 % was judged on web-1's idle figures: {kinds:?}"
    );
}

#[tokio::test]
async fn members_stamped_by_an_older_collector_with_todays_settings_are_not_outdated() {
    let store = Arc::new(Store::in_memory());
    let (provider, lb) = (FakeProvider::default(), FakeLoadBalancer::default());
    let mut h = harness_on(|g| g, store.clone(), provider.clone(), lb.clone()).await;
    let now = now_ms();
    h.controller.capacity.desired = 2;
    h.controller.step(now).await;
    let current = h.controller.launch_spec.clone();
    assert!(current.starts_with("v2:") && current.len() == 15, "{current}");
    // As a collector before v2 left them: one with today's settings, one with others.
    h.controller.members[0].launch_spec = launch_spec_v1(&h.controller.config);
    h.controller.members[1].launch_spec = "0123456789ab".into();
    assert!(h.controller.save());
    drop(h);

    let h = harness_on(|g| g, store, provider, lb).await;
    let specs: Vec<&str> = h.controller.members.iter().map(|m| m.launch_spec.as_str()).collect();
    assert_eq!(specs, [current.as_str(), "0123456789ab"]);
}

#[tokio::test]
async fn new_user_data_at_reload_makes_the_members_launched_before_it_outdated() {
    let mut h = harness().await;
    let now = now_ms();
    h.controller.capacity.desired = 2;
    h.controller.step(now).await;
    let before = h.controller.launch_spec.clone();
    // As a reload reads a changed user_data_file: the provider table is the same, its file's text is not.
    let mut reloaded = h.controller.config.clone();
    reloaded.operator_user_data = Some(crate::userdata::OperatorUserData::parse(b"#!/bin/sh\necho two\n").unwrap());
    h.controller.reconfigure(reloaded).await;
    assert_ne!(h.controller.launch_spec, before);
    let (reply, answer) = oneshot::channel();
    h.controller
        .handle(
            Command::Refresh {
                min_healthy_percent: 50,
                reply,
            },
            now + 100,
        )
        .await;
    assert_eq!(
        answer.await.unwrap(),
        2,
        "both members were launched with the old user data"
    );
}

/// A step's activities carry the time the step was given, not the wall clock's: a run driven with other
/// times (a simulation, these tests) records the same history.
#[tokio::test]
async fn activities_carry_the_time_of_their_step() {
    let mut h = harness().await;
    let at = 1_700_000_000_000; // 2023-11-14, far from the wall clock
    h.controller.step(at).await;
    let launch = h
        .activities
        .since(0, "web")
        .into_iter()
        .find(|a| a.kind == ActivityKind::Launch)
        .unwrap();
    assert_eq!(launch.at, at);
}
