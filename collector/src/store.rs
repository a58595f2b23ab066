//! The embedded store: SQLite (bundled, WAL) in the state directory, so a restart, a crash or an upgrade
//! forgets nothing an operator relies on. It holds each group's runtime state and members, join-token
//! hashes, members' current certificate serials and the activity history. Samples stay in memory.
//!
//! One connection behind a mutex: every statement is small, and the callers are a handful of tasks.
//! Schema changes are numbered migrations, applied in order at open (`PRAGMA user_version`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use thiserror::Error;

use crate::engine::{MemberState, Millis};
use crate::model::{Activity, ActivityKind, Explained, HookWait, Member, Token, Transition};

/// Each entry brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        min_size INTEGER NOT NULL,
        max_size INTEGER NOT NULL,
        desired INTEGER NOT NULL,
        suspended INTEGER NOT NULL,
        last_scale_out INTEGER,
        last_scale_in INTEGER,
        launches INTEGER NOT NULL
    );
    CREATE TABLE members (
        id TEXT PRIMARY KEY,
        grp TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        address TEXT,
        state TEXT NOT NULL,
        launched_at INTEGER NOT NULL,
        in_service_since INTEGER,
        protected INTEGER NOT NULL,
        external INTEGER NOT NULL,
        unhealthy INTEGER NOT NULL,
        replacing INTEGER NOT NULL
    );
    CREATE INDEX members_grp ON members (grp);
    CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        id TEXT NOT NULL,
        grp TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        uses_left INTEGER NOT NULL,
        protected INTEGER NOT NULL,
        bound_member TEXT
    );
    CREATE TABLE serials (member TEXT PRIMARY KEY, serials TEXT NOT NULL);
    CREATE TABLE activities (
        id INTEGER PRIMARY KEY,
        grp TEXT NOT NULL,
        kind TEXT NOT NULL,
        cause TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        at INTEGER NOT NULL,
        from_capacity INTEGER NOT NULL,
        to_capacity INTEGER NOT NULL,
        member_id TEXT NOT NULL
    );
    CREATE INDEX activities_at ON activities (at);
"#,
    r#"
    CREATE TABLE intents (
        key TEXT PRIMARY KEY,
        grp TEXT NOT NULL,
        kind TEXT NOT NULL,
        member_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        done_at INTEGER,
        outcome TEXT
    );
    CREATE INDEX intents_open ON intents (grp, done_at);
"#,
    r#"
    ALTER TABLE members ADD COLUMN drain_until INTEGER;
"#,
    r#"
    ALTER TABLE members ADD COLUMN launch_spec TEXT NOT NULL DEFAULT '';
"#,
    r#"
    CREATE TABLE explanations (
        id INTEGER PRIMARY KEY,
        grp TEXT NOT NULL,
        from_ms INTEGER NOT NULL,
        until_ms INTEGER NOT NULL,
        evaluations INTEGER NOT NULL,
        dry_run INTEGER NOT NULL,
        action TEXT NOT NULL,
        reason TEXT NOT NULL,
        desired_before INTEGER NOT NULL,
        desired INTEGER NOT NULL,
        text TEXT NOT NULL,
        json TEXT NOT NULL
    );
    CREATE INDEX explanations_grp_until ON explanations (grp, until_ms);
"#,
    r#"
    ALTER TABLE members ADD COLUMN hook_transition TEXT;
    ALTER TABLE members ADD COLUMN hook_position INTEGER;
    ALTER TABLE members ADD COLUMN hook_deadline INTEGER;
"#,
];

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "cannot open the store {path}: {source}; check that the state directory exists and is writable by the collector's user"
    )]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error(
        "the store {path} is not a usable ebb database ({source}); move it aside and start again, or restore a backup — the collector will not start empty over it"
    )]
    Corrupt { path: PathBuf, source: rusqlite::Error },
    #[error(
        "the store {path} has schema version {found}, newer than this collector knows ({known}); run the newer collector or restore a backup"
    )]
    TooNew { path: PathBuf, found: i64, known: i64 },
    #[error("the store: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// A group's runtime state as kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupRecord {
    pub min_size: u32,
    pub max_size: u32,
    pub desired: u32,
    /// Suspended processes, as bits (`reconcile::Suspended`).
    pub suspended: u32,
    pub last_scale_out: Option<Millis>,
    pub last_scale_in: Option<Millis>,
    /// Launches so far; the next member id follows it.
    pub launches: u64,
}

/// A call that changes the cloud, written before it is made and marked done after: after a crash, an
/// intent still open says what may or may not have happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// The idempotency key (a launch's `launch_id`).
    pub key: String,
    pub group: String,
    pub kind: IntentKind,
    pub member_id: String,
    /// Empty for a launch.
    pub instance_id: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntentKind {
    Launch,
    Terminate,
}

impl IntentKind {
    fn as_str(self) -> &'static str {
        match self {
            IntentKind::Launch => "launch",
            IntentKind::Terminate => "terminate",
        }
    }
}

pub struct Store {
    connection: Mutex<Connection>,
}

impl Store {
    /// Opens (or creates) the store at `path`, applying any pending migrations. A file that is not an ebb
    /// store, or is damaged, is refused rather than replaced.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // Owner-only from its first byte, whatever the umask; SQLite gives its WAL and shared-memory files
        // the database file's mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path);
            if let Err(e) = created {
                tracing::debug!(path = %path.display(), error = %e, "Cannot create the store file ahead of SQLite.");
            }
        }
        let connection = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let corrupt = |source| StoreError::Corrupt {
            path: path.to_path_buf(),
            source,
        };
        // The first read of a file that is not SQLite fails here.
        connection.pragma_update(None, "journal_mode", "WAL").map_err(corrupt)?;
        let check: String = connection
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(corrupt)?;
        if check != "ok" {
            let damaged = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT);
            return Err(corrupt(rusqlite::Error::SqliteFailure(damaged, Some(check))));
        }
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&connection, path)?;
        Ok(Self {
            connection: Mutex::new(connection),
        })
    }

    /// A store in memory, for tests.
    pub fn in_memory() -> Self {
        let connection = Connection::open_in_memory().expect("an in-memory database");
        migrate(&connection, Path::new(":memory:")).expect("the migrations apply");
        Self {
            connection: Mutex::new(connection),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let mut connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(&mut connection)?)
    }

    /// This collector's identity, made once: it tags what it launches.
    pub fn cluster_id(&self) -> Result<String, StoreError> {
        self.with(|c| {
            if let Some(id) = c
                .query_row("SELECT value FROM meta WHERE key = 'cluster_id'", [], |r| r.get(0))
                .optional()?
            {
                return Ok(id);
            }
            let mut bytes = [0u8; 8];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .expect("the system's random source");
            let id = crate::pki::hex(&bytes);
            c.execute("INSERT INTO meta (key, value) VALUES ('cluster_id', ?1)", [&id])?;
            Ok(id)
        })
    }

    // Groups and members.

    /// Saves a group's state and its whole membership in one transaction.
    pub fn save_group(&self, name: &str, group: &GroupRecord, members: &[Member]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            save_group_row(&tx, name, group)?;
            tx.execute("DELETE FROM members WHERE grp = ?1", [name])?;
            for member in members {
                save_member(&tx, name, member)?;
            }
            tx.commit()
        })
    }

    /// Saves a group's state and the members that changed or left since the last save, in one transaction:
    /// a large group pays for what changed, not for its size.
    pub fn save_group_changes(
        &self,
        name: &str,
        group: &GroupRecord,
        changed: &[Member],
        removed: &[String],
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            save_group_row(&tx, name, group)?;
            for member in changed {
                save_member(&tx, name, member)?;
            }
            for id in removed {
                tx.prepare_cached("DELETE FROM members WHERE id = ?1 AND grp = ?2")?
                    .execute([id.as_str(), name])?;
            }
            tx.commit()
        })
    }

    /// A group's saved state and members, if it was ever saved.
    pub fn load_group(&self, name: &str) -> Result<Option<(GroupRecord, Vec<Member>)>, StoreError> {
        self.with(|c| {
            let Some(group) = c
                .query_row(
                    "SELECT min_size, max_size, desired, suspended, last_scale_out, last_scale_in, launches FROM groups WHERE name = ?1",
                    [name],
                    |r| {
                        Ok(GroupRecord {
                            min_size: r.get(0)?,
                            max_size: r.get(1)?,
                            desired: r.get(2)?,
                            suspended: r.get(3)?,
                            last_scale_out: r.get(4)?,
                            last_scale_in: r.get(5)?,
                            launches: r.get::<_, i64>(6)? as u64,
                        })
                    },
                )
                .optional()?
            else {
                return Ok(None);
            };
            let mut statement = c.prepare(
                "SELECT id, instance_id, address, state, launched_at, in_service_since, protected, external, unhealthy, replacing, drain_until, launch_spec, hook_transition, hook_position, hook_deadline
                 FROM members WHERE grp = ?1 ORDER BY rowid",
            )?;
            let members = statement
                .query_map([name], |r| {
                    let state: String = r.get(3)?;
                    let address: Option<String> = r.get(2)?;
                    let hook_transition: Option<String> = r.get(12)?;
                    let hook = match (hook_transition.as_deref().and_then(Transition::from_name), r.get(13)?, r.get(14)?) {
                        (Some(transition), Some(position), Some(deadline)) => Some(HookWait {
                            transition,
                            position,
                            deadline,
                        }),
                        _ => None,
                    };
                    Ok(Member {
                        id: r.get(0)?,
                        instance_id: r.get(1)?,
                        address: address.and_then(|a| a.parse::<SocketAddr>().ok()),
                        state: match state.as_str() {
                            "in_service" => MemberState::InService,
                            "draining" => MemberState::Draining,
                            _ => MemberState::Pending,
                        },
                        launched_at: r.get(4)?,
                        in_service_since: r.get(5)?,
                        protected: r.get(6)?,
                        external: r.get(7)?,
                        unhealthy: r.get(8)?,
                        replacing: r.get(9)?,
                        drain_until: r.get(10)?,
                        launch_spec: r.get(11)?,
                        hook,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some((group, members)))
        })
    }

    // Join tokens (hashes only) and certificate serials.

    pub fn save_token(&self, hash: &str, token: &Token) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO tokens (hash, id, grp, expires_at, uses_left, protected, bound_member)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    hash,
                    token.id,
                    token.group,
                    token.expires_at,
                    token.uses_left,
                    token.protected,
                    token.bound_member
                ],
            )
            .map(|_| ())
        })
    }

    pub fn delete_tokens(&self, hashes: &[String]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            for hash in hashes {
                tx.execute("DELETE FROM tokens WHERE hash = ?1", [hash])?;
            }
            tx.commit()
        })
    }

    /// Every saved token by hash.
    pub fn tokens(&self) -> Result<Vec<(String, Token)>, StoreError> {
        self.with(|c| {
            let mut statement =
                c.prepare("SELECT hash, id, grp, expires_at, uses_left, protected, bound_member FROM tokens")?;
            statement
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        Token {
                            id: r.get(1)?,
                            group: r.get(2)?,
                            expires_at: r.get(3)?,
                            uses_left: r.get(4)?,
                            protected: r.get(5)?,
                            bound_member: r.get(6)?,
                        },
                    ))
                })?
                .collect()
        })
    }

    /// A member's valid serials; none deletes the member's row (revoked).
    pub fn save_serials(&self, member: &str, serials: &[String]) -> Result<(), StoreError> {
        self.with(|c| {
            if serials.is_empty() {
                c.execute("DELETE FROM serials WHERE member = ?1", [member])?;
            } else {
                c.execute(
                    "INSERT OR REPLACE INTO serials (member, serials) VALUES (?1, ?2)",
                    params![member, serials.join(",")],
                )?;
            }
            Ok(())
        })
    }

    pub fn serials(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare("SELECT member, serials FROM serials")?;
            statement
                .query_map([], |r| {
                    let list: String = r.get(1)?;
                    Ok((r.get(0)?, list.split(',').map(str::to_string).collect()))
                })?
                .collect()
        })
    }

    // The intent log.

    pub fn begin_intent(&self, intent: &Intent) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO intents (key, grp, kind, member_id, instance_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    intent.key,
                    intent.group,
                    intent.kind.as_str(),
                    intent.member_id,
                    intent.instance_id,
                    intent.created_at
                ],
            )
            .map(|_| ())
        })
    }

    pub fn finish_intent(&self, key: &str, at: Millis, outcome: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE intents SET done_at = ?2, outcome = ?3 WHERE key = ?1",
                params![key, at, outcome],
            )
            .map(|_| ())
        })
    }

    /// The intents of `group` never marked done, oldest first.
    pub fn open_intents(&self, group: &str) -> Result<Vec<Intent>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(
                "SELECT key, grp, kind, member_id, instance_id, created_at FROM intents
                 WHERE grp = ?1 AND done_at IS NULL ORDER BY created_at, key",
            )?;
            statement
                .query_map([group], |r| {
                    let kind: String = r.get(2)?;
                    Ok(Intent {
                        key: r.get(0)?,
                        group: r.get(1)?,
                        kind: if kind == "terminate" {
                            IntentKind::Terminate
                        } else {
                            IntentKind::Launch
                        },
                        member_id: r.get(3)?,
                        instance_id: r.get(4)?,
                        created_at: r.get(5)?,
                    })
                })?
                .collect()
        })
    }

    /// Forgets intents done before `before`.
    pub fn prune_intents(&self, before: Millis) -> Result<usize, StoreError> {
        self.with(|c| c.execute("DELETE FROM intents WHERE done_at < ?1", [before]))
    }

    // Explanations.

    /// Saves a new explanation record; returns its id.
    pub fn add_explanation(&self, group: &str, e: &Explained) -> Result<i64, StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO explanations (grp, from_ms, until_ms, evaluations, dry_run, action, reason, desired_before, desired, text, json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    group,
                    e.from,
                    e.until,
                    e.evaluations as i64,
                    e.dry_run,
                    e.action,
                    e.reason,
                    e.desired_before,
                    e.desired,
                    e.text,
                    e.json
                ],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Extends a record to its latest evaluation.
    pub fn update_explanation(&self, id: i64, e: &Explained) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE explanations SET until_ms = ?2, evaluations = ?3, text = ?4, json = ?5 WHERE id = ?1",
                params![id, e.until, e.evaluations as i64, e.text, e.json],
            )
            .map(|_| ())
        })
    }

    /// The records of `group` that end at or after `since`, oldest first, at most the newest `limit`.
    pub fn explanations(&self, group: &str, since: Millis, limit: usize) -> Result<Vec<Explained>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare_cached(
                "SELECT from_ms, until_ms, evaluations, dry_run, action, reason, desired_before, desired, text, json
                 FROM explanations WHERE grp = ?1 AND until_ms >= ?2 ORDER BY id DESC LIMIT ?3",
            )?;
            let mut records = statement
                .query_map(params![group, since, limit as i64], |r| {
                    Ok(Explained {
                        from: r.get(0)?,
                        until: r.get(1)?,
                        evaluations: r.get::<_, i64>(2)? as u64,
                        dry_run: r.get(3)?,
                        action: r.get(4)?,
                        reason: r.get(5)?,
                        desired_before: r.get(6)?,
                        desired: r.get(7)?,
                        text: r.get(8)?,
                        json: r.get(9)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            records.reverse();
            Ok(records)
        })
    }

    /// Forgets explanations that ended before `before`.
    pub fn prune_explanations(&self, before: Millis) -> Result<usize, StoreError> {
        self.with(|c| c.execute("DELETE FROM explanations WHERE until_ms < ?1", [before]))
    }

    // Activities.

    /// Saves an activity; returns its id.
    pub fn add_activity(&self, a: &Activity) -> Result<u64, StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO activities (grp, kind, cause, outcome, detail, at, from_capacity, to_capacity, member_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    a.group,
                    a.kind.as_str(),
                    a.cause,
                    a.outcome,
                    a.detail,
                    a.at,
                    a.from_capacity,
                    a.to_capacity,
                    a.member_id
                ],
            )?;
            Ok(c.last_insert_rowid() as u64)
        })
    }

    /// Activities with an id above `after`, of `group` (all if empty), oldest first, at most `limit`.
    pub fn activities_after(&self, after: u64, group: &str, limit: usize) -> Result<Vec<Activity>, StoreError> {
        self.activities(
            "SELECT id, grp, kind, cause, outcome, detail, at, from_capacity, to_capacity, member_id FROM activities
             WHERE id > ?1 AND (?2 = '' OR grp = ?2) ORDER BY id LIMIT ?3",
            params![after as i64, group, limit as i64],
        )
    }

    /// The newest `limit` activities of `group` (all if empty), newest first.
    pub fn newest_activities(&self, group: &str, limit: usize) -> Result<Vec<Activity>, StoreError> {
        self.activities(
            "SELECT id, grp, kind, cause, outcome, detail, at, from_capacity, to_capacity, member_id FROM activities
             WHERE (?1 = '' OR grp = ?1) ORDER BY id DESC LIMIT ?2",
            params![group, limit as i64],
        )
    }

    fn activities(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Activity>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare_cached(sql)?;
            statement
                .query_map(params, |r| {
                    let kind: String = r.get(2)?;
                    let outcome: String = r.get(4)?;
                    Ok(Activity {
                        id: r.get::<_, i64>(0)? as u64,
                        group: r.get(1)?,
                        kind: ActivityKind::from_name(&kind).unwrap_or(ActivityKind::Warning),
                        cause: r.get(3)?,
                        outcome: if outcome == "ok" { "ok" } else { "failed" },
                        detail: r.get(5)?,
                        at: r.get(6)?,
                        from_capacity: r.get(7)?,
                        to_capacity: r.get(8)?,
                        member_id: r.get(9)?,
                    })
                })?
                .collect()
        })
    }

    /// Forgets activities older than `before`.
    pub fn prune_activities(&self, before: Millis) -> Result<usize, StoreError> {
        self.with(|c| c.execute("DELETE FROM activities WHERE at < ?1", [before]))
    }
}

fn migrate(connection: &Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = connection
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|source| StoreError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        connection.execute_batch(&format!("BEGIN; {migration}; PRAGMA user_version = {}; COMMIT;", i + 1))?;
    }
    Ok(())
}

#[cfg(test)]
impl Store {
    /// Makes every write fail, as a full disk would (`PRAGMA query_only`).
    pub fn refuse_writes(&self, refuse: bool) {
        self.with(|c| c.pragma_update(None, "query_only", refuse)).unwrap();
    }
}

fn save_group_row(tx: &rusqlite::Transaction, name: &str, group: &GroupRecord) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO groups (name, min_size, max_size, desired, suspended, last_scale_out, last_scale_in, launches)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        name,
        group.min_size,
        group.max_size,
        group.desired,
        group.suspended,
        group.last_scale_out,
        group.last_scale_in,
        group.launches as i64
    ])
}

fn save_member(tx: &rusqlite::Transaction, group: &str, m: &Member) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO members (id, grp, instance_id, address, state, launched_at, in_service_since, protected, external, unhealthy, replacing, drain_until, launch_spec, hook_transition, hook_position, hook_deadline)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
    )?
    .execute(params![
        m.id,
        group,
        m.instance_id,
        m.address.map(|a| a.to_string()),
        m.state.as_str(),
        m.launched_at,
        m.in_service_since,
        m.protected,
        m.external,
        m.unhealthy,
        m.replacing,
        m.drain_until,
        m.launch_spec,
        m.hook.map(|h| h.transition.name()),
        m.hook.map(|h| h.position),
        m.hook.map(|h| h.deadline)
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, protected: bool) -> Member {
        Member {
            id: id.into(),
            instance_id: format!("i-{id}"),
            address: Some("127.0.1.2:8080".parse().unwrap()),
            state: MemberState::InService,
            launched_at: 1_000,
            in_service_since: Some(2_000),
            protected,
            external: false,
            unhealthy: false,
            replacing: false,
            drain_until: None,
            launch_spec: "v1".into(),
            hook: Some(HookWait {
                transition: Transition::Terminating,
                position: 1,
                deadline: 9_000,
            }),
        }
    }

    fn activity(group: &str, kind: ActivityKind) -> Activity {
        Activity {
            id: 0,
            group: group.into(),
            kind,
            cause: "because".into(),
            outcome: "ok",
            detail: String::new(),
            at: 5_000,
            from_capacity: 1,
            to_capacity: 2,
            member_id: "web-1".into(),
        }
    }

    #[test]
    fn saving_changes_touches_only_the_members_that_changed_or_left() {
        let store = Store::in_memory();
        let record = GroupRecord {
            desired: 3,
            ..GroupRecord::default()
        };
        store
            .save_group(
                "web",
                &record,
                &[member("web-1", false), member("web-2", false), member("web-3", false)],
            )
            .unwrap();
        store.save_group("api", &record, &[member("api-1", false)]).unwrap();
        let protected = member("web-2", true);
        let new = member("web-4", false);
        let record = GroupRecord { desired: 2, ..record };
        store
            .save_group_changes("web", &record, &[protected, new], &["web-1".to_string()])
            .unwrap();
        let (loaded, members) = store.load_group("web").unwrap().unwrap();
        assert_eq!(loaded, record);
        let mut found: Vec<(String, bool)> = members.iter().map(|m| (m.id.clone(), m.protected)).collect();
        found.sort();
        assert_eq!(
            found,
            [("web-2".into(), true), ("web-3".into(), false), ("web-4".into(), false)],
            "web-1 gone, web-2 changed, web-3 untouched, web-4 added"
        );
        assert_eq!(
            store.load_group("api").unwrap().unwrap().1.len(),
            1,
            "other groups untouched"
        );
    }

    #[test]
    fn everything_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("collector.db");
        let record = GroupRecord {
            min_size: 1,
            max_size: 4,
            desired: 3,
            suspended: 5,
            last_scale_out: Some(9),
            last_scale_in: None,
            launches: 7,
        };
        let cluster = {
            let store = Store::open(&path).unwrap();
            store
                .save_group("web", &record, &[member("web-6", true), member("web-7", false)])
                .unwrap();
            store.save_serials("web-6", &["01".into(), "02".into()]).unwrap();
            store.add_activity(&activity("web", ActivityKind::ScaleOut)).unwrap();
            store.cluster_id().unwrap()
        };
        let store = Store::open(&path).unwrap();
        let (group, members) = store.load_group("web").unwrap().unwrap();
        assert_eq!(group, record);
        assert_eq!(members, [member("web-6", true), member("web-7", false)]);
        assert_eq!(
            store.serials().unwrap(),
            [("web-6".to_string(), vec!["01".to_string(), "02".to_string()])]
        );
        assert_eq!(store.cluster_id().unwrap(), cluster, "made once");
        let next = store.add_activity(&activity("web", ActivityKind::ScaleIn)).unwrap();
        assert_eq!(next, 2, "ids continue");
        let kinds: Vec<ActivityKind> = store
            .newest_activities("web", 10)
            .unwrap()
            .iter()
            .map(|a| a.kind)
            .collect();
        assert_eq!(kinds, [ActivityKind::ScaleIn, ActivityKind::ScaleOut]);
        assert!(store.load_group("db").unwrap().is_none());
    }

    #[test]
    fn a_damaged_or_foreign_file_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("collector.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let error = Store::open(&path).err().unwrap().to_string();
        assert!(
            error.contains("is not a usable ebb database") && error.contains("move it aside"),
            "{error}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192], "left as it was");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("collector.db");
        drop(Store::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let error = Store::open(&path).err().unwrap().to_string();
        assert!(
            error.contains("schema version 99, newer than this collector knows"),
            "{error}"
        );
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        let error = Store::open(Path::new("/nonexistent/ebb/collector.db"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("cannot open the store /nonexistent/ebb/collector.db") && error.contains("writable"),
            "{error}"
        );
    }

    #[test]
    fn a_refused_write_changes_nothing() {
        let store = Store::in_memory();
        store
            .save_group("web", &GroupRecord::default(), &[member("web-1", false)])
            .unwrap();
        store.refuse_writes(true);
        let error = store.save_group("web", &GroupRecord::default(), &[member("web-2", false)]);
        assert!(error.is_err());
        store.refuse_writes(false);
        assert_eq!(store.load_group("web").unwrap().unwrap().1, [member("web-1", false)]);
    }

    #[test]
    fn intents_stay_open_until_marked_done() {
        let store = Store::in_memory();
        let intent = |key: &str, kind| Intent {
            key: key.into(),
            group: "web".into(),
            kind,
            member_id: "web-1".into(),
            instance_id: String::new(),
            created_at: 1,
        };
        store.begin_intent(&intent("web-1-1", IntentKind::Launch)).unwrap();
        store.begin_intent(&intent("t-1", IntentKind::Terminate)).unwrap();
        store.finish_intent("t-1", 2, "done").unwrap();
        assert_eq!(
            store.open_intents("web").unwrap(),
            [intent("web-1-1", IntentKind::Launch)]
        );
        assert!(store.open_intents("db").unwrap().is_empty());
        assert_eq!(store.prune_intents(3).unwrap(), 1);
    }

    #[test]
    fn old_activities_are_pruned() {
        let store = Store::in_memory();
        store.add_activity(&activity("web", ActivityKind::Launch)).unwrap();
        assert_eq!(store.prune_activities(4_000).unwrap(), 0);
        assert_eq!(store.prune_activities(6_000).unwrap(), 1);
        assert!(store.activities_after(0, "", 10).unwrap().is_empty());
    }
}
