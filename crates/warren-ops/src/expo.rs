//! The Prometheus text exposition format (version 0.0.4), written by hand.

use std::fmt::Write;

/// Upper bounds, in seconds, of task duration histograms.
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Upper bounds, in seconds, of release lateness histograms (how long after
/// its due time a delayed task was published).
pub const LATENESS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// A histogram: cumulative bucket counts over fixed bounds, sum and count.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending upper bounds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one value.
    pub fn observe(&mut self, value: f64) {
        for (le, n) in self.bounds.iter().zip(self.buckets.iter_mut()) {
            if value <= *le {
                *n += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    /// Values recorded so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// A text exposition being written: families (HELP and TYPE) and samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a metric family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample; label values are escaped here.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The samples of one histogram (`_bucket`, `_sum`, `_count`); the
    /// family is started by the caller.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        for (le, n) in h.bounds.iter().zip(&h.buckets) {
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(&le.to_string()));
            let _ = writeln!(self.out, " {n}");
        }
        let _ = write!(self.out, "{name}_bucket");
        write_labels(&mut self.out, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", h.count);
        let _ = write!(self.out, "{name}_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", h.sum);
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", h.count);
    }

    /// Appends text already in the exposition format.
    pub fn push_raw(&mut self, text: &str) {
        self.out.push_str(text);
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{k}=\"{}\"", escape(v));
    }
    if let Some(le) = le {
        if !first {
            out.push(',');
        }
        let _ = write!(out, "le=\"{le}\"");
    }
    out.push('}');
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(7.0);
        let mut e = Exposition::new();
        e.family("x_seconds", "histogram", "X.");
        e.histogram("x_seconds", &[("type", "a")], &h);
        let text = e.finish();
        assert!(
            text.contains("x_seconds_bucket{type=\"a\",le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{type=\"a\",le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{type=\"a\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_sum{type=\"a\"} 7.55\n"), "{text}");
        assert!(text.contains("x_seconds_count{type=\"a\"} 3\n"), "{text}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn unlabelled_histogram_has_only_le() {
        let h = Histogram::new(&[1.0]);
        let mut e = Exposition::new();
        e.histogram("y", &[], &h);
        assert_eq!(
            e.finish(),
            "y_bucket{le=\"1\"} 0\ny_bucket{le=\"+Inf\"} 0\ny_sum 0\ny_count 0\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::new();
        e.single("z_total", "counter", "Z.", 2.0);
        e.sample("z_total", &[("type", "a\"b\\c\nd")], 1.0);
        let text = e.finish();
        assert!(text.starts_with("# HELP z_total Z.\n# TYPE z_total counter\nz_total 2\n"));
        assert!(
            text.contains("z_total{type=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{text}"
        );
    }
}
