//! The result table.

use serde::Serialize;

/// One measured figure, with the baseline's when there is one.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// What was measured.
    pub metric: String,
    /// Unit of the figures.
    pub unit: String,
    /// Warren's figure.
    pub warren: f64,
    /// The raw-lapin baseline's figure, when measured.
    pub baseline: Option<f64>,
}

impl Row {
    /// A figure without a baseline.
    pub fn new(scenario: &str, metric: &str, unit: &str, warren: f64) -> Self {
        Row {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            warren,
            baseline: None,
        }
    }

    /// A figure beside the baseline's.
    pub fn vs(scenario: &str, metric: &str, unit: &str, warren: f64, baseline: f64) -> Self {
        Row {
            baseline: Some(baseline),
            ..Row::new(scenario, metric, unit, warren)
        }
    }

    /// Warren / baseline.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline.filter(|b| *b != 0.0).map(|b| self.warren / b)
    }
}

/// Renders rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let fmt = |v: f64| {
        if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.clone(),
                r.metric.clone(),
                r.unit.clone(),
                fmt(r.warren),
                r.baseline.map(fmt).unwrap_or_else(|| "-".into()),
                r.ratio()
                    .map(|x| format!("{x:.2}x"))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let head = ["scenario", "metric", "unit", "warren", "baseline", "ratio"];
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            widths[i] = widths[i].max(v.chars().count());
        }
    }
    let line = |c: &[String]| {
        c.iter()
            .enumerate()
            .map(|(i, v)| format!("{v:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&head.map(String::from));
    out.push('\n');
    for c in &cells {
        out.push_str(&line(c));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_table() {
        let rows = vec![
            Row::vs("throughput", "drain", "tasks/s", 7000.0, 6000.0),
            Row::new("memory", "worker idle RSS", "MB", 9.5),
        ];
        assert!((rows[0].ratio().unwrap() - 7.0 / 6.0).abs() < 1e-9);
        let t = table(&rows);
        assert!(t.contains("1.17x"), "{t}");
        assert!(t.lines().nth(2).unwrap().contains("9.50"), "{t}");
    }
}
