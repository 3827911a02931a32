//! Priority lanes: how a quorum work queue keeps priorities.
//!
//! Quorum queues on RabbitMQ 3.x have no message priorities, and no exchange
//! routes on the `priority` property. A quorum work queue `P.q.<name>` with
//! lanes keeps its name as the entry (routes bind to it, producers publish
//! as before) and gets `lanes` more queues `P.q.<name>.lane.<k>`, `k` from 0
//! (lowest priorities) up. Workers sort: a delivery from the entry that
//! cannot start at once is moved to the lane of its priority, and a free
//! slot always takes from the highest non-empty lane first.
//!
//! The priorities `0..=max_priority` are split evenly over the lanes, lower
//! lanes taking the smaller share when they do not divide; a message without
//! a priority counts as 0, one above `max_priority` as `max_priority` (as a
//! classic priority queue treats them).

/// Lanes a quorum work queue gets when `[[queues]] lanes` is not set.
pub const DEFAULT_LANES: u8 = 3;

/// The most lanes a queue may have (one per priority of `0..=9`, the range
/// producers use).
pub const MAX_LANES: u8 = 10;

/// The priority bands of one work queue: which lane each priority goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bands {
    lanes: u8,
    max_priority: u8,
}

impl Bands {
    /// Bands for `lanes` lanes (at least 1) over priorities `0..=max_priority`.
    pub fn new(lanes: u8, max_priority: u8) -> Self {
        Bands {
            lanes: lanes.max(1),
            max_priority,
        }
    }

    /// How many lanes there are.
    pub fn lanes(self) -> u8 {
        self.lanes
    }

    /// The lane of a message with this priority (`None`: unset, counts as 0).
    pub fn lane_of(self, priority: Option<u8>) -> u8 {
        let p = u32::from(priority.unwrap_or(0).min(self.max_priority));
        let lane = p * u32::from(self.lanes) / (u32::from(self.max_priority) + 1);
        lane as u8
    }

    /// The lowest and highest priority of lane `k`; `None` when `k` is not a
    /// lane or no priority maps to it.
    pub fn band(self, k: u8) -> Option<(u8, u8)> {
        let mut members = (0..=self.max_priority).filter(|&p| self.lane_of(Some(p)) == k);
        let low = members.next()?;
        Some((low, members.next_back().unwrap_or(low)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_bands_split_the_priorities_evenly() {
        let b = Bands::new(3, 10);
        let lanes: Vec<u8> = (0..=10).map(|p| b.lane_of(Some(p))).collect();
        assert_eq!(lanes, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]);
        assert_eq!(b.lane_of(None), 0, "unset priority counts as 0");
        assert_eq!(b.lane_of(Some(200)), 2, "above the maximum counts as it");
        assert_eq!(b.band(0), Some((0, 3)));
        assert_eq!(b.band(1), Some((4, 7)));
        assert_eq!(b.band(2), Some((8, 10)));
        assert_eq!(b.band(3), None);
    }

    #[test]
    fn one_lane_per_priority_and_one_lane_for_all() {
        let b = Bands::new(10, 9);
        for p in 0..=9 {
            assert_eq!(b.lane_of(Some(p)), p);
            assert_eq!(b.band(p), Some((p, p)));
        }
        let one = Bands::new(1, 10);
        assert!((0..=255).all(|p| one.lane_of(Some(p)) == 0));
        assert_eq!(Bands::new(0, 10).lanes(), 1);
    }

    #[test]
    fn every_lane_gets_a_band_when_lanes_fit() {
        for max in 1..=20u8 {
            for lanes in 1..=MAX_LANES.min(max + 1) {
                let b = Bands::new(lanes, max);
                for k in 0..lanes {
                    assert!(b.band(k).is_some(), "max {max} lanes {lanes} lane {k}");
                }
                assert_eq!(b.lane_of(Some(max)), lanes - 1);
            }
        }
    }
}
