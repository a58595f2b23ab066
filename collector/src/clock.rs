//! The wall clock. It is read at the edges — a gRPC handler, a group controller's loop — and the time is
//! handed down from there: inside a controller's step or command everything (decisions, intents, activity
//! times) uses the time that step was given, so a run driven with other times (tests, a simulation) is
//! the same run.

use crate::engine::Millis;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Where a group controller reads the time at the start of each step and command.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> Millis;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        now_ms()
    }
}
