//! Enricher hot paths, per message: `enrich()` of one telemetry record against a 1000-device
//! registry (the simulator's energy meter as it is, and a device with tags, unit conversions
//! and a personal-data metric to drop), and the stage's CPU work per message (Avro decode of
//! the telemetry, enrich, Avro encode of the enriched record; the twin write is I/O and per
//! batch, not measured here). Each figure includes freeing what was built, as the stage does.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use iotp_contract::devices::Registry;
use iotp_contract::{Codec, EnrichedTelemetry, Header, Reading, Telemetry};
use iotp_enricher::enrich;

/// Devices in the simulator part of the registry.
const FLEET: usize = 1000;

/// The simulator's registry for `devices` devices, plus `tagged-1`: an energy meter with
/// asset, firmware, configuration version, tags and a personal-data metric.
fn registry() -> Registry {
    let mut text = String::from(
        "[profiles.energy-meter-v1]\n\
         heartbeat_secs = 60\n\
         metrics = { energy = { unit = \"Wh\", min = 0.0, max = 1e15, cumulative = true }, power = { unit = \"W\", min = 0.0, max = 1e6 }, voltage = { unit = \"V\", min = 0.0, max = 1000.0 }, location = { unit = \"deg\", min = -180.0, max = 180.0 } }\n\n\
         [profiles.climate-v1]\n\
         metrics = { temperature = { unit = \"Cel\", min = -60.0, max = 100.0 }, humidity = { unit = \"%RH\", min = 0.0, max = 100.0 } }\n\n\
         [profiles.vibration-v1]\n\
         metrics = { vibration_rms = { unit = \"mm/s\", min = 0.0, max = 100.0 } }\n",
    );
    for index in 0..FLEET {
        let profile = ["energy-meter-v1", "climate-v1", "vibration-v1"][index % 3];
        text.push_str(&format!(
            "\n[[devices]]\ntenant = \"acme\"\nid = \"dev-{index:06}\"\nprofile = \"{profile}\"\nsite = \"site-{}\"\n",
            index % 10
        ));
    }
    text.push_str(
        "\n[[devices]]\ntenant = \"acme\"\nid = \"tagged-1\"\nprofile = \"energy-meter-v1\"\n\
         site = \"plant-1\"\nasset = \"line-3\"\nfirmware = \"2.4.1\"\nconfig_version = \"cfg-7\"\n\
         pii = [\"location\"]\ntags = { building = \"B2\", feeder = \"F7\", owner = \"ops\" }\n",
    );
    Registry::parse(&text, Path::new("bench.toml")).expect("registry")
}

fn reading(metric: &str, value: f64, unit: &str) -> Reading {
    Reading {
        metric: metric.into(),
        value,
        unit: Some(unit.into()),
    }
}

fn telemetry(device_id: &str, readings: Vec<Reading>) -> Telemetry {
    Telemetry {
        header: Header {
            msg_id: "0190f3a2-7c1e-7d4b-9a55-3f2e1c0b9a87".into(),
            tenant: "acme".into(),
            device_id: device_id.into(),
            seq_no: 123_456,
            produced_at: 1_800_000_000_000,
            received_at: 1_800_000_000_040,
            schema_version: 1,
        },
        kind: "telemetry".into(),
        readings,
        firmware_version: None,
    }
}

/// The simulator's energy meter, canonical units already.
fn simulator_meter() -> Telemetry {
    telemetry(
        "dev-000003",
        vec![
            reading("energy", 3_021_734.518_231, "Wh"),
            reading("power", 1_523.420_917, "W"),
            reading("voltage", 229.871_204, "V"),
        ],
    )
}

/// A meter reporting kWh and kW (converted), and its location (dropped).
fn tagged_meter() -> Telemetry {
    telemetry(
        "tagged-1",
        vec![
            reading("energy", 3_021.734_518, "kWh"),
            reading("power", 1.523_420, "kW"),
            reading("voltage", 229.871_204, "V"),
            reading("location", 48.137_154, "deg"),
        ],
    )
}

/// Hot path: `enrich()` of one record (registry lookup, unit conversion, tags, masking).
fn enrich_record(c: &mut Criterion) {
    let registry = registry();
    let mut group = c.benchmark_group("enricher/enrich");
    group.throughput(Throughput::Elements(1));
    for (name, t) in [
        ("simulator_meter", simulator_meter()),
        ("tags_conversion_pii", tagged_meter()),
    ] {
        let record = enrich(t.clone(), &registry, true)
            .expect("enriched")
            .record
            .expect("record");
        assert!(record.readings.iter().all(|r| r.metric != "location"));
        group.bench_function(name, |b| {
            b.iter_batched(
                || t.clone(),
                |t| {
                    drop(black_box(
                        enrich(black_box(t), &registry, true).expect("enriched"),
                    ))
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// Hot path: the enricher stage's CPU work per message: Avro decode, enrich, Avro encode.
fn enricher_stage_cpu(c: &mut Criterion) {
    let registry = registry();
    let input = Codec::<Telemetry>::latest().expect("codec");
    let output = Codec::<EnrichedTelemetry>::latest().expect("codec");
    let bytes = input.encode(&simulator_meter()).expect("encode");
    let mut group = c.benchmark_group("enricher/stage_cpu");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_enrich_encode", |b| {
        b.iter(|| {
            let t = input.decode(black_box(&bytes)).expect("decode");
            let e = enrich(t, &registry, true).expect("enriched");
            output.encode(&e.record.expect("record")).expect("encode")
        })
    });
    group.finish();
}

criterion_group!(benches, enrich_record, enricher_stage_cpu);
criterion_main!(benches);
