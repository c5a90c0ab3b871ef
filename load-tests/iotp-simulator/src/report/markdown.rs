//! `report.md`: the report for people, with the audit's verdict first.

use std::fmt::Write as _;

use super::{Report, CONFIRM_DRAINED_SECONDS, MACHINE};
use crate::audit::{Finding, Percentiles};

impl Report {
    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        self.header(&mut md);
        self.audit_section(&mut md);
        self.throughput_section(&mut md);
        self.chaos_section(&mut md);
        self.latency_section(&mut md);
        self.cost_section(&mut md);
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

    fn header(&self, md: &mut String) {
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
    }

    fn audit_section(&self, md: &mut String) {
        let a = &self.audit;
        let _ = writeln!(md, "## Audit\n");
        head(md, &["", "count"], 1);
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
            (
                "roll-up buckets checked against the raw tier",
                a.rollups_checked,
            ),
            ("**roll-up buckets wrong**", a.rollups_wrong.count),
            (
                "**left in the bridges' MQTT sessions** after they stopped",
                self.session_leftovers,
            ),
        ] {
            row(md, &[what.to_string(), n.to_string()]);
        }
        if let Some(n) = a.rollups_wrong_after_stop {
            row(
                md,
                &[
                    "… still wrong once the services had stopped".to_string(),
                    n.to_string(),
                ],
            );
        }
        for (name, f) in [
            ("lost", &a.lost),
            ("duplicated", &a.duplicated),
            ("unexpected", &a.unexpected),
            ("incomplete", &a.incomplete),
            ("unexplained dead letters", &a.unexplained_dead_letters),
            ("missing dead letters", &a.missing_dead_letters),
            ("wrong twins", &a.twins_wrong),
            ("wrong roll-ups", &a.rollups_wrong),
        ] {
            examples(md, name, f);
        }
        if self.sessions.len() > 1 {
            let _ = writeln!(md, "\nBridge sessions counted after the bridges stopped (every client id a replica used):\n");
            for (id, n) in &self.sessions {
                let _ = writeln!(md, "- `{id}`: {n}");
            }
        }
        if !a.faults.is_empty() {
            let _ = writeln!(md, "\n### Injected faults\n");
            head(
                md,
                &["fault", "expected outcome", "injected (acked)", "accounted"],
                2,
            );
            for f in &a.faults {
                row(
                    md,
                    &[
                        format!("{:?}", f.fault),
                        f.expected.clone(),
                        f.injected.to_string(),
                        f.accounted.to_string(),
                    ],
                );
            }
        }
    }

    fn throughput_section(&self, md: &mut String) {
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
        if let Some(lag) = self.lag_again.filter(|l| *l > 0) {
            let _ = writeln!(
                md,
                "- **Lag again after lag 0**: {lag} records found {} s later; the audit waited until it was 0 again.",
                CONFIRM_DRAINED_SECONDS
            );
        }
        match (&self.ceiling, self.efficiency) {
            (Some(c), Some(e)) => {
                let _ = writeln!(
                    md,
                    "- Ceiling, Kafka: the run's {} raw records through {} forward-only hops (our runtime, no work) on the same broker: {} carried in {:.1} s, **{:.0} msgs/s**; the machine {:.1} µs CPU per record, {:.2} CPUs busy.",
                    c.records, c.hops, c.carried, c.seconds, c.rate, c.machine.us_per_record, c.machine.cores
                );
                if let Some(m) = c.mqtt_rate {
                    let cost = c.mqtt_machine.unwrap_or_default();
                    let _ = writeln!(
                        md,
                        "- Ceiling, MQTT: the same fleet publishing the same messages (QoS 1, no faults) to topics no one bridges: **{m:.0} PUBACKs/s**; the machine {:.1} µs CPU per message, {:.2} CPUs busy (connections included).",
                        cost.us_per_record, cost.cores
                    );
                }
                if let Some(bound) = self.shared_bound {
                    let _ = writeln!(
                        md,
                        "- Both legs on one machine: their CPU per message together allows at most **{bound:.0} msgs/s** on these {} CPUs; the pipeline sustained {:.0}% of that.",
                        self.machine.cpus,
                        self.sustained_rate / bound * 100.0
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
            let _ = writeln!(md, "\nPer hop (warm-up message included; redeliveries between hops are removed at the store):\n");
            head(md, &["counter", "value"], 1);
            for (what, n) in &self.hops {
                row(md, &[what.clone(), n.to_string()]);
            }
        }
        let _ = writeln!(md, "\n![rate](rate.svg)\n");
    }

    fn latency_section(&self, md: &mut String) {
        let _ = writeln!(md, "## Latency (ms)\n");
        head(md, &["path", "count", "p50", "p95", "p99", "max"], 1);
        let p: &Percentiles = &self.audit.latency_ms;
        row(
            md,
            &[
                "device → store (producedAt → store commit)".to_string(),
                p.count.to_string(),
                format!("{:.0}", p.p50),
                format!("{:.0}", p.p95),
                format!("{:.0}", p.p99),
                format!("{:.0}", p.max),
            ],
        );
        for s in &self.stages {
            row(
                md,
                &[
                    format!(
                        "stage `{}` receive → downstream confirmed (histogram)",
                        s.stage
                    ),
                    String::new(),
                    format!("{:.1}", s.p50),
                    format!("{:.1}", s.p95),
                    format!("{:.1}", s.p99),
                    String::new(),
                ],
            );
        }
        let _ = writeln!(md, "\n![latency](latency.svg)\n");
    }

    fn cost_section(&self, md: &mut String) {
        let _ = writeln!(md, "## Cost\n");
        head(
            md,
            &[
                "process",
                "CPU s",
                "µs per stored message",
                "wake-ups per stored message",
                "bytes to disk per stored message",
                "RSS max MiB",
                "RSS steady MiB",
            ],
            1,
        );
        for c in &self.cpu {
            if c.process == MACHINE {
                continue;
            }
            let m = self.memory.iter().find(|m| m.process == c.process);
            row(
                md,
                &[
                    c.process.clone(),
                    format!("{:.2}", c.seconds),
                    format!("{:.1}", c.us_per_message),
                    format!("{:.2}", c.wakeups_per_message),
                    format!("{:.0}", c.disk_bytes_per_message),
                    format!("{:.1}", m.map(|m| m.max_mib).unwrap_or(0.0)),
                    format!("{:.1}", m.map(|m| m.steady_mib).unwrap_or(0.0)),
                ],
            );
        }
        let _ = writeln!(
            md,
            "\nOur six services together: **{:.1} µs CPU per stored message**.\n",
            self.services_us_per_message
        );
        if let Some(m) = self.cpu.iter().find(|c| c.process == MACHINE) {
            let window = self.fleet.seconds + self.groups_drained_seconds;
            let _ = writeln!(
                md,
                "The whole machine (every process: fleet, brokers, services, load tool), first publish to every group at lag 0: {:.2} CPU s, **{:.1} µs per stored message**, {:.2} of {} CPUs busy on average.\n",
                m.seconds,
                m.us_per_message,
                m.seconds / window.max(f64::EPSILON),
                self.machine.cpus
            );
        }
    }
}

/// Up to 20 examples of a finding, as a list under its name.
fn examples(md: &mut String, name: &str, f: &Finding) {
    if f.examples.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n{name} (first {}):\n", f.examples.len());
    for e in &f.examples {
        let _ = writeln!(md, "- {e}");
    }
}

/// A table's header row and alignment row: the first `left` columns left-aligned (text), the
/// others right-aligned (numbers).
pub(super) fn head(md: &mut String, columns: &[&str], left: usize) {
    row(md, columns);
    let align: Vec<&str> = (0..columns.len())
        .map(|i| if i < left { "---" } else { "---:" })
        .collect();
    let _ = writeln!(md, "|{}|", align.join("|"));
}

/// One table row (`| a | b |`); an empty cell is written `| |`.
pub(super) fn row<T: AsRef<str>>(md: &mut String, cells: &[T]) {
    md.push('|');
    for cell in cells {
        match cell.as_ref() {
            "" => md.push_str(" |"),
            cell => {
                let _ = write!(md, " {cell} |");
            }
        }
    }
    md.push('\n');
}
