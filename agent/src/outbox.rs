//! Samples not yet acknowledged by the collector, oldest first, bounded. While the collector is
//! unreachable they wait here and are replayed in order on reconnect; when full, the oldest is dropped.

use std::collections::VecDeque;

use ebb_proto::v1::Sample;

#[derive(Debug)]
pub struct Outbox {
    samples: VecDeque<Sample>,
    capacity: usize,
    /// Samples lost because the outbox was full.
    pub dropped: u64,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            samples: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
            self.dropped += 1;
        }
        self.samples.push_back(sample);
    }

    /// Forgets every sample up to and including `highest_seq`.
    pub fn acknowledge(&mut self, highest_seq: u64) {
        while self.samples.front().is_some_and(|s| s.seq <= highest_seq) {
            self.samples.pop_front();
        }
    }

    /// Up to `limit` samples after `seq`, in order.
    pub fn after(&self, seq: u64, limit: usize) -> Vec<Sample> {
        let start = self.samples.partition_point(|s| s.seq <= seq);
        self.samples.range(start..).take(limit).cloned().collect()
    }

    /// Whether a sample after `seq` waits.
    pub fn has_after(&self, seq: u64) -> bool {
        self.samples.back().is_some_and(|s| s.seq > seq)
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Sample {
        Sample {
            seq,
            ..Sample::default()
        }
    }

    fn seqs(samples: &[Sample]) -> Vec<u64> {
        samples.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn replays_in_order_after_the_acknowledged_sequence() {
        let mut outbox = Outbox::new(10);
        (1..=5).for_each(|seq| outbox.push(sample(seq)));
        assert_eq!(seqs(&outbox.after(0, 3)), [1, 2, 3]);
        outbox.acknowledge(2);
        assert_eq!(seqs(&outbox.after(0, 10)), [3, 4, 5]);
        assert_eq!(seqs(&outbox.after(4, 10)), [5]);
        assert!(outbox.has_after(4) && !outbox.has_after(5));
        outbox.acknowledge(5);
        assert!(outbox.is_empty());
        assert!(!outbox.has_after(0));
    }

    #[test]
    fn drops_the_oldest_when_full() {
        let mut outbox = Outbox::new(3);
        (1..=5).for_each(|seq| outbox.push(sample(seq)));
        assert_eq!(seqs(&outbox.after(0, 10)), [3, 4, 5]);
        assert_eq!(outbox.dropped, 2);
    }
}
