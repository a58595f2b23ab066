//! Rate limits for the calls anyone (enrolment) or any member (renewal) can make as often as it likes: a
//! count per key and a count in all, in fixed windows, in bounded memory (the table is emptied every window
//! and holds at most `max_keys` keys within one).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use crate::engine::Millis;

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This key made its calls for this window.
    Key,
    /// Everyone together did (or the table of keys is full).
    Total,
}

#[derive(Debug)]
pub struct RateLimiter<K> {
    window_ms: Millis,
    per_key: u32,
    total: u32,
    max_keys: usize,
    state: Mutex<Window<K>>,
}

#[derive(Debug)]
struct Window<K> {
    start: Millis,
    total: u32,
    counts: HashMap<K, u32>,
}

impl<K: Hash + Eq> RateLimiter<K> {
    /// At most `per_key` calls per key and `total` in all per `window_ms`, tracking at most `max_keys` keys.
    pub fn new(window_ms: Millis, per_key: u32, total: u32, max_keys: usize) -> Self {
        Self {
            window_ms,
            per_key,
            total,
            max_keys,
            state: Mutex::new(Window {
                start: Millis::MIN,
                total: 0,
                counts: HashMap::new(),
            }),
        }
    }

    /// Counts a call by `key` at `now`, or says why it is refused (a refused call is not counted).
    pub fn check(&self, key: K, now: Millis) -> Result<(), Refusal> {
        let mut window = self.state.lock().expect("rate limiter lock");
        if now.saturating_sub(window.start) >= self.window_ms {
            window.start = now;
            window.total = 0;
            window.counts = HashMap::new();
        }
        if window.total >= self.total {
            return Err(Refusal::Total);
        }
        let known = window.counts.len();
        let count = match window.counts.get_mut(&key) {
            Some(count) => count,
            None if known >= self.max_keys => return Err(Refusal::Total),
            None => window.counts.entry(key).or_insert(0),
        };
        if *count >= self.per_key {
            return Err(Refusal::Key);
        }
        *count += 1;
        window.total += 1;
        Ok(())
    }

    pub fn per_key(&self) -> u32 {
        self.per_key
    }

    pub fn total(&self) -> u32 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_and_everyone_together_are_limited_per_window() {
        let limiter = RateLimiter::new(60_000, 2, 5, 100);
        assert_eq!(limiter.check("a", 0), Ok(()));
        assert_eq!(limiter.check("a", 1), Ok(()));
        assert_eq!(limiter.check("a", 2), Err(Refusal::Key));
        assert_eq!(limiter.check("b", 3), Ok(()));
        assert_eq!(limiter.check("c", 4), Ok(()));
        assert_eq!(limiter.check("d", 5), Ok(()));
        assert_eq!(limiter.check("e", 6), Err(Refusal::Total), "five in all");
        assert_eq!(limiter.check("a", 60_000), Ok(()), "a new window");
    }

    #[test]
    fn the_table_of_keys_never_grows_past_its_bound() {
        let limiter = RateLimiter::new(60_000, 10, u32::MAX, 1000);
        for key in 0..1000u32 {
            assert_eq!(limiter.check(key, 0), Ok(()));
        }
        assert_eq!(
            limiter.check(5000, 1),
            Err(Refusal::Total),
            "a full table refuses new keys"
        );
        assert_eq!(limiter.check(7, 2), Ok(()), "known keys go on");
        assert_eq!(limiter.state.lock().unwrap().counts.len(), 1000);
        assert_eq!(limiter.check(5000, 60_000), Ok(()), "emptied with the window");
        assert_eq!(limiter.state.lock().unwrap().counts.len(), 1);
    }
}
