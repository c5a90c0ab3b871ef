//! `report.md`'s chaos section: each fault with its number on the plots, when it hit, how long
//! its own recovery took (replicas ready, broker listening), how long the stored rate took to
//! come back, and the redeliveries counted from it until the next fault.

use std::fmt::Write as _;

use super::markdown::{head, row};
use super::Report;
use crate::chaos::recovery::{BASELINE, HOLD, SHARE};

impl Report {
    /// The chaos section (nothing without a chaos timeline).
    pub(super) fn chaos_section(&self, md: &mut String) {
        if self.chaos.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Chaos\n");
        let _ = writeln!(
            md,
            "Each fault is numbered on the plots (dashed lines). **Ready**: from the action until the replicas it started reported ready, or the broker listened again. **Rate back**: from the fault until the store took at least {:.0}% of its pre-fault rate (the median of the {BASELINE} s before) for {HOLD} s in a row; — : not before the stream ended. **Redeliveries**, counted from the fault until the next one: messages the store removed as duplicates, and MQTT messages the bridges received beyond the fleet's PUBACKs (the broker sending again what a bridge had not acknowledged).\n",
            SHARE * 100.0
        );
        head(
            md,
            &[
                "#",
                "fault",
                "at s",
                "ready s",
                "pre-fault msgs/s",
                "lowest msgs/s",
                "rate back s",
                "store duplicates",
                "MQTT redeliveries",
                "what happened",
            ],
            2,
        );
        for (i, f) in self.chaos.iter().enumerate() {
            let r = &f.recovery;
            row(
                md,
                &[
                    (i + 1).to_string(),
                    format!(
                        "`{}`{}",
                        f.action,
                        if f.failed { " **FAILED**" } else { "" }
                    ),
                    format!("{:.1}", f.at),
                    format!("{:.1}", f.ready_after),
                    format!("{:.0}", r.baseline),
                    format!("{:.0}", r.lowest),
                    r.seconds.map_or("—".into(), |s| format!("{s:.1}")),
                    format!("{:.0}", f.store_duplicates),
                    format!("{:.0}", f.mqtt_redeliveries),
                    f.detail.replace('|', "/"),
                ],
            );
        }
        let back: Vec<f64> = self
            .chaos
            .iter()
            .filter_map(|f| f.recovery.seconds)
            .collect();
        let _ = writeln!(
            md,
            "\n{} faults; the stored rate came back after {} of them (longest {:.1} s); {:.0} duplicates removed at the store and {:.0} MQTT redeliveries in all.\n",
            self.chaos.len(),
            back.len(),
            back.iter().copied().fold(0.0, f64::max),
            self.chaos.iter().map(|f| f.store_duplicates).sum::<f64>(),
            self.chaos.iter().map(|f| f.mqtt_redeliveries).sum::<f64>(),
        );
    }
}
