//! Phase 4: what the services say (per-stage latency from their histograms, what each hop
//! counted over every replica that lived), the audit of the devices' ledgers against the
//! store and the archive (roll-ups against the raw tier included), what each chaos fault
//! cost, the services stopped with SIGTERM, and what the bridges left in their sessions.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use iotp_contract::topology::topic_name;
use iotp_core::kafka::{count_carried, count_records, KafkaConfig};
use iotp_core::probe::{histogram_quantile, label_values};
use iotp_store::{ReadingStore, RollupStore, StoredMessage, TwinStore};

use super::counters::Counters;
use super::{chaos, Run, Settled};
use crate::audit::audit;
use crate::audit::rollups::{self, Reading};
use crate::fleet::now_millis;
use crate::report::{Outcome, StageLatency};
use crate::stack::{scrape, Stack};

/// Stored messages read per page while auditing.
const PAGE: usize = 20_000;

/// Gather everything the report needs from the pipeline, audit, stop the services.
pub async fn collect(run: &mut Run, settled: Settled) -> anyhow::Result<Outcome> {
    let Settled {
        fleet,
        progress,
        drained,
        usage,
        chaos,
        mut counters,
    } = settled;
    let stages = stage_latencies(&run.stack).await;
    let hops = hop_counts(&run.stack, &mut counters, &run.kafka, &run.out).await;
    println!("iotp-load: auditing");
    let stored = all_stored(run).await?;
    let letters = run.letters().await?;
    let mut twins = HashMap::new();
    let mut buckets = Vec::new();
    for d in fleet.devices.iter().filter(|d| d.registered) {
        if let Some(t) = run.store.twin(&run.tenant, &d.id).await? {
            twins.insert(d.id.clone(), t);
        }
        buckets.extend(run.store.buckets(&run.tenant, &d.id).await?);
    }
    let mut audit = audit(&fleet, &stored, &letters, &twins);
    drop(stored);
    let readings = raw_readings(&run.stack.store_path, &run.tenant).await?;
    (audit.rollups_checked, audit.rollups_wrong) = rollups::check(&readings, &buckets);
    drop(readings);
    let exit_codes = run.stack.stop_services().await;
    if audit.rollups_wrong.count > 0 {
        // Read again once the aggregator has stopped: a bucket right now was read before its
        // fold committed (still a failure: the audit runs when every group is at lag 0).
        let mut buckets = Vec::new();
        for d in fleet.devices.iter().filter(|d| d.registered) {
            buckets.extend(run.store.buckets(&run.tenant, &d.id).await?);
        }
        let readings = raw_readings(&run.stack.store_path, &run.tenant).await?;
        let (_, still) = rollups::check(&readings, &buckets);
        audit.rollups_wrong_after_stop = Some(still.count);
    }
    let mut session_leftovers = Vec::new();
    for client_id in run.stack.bridge_client_ids() {
        let n = super::leftovers::bridge_session_leftovers(
            &client_id,
            run.stack.mqtt_port(),
            run.stack.bridge_tls(),
        )
        .await?;
        session_leftovers.push((client_id, n));
    }
    let acks_per_second = progress
        .acks_per_second
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    let chaos = chaos::costs(
        &chaos::with_crashes(chaos, &run.stack.crashes()),
        &audit,
        &counters,
        fleet.started_at,
        &acks_per_second,
    );
    Ok(Outcome {
        acks_per_second,
        connection_errors: progress.connection_errors.load(Ordering::Relaxed),
        fleet,
        drained,
        usage,
        stages,
        hops,
        audit,
        exit_codes,
        session_leftovers,
        chaos,
    })
}

/// p50, p95 and p99 of every stage's `iotp_delivery_seconds` histogram, ms (of the first live
/// replica that reports the stage).
async fn stage_latencies(stack: &Stack) -> Vec<StageLatency> {
    let mut stages: Vec<StageLatency> = Vec::new();
    for m in stack.members().iter().filter(|m| m.admin_port != 0) {
        let Some(text) = scrape(m.admin_port).await else {
            continue;
        };
        for stage in label_values(&text, "iotp_delivery_seconds_bucket", "stage") {
            if stages.iter().any(|s| s.stage == stage) {
                continue;
            }
            let label = format!("stage=\"{stage}\"");
            let q = |q| {
                histogram_quantile(&text, "iotp_delivery_seconds", &[label.as_str()], q)
                    .unwrap_or(0.0)
                    * 1000.0
            };
            stages.push(StageLatency {
                stage,
                p50: q(0.5),
                p95: q(0.95),
                p99: q(0.99),
            });
        }
    }
    stages
}

/// What each hop counted: the counters of every replica that lived (the live ones scraped
/// once more now), then the records on each topic (-1 where the broker would not say).
async fn hop_counts(
    stack: &Stack,
    counters: &mut Counters,
    kafka: &KafkaConfig,
    out: &Path,
) -> Vec<(String, i64)> {
    // Each live replica's exposition as scraped, kept beside the report (`metrics/`):
    // the smoke test hands them to `promtool check metrics`.
    let expositions = out.join("metrics");
    if let Err(e) = std::fs::create_dir_all(&expositions) {
        eprintln!("iotp-load: cannot create {}: {e}", expositions.display());
    }
    for m in stack.members().iter().filter(|m| m.admin_port != 0) {
        if let Some(text) = scrape(m.admin_port).await {
            counters.observe(m, &text);
            let file = expositions.join(format!("{}.prom", m.replica));
            if let Err(e) = std::fs::write(&file, &text) {
                eprintln!("iotp-load: cannot write {}: {e}", file.display());
            }
        }
    }
    counters.record(now_millis());
    let mut hops = counters.hops();
    for schema in ["raw-envelope", "telemetry", "enriched"] {
        let topic = topic_name(schema);
        // Records carried (a bundle's items one by one), what the services' counters count;
        // and the Kafka records themselves (bundles).
        hops.push((
            format!("records on {topic}"),
            count_carried(kafka, &topic).await.unwrap_or(-1),
        ));
        hops.push((
            format!("kafka records on {topic}"),
            count_records(kafka, &topic).await.unwrap_or(-1),
        ));
    }
    hops
}

/// Every message of the run's tenant in the store, page by page.
async fn all_stored(run: &Run) -> anyhow::Result<Vec<StoredMessage>> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = run
            .store
            .stored_messages(&run.tenant, after.as_ref(), PAGE)
            .await?;
        out.extend(page.messages);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(out)
}

/// Every reading of `tenant` in the raw tier of the embedded store at `path`, read straight
/// from the file (the store's contract has no reader of values: nothing but an audit needs
/// one).
async fn raw_readings(path: &Path, tenant: &str) -> anyhow::Result<Vec<Reading>> {
    let (path, tenant) = (path.to_path_buf(), tenant.to_string());
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Reading>> {
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        let mut stmt = conn
            .prepare("SELECT device_id, produced_at, readings FROM messages WHERE tenant = ?1")?;
        let mut rows = stmt.query([&tenant])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let device: String = row.get(0)?;
            let at: i64 = row.get(1)?;
            let text: String = row.get(2)?;
            let readings: Vec<(String, f64, Option<String>)> = serde_json::from_str(&text)
                .with_context(|| format!("readings of {device} at {at}"))?;
            for (metric, value, _) in readings {
                out.push((device.clone(), metric, value, at));
            }
        }
        Ok(out)
    })
    .await?
}
