//! Live reload (`ebb-collector reload`, SIGHUP): the configuration file is read again; each group's new
//! settings — limits, policies, schedules, health, cooldowns, drain — apply at once without touching its
//! members, and a group the file gained starts. What a running collector cannot change in place (the server
//! section, a group's provider or load balancer, a group taken out of the file) is refused with the reason,
//! and the running configuration kept; an invalid file likewise, and one `serve` would refuse.

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::config::{self, CollectorConfig, GroupConfig, ProviderConfig};
use crate::groups::Groups;
use crate::ingest::IngestHandle;

pub struct Reloader {
    /// The running configuration; held for the whole of a reload, so two never interleave.
    running: Mutex<CollectorConfig>,
    groups: Arc<Groups>,
    ingest: IngestHandle,
}

impl Reloader {
    pub fn new(running: CollectorConfig, groups: Arc<Groups>, ingest: IngestHandle) -> Self {
        Self {
            running: Mutex::new(running),
            groups,
            ingest,
        }
    }

    /// Reads the file again and applies it; what changed, one line per group, or why nothing did.
    pub async fn reload(&self) -> Result<Vec<String>, String> {
        let kept = |e: String| format!("{e}; the running configuration is kept");
        let mut running = self.running.lock().await;
        let Some(path) = running.source.clone() else {
            return Err("this collector was not started from a file; nothing to reload".into());
        };
        let mut next = config::load(&path).map_err(|e| kept(e.to_string()))?;
        next.override_state_dir(running.state_dir_override.as_deref());
        let plan = plan(&running, &next).map_err(kept)?;
        let (problems, _) = crate::preflight(&next);
        if !problems.is_empty() {
            return Err(kept(problems.join("; ")));
        }
        let mut applied = Vec::new();
        let added: Vec<String> = plan.added.iter().map(|g| g.name.clone()).collect();
        self.groups
            .start(plan.added)
            .await
            .map_err(|e| kept(crate::error_chain(&e)))?;
        self.ingest
            .configure(next.sample_retention_ms(), next.custom_metric_slots())
            .await;
        for name in added {
            tracing::info!(group = %name, "Started a group the configuration gained.");
            applied.push(format!("{name}: added"));
        }
        for (group, summary) in plan.changed {
            let handle = self.groups.get(&group.name).expect("a running group stays running");
            handle.reconfigure(group.clone()).await.map_err(|e| e.to_string())?;
            applied.push(format!("{}: {summary}", group.name));
        }
        *running = next;
        Ok(applied)
    }
}

/// What a reload does: groups to start, and groups whose settings change (with what changed).
struct Plan {
    added: Vec<GroupConfig>,
    changed: Vec<(GroupConfig, String)>,
}

/// What `next` changes from `running`; an error for what cannot change in place.
fn plan(running: &CollectorConfig, next: &CollectorConfig) -> Result<Plan, String> {
    if running.server != next.server {
        return Err("the [server] section changed, which needs a restart".into());
    }
    let removed: Vec<&str> = running
        .groups
        .iter()
        .filter(|old| !next.groups.iter().any(|new| new.name == old.name))
        .map(|g| g.name.as_str())
        .collect();
    if !removed.is_empty() {
        return Err(format!(
            "group(s) {} are no longer in the file; a running group is only taken out by a restart, after which \
             its members are no longer managed (set min_size = max_size = 0 first to let it end its members)",
            removed.join(", ")
        ));
    }
    // Each custom metric keeps its slot in the stored samples: a new one may only come after the others.
    let (before, after) = (running.custom_metrics(), next.custom_metrics());
    if !after.starts_with(&before) {
        return Err(format!(
            "the custom metrics' order changed ({} → {}), which needs a restart; add new ones after the others",
            before.join(", "),
            after.join(", ")
        ));
    }
    if !guests_need_gateway(running) && guests_need_gateway(next) {
        return Err(format!(
            "the first qemu group needs the server certificate to name the guests' gateway {}, which needs a \
             restart (or set the group's provider.collector_url)",
            crate::providers::qemu::GUEST_GATEWAY
        ));
    }
    let mut plan = Plan {
        added: Vec::new(),
        changed: Vec::new(),
    };
    for new in &next.groups {
        let Some(old) = running.groups.iter().find(|old| old.name == new.name) else {
            plan.added.push(new.clone());
            continue;
        };
        if old.provider != new.provider || old.load_balancer != new.load_balancer {
            return Err(format!(
                "group {}'s provider or load_balancer changed, which needs a restart",
                new.name
            ));
        }
        if old == new {
            continue;
        }
        let mut what = Vec::new();
        if (old.min_size, old.max_size) != (new.min_size, new.max_size) {
            what.push(format!(
                "min_size..max_size {}..{} → {}..{}",
                old.min_size, old.max_size, new.min_size, new.max_size
            ));
        }
        if old.policies != new.policies {
            what.push("policies".to_string());
        }
        if old.schedules != new.schedules {
            what.push("schedules".to_string());
        }
        if old.health_check != new.health_check {
            what.push("health_check".to_string());
        }
        if what.is_empty() {
            what.push("settings".to_string());
        }
        plan.changed.push((new.clone(), what.join(", ")));
    }
    Ok(plan)
}

/// Whether a qemu group's guests are told to reach the collector through their gateway, which the server
/// certificate must then name.
pub fn guests_need_gateway(config: &CollectorConfig) -> bool {
    config
        .groups
        .iter()
        .any(|g| matches!(&g.provider, ProviderConfig::Qemu(q) if q.collector_url.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::GroupToml;
    use std::path::Path;

    fn parse(text: &str) -> CollectorConfig {
        config::parse(Path::new("c.toml"), text).unwrap()
    }

    fn refusal(running: &CollectorConfig, next: &CollectorConfig) -> String {
        match plan(running, next) {
            Ok(_) => panic!("the reload should be refused"),
            Err(e) => e,
        }
    }

    /// A second group on the fake directory cloud, after the example's `web`.
    fn with_api_group(extra: &str) -> String {
        with_group(api_group().table(extra))
    }

    /// The example's configuration with `group` after its `web`.
    fn with_group(group: GroupToml) -> String {
        format!("{}\n{}", config::LOCAL_EXAMPLE, group.to_toml())
    }

    fn api_group() -> GroupToml {
        GroupToml::fake("api", Path::new("/tmp/cloud"))
            .set("max_size", 2)
            .load_balancer("listen", "127.0.0.1:8001")
    }

    #[test]
    fn group_settings_change_in_place_but_not_the_server_or_a_provider() {
        let running = parse(config::LOCAL_EXAMPLE);
        let more = parse(&config::LOCAL_EXAMPLE.replacen("max_size = 4", "max_size = 6", 1));
        let plan = plan(&running, &more).unwrap();
        assert!(plan.added.is_empty());
        assert_eq!(plan.changed.len(), 1);
        assert_eq!(plan.changed[0].1, "min_size..max_size 1..4 → 1..6");
        assert!(super::plan(&running, &running).unwrap().changed.is_empty());
        let policy = parse(&config::LOCAL_EXAMPLE.replacen("threshold = 60.0", "threshold = 70.0", 1));
        assert_eq!(super::plan(&running, &policy).unwrap().changed[0].1, "policies");

        let server = parse(&config::LOCAL_EXAMPLE.replacen("127.0.0.1:7300", "127.0.0.1:7400", 1));
        assert!(refusal(&running, &server).contains("[server]"));
        let provider = parse(&config::LOCAL_EXAMPLE.replacen("instance_cpus = 1.0", "instance_cpus = 2.0", 1));
        assert!(refusal(&running, &provider).contains("provider or load_balancer"));
    }

    #[test]
    fn a_group_the_file_gains_is_added_and_one_it_loses_is_refused() {
        let running = parse(config::LOCAL_EXAMPLE);
        let next = parse(&with_api_group(""));
        let plan = plan(&running, &next).unwrap();
        assert_eq!(plan.added.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["api"]);
        assert!(plan.changed.is_empty());

        let renamed = parse(&config::LOCAL_EXAMPLE.replacen("name = \"web\"", "name = \"www\"", 1));
        let refused = refusal(&running, &renamed);
        assert!(refused.contains("web are no longer in the file"), "{refused}");
        assert!(refusal(&next, &running).contains("api are no longer in the file"));
    }

    #[test]
    fn custom_metrics_keep_their_slots_across_a_reload() {
        let queue = "[[groups.policies]]\nname = \"queue\"\nmetric = \"custom:queue_depth\"\n\
                     comparison = \"gt\"\nthreshold = 100.0\nadjustment = 1\n";
        let jobs = queue.replace("queue_depth", "jobs").replace("\"queue\"", "\"jobs\"");
        let one = parse(&with_api_group(queue));
        let two = parse(&with_api_group(&format!("{queue}{jobs}")));
        assert!(
            plan(&one, &two).is_ok(),
            "a metric added after the others keeps the slots"
        );
        let swapped = parse(&with_api_group(&format!("{jobs}{queue}")));
        assert!(refusal(&one, &swapped).contains("custom metrics' order changed (queue_depth → jobs, queue_depth)"));
    }

    #[test]
    fn the_first_qemu_group_without_a_collector_url_needs_a_restart() {
        let running = parse(config::LOCAL_EXAMPLE);
        let qemu = api_group()
            .provider_type("qemu")
            .provider("image", "/t.qcow2")
            .provider("kernel", "/vmlinuz")
            .provider("initrd", "/initrd.img");
        assert!(refusal(&running, &parse(&with_group(qemu.clone()))).contains("10.0.2.2"));
        let reachable = qemu.provider("collector_url", "https://192.0.2.1:7300");
        assert!(plan(&running, &parse(&with_group(reachable))).is_ok());
    }
}
