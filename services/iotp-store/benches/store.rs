//! Store batch building, per message, for the upserter's batch of 500 enriched records:
//! the conversion to the store's `MessageRecord`, the MongoDB time-series documents built from
//! them (no server: document building only), and — I/O, not CPU — the embedded SQLite store's
//! `write_messages` of the batch into a file. Each figure includes freeing what was built, as
//! the upserter does after its write.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use iotp_contract::EnrichedTelemetry;
use iotp_store::mongo::reading_docs;
use iotp_store::sqlite::SqliteStore;
use iotp_store::{MessageRecord, Observation, ReadingStore, RollupStore, TwinStore};

mod support;
use support::{enriched, TempStore, BATCH};

/// A batch as a partition delivers it: 100 devices, 5 consecutive messages each.
fn batch(first_seq_no: i64) -> Vec<EnrichedTelemetry> {
    (0..BATCH)
        .map(|i| enriched((i % 100) * 3, first_seq_no + (i / 100) as i64))
        .collect()
}

/// Hot path: `MessageRecord::from(EnrichedTelemetry)` over a batch.
fn message_records(c: &mut Criterion) {
    let records = batch(0);
    let mut group = c.benchmark_group("store/message_record_from");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("batch_500", |b| {
        b.iter_batched(
            || records.clone(),
            |records| {
                let built: Vec<MessageRecord> = black_box(records)
                    .into_iter()
                    .map(MessageRecord::from)
                    .collect();
                drop(black_box(built));
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Hot path: MongoDB raw-tier documents (one per reading) for a batch of messages.
fn mongo_reading_docs(c: &mut Criterion) {
    let messages: Vec<MessageRecord> = batch(0).into_iter().map(MessageRecord::from).collect();
    assert_eq!(reading_docs(&messages[0]).len(), 3);
    let mut group = c.benchmark_group("store/mongo_reading_docs");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("batch_500", |b| {
        b.iter(|| {
            black_box(&messages)
                .iter()
                .flat_map(reading_docs)
                .collect::<Vec<_>>()
        })
    });
    group.finish();
}

/// A new embedded store in a temporary file (removed when the first value is dropped), and a
/// runtime to call it from.
fn sqlite_store() -> (TempStore, SqliteStore, tokio::runtime::Runtime) {
    let file = TempStore::new();
    let store = SqliteStore::create(&file.0).expect("store");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    (file, store, runtime)
}

/// I/O, not a CPU hot path: the embedded store's `write_messages` of a batch of new messages
/// (one transaction, WAL, `synchronous = FULL`) into a file on this machine's disk.
fn sqlite_write_messages(c: &mut Criterion) {
    let (_file, store, runtime) = sqlite_store();
    // Each batch continues the devices' sequence numbers: every message is new, as in steady
    // state (redeliveries would be the cheaper duplicate path).
    let mut next_seq_no = 0;
    let mut group = c.benchmark_group("store/sqlite_write_messages_io");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("batch_500", |b| {
        b.iter_batched(
            || {
                let records: Vec<MessageRecord> = batch(next_seq_no)
                    .into_iter()
                    .map(MessageRecord::from)
                    .collect();
                next_seq_no += (BATCH / 100) as i64;
                records
            },
            |records| {
                let report = runtime
                    .block_on(store.write_messages(black_box(records)))
                    .expect("write");
                assert_eq!(report.stored, BATCH as u64);
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// Devices in the enricher's twin batch and in the upserter's gap count: at moderate rates a
/// batch holds about one message per device, so each observation is a twin of its own.
const DEVICES: usize = 200;

/// An observation of device `device` (the simulator's energy meter), message `seq_no`.
fn observation(device: usize, seq_no: i64) -> Observation {
    let e = enriched(device, seq_no);
    Observation {
        tenant: e.header.tenant,
        device_id: e.header.device_id,
        seq_no,
        produced_at: e.header.produced_at,
        readings: e
            .readings
            .into_iter()
            .map(|r| (r.metric, r.value, r.unit))
            .collect(),
        firmware: Some("1.4.2".into()),
        config_version: Some("cfg-7".into()),
        heartbeat_secs: Some(60),
    }
}

/// I/O and SQLite's CPU: the enricher's twin write (`TwinStore::apply`) of a batch holding one
/// observation for each of 200 devices (read, fold and write each twin, one transaction), per
/// observation; then the upserter's per-tick gap count (`update_seq_gaps`) for the same
/// devices, per device.
fn sqlite_twins(c: &mut Criterion) {
    let (_file, store, runtime) = sqlite_store();
    let mut next_seq_no = 0;
    let mut group = c.benchmark_group("store/sqlite_twins_apply_io");
    group.throughput(Throughput::Elements(DEVICES as u64));
    group.bench_function("batch_200_devices", |b| {
        b.iter_batched(
            || {
                next_seq_no += 1;
                (0..DEVICES)
                    .map(|d| observation(d, next_seq_no))
                    .collect::<Vec<_>>()
            },
            |observations| {
                runtime
                    .block_on(store.apply(black_box(observations)))
                    .expect("apply");
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
    let records: Vec<MessageRecord> = (0..DEVICES)
        .map(|d| MessageRecord::from(enriched(d, 0)))
        .collect();
    runtime
        .block_on(store.write_messages(records.clone()))
        .expect("write");
    let devices: Vec<(String, String)> = records
        .iter()
        .map(|m| (m.tenant.clone(), m.device_id.clone()))
        .collect();
    let mut group = c.benchmark_group("store/sqlite_update_seq_gaps_io");
    group.throughput(Throughput::Elements(DEVICES as u64));
    group.bench_function("devices_200", |b| {
        b.iter(|| {
            runtime
                .block_on(store.update_seq_gaps(black_box(&devices)))
                .expect("gaps")
        })
    });
    group.finish();
}

/// Devices in the aggregator's batch: a backlog's batch of 1,000 records from 250 devices,
/// four consecutive messages each.
const FOLD_DEVICES: usize = 250;

/// I/O and SQLite's CPU: the aggregator's fold (`RollupStore::fold`) of a batch of 1,000 new
/// messages from 250 devices, three readings each, into their hour and day buckets (the dedup
/// guard, then read, fold and write each bucket, one transaction), per message.
fn sqlite_rollups(c: &mut Criterion) {
    let (_file, store, runtime) = sqlite_store();
    let mut next_seq_no = 0;
    let mut group = c.benchmark_group("store/sqlite_rollups_fold_io");
    group.throughput(Throughput::Elements((FOLD_DEVICES * 4) as u64));
    group.bench_function("batch_1000_of_250_devices", |b| {
        b.iter_batched(
            || {
                let first = next_seq_no;
                next_seq_no += 4;
                (0..FOLD_DEVICES * 4)
                    .map(|i| {
                        MessageRecord::from(enriched(
                            i % FOLD_DEVICES,
                            first + (i / FOLD_DEVICES) as i64,
                        ))
                    })
                    .collect::<Vec<_>>()
            },
            |messages| {
                let report = runtime
                    .block_on(store.fold(black_box(messages), &[], 0))
                    .expect("fold");
                assert_eq!(report.applied, (FOLD_DEVICES * 4) as u64);
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(
    benches,
    message_records,
    mongo_reading_docs,
    sqlite_write_messages,
    sqlite_twins,
    sqlite_rollups
);
criterion_main!(benches);
