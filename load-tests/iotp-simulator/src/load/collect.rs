//! Phase 4: what the services say (per-stage latency from their histograms, what each hop
//! counted), the audit of the devices' ledgers against the store and the archive, and the
//! services stopped with SIGTERM.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use iotp_contract::topology::topic_name;
use iotp_core::kafka::{count_records, KafkaConfig};
use iotp_core::probe::{histogram_quantile, label_values, sample_sum};
use iotp_store::{ReadingStore, StoredMessage, TwinStore};

use super::{Run, Settled};
use crate::audit::audit;
use crate::report::{Outcome, StageLatency};
use crate::stack::{scrape, Stack};

/// The counters read per hop, by service: duplicates between hops show here (they are removed
/// at the store).
const HOP_COUNTERS: [(&str, &str); 14] = [
    ("mqtt-bridge", "iotp_mqtt_received_messages_total"),
    ("mqtt-bridge", "iotp_mqtt_acked_messages_total"),
    ("mqtt-bridge", "iotp_mqtt_superseded_acks_total"),
    ("mqtt-bridge", "iotp_kafka_produced_messages_total"),
    ("parser", "iotp_kafka_produced_messages_total"),
    ("enricher", "iotp_kafka_produced_messages_total"),
    ("parser", "iotp_consumer_offset_gaps_total"),
    ("enricher", "iotp_consumer_offset_gaps_total"),
    ("upserter", "iotp_consumer_offset_gaps_total"),
    ("parser", "iotp_consumer_rereads_total"),
    ("enricher", "iotp_consumer_rereads_total"),
    ("upserter", "iotp_consumer_rereads_total"),
    ("upserter", "iotp_messages_stored_total"),
    ("upserter", "iotp_duplicates_removed_total"),
];

/// Stored messages read per page while auditing.
const PAGE: usize = 20_000;

/// Gather everything the report needs from the pipeline, audit, stop the services.
pub async fn collect(run: &mut Run, settled: Settled) -> anyhow::Result<Outcome> {
    let Settled {
        fleet,
        progress,
        drained,
        usage,
    } = settled;
    let stages = stage_latencies(&run.stack).await;
    let hops = hop_counts(&run.stack, &run.kafka).await;
    println!("iotp-load: auditing");
    let stored = all_stored(run).await?;
    let letters = run.letters().await?;
    let mut twins = HashMap::new();
    for d in fleet.devices.iter().filter(|d| d.registered) {
        if let Some(t) = run.store.twin(&run.tenant, &d.id).await? {
            twins.insert(d.id.clone(), t);
        }
    }
    let audit = audit(&fleet, &stored, &letters, &twins);
    let exit_codes = run.stack.stop_services().await;
    let (client_id, port) = &run.stack.bridge_session;
    let session_leftovers = super::leftovers::bridge_session_leftovers(client_id, *port).await?;
    let acks_per_second = progress
        .acks_per_second
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
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
    })
}

/// p50, p95 and p99 of every stage's `iotp_delivery_seconds` histogram, ms.
async fn stage_latencies(stack: &Stack) -> Vec<StageLatency> {
    let mut stages = Vec::new();
    for s in &stack.services {
        let Some(text) = scrape(s.admin_port).await else {
            continue;
        };
        for stage in label_values(&text, "iotp_delivery_seconds_bucket", "stage") {
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

/// What each hop counted: the [`HOP_COUNTERS`] of the services that run, then the records on
/// each topic (-1 where the broker would not say).
async fn hop_counts(stack: &Stack, kafka: &KafkaConfig) -> Vec<(String, i64)> {
    let mut hops = Vec::new();
    for (service, metric) in HOP_COUNTERS {
        if let Some(s) = stack.service(service) {
            let text = scrape(s.admin_port).await.unwrap_or_default();
            hops.push((
                format!("{service}: {metric}"),
                sample_sum(&text, metric, &[]) as i64,
            ));
        }
    }
    for schema in ["raw-envelope", "telemetry", "enriched"] {
        let topic = topic_name(schema);
        hops.push((
            format!("records on {topic}"),
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
            .stored_messages(&run.tenant, after.clone(), PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some((last.device_id.clone(), last.seq_no));
        out.extend(page);
    }
    Ok(out)
}
