//! The few Prometheus types quantd needs, rendered in the text exposition format 0.0.4:
//! labelled counters and histograms behind one mutex each (a scrape or a request takes it for
//! microseconds), and gauges that the scrape computes from live state.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Latency buckets in seconds, from a fast HTTP answer to a long prompt.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Job-stage buckets in seconds: a tiny model's stage to an hour of calibration.
pub const STAGE_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// A counter per label set.
pub struct CounterFamily {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, f64>>,
}

impl CounterFamily {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            help,
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn add(&self, values: &[&str], by: f64) {
        debug_assert_eq!(values.len(), self.labels.len());
        let key = values.iter().map(|v| v.to_string()).collect();
        *self.series.lock().unwrap().entry(key).or_default() += by;
    }

    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "counter");
        for (values, v) in self.series.lock().unwrap().iter() {
            sample(out, self.name, &label_set(self.labels, values, None), *v);
        }
    }
}

#[derive(Clone)]
struct Buckets {
    /// Observations ≤ each bound (not yet cumulative).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A histogram per label set, with fixed bucket bounds.
pub struct HistogramFamily {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    bounds: &'static [f64],
    series: Mutex<BTreeMap<Vec<String>, Buckets>>,
}

impl HistogramFamily {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> Self {
        Self {
            name,
            help,
            labels,
            bounds,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn observe(&self, values: &[&str], v: f64) {
        debug_assert_eq!(values.len(), self.labels.len());
        let key = values.iter().map(|v| v.to_string()).collect();
        let mut series = self.series.lock().unwrap();
        let b = series.entry(key).or_insert_with(|| Buckets {
            counts: vec![0; self.bounds.len()],
            sum: 0.0,
            count: 0,
        });
        if let Some(i) = self.bounds.iter().position(|&le| v <= le) {
            b.counts[i] += 1;
        }
        b.sum += v;
        b.count += 1;
    }

    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "histogram");
        let bucket = format!("{}_bucket", self.name);
        for (values, b) in self.series.lock().unwrap().iter() {
            let mut cumulative = 0;
            for (le, n) in self.bounds.iter().zip(&b.counts) {
                cumulative += n;
                let labels = label_set(self.labels, values, Some(&format_value(*le)));
                sample(out, &bucket, &labels, cumulative as f64);
            }
            let labels = label_set(self.labels, values, Some("+Inf"));
            sample(out, &bucket, &labels, b.count as f64);
            let plain = label_set(self.labels, values, None);
            sample(out, &format!("{}_sum", self.name), &plain, b.sum);
            sample(out, &format!("{}_count", self.name), &plain, b.count as f64);
        }
    }
}

/// Gauges whose values the caller gathered for this scrape.
pub fn render_gauge(
    out: &mut String,
    name: &str,
    help: &str,
    labels: &[&str],
    samples: &[(Vec<String>, f64)],
) {
    header(out, name, help, "gauge");
    for (values, v) in samples {
        sample(out, name, &label_set(labels, values, None), *v);
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, v: f64) {
    let _ = writeln!(out, "{name}{labels} {}", format_value(v));
}

/// `{a="x",b="y"}` (with `le` last for buckets), or nothing without labels.
fn label_set(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let h = HistogramFamily::new("t_seconds", "help", &["route"], &[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 3.0] {
            h.observe(&["/a"], v);
        }
        let mut out = String::new();
        h.render(&mut out);
        assert!(out.contains("# TYPE t_seconds histogram\n"), "{out}");
        assert!(
            out.contains("t_seconds_bucket{route=\"/a\",le=\"0.1\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("t_seconds_bucket{route=\"/a\",le=\"1\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("t_seconds_bucket{route=\"/a\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("t_seconds_sum{route=\"/a\"} 4.25\n"), "{out}");
        assert!(out.contains("t_seconds_count{route=\"/a\"} 4\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        let c = CounterFamily::new("c_total", "help", &["model"]);
        c.add(&["a\"b\\c\nd"], 2.0);
        let mut out = String::new();
        c.render(&mut out);
        assert!(
            out.contains("c_total{model=\"a\\\"b\\\\c\\nd\"} 2\n"),
            "{out}"
        );
    }
}
