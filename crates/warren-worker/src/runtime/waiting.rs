//! The deliveries a worker holds until a slot is free.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use super::Held;

/// What [`Waiting`] orders by.
pub(super) trait Ranked {
    /// Its place: higher ranks go first.
    fn rank(&self) -> u8;
    /// When it arrived.
    fn since(&self) -> Instant;
}

impl Ranked for Held {
    fn rank(&self) -> u8 {
        self.rank
    }

    fn since(&self) -> Instant {
        self.since
    }
}

/// Deliveries waiting for a slot, by rank (their priority): a free slot
/// takes the oldest of the highest rank. So a worker serves the highest
/// non-empty lane of a quorum work queue first, and on a classic queue
/// keeps the broker's priority order among what it prefetched.
pub(super) struct Waiting<T = Held> {
    by_rank: BTreeMap<u8, VecDeque<T>>,
    len: usize,
}

impl<T> Default for Waiting<T> {
    fn default() -> Self {
        Waiting {
            by_rank: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<T: Ranked> Waiting<T> {
    /// Adds a delivery behind those of its rank.
    pub(super) fn push(&mut self, d: T) {
        self.by_rank.entry(d.rank()).or_default().push_back(d);
        self.len += 1;
    }

    /// Takes the oldest delivery of the highest rank.
    pub(super) fn pop(&mut self) -> Option<T> {
        let mut entry = self.by_rank.last_entry()?;
        let d = entry.get_mut().pop_front();
        if entry.get().is_empty() {
            entry.remove();
        }
        self.len -= usize::from(d.is_some());
        d
    }

    /// The highest rank waiting.
    pub(super) fn highest(&self) -> Option<u8> {
        self.by_rank.keys().next_back().copied()
    }

    /// When the delivery that has waited longest arrived.
    pub(super) fn oldest(&self) -> Option<Instant> {
        self.by_rank
            .values()
            .filter_map(|q| q.front().map(Ranked::since))
            .min()
    }

    /// True when nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many deliveries wait.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Takes the waiting deliveries for which `take` is true, highest rank
    /// first; the others keep their places.
    pub(super) fn take_where(&mut self, take: impl Fn(&T) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        for q in self.by_rank.values_mut().rev() {
            let (out, kept): (VecDeque<T>, VecDeque<T>) =
                std::mem::take(q).into_iter().partition(|d| take(d));
            *q = kept;
            taken.extend(out);
        }
        self.by_rank.retain(|_, q| !q.is_empty());
        self.len -= taken.len();
        taken
    }

    /// Takes every waiting delivery, highest rank first.
    pub(super) fn drain(&mut self) -> impl Iterator<Item = T> {
        self.len = 0;
        std::mem::take(&mut self.by_rank)
            .into_values()
            .rev()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    struct Item(u8, Instant, &'static str);

    impl Ranked for Item {
        fn rank(&self) -> u8 {
            self.0
        }
        fn since(&self) -> Instant {
            self.1
        }
    }

    #[test]
    fn highest_rank_first_then_oldest() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut w = Waiting::default();
        assert!(w.is_empty() && w.highest().is_none() && w.oldest().is_none());
        w.push(Item(0, at(0), "low-a"));
        w.push(Item(9, at(5), "high-a"));
        w.push(Item(0, at(6), "low-b"));
        w.push(Item(4, at(7), "mid"));
        w.push(Item(9, at(8), "high-b"));
        assert_eq!(w.len(), 5);
        assert_eq!(w.highest(), Some(9));
        assert_eq!(w.oldest(), Some(at(0)));
        let first: Vec<&str> = (0..3).map(|_| w.pop().unwrap().2).collect();
        assert_eq!(first, ["high-a", "high-b", "mid"]);
        assert_eq!(w.highest(), Some(0));
        w.push(Item(2, at(9), "two"));
        w.push(Item(9, at(10), "nine"));
        let taken: Vec<&str> = w
            .take_where(|i| i.2 != "low-a")
            .into_iter()
            .map(|i| i.2)
            .collect();
        assert_eq!(taken, ["nine", "two", "low-b"]);
        assert_eq!((w.len(), w.highest()), (1, Some(0)));
        w.push(Item(2, at(9), "two"));
        let rest: Vec<&str> = w.drain().map(|i| i.2).collect();
        assert_eq!(rest, ["two", "low-a"]);
        assert!(w.is_empty() && w.pop().is_none());
    }
}
