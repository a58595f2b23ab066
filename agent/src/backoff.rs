//! Exponential backoff with jitter, capped: the delay doubles after each failure up to `max`, each wait is
//! a random point in the upper half of the current delay (so a fleet that lost its collector does not
//! come back in lockstep), and a success starts over from `initial`.

use std::time::Duration;

#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    random: Random,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Self {
            initial,
            max,
            current: initial,
            random: Random::new(seed),
        }
    }

    /// The next wait, between half the current delay and the current delay; never more than `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = delay / 2;
        half + half.mul_f64(self.random.unit())
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// A small xorshift generator: jitter and run ids need spread, not secrecy.
#[derive(Debug)]
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// Seeded from the clock and the process id.
    pub fn from_entropy() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        Self::new(nanos ^ (u64::from(std::process::id()) << 32))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// In [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 42);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        let bounds = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (delay, bound) in delays.iter().zip(bounds) {
            let bound = Duration::from_millis(bound);
            assert!(
                *delay >= bound / 2 && *delay <= bound,
                "{delay:?} outside [{:?}, {bound:?}]",
                bound / 2
            );
        }
        assert!(
            delays[4..].windows(2).any(|w| w[0] != w[1]),
            "jitter varies the capped delays: {delays:?}"
        );
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
