//! One record's enrichment: registry lookup, unit conversion, personal-data masking, and the
//! twin observation it yields.

use std::collections::HashMap;

use iotp_contract::devices::{unit_conversion, Registry};
use iotp_contract::{EnrichedTelemetry, Reading, Telemetry};
use iotp_core::stage::Rejection;
use iotp_store::Observation;

/// The result for one record.
#[derive(Debug)]
pub struct Enriched {
    /// The record to pass on (`None` for heartbeats).
    pub record: Option<EnrichedTelemetry>,
    /// What it tells the twin.
    pub observation: Observation,
}

/// Enrich `t`. `registry_readable` false means the registry source is failing: an unknown
/// device is then a transient failure (it may be known once the source is back), not a
/// quarantine.
pub fn enrich(
    t: Telemetry,
    registry: &Registry,
    registry_readable: bool,
) -> Result<Enriched, Rejection> {
    let identify = |mut r: Rejection| {
        r.tenant = Some(t.header.tenant.clone());
        r.device_id = Some(t.header.device_id.clone());
        r
    };
    let Some((device, profile)) = registry.device(&t.header.tenant, &t.header.device_id) else {
        return Err(identify(if registry_readable {
            Rejection::permanent(
                "unknown_device",
                format!(
                    "device {}/{} is not in the registry",
                    t.header.tenant, t.header.device_id
                ),
            )
        } else {
            Rejection::transient(
                "registry_unavailable",
                "device not in the cached registry and the registry source is unreadable",
            )
        }));
    };
    let mut readings = Vec::with_capacity(t.readings.len());
    let mut dropped = Vec::new();
    for r in &t.readings {
        if device.pii.iter().any(|p| p == &r.metric) {
            dropped.push(r.metric.clone());
            continue;
        }
        let Some(spec) = profile.metrics.get(&r.metric) else {
            return Err(identify(Rejection::permanent(
                "unknown_metric",
                format!("metric {:?} is not in profile {}", r.metric, device.profile),
            )));
        };
        let unit = r.unit.as_deref().unwrap_or(&spec.unit);
        let Some((factor, offset)) = unit_conversion(unit, &spec.unit) else {
            return Err(identify(Rejection::permanent(
                "bad_unit",
                format!(
                    "metric {:?}: unit {unit:?} cannot convert to {:?}",
                    r.metric, spec.unit
                ),
            )));
        };
        readings.push(Reading {
            metric: r.metric.clone(),
            value: r.value * factor + offset,
            unit: Some(spec.unit.clone()),
        });
    }
    let firmware = t
        .firmware_version
        .clone()
        .or_else(|| device.firmware.clone());
    let observation = Observation {
        tenant: t.header.tenant.clone(),
        device_id: t.header.device_id.clone(),
        seq_no: t.header.seq_no,
        produced_at: t.header.produced_at,
        readings: readings
            .iter()
            .map(|r| (r.metric.clone(), r.value, r.unit.clone()))
            .collect(),
        firmware: firmware.clone(),
        config_version: device.config_version.clone(),
        heartbeat_secs: profile.heartbeat_secs,
    };
    let record = (t.kind != "heartbeat").then(|| {
        let mut tags: HashMap<String, String> = device.tags.clone();
        if !dropped.is_empty() {
            tags.insert("pii_dropped".into(), dropped.join(","));
        }
        EnrichedTelemetry {
            header: t.header,
            kind: t.kind,
            readings,
            site: device.site.clone(),
            asset: device.asset.clone(),
            profile: device.profile.clone(),
            firmware_version: firmware,
            tags,
        }
    });
    Ok(Enriched {
        record,
        observation,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use iotp_contract::Header;

    use super::*;

    const REGISTRY: &str = r#"
[profiles.meter]
heartbeat_secs = 60
metrics = { energy = { unit = "Wh", min = 0.0, max = 1e12, cumulative = true }, temp = { unit = "Cel", min = -40.0, max = 120.0 }, location = { unit = "deg", min = -180.0, max = 180.0 } }

[[devices]]
tenant = "acme"
id = "m-1"
profile = "meter"
site = "plant-1"
asset = "line-3"
firmware = "1.0.0"
config_version = "cfg-7"
pii = ["location"]
tags = { building = "B2" }
"#;

    fn telemetry(device: &str, kind: &str, readings: Vec<Reading>) -> Telemetry {
        Telemetry {
            header: Header {
                msg_id: "m".into(),
                tenant: "acme".into(),
                device_id: device.into(),
                seq_no: 9,
                produced_at: 1000,
                received_at: 1001,
                schema_version: 1,
            },
            kind: kind.into(),
            readings,
            firmware_version: None,
        }
    }

    fn reading(metric: &str, value: f64, unit: Option<&str>) -> Reading {
        Reading {
            metric: metric.into(),
            value,
            unit: unit.map(String::from),
        }
    }

    fn registry() -> Registry {
        Registry::parse(REGISTRY, Path::new("r.toml")).expect("registry")
    }

    #[test]
    fn tags_converts_units_and_drops_personal_data() {
        let t = telemetry(
            "m-1",
            "telemetry",
            vec![
                reading("energy", 1.5, Some("kWh")),
                reading("temp", 212.0, Some("[degF]")),
                reading("location", 4.2, None),
            ],
        );
        let e = enrich(t, &registry(), true).expect("enriched");
        let r = e.record.expect("record");
        assert_eq!(r.site.as_deref(), Some("plant-1"));
        assert_eq!(r.asset.as_deref(), Some("line-3"));
        assert_eq!(r.profile, "meter");
        assert_eq!(r.firmware_version.as_deref(), Some("1.0.0"));
        assert_eq!(r.tags["building"], "B2");
        assert_eq!(r.tags["pii_dropped"], "location");
        assert_eq!(r.readings.len(), 2, "personal metric dropped");
        assert_eq!(
            (r.readings[0].value, r.readings[0].unit.as_deref()),
            (1500.0, Some("Wh"))
        );
        assert!((r.readings[1].value - 100.0).abs() < 1e-9);
        assert_eq!(e.observation.config_version.as_deref(), Some("cfg-7"));
        assert_eq!(e.observation.heartbeat_secs, Some(60));
        assert!(
            e.observation
                .readings
                .iter()
                .all(|(m, _, _)| m != "location"),
            "twin never sees personal data"
        );
    }

    #[test]
    fn unknown_device_is_quarantined_or_retried() {
        let t = telemetry("stranger", "telemetry", vec![]);
        let r = enrich(t.clone(), &registry(), true).expect_err("unknown");
        assert_eq!((r.reason, r.transient), ("unknown_device", false));
        assert_eq!(r.device_id.as_deref(), Some("stranger"));
        let r = enrich(t, &registry(), false).expect_err("registry down");
        assert_eq!((r.reason, r.transient), ("registry_unavailable", true));
    }

    #[test]
    fn heartbeat_updates_the_twin_only() {
        let e =
            enrich(telemetry("m-1", "heartbeat", vec![]), &registry(), true).expect("heartbeat");
        assert!(e.record.is_none());
        assert_eq!(e.observation.seq_no, 9);
    }
}
