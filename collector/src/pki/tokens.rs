//! Join tokens: 256 random bits, shown once, stored only as a SHA-256 hash, scoped to one group, with an
//! expiry and a use count. A launch's token is single-use and bound to that launch's member id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::engine::Millis;
use crate::store::Store;

/// Secrets start with this, so that leaked ones are easy to find in logs and repositories.
pub const TOKEN_PREFIX: &str = "ebbjt_";

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

/// Why a token was refused; `reason` labels the metric. The message never repeats the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRejection {
    pub reason: &'static str,
    pub message: String,
}

/// The tokens, in memory and in the store: every change is written through, so a restart forgets none.
pub struct TokenStore {
    by_hash: Mutex<HashMap<String, Token>>,
    store: Arc<Store>,
}

fn hash(secret: &str) -> String {
    super::hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

impl TokenStore {
    /// The tokens the store holds.
    pub fn load(store: Arc<Store>) -> Result<Self, crate::store::StoreError> {
        let by_hash = store.tokens()?.into_iter().collect();
        Ok(Self {
            by_hash: Mutex::new(by_hash),
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
        self.by_hash.lock().unwrap().insert(hashed, token.clone());
        (secret, token)
    }

    /// Uses the token once for `group` (any group if empty).
    pub fn redeem(&self, secret: &str, group: &str, now: Millis) -> Result<Token, TokenRejection> {
        let reject = |reason, message: &str| TokenRejection {
            reason,
            message: message.to_string(),
        };
        let mut tokens = self.by_hash.lock().unwrap();
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
        token.uses_left -= 1;
        self.persist(&hashed, token);
        Ok(token.clone())
    }

    /// Tokens not yet expired.
    pub fn list(&self, now: Millis) -> Vec<Token> {
        let mut tokens: Vec<Token> = self
            .by_hash
            .lock()
            .unwrap()
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
        let mut tokens = self.by_hash.lock().unwrap();
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
        let redeemed = store.redeem(&secret, "web", NOW + 1000).unwrap();
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
        store.redeem(&secret, "web", NOW).unwrap();
        store.revoke(&token.id);
        let again = TokenStore::load(db).unwrap();
        assert_eq!(again.list(NOW)[0].uses_left, 1, "the use is remembered");
        again.redeem(&secret, "web", NOW).unwrap();
        assert_eq!(again.redeem(&revoked, "web", NOW).unwrap_err().reason, "unknown_token");
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
