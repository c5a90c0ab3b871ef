//! Does the embedded store's write cost stay flat as the store fills? (Issue 11's target: the
//! upserter at 1,000,000 stored costs no more than 1.2× what it costs at 100,000.)
//!
//! The upserter's `write_messages` of batches of 500 new messages from a fleet of 1,000
//! devices (the standard scenario's), each batch the next message of 500 devices in turn, into
//! a file on this machine's disk (WAL, `synchronous = FULL`). Measured over windows of 10,000
//! messages once the store holds 100,000 and again once it holds 1,000,000: the process's CPU
//! time (every thread's, from `/proc/self/task/*/schedstat`), the wall time (fsyncs included)
//! and the bytes written to disk (`write_bytes` of `/proc/self/io`), per message.
//!
//! Not criterion: every batch measured grows the store, so the bench, not criterion's choice
//! of iterations, has to fix the size measured at. Run:
//! `cargo bench -p iotp-store --bench store_growth`.

use std::time::Instant;

use iotp_store::sqlite::SqliteStore;
use iotp_store::{MessageRecord, ReadingStore};

mod support;
use support::{enriched, TempStore, BATCH};

/// Devices in the fleet.
const DEVICES: usize = 1_000;
/// Messages per window measured.
const WINDOW: usize = 10_000;
/// Windows measured at each size.
const WINDOWS: usize = 5;

/// CPU time of every live thread of this process, ns.
fn cpu_ns() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| {
                    let stat = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
                    stat.split_whitespace().next()?.parse::<u64>().ok()
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes this process has caused to be written to disk.
fn disk_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes: "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The fleet's messages in the order the upserter gets them: batch `n` holds the next message
/// of devices `500·n mod 1,000` onwards.
struct Fleet {
    batches: usize,
}

impl Fleet {
    fn next(&mut self) -> Vec<MessageRecord> {
        let first = self.batches * BATCH;
        self.batches += 1;
        (first..first + BATCH)
            .map(|i| MessageRecord::from(enriched(i % DEVICES, (i / DEVICES) as i64)))
            .collect()
    }

    fn stored(&self) -> usize {
        self.batches * BATCH
    }
}

/// Per message over one window: CPU µs, wall µs, bytes to disk.
fn window(rt: &tokio::runtime::Runtime, store: &SqliteStore, fleet: &mut Fleet) -> (f64, f64, f64) {
    // Built before the clock starts: only the writes are measured.
    let batches: Vec<_> = (0..WINDOW / BATCH).map(|_| fleet.next()).collect();
    let (cpu, disk, wall) = (cpu_ns(), disk_bytes(), Instant::now());
    for batch in batches {
        let report = rt
            .block_on(store.write_messages(batch.clone()))
            .expect("write");
        assert_eq!(report.stored, BATCH as u64, "every message is new");
    }
    let n = WINDOW as f64;
    (
        (cpu_ns() - cpu) as f64 / 1e3 / n,
        wall.elapsed().as_secs_f64() * 1e6 / n,
        (disk_bytes() - disk) as f64 / n,
    )
}

/// `min – median – max` of one column.
fn spread(mut values: Vec<f64>, decimals: usize) -> String {
    values.sort_by(f64::total_cmp);
    let at = |i: usize| format!("{:.*}", decimals, values[i]);
    format!(
        "{} – {} – {}",
        at(0),
        at(values.len() / 2),
        at(values.len() - 1)
    )
}

fn main() {
    // `cargo bench` passes `--bench`; a filter that is not ours means another bench was asked for.
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && !"store_growth".contains(a.as_str()))
    {
        return;
    }
    let file = TempStore::new();
    let store = SqliteStore::create(&file.0).expect("store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .expect("runtime");
    let mut fleet = Fleet { batches: 0 };
    let mut medians = Vec::new();
    println!("store/sqlite_write_messages_growth ({DEVICES} devices, batches of {BATCH}, windows of {WINDOW}):");
    println!("| stored at start | CPU µs/msg | wall µs/msg | bytes to disk/msg |");
    println!("|---|---|---|---|");
    for size in [100_000, 1_000_000] {
        while fleet.stored() < size {
            rt.block_on(store.write_messages(fleet.next()))
                .expect("fill");
        }
        let windows: Vec<_> = (0..WINDOWS)
            .map(|_| window(&rt, &store, &mut fleet))
            .collect();
        let column = |f: fn(&(f64, f64, f64)) -> f64| windows.iter().map(f).collect::<Vec<_>>();
        let cpu = column(|w| w.0);
        let mut sorted = cpu.clone();
        sorted.sort_by(f64::total_cmp);
        medians.push(sorted[WINDOWS / 2]);
        println!(
            "| {size} | {} | {} | {} |",
            spread(cpu, 2),
            spread(column(|w| w.1), 2),
            spread(column(|w| w.2), 0)
        );
    }
    println!(
        "CPU at 1,000,000 / at 100,000 (medians): {:.2}× (target ≤ 1.2×)",
        medians[1] / medians[0]
    );
}
