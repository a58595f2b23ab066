//! The data the store keeps, as plain types: members, their hook waits, activities, explanations, join
//! tokens. The modules that act on them (reconcile, hooks, activity, explain, pki) and the store all depend
//! on this one, which depends on nothing of the collector.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::engine::{MemberState, Millis};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivityKind {
    /// A policy raised desired capacity.
    ScaleOut,
    /// A policy lowered desired capacity.
    ScaleIn,
    /// An operator set desired capacity.
    SetDesired,
    Launch,
    Terminate,
    /// Put behind the load balancer after passing its health check.
    Register,
    /// Taken out of the load balancer.
    Deregister,
    /// An instance disappeared without ebb terminating it.
    InstanceLost,
    /// A VM ebb did not launch joined with an operator's token.
    Join,
    /// Such a VM left the group (scale-in); it keeps running.
    Leave,
    /// Judged unhealthy: out of the load balancer, replaced if the group replaces unhealthy members.
    Unhealthy,
    /// Judged healthy again.
    Healthy,
    /// A scheduled action changed the group's limits or desired capacity.
    Scheduled,
    /// Something an operator should look at, like a setting shorter than the group's boot time.
    Warning,
    /// An operator suspended or resumed scaling.
    Suspension,
    /// A launch interrupted by a restart was found running and taken back into the group.
    Adopt,
    /// An instance tagged for the group that no member owns.
    Orphan,
    /// Out of the load balancer, finishing its requests before it goes.
    Drain,
    /// The configuration was reloaded.
    Reconfigure,
    /// A lifecycle hook answered (or timed out).
    Hook,
    /// An instance refresh started, replaced a member, or finished.
    Refresh,
    /// An operator protected a member from scale-in, or lifted the protection.
    Protection,
}

impl ActivityKind {
    const ALL: [ActivityKind; 22] = [
        ActivityKind::ScaleOut,
        ActivityKind::ScaleIn,
        ActivityKind::SetDesired,
        ActivityKind::Launch,
        ActivityKind::Terminate,
        ActivityKind::Register,
        ActivityKind::Deregister,
        ActivityKind::InstanceLost,
        ActivityKind::Join,
        ActivityKind::Leave,
        ActivityKind::Unhealthy,
        ActivityKind::Healthy,
        ActivityKind::Scheduled,
        ActivityKind::Warning,
        ActivityKind::Suspension,
        ActivityKind::Adopt,
        ActivityKind::Orphan,
        ActivityKind::Drain,
        ActivityKind::Reconfigure,
        ActivityKind::Hook,
        ActivityKind::Refresh,
        ActivityKind::Protection,
    ];

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ActivityKind::ScaleOut => "scale_out",
            ActivityKind::ScaleIn => "scale_in",
            ActivityKind::SetDesired => "set_desired",
            ActivityKind::Launch => "launch",
            ActivityKind::Terminate => "terminate",
            ActivityKind::Register => "register",
            ActivityKind::Deregister => "deregister",
            ActivityKind::InstanceLost => "instance_lost",
            ActivityKind::Join => "join",
            ActivityKind::Leave => "leave",
            ActivityKind::Unhealthy => "unhealthy",
            ActivityKind::Healthy => "healthy",
            ActivityKind::Scheduled => "scheduled",
            ActivityKind::Warning => "warning",
            ActivityKind::Suspension => "suspension",
            ActivityKind::Adopt => "adopt",
            ActivityKind::Orphan => "orphan",
            ActivityKind::Drain => "drain",
            ActivityKind::Reconfigure => "reconfigure",
            ActivityKind::Hook => "hook",
            ActivityKind::Refresh => "refresh",
            ActivityKind::Protection => "protection",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Activity {
    pub id: u64,
    pub group: String,
    pub kind: ActivityKind,
    pub cause: String,
    /// `ok` or `failed`.
    pub outcome: &'static str,
    /// What happened: the error on failure, the instance id on launch, ...
    pub detail: String,
    pub at: Millis,
    pub from_capacity: u32,
    pub to_capacity: u32,
    pub member_id: String,
}

/// One outcome and the span of evaluations that had it, as kept and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explained {
    pub from: Millis,
    pub until: Millis,
    pub evaluations: u64,
    /// `true` when the group decides but never acts (`dry_run`).
    pub dry_run: bool,
    pub action: String,
    pub reason: String,
    pub desired_before: u32,
    pub desired: u32,
    /// The latest evaluation of the span, in words.
    pub text: String,
    /// The same evaluation as JSON.
    pub json: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// Public: the first 12 hex digits of the hash.
    pub id: String,
    pub group: String,
    pub expires_at: Millis,
    pub uses_left: u32,
    /// Members enrolled with it are never chosen for scale-in.
    pub protected: bool,
    /// The member of the launch it was minted for.
    pub bound_member: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    Launching,
    Terminating,
}

impl Transition {
    pub fn name(self) -> &'static str {
        match self {
            Transition::Launching => "launching",
            Transition::Terminating => "terminating",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Transition::Launching, Transition::Terminating]
            .into_iter()
            .find(|t| t.name() == name)
    }
}

/// A member held by its lifecycle hooks: the `position`-th hook of `transition` is running, until
/// `deadline`. Saved with the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookWait {
    pub transition: Transition,
    pub position: u32,
    pub deadline: Millis,
}

/// A member of a group, as its controller keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: String,
    pub instance_id: String,
    pub address: Option<SocketAddr>,
    pub state: MemberState,
    pub launched_at: Millis,
    pub in_service_since: Option<Millis>,
    /// Never chosen for scale-in.
    pub protected: bool,
    /// Joined with an operator's token; ebb did not launch it and never terminates it.
    pub external: bool,
    /// Judged unhealthy by the engine; out of the load balancer.
    pub unhealthy: bool,
    /// Unhealthy and being replaced: it goes once enough healthy members serve.
    pub replacing: bool,
    /// Draining: terminated at this time, or sooner once its agent reports drained.
    pub drain_until: Option<Millis>,
    /// The fingerprint of the provider settings it was launched with (empty for hand-made members).
    pub launch_spec: String,
    /// Held by a lifecycle hook: which, and until when.
    pub hook: Option<HookWait>,
}

impl Member {
    /// What operators see: `pending`, `in_service`, `draining`, or `unhealthy` / `replacing` when judged so.
    pub fn state_name(&self) -> &'static str {
        match (self.replacing, self.unhealthy) {
            (true, _) => "replacing",
            (false, true) => "unhealthy",
            _ => self.state.as_str(),
        }
    }

    /// Launched or joined at `now`, not in service yet; launched by ebb and not protected.
    pub fn pending(id: &str, instance_id: &str, address: Option<SocketAddr>, now: Millis) -> Self {
        Self {
            id: id.to_string(),
            instance_id: instance_id.to_string(),
            address,
            state: MemberState::Pending,
            launched_at: now,
            in_service_since: None,
            protected: false,
            external: false,
            unhealthy: false,
            replacing: false,
            drain_until: None,
            launch_spec: String::new(),
            hook: None,
        }
    }
}
