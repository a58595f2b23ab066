//! The sampling tick, from a kernel timer (`timerfd`) the event loop watches like a socket.
//!
//! tokio's timers would do, at a cost the agent pays every second on every VM: a timer one interval away
//! sits in a wheel slot 64 ms wide, so the event loop wakes at the slot's start and again at the tick, and
//! re-arming it from a task writes the event loop's eventfd (`strace` of the agent showed two wake-ups
//! a tick on the way to it). The kernel timer wakes the agent once, at the tick.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A timer ticking every `period`, first one `period` from its start. Ticks missed while the agent was
/// busy count as one, and the next stays on the schedule.
pub struct Ticker {
    timer: AsyncFd<Timer>,
}

/// [`TimerFd`] for [`AsyncFd`], which wants [`AsRawFd`].
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Ticker {
    pub fn new(period: Duration) -> io::Result<Self> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        timer.set(
            Expiration::Interval(TimeSpec::from_duration(period)),
            TimerSetTimeFlags::empty(),
        )?;
        // tokio deprecates registering by raw descriptor for descriptors it cannot tell are alive; this one is
        // owned by the `Timer` inside the `AsyncFd` and lives exactly as long as the registration. (The
        // replacement is `unsafe`, which the agent forbids.)
        #[allow(deprecated)]
        let timer = AsyncFd::with_interest(Timer(timer), Interest::READABLE)?;
        Ok(Self { timer })
    }

    /// Waits for the next tick.
    pub async fn tick(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.timer.readable().await?;
            // Reading the timer takes every expiration since the last read.
            match ready.try_io(|timer| timer.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(read) => {
                    // Nothing more to read until the next expiration, which the event loop will report: no
                    // need to learn that from a read failing with EAGAIN at the next call.
                    ready.clear_ready();
                    return read;
                }
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_come_one_period_apart_and_missed_ones_count_as_one() {
        const PERIOD: Duration = Duration::from_millis(200);
        let started = std::time::Instant::now();
        let mut ticker = Ticker::new(PERIOD).unwrap();
        ticker.tick().await.unwrap();
        ticker.tick().await.unwrap();
        assert!(started.elapsed() >= 2 * PERIOD, "{:?}", started.elapsed());
        // Busy for three periods and more: one tick is due at once, then the schedule goes on, with no
        // burst of the missed ones.
        std::thread::sleep((started + 5 * PERIOD + PERIOD / 2).saturating_duration_since(std::time::Instant::now()));
        let due = std::time::Instant::now();
        ticker.tick().await.unwrap();
        assert!(due.elapsed() < PERIOD, "the missed tick came after {:?}", due.elapsed());
        let next = std::time::Instant::now();
        ticker.tick().await.unwrap();
        assert!(
            next.elapsed() >= PERIOD / 4,
            "a missed tick came again after {:?}",
            next.elapsed()
        );
    }
}
