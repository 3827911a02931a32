//! The broker link every consuming process reports: consuming or not,
//! caught up with the cancel stream, connections lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::Exposition;

/// Readiness state shared by workers and schedulers.
#[derive(Debug, Default)]
pub struct BrokerLink {
    consuming: AtomicBool,
    cancels_known: AtomicBool,
    reconnects: AtomicU64,
}

impl BrokerLink {
    /// Whether the process has its consumers on the broker.
    pub fn consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::Relaxed);
    }

    /// Every cancel published before start has been read.
    pub fn cancels_known(&self) {
        self.cancels_known.store(true, Ordering::Relaxed);
    }

    /// The broker connection was lost.
    pub fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// `<process>_reconnects_total` and `<process>_up` (help: what "up" means).
    pub fn write(&self, e: &mut Exposition, process: &str, up_help: &str) {
        e.single(
            &format!("{process}_reconnects_total"),
            "counter",
            "Times the broker connection was lost and re-established.",
            self.reconnects.load(Ordering::Relaxed) as f64,
        );
        e.single(
            &format!("{process}_up"),
            "gauge",
            up_help,
            f64::from(u8::from(self.consuming.load(Ordering::Relaxed))),
        );
    }

    /// The `/readyz` checks: `broker` (consuming) and `cancels` (caught up).
    pub fn checks(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("broker", self.consuming.load(Ordering::Relaxed)),
            ("cancels", self.cancels_known.load(Ordering::Relaxed)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_reconnects_up_and_checks() {
        let l = BrokerLink::default();
        assert_eq!(l.checks(), vec![("broker", false), ("cancels", false)]);
        l.consuming(true);
        l.cancels_known();
        l.reconnect();
        let mut e = Exposition::new();
        l.write(&mut e, "warren_x", "1 while consuming.");
        let text = e.finish();
        assert!(text.contains("warren_x_reconnects_total 1\n"), "{text}");
        assert!(text.contains("warren_x_up 1\n"), "{text}");
        assert_eq!(l.checks(), vec![("broker", true), ("cancels", true)]);
    }
}
