//! The rules tying `broker.consumer_timeout_ms` to the escrow of long tasks
//! (`worker.escrow_after_ms`, `worker.escrow_lease_ms`).

use super::{Config, Issues};

impl Config {
    /// A task must go into escrow well before the broker times its delivery
    /// out, its lease must be long enough to renew, and the cancels stream
    /// must keep lease and done records longer than a copy can be away.
    pub(super) fn check_escrow(&self, issues: &mut Issues) {
        let (timeout, w) = (self.broker.consumer_timeout_ms, &self.worker);
        if timeout > 0 && w.escrow_after_ms > timeout / 2 {
            issues.add(
                "worker.escrow_after_ms",
                format!(
                    "{} is more than half of broker.consumer_timeout_ms = {timeout}: a task \
                     must go into escrow well before the broker times its delivery out; set \
                     it to at most {} (or 0 for half of the timeout)",
                    w.escrow_after_ms,
                    timeout / 2
                ),
            );
        }
        if w.escrow_lease_ms < 1000 {
            issues.add(
                "worker.escrow_lease_ms",
                format!(
                    "{} is below 1000: a lease is renewed every half lease, with a quarter of \
                     it as margin for clocks and the cancels stream; set it to at least 1000, \
                     for example 60000",
                    w.escrow_lease_ms
                ),
            );
        } else if self.scheduler.cancel_ttl_ms > 0
            && w.escrow_lease_ms.saturating_mul(2) > self.scheduler.cancel_ttl_ms
        {
            // (0 is an issue of its own key.)
            issues.add(
                "worker.escrow_lease_ms",
                format!(
                    "{} is more than half of scheduler.cancel_ttl_ms = {}: the cancels stream \
                     must keep lease records for two leases; lower it or raise \
                     scheduler.cancel_ttl_ms",
                    w.escrow_lease_ms, self.scheduler.cancel_ttl_ms
                ),
            );
        }
        let after = match w.escrow_after_ms {
            0 => timeout / 2,
            set => set,
        };
        if timeout > 0 && w.handback_ms > after {
            issues.add(
                "worker.handback_ms",
                format!(
                    "{} is longer than the escrow start ({after} ms, from \
                     broker.consumer_timeout_ms = {timeout}): a delivery waiting that long for \
                     a slot could reach the broker's consumer timeout; set it below {after}",
                    w.handback_ms
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::Config;

    #[test]
    fn escrow_rules() {
        one_issue(
            "[broker]\nconsumer_timeout_ms = 10000\n[worker]\nescrow_after_ms = 6000",
            "config key worker.escrow_after_ms: 6000 is more than half of \
             broker.consumer_timeout_ms = 10000: a task must go into escrow well before the \
             broker times its delivery out; set it to at most 5000 (or 0 for half of the \
             timeout)",
        );
        one_issue(
            "[worker]\nescrow_lease_ms = 999",
            "config key worker.escrow_lease_ms: 999 is below 1000: a lease is renewed every \
             half lease, with a quarter of it as margin for clocks and the cancels stream; set \
             it to at least 1000, for example 60000",
        );
        one_issue(
            "[scheduler]\ncancel_ttl_ms = 100000",
            "config key worker.escrow_lease_ms: 60000 is more than half of \
             scheduler.cancel_ttl_ms = 100000: the cancels stream must keep lease records for \
             two leases; lower it or raise scheduler.cancel_ttl_ms",
        );
        one_issue(
            "[broker]\nconsumer_timeout_ms = 1000",
            "config key worker.handback_ms: 1000 is longer than the escrow start (500 ms, from \
             broker.consumer_timeout_ms = 1000): a delivery waiting that long for a slot could \
             reach the broker's consumer timeout; set it below 500",
        );
        // No timeout: escrow is off, and the handback may be anything.
        for fine in [
            "[broker]\nconsumer_timeout_ms = 0\n[worker]\nescrow_after_ms = 99999999\n\
             handback_ms = 99999999",
            "[broker]\nconsumer_timeout_ms = 10000\n[worker]\nhandback_ms = 5000\n\
             escrow_lease_ms = 4000",
        ] {
            assert!(Config::from_toml(fine).is_ok(), "{fine}");
        }
    }
}
