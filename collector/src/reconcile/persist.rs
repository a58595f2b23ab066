//! The group's state in the store: only what changed since the last successful save is written, and
//! the intent log around every cloud call. A refused write pauses decisions until one succeeds.

use std::collections::{HashMap, HashSet};

use super::GroupController;
use crate::engine::Millis;
use crate::model::Member;
use crate::store::{GroupRecord, Intent};

/// What the store holds of a group, as of the last successful save.
#[derive(Debug, Default)]
pub(super) struct Saved {
    record: GroupRecord,
    members: HashMap<String, Member>,
}

impl GroupController {
    /// What the store keeps of this group.
    pub(super) fn group_record(&self) -> GroupRecord {
        GroupRecord {
            min_size: self.capacity.min_size,
            max_size: self.capacity.max_size,
            desired: self.capacity.desired,
            suspended: self.suspended.0,
            last_scale_out: self.memory.last_scale_out,
            last_scale_in: self.memory.last_scale_in,
            launches: self.launches,
        }
    }

    /// Writes the group's state to the store if it changed (the first time all of it, then the members
    /// that changed or left); false if the store refused (disk full, unwritable), which is logged and
    /// counted, and pauses decisions until a write succeeds.
    pub(super) fn save(&mut self) -> bool {
        let record = self.group_record();
        let (result, changed, removed) = match &self.saved {
            None => (
                self.deps
                    .services
                    .store
                    .save_group(&self.config.name, &record, &self.members),
                self.members.clone(),
                Vec::new(),
            ),
            Some(saved) => {
                let changed: Vec<Member> = self
                    .members
                    .iter()
                    .filter(|m| saved.members.get(&m.id) != Some(m))
                    .cloned()
                    .collect();
                let current: HashSet<&str> = self.members.iter().map(|m| m.id.as_str()).collect();
                let removed: Vec<String> = saved
                    .members
                    .keys()
                    .filter(|id| !current.contains(id.as_str()))
                    .cloned()
                    .collect();
                if saved.record == record && changed.is_empty() && removed.is_empty() {
                    return true;
                }
                let result =
                    self.deps
                        .services
                        .store
                        .save_group_changes(&self.config.name, &record, &changed, &removed);
                (result, changed, removed)
            }
        };
        match result {
            Ok(()) => {
                if self.store_failing {
                    tracing::info!(group = %self.config.name, "The store accepts writes again; decisions resume.");
                }
                // What the store now holds: only what changed is copied, as only that was written.
                let saved = self.saved.get_or_insert_with(Saved::default);
                saved.record = record;
                for id in &removed {
                    saved.members.remove(id);
                }
                saved.members.extend(changed.into_iter().map(|m| (m.id.clone(), m)));
                self.store_failing = false;
                true
            }
            Err(e) => {
                if !self.store_failing {
                    tracing::error!(group = %self.config.name, error = %e, "Cannot save the group's state; decisions pause until the store accepts writes.");
                }
                self.deps.services.metrics.store_error();
                self.store_failing = true;
                false
            }
        }
    }

    /// Writes an intent; false (logged, counted, decisions paused) if the store refuses.
    pub(super) fn write_intent(&mut self, intent: &Intent) -> bool {
        match self.deps.services.store.begin_intent(intent) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(group = %self.config.name, error = %e, "Cannot write an intent; not calling the cloud.");
                self.deps.services.metrics.store_error();
                self.store_failing = true;
                false
            }
        }
    }

    pub(super) fn finish_intent(&mut self, key: &str, now: Millis, outcome: &str) {
        if let Err(e) = self.deps.services.store.finish_intent(key, now, outcome) {
            tracing::error!(group = %self.config.name, error = %e, "Cannot mark an intent done.");
            self.deps.services.metrics.store_error();
            self.store_failing = true;
        }
    }
}
