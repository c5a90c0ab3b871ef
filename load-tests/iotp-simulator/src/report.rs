//! The load-test report: `report.json` (everything, machine-readable), `report.md` (for
//! people) and two plots, `rate.svg` and `latency.svg`.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::audit::{Audit, Finding, Percentiles};
use crate::ceiling::Ceiling;
use crate::scenario::Scenario;

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs the OS offers.
    pub cpus: usize,
    /// CPU model.
    pub cpu_model: String,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Kernel.
    pub kernel: String,
}

impl Machine {
    /// This machine.
    pub fn this() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default(),
            memory_gib: meminfo
                .lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map(|kb| kb / 1024.0 / 1024.0)
                .unwrap_or(0.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// What the fleet did.
#[derive(Debug, Clone, Serialize)]
pub struct FleetSummary {
    /// Devices (registered and not).
    pub devices: usize,
    /// Publishes (telemetry, resends, heartbeats).
    pub published: u64,
    /// PUBACKs.
    pub acked: u64,
    /// Seconds from the first publish to the last PUBACK.
    pub seconds: f64,
    /// PUBACKs per second.
    pub ack_rate: f64,
    /// MQTT connection errors.
    pub connection_errors: u64,
    /// PUBACKs with an error reason.
    pub refused: u64,
    /// Publishes the client gave up (no session on reconnect).
    pub abandoned: u64,
}

/// CPU of one process over the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    /// Service (or broker).
    pub process: String,
    /// CPU seconds, user + system.
    pub seconds: f64,
    /// Per message stored, µs.
    pub us_per_message: f64,
}

/// Memory of one process.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Service (or broker).
    pub process: String,
    /// Highest RSS sampled, MiB.
    pub max_mib: f64,
    /// Median RSS over the second half of the run (steady state), MiB.
    pub steady_mib: f64,
}

/// A stage's receive→confirmed latency, from its `iotp_delivery_seconds` histogram, ms.
#[derive(Debug, Clone, Serialize)]
pub struct StageLatency {
    /// Stage.
    pub stage: String,
    /// Median.
    pub p50: f64,
    /// 95th.
    pub p95: f64,
    /// 99th.
    pub p99: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario as run.
    pub scenario: Scenario,
    /// Tenant of the run.
    pub tenant: String,
    /// When it started (UTC).
    pub started: String,
    /// Machine.
    pub machine: Machine,
    /// Kafka-protocol broker and engine.
    pub kafka: String,
    /// Fleet.
    pub fleet: FleetSummary,
    /// PUBACKs per second since the first publish.
    pub acks_per_second: Vec<u64>,
    /// Audit.
    pub audit: Audit,
    /// Messages stored per second, first publish to last store commit.
    pub sustained_rate: f64,
    /// Median of the per-second store rates over the middle 80% of the run.
    pub steady_rate: f64,
    /// Seconds from the last PUBACK until the store had everything.
    pub drain_seconds: f64,
    /// Seconds from the last PUBACK until every consumer group (aggregator included) was at
    /// lag 0; the CPU window ends there.
    pub groups_drained_seconds: f64,
    /// Lag each consumer group had left at the end (all 0 unless stuck).
    pub lag_left: Vec<(String, i64)>,
    /// Counts per hop (services' counters and records per topic), run and warm-up together.
    pub hops: Vec<(String, i64)>,
    /// Forward-only ceiling, if measured.
    pub ceiling: Option<Ceiling>,
    /// sustained_rate / ceiling rate.
    pub efficiency: Option<f64>,
    /// CPU per process over the run.
    pub cpu: Vec<Cpu>,
    /// Our services' CPU per stored message, summed, µs.
    pub services_us_per_message: f64,
    /// Memory per process.
    pub memory: Vec<Memory>,
    /// Per stage latency.
    pub stages: Vec<StageLatency>,
    /// Exit code of each service after SIGTERM.
    pub exit_codes: Vec<(String, Option<i32>)>,
    /// Audit passed and every service exited 0.
    pub passed: bool,
}

impl Report {
    /// Write report.json, report.md, rate.svg and latency.svg into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        let t = &self.audit.timeline;
        let rate: Vec<(f64, f64)> = t.iter().map(|s| (s.at as f64, s.stored as f64)).collect();
        let acked: Vec<(f64, f64)> = self
            .acks_per_second
            .iter()
            .enumerate()
            .map(|(i, n)| (i as f64, *n as f64))
            .collect();
        std::fs::write(
            dir.join("rate.svg"),
            svg_chart(
                "Messages acknowledged (PUBACK) and stored per second",
                "seconds since the first publish",
                "msgs/s",
                &[("acked", "#ff7f0e", acked), ("stored", "#1f77b4", rate)],
            ),
        )?;
        let p50: Vec<(f64, f64)> = t.iter().map(|s| (s.at as f64, s.latency.p50)).collect();
        let p99: Vec<(f64, f64)> = t.iter().map(|s| (s.at as f64, s.latency.p99)).collect();
        std::fs::write(
            dir.join("latency.svg"),
            svg_chart(
                "Device→store latency of the messages stored in each second",
                "seconds since the first publish",
                "ms",
                &[("p50", "#2ca02c", p50), ("p99", "#d62728", p99)],
            ),
        )?;
        Ok(())
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let a = &self.audit;
        let mut md = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let _ = writeln!(md, "# Load test `{}`: {verdict}\n", self.scenario.name);
        let _ = writeln!(md, "{}\n", self.scenario.description);
        let _ = writeln!(
            md,
            "Started {} · tenant `{}` · {} CPUs ({}), {:.0} GiB, Linux {} · Kafka: {}\n",
            self.started,
            self.tenant,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_gib,
            self.machine.kernel,
            self.kafka
        );
        let _ = writeln!(md, "## Audit\n");
        let _ = writeln!(md, "| | count |\n|---|---:|");
        for (what, n) in [
            ("telemetry messages acknowledged (PUBACK)", a.acked_messages),
            ("owed to the store", a.expected_stored),
            ("owed to the dead-letter archive", a.expected_dead_letters),
            ("in the store (this tenant)", a.stored),
            ("in the dead-letter archive (this tenant)", a.dead_letters),
            ("**lost**", a.lost.count),
            ("**duplicated**", a.duplicated.count),
            ("**unexpected**", a.unexpected.count),
            ("incomplete (fewer readings)", a.incomplete.count),
            (
                "dead letters no fault explains",
                a.unexplained_dead_letters.count,
            ),
            (
                "faults without their dead letter",
                a.missing_dead_letters.count,
            ),
            ("published, never acknowledged", a.unacknowledged),
            ("… of which stored anyway", a.unacknowledged_but_stored),
            ("twins checked", a.twins_checked),
            ("twins wrong", a.twins_wrong.count),
        ] {
            let _ = writeln!(md, "| {what} | {n} |");
        }
        for (name, f) in [
            ("lost", &a.lost),
            ("duplicated", &a.duplicated),
            ("unexpected", &a.unexpected),
            ("incomplete", &a.incomplete),
            ("unexplained dead letters", &a.unexplained_dead_letters),
            ("missing dead letters", &a.missing_dead_letters),
            ("wrong twins", &a.twins_wrong),
        ] {
            examples(&mut md, name, f);
        }
        if !a.faults.is_empty() {
            let _ = writeln!(
                md,
                "\n### Injected faults\n\n| fault | expected outcome | injected (acked) | accounted |\n|---|---|---:|---:|"
            );
            for f in &a.faults {
                let _ = writeln!(
                    md,
                    "| {:?} | {} | {} | {} |",
                    f.fault, f.expected, f.injected, f.accounted
                );
            }
        }
        let _ = writeln!(md, "\n## Throughput\n");
        let f = &self.fleet;
        let _ = writeln!(
            md,
            "- Fleet: {} devices, {} publishes, {} PUBACKs in {:.1} s ({:.0}/s); {} connection errors, {} refused, {} abandoned.",
            f.devices, f.published, f.acked, f.seconds, f.ack_rate, f.connection_errors, f.refused, f.abandoned
        );
        let _ = writeln!(
            md,
            "- Stored: **{:.0} msgs/s sustained** (first publish to last store commit), {:.0} msgs/s steady (median second of the middle 80%); the store had everything {:.1} s after the last PUBACK.",
            self.sustained_rate, self.steady_rate, self.drain_seconds
        );
        let _ = writeln!(
            md,
            "- Every consumer group (aggregator included) at lag 0: {:.1} s after the last PUBACK{}.",
            self.groups_drained_seconds,
            if self.lag_left.iter().all(|(_, l)| *l == 0) {
                String::new()
            } else {
                format!(" — NOT drained: {:?}", self.lag_left)
            }
        );
        match (&self.ceiling, self.efficiency) {
            (Some(c), Some(e)) => {
                let _ = writeln!(
                    md,
                    "- Ceiling, Kafka: the run's {} raw records through {} forward-only hops (our runtime, no work) on the same broker: {} carried in {:.1} s, **{:.0} msgs/s**.",
                    c.records, c.hops, c.carried, c.seconds, c.rate
                );
                if let Some(m) = c.mqtt_rate {
                    let _ = writeln!(
                        md,
                        "- Ceiling, MQTT: the same fleet publishing the same messages (QoS 1, no faults) to topics no one bridges: **{m:.0} PUBACKs/s**."
                    );
                }
                let _ = writeln!(
                    md,
                    "- Pipeline efficiency: **{:.0}%** of the lower ceiling.",
                    e * 100.0
                );
            }
            _ => {
                let _ = writeln!(md, "- Ceiling: not measured in this run.");
            }
        }
        if !self.hops.is_empty() {
            let _ = writeln!(md, "\nPer hop (warm-up message included; redeliveries between hops are removed at the store):\n\n| counter | value |\n|---|---:|");
            for (what, n) in &self.hops {
                let _ = writeln!(md, "| {what} | {n} |");
            }
        }
        let _ = writeln!(md, "\n![rate](rate.svg)\n");
        let _ = writeln!(md, "## Latency (ms)\n");
        let _ = writeln!(
            md,
            "| path | count | p50 | p95 | p99 | max |\n|---|---:|---:|---:|---:|---:|"
        );
        row(
            &mut md,
            "device → store (producedAt → store commit)",
            &a.latency_ms,
        );
        for s in &self.stages {
            let _ = writeln!(
                md,
                "| stage `{}` receive → downstream confirmed (histogram) | | {:.1} | {:.1} | {:.1} | |",
                s.stage, s.p50, s.p95, s.p99
            );
        }
        let _ = writeln!(md, "\n![latency](latency.svg)\n");
        let _ = writeln!(md, "## Cost\n\n| process | CPU s | µs per stored message | RSS max MiB | RSS steady MiB |\n|---|---:|---:|---:|---:|");
        for c in &self.cpu {
            let m = self.memory.iter().find(|m| m.process == c.process);
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.1} | {:.1} | {:.1} |",
                c.process,
                c.seconds,
                c.us_per_message,
                m.map(|m| m.max_mib).unwrap_or(0.0),
                m.map(|m| m.steady_mib).unwrap_or(0.0)
            );
        }
        let _ = writeln!(
            md,
            "\nOur six services together: **{:.1} µs CPU per stored message**.\n",
            self.services_us_per_message
        );
        let _ = writeln!(md, "## Shutdown\n");
        for (name, code) in &self.exit_codes {
            let _ = writeln!(
                md,
                "- `{name}`: exit {}",
                code.map(|c| c.to_string()).unwrap_or("by signal".into())
            );
        }
        md
    }
}

fn examples(md: &mut String, name: &str, f: &Finding) {
    if f.examples.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n{name} (first {}):\n", f.examples.len());
    for e in &f.examples {
        let _ = writeln!(md, "- {e}");
    }
}

fn row(md: &mut String, what: &str, p: &Percentiles) {
    let _ = writeln!(
        md,
        "| {what} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        p.count, p.p50, p.p95, p.p99, p.max
    );
}

/// One line of a chart: name, colour, points.
pub type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart as SVG: no dependencies, opens in any browser and renders on GitHub.
pub fn svg_chart(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let (w, h, left, right, top, bottom) = (900.0, 360.0, 70.0, 20.0, 40.0, 50.0);
    let points = series.iter().flat_map(|s| s.2.iter());
    let x_max = points.clone().map(|p| p.0).fold(1.0_f64, f64::max);
    let y_max = points.map(|p| p.1).fold(1.0_f64, f64::max) * 1.1;
    let x = |v: f64| left + v / x_max * (w - left - right);
    let y = |v: f64| h - bottom - v / y_max * (h - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        escape(title)
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>",
            w - right,
            left - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
        let xv = x_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{xv:.0}</text>",
            x(xv),
            h - bottom + 18.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{}</text>",
        w / 2.0,
        h - 10.0,
        escape(x_label),
        h / 2.0,
        h / 2.0,
        escape(y_label)
    );
    for (n, (name, color, data)) in series.iter().enumerate() {
        let path: Vec<String> = data
            .iter()
            .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
            path.join(" "),
            w - right - 60.0,
            top + 14.0 + 16.0 * n as f64,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Median of the per-second store counts over the middle 80% of the seconds.
pub fn steady_rate(audit: &Audit) -> f64 {
    let counts: Vec<u64> = audit.timeline.iter().map(|s| s.stored).collect();
    if counts.is_empty() {
        return 0.0;
    }
    let cut = counts.len() / 10;
    let mut middle: Vec<u64> = counts[cut..counts.len() - cut].to_vec();
    middle.sort_unstable();
    middle[middle.len() / 2] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_one_polyline_per_series_and_escapes_text() {
        let svg = svg_chart(
            "a < b",
            "x",
            "y",
            &[
                ("one", "#000", vec![(0.0, 1.0), (1.0, 2.0)]),
                ("two", "#f00", vec![(0.0, 3.0)]),
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt; b"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
