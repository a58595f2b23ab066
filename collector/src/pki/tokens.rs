//! Join tokens: 256 random bits, shown once, stored only as a SHA-256 hash, scoped to one group, with an
//! expiry and a use count. A launch's token is single-use and bound to that launch's member id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::engine::Millis;
pub use crate::model::Token;
use crate::store::Store;

/// Secrets start with this, so that leaked ones are easy to find in logs and repositories.
pub const TOKEN_PREFIX: &str = "ebbjt_";

/// Why a token was refused; `reason` labels the metric. The message never repeats the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRejection {
    pub reason: &'static str,
    pub message: String,
}

/// The tokens, in memory and in the store: every change is written through, so a restart forgets none.
pub struct TokenStore {
    tokens: Mutex<Tokens>,
    store: Arc<Store>,
}

#[derive(Default)]
struct Tokens {
    by_hash: HashMap<String, Token>,
    /// Uses held by enrolments under way, by hash: spent when they succeed, given back when they fail.
    held: HashMap<String, u32>,
}

/// One use of a token, held while its enrolment is under way. [`Redemption::spend`] spends it; dropped
/// without that (the join failed: group at its maximum, a bad CSR, the caller gone), the use is given back.
pub struct Redemption<'a> {
    store: &'a TokenStore,
    hash: String,
    token: Token,
    spent: bool,
}

impl std::fmt::Debug for Redemption<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redemption")
            .field("token", &self.token)
            .field("spent", &self.spent)
            .finish()
    }
}

impl Redemption<'_> {
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// Spends the use, in memory and in the store.
    pub fn spend(mut self) -> Token {
        self.spent = true;
        let mut tokens = self.store.tokens.lock().unwrap();
        release(&mut tokens.held, &self.hash);
        if let Some(token) = tokens.by_hash.get_mut(&self.hash) {
            token.uses_left = token.uses_left.saturating_sub(1);
            self.store.persist(&self.hash, token);
        }
        self.token.clone()
    }
}

impl Drop for Redemption<'_> {
    fn drop(&mut self) {
        if !self.spent {
            release(&mut self.store.tokens.lock().unwrap().held, &self.hash);
        }
    }
}

fn release(held: &mut HashMap<String, u32>, hash: &str) {
    if let Some(count) = held.get_mut(hash) {
        *count -= 1;
        if *count == 0 {
            held.remove(hash);
        }
    }
}

fn hash(secret: &str) -> String {
    super::hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

impl TokenStore {
    /// The tokens the store holds.
    pub fn load(store: Arc<Store>) -> Result<Self, crate::store::StoreError> {
        let by_hash = store.tokens()?.into_iter().collect();
        Ok(Self {
            tokens: Mutex::new(Tokens {
                by_hash,
                held: HashMap::new(),
            }),
            store,
        })
    }

    /// Writes a token's record through to the store; a failure is logged (the in-memory record still holds
    /// until a restart).
    fn persist(&self, hash: &str, token: &Token) {
        if let Err(e) = self.store.save_token(hash, token) {
            tracing::error!(error = %e, token = %token.id, "Cannot save a join token.");
        }
    }

    fn forget(&self, hashes: Vec<String>) {
        if hashes.is_empty() {
            return;
        }
        if let Err(e) = self.store.delete_tokens(&hashes) {
            tracing::error!(error = %e, "Cannot delete join tokens.");
        }
    }

    /// Mints a token; returns the secret (shown once) and its record.
    pub fn create(
        &self,
        group: &str,
        now: Millis,
        ttl_secs: u32,
        uses: u32,
        protected: bool,
        bound_member: Option<String>,
    ) -> (String, Token) {
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .expect("the system's random source");
        let secret = format!("{TOKEN_PREFIX}{}", super::hex(&bytes));
        let hashed = hash(&secret);
        let token = Token {
            id: hashed[..12].to_string(),
            group: group.to_string(),
            expires_at: now + Millis::from(ttl_secs) * 1000,
            uses_left: uses,
            protected,
            bound_member,
        };
        self.persist(&hashed, &token);
        self.tokens.lock().unwrap().by_hash.insert(hashed, token.clone());
        (secret, token)
    }

    /// Holds one use of the token for `group` (any group if empty), for an enrolment under way: of
    /// enrolments racing for its last use, exactly one gets it.
    pub fn redeem(&self, secret: &str, group: &str, now: Millis) -> Result<Redemption<'_>, TokenRejection> {
        let reject = |reason, message: &str| TokenRejection {
            reason,
            message: message.to_string(),
        };
        let mut guard = self.tokens.lock().unwrap();
        let Tokens { by_hash: tokens, held } = &mut *guard;
        // Expired tokens are kept an hour, so that a late VM hears "expired" rather than "unknown".
        let stale: Vec<String> = tokens
            .iter()
            .filter(|(_, t)| t.expires_at + 3_600_000 <= now)
            .map(|(h, _)| h.clone())
            .collect();
        for h in &stale {
            tokens.remove(h);
        }
        self.forget(stale);
        let hashed = hash(secret);
        let token = tokens.get_mut(&hashed).ok_or_else(|| {
            reject(
                "unknown_token",
                "the join token is not known to this collector (mistyped, revoked, or for another collector)",
            )
        })?;
        if token.expires_at <= now {
            return Err(reject(
                "expired_token",
                "the join token has expired; ask the operator for a new one",
            ));
        }
        if token.uses_left == 0 {
            return Err(reject(
                "used_token",
                "the join token has already been used; each launch's token is good for one enrolment",
            ));
        }
        if !group.is_empty() && token.group != group {
            return Err(TokenRejection {
                reason: "wrong_group",
                message: format!("the join token is for group `{}`, not `{group}`", token.group),
            });
        }
        let holding = held.entry(hashed.clone()).or_insert(0);
        if *holding >= token.uses_left {
            return Err(reject(
                "token_in_use",
                "the join token's last use is held by another enrolment under way; retry in a few seconds",
            ));
        }
        *holding += 1;
        Ok(Redemption {
            store: self,
            hash: hashed,
            token: token.clone(),
            spent: false,
        })
    }

    /// Tokens not yet expired.
    pub fn list(&self, now: Millis) -> Vec<Token> {
        let mut tokens: Vec<Token> = self
            .tokens
            .lock()
            .unwrap()
            .by_hash
            .values()
            .filter(|t| t.expires_at > now)
            .cloned()
            .collect();
        tokens.sort_by_key(|t| t.expires_at);
        tokens
    }

    /// Forgets the token with this public id; false if there is none.
    pub fn revoke(&self, id: &str) -> bool {
        self.remove_where(|t| t.id == id)
    }

    /// Forgets every token bound to `member_id` (its launch failed or it was terminated before enrolling).
    pub fn revoke_bound(&self, member_id: &str) {
        self.remove_where(|t| t.bound_member.as_deref() == Some(member_id));
    }

    /// Forgets the tokens `matches` picks; whether there were any.
    fn remove_where(&self, matches: impl Fn(&Token) -> bool) -> bool {
        let mut guard = self.tokens.lock().unwrap();
        let tokens = &mut guard.by_hash;
        let gone: Vec<String> = tokens
            .iter()
            .filter(|(_, t)| matches(t))
            .map(|(h, _)| h.clone())
            .collect();
        for h in &gone {
            tokens.remove(h);
        }
        let any = !gone.is_empty();
        self.forget(gone);
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_800_000_000_000;

    #[test]
    fn a_single_use_token_works_once() {
        let store = TokenStore::load(Arc::new(Store::in_memory())).unwrap();
        let (secret, token) = store.create("web", NOW, 1800, 1, false, Some("web-4".into()));
        assert!(secret.starts_with(TOKEN_PREFIX) && secret.len() == TOKEN_PREFIX.len() + 64);
        assert!(
            !format!("{token:?}").contains(&secret[TOKEN_PREFIX.len()..]),
            "the record does not hold the secret"
        );
        let redeemed = store.redeem(&secret, "web", NOW + 1000).unwrap().spend();
        assert_eq!(redeemed.bound_member.as_deref(), Some("web-4"));
        assert_eq!(
            store.redeem(&secret, "web", NOW + 2000).unwrap_err().reason,
            "used_token"
        );
    }

    #[test]
    fn expired_unknown_and_other_group_tokens_are_refused() {
        let store = TokenStore::load(Arc::new(Store::in_memory())).unwrap();
        let (secret, _) = store.create("web", NOW, 60, 5, false, None);
        assert_eq!(store.redeem(&secret, "db", NOW).unwrap_err().reason, "wrong_group");
        assert_eq!(
            store.redeem(&secret, "web", NOW + 60_000).unwrap_err().reason,
            "expired_token"
        );
        let error = store.redeem("ebbjt_0000", "web", NOW).unwrap_err();
        assert_eq!(error.reason, "unknown_token");
        assert!(!error.message.contains("ebbjt_0000"), "never echoes the secret");
    }

    #[test]
    fn tokens_outlive_a_restart() {
        let db = Arc::new(Store::in_memory());
        let store = TokenStore::load(db.clone()).unwrap();
        let (secret, _) = store.create("web", NOW, 3600, 2, false, None);
        let (revoked, token) = store.create("web", NOW, 3600, 1, false, None);
        store.redeem(&secret, "web", NOW).unwrap().spend();
        store.revoke(&token.id);
        let again = TokenStore::load(db).unwrap();
        assert_eq!(again.list(NOW)[0].uses_left, 1, "the use is remembered");
        again.redeem(&secret, "web", NOW).unwrap().spend();
        assert_eq!(again.redeem(&revoked, "web", NOW).unwrap_err().reason, "unknown_token");
    }

    #[test]
    fn a_use_is_spent_only_by_an_enrolment_that_succeeds_and_a_race_has_one_winner() {
        let db = Arc::new(Store::in_memory());
        let store = TokenStore::load(db.clone()).unwrap();
        let (secret, _) = store.create("web", NOW, 3600, 1, false, None);
        // The join failed (group full, bad CSR): the use comes back, in memory and across a restart.
        drop(store.redeem(&secret, "web", NOW).unwrap());
        assert_eq!(store.list(NOW)[0].uses_left, 1);
        assert_eq!(TokenStore::load(db.clone()).unwrap().list(NOW)[0].uses_left, 1);
        // Two enrolments at once: the second is told to retry while the first holds the last use.
        let first = store.redeem(&secret, "web", NOW).unwrap();
        assert_eq!(store.redeem(&secret, "web", NOW).unwrap_err().reason, "token_in_use");
        first.spend();
        assert_eq!(store.redeem(&secret, "web", NOW).unwrap_err().reason, "used_token");
        assert_eq!(TokenStore::load(db).unwrap().list(NOW)[0].uses_left, 0);
        // Racing threads: exactly one spends it.
        let (secret, _) = store.create("web", NOW, 3600, 1, false, None);
        let winners = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| store.redeem(&secret, "web", NOW).map(Redemption::spend).is_ok()))
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).filter(|won| *won).count()
        });
        assert_eq!(winners, 1);
    }

    #[test]
    fn operators_list_and_revoke() {
        let store = TokenStore::load(Arc::new(Store::in_memory())).unwrap();
        let (secret, token) = store.create("web", NOW, 3600, 2, true, None);
        assert_eq!(store.list(NOW), std::slice::from_ref(&token));
        assert!(store.revoke(&token.id));
        assert!(!store.revoke(&token.id));
        assert_eq!(store.redeem(&secret, "web", NOW).unwrap_err().reason, "unknown_token");
    }
}
