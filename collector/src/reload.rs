//! Live reload (`ebb-collector reload`, SIGHUP): the configuration file is read again and each group's
//! new settings — limits, policies, schedules, health, cooldowns, drain — apply at once without touching
//! its members. What a running collector cannot change in place (the server section, which groups exist,
//! a group's provider or load balancer) is refused with the reason, and the running configuration kept;
//! an invalid file likewise.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::config::{self, CollectorConfig, GroupConfig};
use crate::reconcile::GroupHandle;

pub struct Reloader {
    /// The file the running configuration came from; `None` when it was given in memory.
    source: Option<PathBuf>,
    running: Mutex<CollectorConfig>,
    groups: BTreeMap<String, GroupHandle>,
}

impl Reloader {
    pub fn new(running: CollectorConfig, groups: BTreeMap<String, GroupHandle>) -> Self {
        Self {
            source: running.source.clone(),
            running: Mutex::new(running),
            groups,
        }
    }

    /// Reads the file again and applies it; what changed, one line per group, or why nothing did.
    pub async fn reload(&self) -> Result<Vec<String>, String> {
        let Some(path) = &self.source else {
            return Err("this collector was not started from a file; nothing to reload".into());
        };
        let mut next = config::load(path).map_err(|e| format!("{e}; the running configuration is kept"))?;
        let changed = {
            let running = self.running.lock().unwrap();
            next.override_state_dir(running.state_dir_override.as_deref());
            changes(&running, &next).map_err(|e| format!("{e}; the running configuration is kept"))?
        };
        let mut applied = Vec::new();
        for (group, summary) in changed {
            let handle = &self.groups[&group.name];
            handle.reconfigure(group.clone()).await?;
            applied.push(format!("{}: {summary}", group.name));
        }
        *self.running.lock().unwrap() = next;
        Ok(applied)
    }
}

/// The groups whose settings differ, with what differs; an error for what cannot change in place.
fn changes(running: &CollectorConfig, next: &CollectorConfig) -> Result<Vec<(GroupConfig, String)>, String> {
    if running.server != next.server {
        return Err("the [server] section changed, which needs a restart".into());
    }
    let names = |c: &CollectorConfig| c.groups.iter().map(|g| g.name.clone()).collect::<Vec<_>>();
    if names(running) != names(next) {
        return Err(format!(
            "the groups changed ({} → {}), which needs a restart",
            names(running).join(", "),
            names(next).join(", ")
        ));
    }
    let mut changed = Vec::new();
    for (old, new) in running.groups.iter().zip(&next.groups) {
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
        changed.push((new.clone(), what.join(", ")));
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> CollectorConfig {
        config::parse(Path::new("c.toml"), text).unwrap()
    }

    #[test]
    fn group_settings_change_in_place_but_not_the_server_the_groups_or_the_provider() {
        let running = parse(config::LOCAL_EXAMPLE);
        let more = parse(&config::LOCAL_EXAMPLE.replacen("max_size = 4", "max_size = 6", 1));
        let changed = changes(&running, &more).unwrap();
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].1, "min_size..max_size 1..4 → 1..6");
        assert!(changes(&running, &running).unwrap().is_empty());
        let policy = parse(&config::LOCAL_EXAMPLE.replacen("threshold = 60.0", "threshold = 70.0", 1));
        assert_eq!(changes(&running, &policy).unwrap()[0].1, "policies");

        let server = parse(&config::LOCAL_EXAMPLE.replacen("127.0.0.1:7300", "127.0.0.1:7400", 1));
        assert!(changes(&running, &server).unwrap_err().contains("[server]"));
        let provider = parse(&config::LOCAL_EXAMPLE.replacen("instance_cpus = 1.0", "instance_cpus = 2.0", 1));
        assert!(
            changes(&running, &provider)
                .unwrap_err()
                .contains("provider or load_balancer")
        );
        let renamed = parse(&config::LOCAL_EXAMPLE.replacen("name = \"web\"", "name = \"www\"", 1));
        assert!(changes(&running, &renamed).unwrap_err().contains("web → www"));
    }
}
