//! Several runs of one scenario side by side (`iotp-load --repeat N`): each run's throughput,
//! efficiency and CPU per message, and how far apart the runs landed. The performance issue
//! asks for identical runs within ±15%; this is where that is read off.

use std::fmt::Write as _;

use super::Report;

/// One figure of every run, with its minimum, median, maximum and spread.
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    /// Half the range over the midpoint, %: `(max − min) / (max + min) × 100`, so runs
    /// within ±15% of each other have a spread ≤ 15.
    pub plus_minus_percent: f64,
}

impl Spread {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let (min, max) = (v[0], v[v.len() - 1]);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        let plus_minus_percent = if max + min > 0.0 {
            (max - min) / (max + min) * 100.0
        } else {
            0.0
        };
        Some(Spread {
            min,
            median,
            max,
            plus_minus_percent,
        })
    }
}

fn cpu_of(r: &Report, process: &str) -> f64 {
    r.cpu
        .iter()
        .find(|c| c.process == process)
        .map_or(f64::NAN, |c| c.us_per_message)
}

/// `spread.md`: a row per run, then min / median / max / spread of each column.
pub fn markdown(runs: &[Report]) -> String {
    let mut md = String::new();
    let Some(first) = runs.first() else {
        return md;
    };
    let passed = runs.iter().filter(|r| r.passed).count();
    let _ = writeln!(
        md,
        "# `{}` × {}: {passed} of {} passed\n",
        first.scenario.name,
        runs.len(),
        runs.len()
    );
    let _ = writeln!(md, "{}\n", first.scenario.description);
    let _ = writeln!(
        md,
        "{} CPUs ({}) · Kafka: {} · each run's report in `run-<n>/report.md`\n",
        first.machine.cpus, first.machine.cpu_model, first.kafka
    );
    let mut columns: Vec<(String, Vec<f64>)> = vec![
        (
            "sustained msgs/s".into(),
            runs.iter().map(|r| r.sustained_rate).collect(),
        ),
        (
            "% of ceiling".into(),
            runs.iter()
                .map(|r| r.efficiency.map_or(f64::NAN, |e| e * 100.0))
                .collect(),
        ),
        (
            "our µs/msg".into(),
            runs.iter().map(|r| r.services_us_per_message).collect(),
        ),
    ];
    // The services in pipeline order, then the broker.
    for p in crate::stack::SERVICES.into_iter().chain(["tansu"]) {
        columns.push((p.into(), runs.iter().map(|r| cpu_of(r, p)).collect()));
    }
    columns.push((
        "store had all, s after last PUBACK".into(),
        runs.iter().map(|r| r.drain_seconds).collect(),
    ));
    let _ = write!(md, "| run | passed |");
    for (name, _) in &columns {
        let _ = write!(md, " {name} |");
    }
    let _ = write!(md, "\n|---|---|");
    for _ in &columns {
        let _ = write!(md, "---:|");
    }
    md.push('\n');
    let cell = |v: f64| {
        if v.is_finite() {
            if v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        } else {
            "–".to_string()
        }
    };
    for (i, r) in runs.iter().enumerate() {
        let _ = write!(
            md,
            "| {} | {} |",
            i + 1,
            if r.passed { "yes" } else { "**no**" }
        );
        for (_, values) in &columns {
            let _ = write!(md, " {} |", cell(values[i]));
        }
        md.push('\n');
    }
    let spreads: Vec<Option<Spread>> = columns.iter().map(|(_, v)| Spread::of(v)).collect();
    for (label, pick) in [
        ("min", (|s: &Spread| s.min) as fn(&Spread) -> f64),
        ("median", |s: &Spread| s.median),
        ("max", |s: &Spread| s.max),
    ] {
        let _ = write!(md, "| {label} | |");
        for s in &spreads {
            let _ = write!(
                md,
                " {} |",
                s.as_ref().map_or("–".into(), |s| cell(pick(s)))
            );
        }
        md.push('\n');
    }
    let _ = write!(md, "| **spread** | |");
    for s in &spreads {
        let _ = write!(
            md,
            " {} |",
            s.as_ref()
                .map_or("–".into(), |s| format!("±{:.1}%", s.plus_minus_percent))
        );
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_half_the_range_over_the_midpoint() {
        let s = Spread::of(&[100.0, 130.0, 115.0, f64::NAN]).expect("values");
        assert_eq!((s.min, s.median, s.max), (100.0, 115.0, 130.0));
        assert!((s.plus_minus_percent - 30.0 / 230.0 * 100.0).abs() < 1e-9);
        let even = Spread::of(&[4.0, 1.0, 2.0, 3.0]).expect("values");
        assert_eq!(even.median, 2.5);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(
            Spread::of(&[0.0, 0.0]).map(|s| s.plus_minus_percent),
            Some(0.0)
        );
    }
}
