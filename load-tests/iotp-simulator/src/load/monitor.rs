//! What watches a run while the fleet publishes and the pipeline drains: every process's RSS
//! once a second, and the progress (PUBACKs, messages stored, reconnects) on a bar, or in a log
//! line every 10 s with `--quiet`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use iotp_core::probe::sample_sum;
use tokio::task::JoinHandle;

use super::Run;
use crate::fleet::Progress;
use crate::report::PerProcess;
use crate::stack::{self, rss_bytes};

/// The memory sampler and the progress display, running.
pub struct Monitor {
    /// One row per second: each process's RSS, bytes.
    samples: Arc<Mutex<Vec<PerProcess<u64>>>>,
    sampler: JoinHandle<()>,
    ticker: JoinHandle<()>,
    bar: Option<ProgressBar>,
}

impl Monitor {
    /// Start watching `run`, whose fleet will make `total_publishes` publishes counted in
    /// `progress`.
    pub fn start(run: &Run, progress: &Arc<Progress>, total_publishes: u64) -> Self {
        let samples: Arc<Mutex<Vec<PerProcess<u64>>>> = Arc::default();
        let sampler = {
            let samples = samples.clone();
            let processes = run.stack.processes();
            tokio::spawn(async move {
                loop {
                    let row = stack::per_process(&processes, rss_bytes);
                    if let Ok(mut s) = samples.lock() {
                        s.push(row);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        let bar = (!run.opts.quiet).then(|| {
            let bar = ProgressBar::new(total_publishes);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} acked {per_sec} · {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        let upserter = run.stack.service("upserter").map(|s| s.admin_port);
        let ticker = tokio::spawn(tick(progress.clone(), bar.clone(), upserter));
        Self {
            samples,
            sampler,
            ticker,
            bar,
        }
    }

    /// The fleet is done: the bar shows its last PUBACK count.
    pub fn fleet_done(&self, progress: &Progress) {
        if let Some(bar) = &self.bar {
            bar.set_position(progress.acked.load(Ordering::Relaxed));
        }
    }

    /// Stop the progress display, its last word the number of messages stored.
    pub fn stop_display(&mut self, stored: u64) {
        self.ticker.abort();
        if let Some(bar) = self.bar.take() {
            bar.finish_with_message(format!("stored {stored}"));
        }
    }

    /// Stop sampling memory; the rows sampled.
    pub fn stop_sampling(self) -> Vec<PerProcess<u64>> {
        self.sampler.abort();
        self.ticker.abort();
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Show the progress every half second until aborted: PUBACKs from `progress`, messages
/// stored from the upserter's admin port.
async fn tick(progress: Arc<Progress>, bar: Option<ProgressBar>, upserter: Option<u16>) {
    let mut last_print = Instant::now();
    loop {
        let acked = progress.acked.load(Ordering::Relaxed);
        let stored = match upserter {
            Some(port) => stack::scrape(port)
                .await
                .map(|m| sample_sum(&m, "iotp_messages_stored_total", &[]))
                .unwrap_or(0.0),
            None => 0.0,
        };
        let msg = format!(
            "stored {stored:.0} · reconnects {}",
            progress.connection_errors.load(Ordering::Relaxed)
        );
        match &bar {
            Some(bar) => {
                bar.set_position(acked);
                bar.set_message(msg);
            }
            None if last_print.elapsed() > Duration::from_secs(10) => {
                println!("iotp-load: acked {acked} · {msg}");
                last_print = Instant::now();
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
