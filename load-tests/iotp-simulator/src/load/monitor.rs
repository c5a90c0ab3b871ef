//! What watches a run while the fleet publishes and the pipeline drains: once a second, the
//! RSS of every service (summed over its live replicas) and of the broker, and every live
//! replica's counters ([`Counters`]); the progress (PUBACKs, messages stored, reconnects) on a
//! bar, or in a log line every 10 s with `--quiet`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use super::counters::Counters;
use super::Run;
use crate::fleet::{now_millis, Progress};
use crate::report::PerProcess;
use crate::stack::{self, rss_bytes, Roster, SERVICES};

/// The memory and counter sampler and the progress display, running.
pub struct Monitor {
    /// One row per second: each service's RSS (its live replicas together), bytes.
    samples: Arc<Mutex<Vec<PerProcess<u64>>>>,
    counters: Arc<Mutex<Counters>>,
    sampler: JoinHandle<()>,
    ticker: JoinHandle<()>,
    bar: Option<ProgressBar>,
}

impl Monitor {
    /// Start watching `run`, whose fleet will make `total_publishes` publishes counted in
    /// `progress`.
    pub fn start(run: &Run, progress: &Arc<Progress>, total_publishes: u64) -> Self {
        let samples: Arc<Mutex<Vec<PerProcess<u64>>>> = Arc::default();
        let counters: Arc<Mutex<Counters>> = Arc::default();
        let sampler = tokio::spawn(sample(
            run.stack.roster(),
            samples.clone(),
            counters.clone(),
        ));
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
        let ticker = tokio::spawn(tick(progress.clone(), bar.clone(), counters.clone()));
        Self {
            samples,
            counters,
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

    /// Stop sampling; the memory rows sampled and the counters.
    pub fn stop_sampling(self) -> (Vec<PerProcess<u64>>, Counters) {
        self.sampler.abort();
        self.ticker.abort();
        let memory = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (memory, counters)
    }
}

/// Once a second until aborted: each service's RSS and every live replica's counters.
async fn sample(
    roster: Arc<Mutex<Roster>>,
    samples: Arc<Mutex<Vec<PerProcess<u64>>>>,
    counters: Arc<Mutex<Counters>>,
) {
    loop {
        let live = roster.lock().map(|r| r.live.clone()).unwrap_or_default();
        let row: PerProcess<u64> = SERVICES
            .iter()
            .copied()
            .chain(["tansu"])
            .map(|s| {
                let rss = live
                    .iter()
                    .filter(|m| m.service == s)
                    .map(|m| rss_bytes(m.pid))
                    .sum();
                (s.to_string(), rss)
            })
            .collect();
        if let Ok(mut s) = samples.lock() {
            s.push(row);
        }
        let mut pages = Vec::new();
        for m in live.iter().filter(|m| m.admin_port != 0) {
            if let Some(text) = stack::scrape(m.admin_port).await {
                pages.push((m, text));
            }
        }
        if let Ok(mut c) = counters.lock() {
            for (m, text) in pages {
                c.observe(m, &text);
            }
            c.record(now_millis());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Show the progress every half second until aborted: PUBACKs from `progress`, messages
/// stored from the upserters' counters.
async fn tick(progress: Arc<Progress>, bar: Option<ProgressBar>, counters: Arc<Mutex<Counters>>) {
    let mut last_print = Instant::now();
    loop {
        let acked = progress.acked.load(Ordering::Relaxed);
        let stored = counters
            .lock()
            .map(|c| c.total("upserter", "iotp_messages_stored_total"))
            .unwrap_or(0.0);
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
