//! The rules a device message must pass to become canonical telemetry. Each failure is a
//! rejection with a reason code; none is silently fixed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use iotp_contract::devices::{unit_conversion, Registry};
use iotp_contract::{Header, RawEnvelope, Reading, Telemetry};
use iotp_core::stage::Rejection;

use crate::payload::{self, Element, Readings, Scalar};

/// Validation limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    /// Largest payload accepted, bytes.
    pub max_payload_bytes: usize,
    /// How far in the future a device clock may be.
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Oldest reading accepted: the raw retention tier (older would be expired on arrival).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Message kinds accepted from the topic.
    pub kinds: Vec<String>,
    /// Most readings per message.
    pub max_readings: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            clock_skew: Duration::from_secs(300),
            max_age: Duration::from_secs(180 * 24 * 3600),
            kinds: vec!["telemetry".into(), "heartbeat".into()],
            max_readings: 256,
        }
    }
}

/// Envelope + payload → canonical telemetry, or why not.
pub fn validate(
    env: &RawEnvelope,
    rules: &Rules,
    registry: Option<&Registry>,
    now_ms: i64,
) -> Result<Telemetry, Rejection> {
    let with_identity = |mut r: Rejection| {
        r.tenant = Some(env.tenant.clone()).filter(|t| !t.is_empty());
        r.device_id = Some(env.device_id.clone()).filter(|d| !d.is_empty());
        r
    };
    check(env, rules, registry, now_ms).map_err(with_identity)
}

fn check(
    env: &RawEnvelope,
    rules: &Rules,
    registry: Option<&Registry>,
    now_ms: i64,
) -> Result<Telemetry, Rejection> {
    if env.tenant.is_empty() || env.device_id.is_empty() {
        return Err(Rejection::permanent(
            "bad_topic",
            format!(
                "topic {:?} is not iot/{{tenant}}/{{deviceId}}/{{kind}}",
                env.mqtt_topic
            ),
        ));
    }
    // The identity the bridge recorded as authenticated (`clientIdentity`, `tenant/deviceId`)
    // must name the tenant and device the record is filed under; empty means none was given.
    if let Some(identity) = env.client_identity.as_deref().filter(|i| !i.is_empty()) {
        let matches = identity
            .split_once('/')
            .is_some_and(|(t, d)| t == env.tenant && d == env.device_id);
        if !matches {
            return Err(Rejection::permanent(
                "identity_mismatch",
                format!(
                    "authenticated identity {identity:?} is not the topic's {}/{}",
                    env.tenant, env.device_id
                ),
            ));
        }
    }
    if !rules.kinds.iter().any(|k| k == &env.kind) {
        return Err(Rejection::permanent(
            "unknown_kind",
            format!(
                "message kind {:?} is not one of {:?}",
                env.kind, rules.kinds
            ),
        ));
    }
    if env.payload.len() > rules.max_payload_bytes {
        return Err(Rejection::permanent(
            "payload_too_large",
            format!(
                "payload is {} bytes, limit {}",
                env.payload.len(),
                rules.max_payload_bytes
            ),
        ));
    }
    let format = payload::detect(env.content_type.as_deref(), &env.payload)?;
    let fields = payload::decode(format, &env.payload)?;

    let msg_id = string(fields.msg_id, "msgId")?;
    let device_id = string(fields.device_id, "deviceId")?;
    if device_id != env.device_id {
        return Err(Rejection::permanent(
            "device_mismatch",
            format!(
                "payload deviceId {device_id:?} differs from topic device {:?}",
                env.device_id
            ),
        ));
    }
    let seq_no = match &fields.seq_no {
        None => return Err(missing("seqNo")),
        Some(v) => v.as_i64().filter(|n| *n >= 0).ok_or_else(|| {
            Rejection::permanent(
                "bad_seq_no",
                format!("seqNo {v} is not a non-negative integer"),
            )
        })?,
    };
    let produced_at = integer(fields.produced_at.as_ref(), "producedAt")?;
    // The device clock is judged against the bridge's receive time, so a replay later is
    // judged the same way.
    if produced_at > env.received_at + rules.clock_skew.as_millis() as i64 {
        return Err(Rejection::permanent(
            "produced_in_future",
            format!(
                "producedAt is {} ms ahead of the bridge clock (skew allowed {:?})",
                produced_at - env.received_at,
                rules.clock_skew
            ),
        ));
    }
    if produced_at < now_ms - rules.max_age.as_millis() as i64 {
        return Err(Rejection::permanent(
            "too_old",
            format!(
                "producedAt is older than the raw retention ({:?})",
                rules.max_age
            ),
        ));
    }
    let schema_version = integer(fields.schema_version.as_ref(), "schemaVersion")?;
    if schema_version != 1 {
        return Err(Rejection::permanent(
            "unsupported_payload_version",
            format!("payload schemaVersion {schema_version} is not supported (1)"),
        ));
    }
    let readings = readings(fields.readings, env.kind == "heartbeat", rules)?;
    if let Some((_, profile)) = registry.and_then(|r| r.device(&env.tenant, &env.device_id)) {
        for r in &readings {
            let Some(spec) = profile.metrics.get(&r.metric) else {
                return Err(Rejection::permanent(
                    "unknown_metric",
                    format!("metric {:?} is not in the device profile", r.metric),
                ));
            };
            let unit = r.unit.as_deref().unwrap_or(&spec.unit);
            let Some((factor, offset)) = unit_conversion(unit, &spec.unit) else {
                return Err(Rejection::permanent(
                    "bad_unit",
                    format!(
                        "metric {:?}: unit {unit:?} cannot convert to {:?}",
                        r.metric, spec.unit
                    ),
                ));
            };
            let value = r.value * factor + offset;
            if !(spec.min..=spec.max).contains(&value) {
                return Err(Rejection::permanent(
                    "out_of_range",
                    format!(
                        "metric {:?} = {value} {} outside [{}, {}]",
                        r.metric, spec.unit, spec.min, spec.max
                    ),
                ));
            }
        }
    }
    let firmware_version = match fields.firmware {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Str(s)) => Some(s.into_owned()),
        Some(_) => return Err(bad_type("firmware", "a string")),
    };
    Ok(Telemetry {
        header: Header {
            msg_id,
            tenant: env.tenant.clone(),
            device_id,
            seq_no,
            produced_at,
            received_at: env.received_at,
            schema_version: schema_version as i32,
        },
        kind: env.kind.clone(),
        readings,
        firmware_version,
    })
}

fn missing(field: &str) -> Rejection {
    Rejection::permanent("missing_field", format!("{field} is missing"))
}

fn bad_type(field: &str, expected: &str) -> Rejection {
    Rejection::permanent("bad_field_type", format!("{field} is not {expected}"))
}

fn string(field: Option<Scalar<'_>>, name: &str) -> Result<String, Rejection> {
    match field {
        None | Some(Scalar::Null) => Err(missing(name)),
        Some(Scalar::Str(s)) if !s.is_empty() => Ok(s.into_owned()),
        Some(_) => Err(bad_type(name, "a non-empty string")),
    }
}

fn integer(field: Option<&Scalar<'_>>, name: &str) -> Result<i64, Rejection> {
    match field {
        None | Some(Scalar::Null) => Err(missing(name)),
        Some(v) => v.as_i64().ok_or_else(|| bad_type(name, "an integer")),
    }
}

fn readings(
    field: Option<Readings<'_>>,
    heartbeat: bool,
    rules: &Rules,
) -> Result<Vec<Reading>, Rejection> {
    let list = match field {
        None if heartbeat => return Ok(Vec::new()),
        None => return Err(missing("readings")),
        Some(Readings::List(list)) => list,
        Some(Readings::NotArray) => return Err(bad_type("readings", "an array")),
    };
    if list.len() > rules.max_readings {
        return Err(Rejection::permanent(
            "too_many_readings",
            format!("{} readings, limit {}", list.len(), rules.max_readings),
        ));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let Element::Reading(obj) = r else {
                return Err(bad_type(&format!("readings[{i}]"), "an object"));
            };
            let metric = string(obj.metric, "metric").map_err(|mut e| {
                e.error = format!("readings[{i}].{}", e.error);
                e
            })?;
            let value = match &obj.value {
                None | Some(Scalar::Null) => return Err(missing(&format!("readings[{i}].value"))),
                Some(v) => v
                    .as_f64()
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| bad_type(&format!("readings[{i}].value"), "a finite number"))?,
            };
            let unit = match obj.unit {
                None | Some(Scalar::Null) => None,
                Some(Scalar::Str(u)) => Some(u.into_owned()),
                Some(_) => return Err(bad_type(&format!("readings[{i}].unit"), "a string")),
            };
            Ok(Reading {
                metric,
                value,
                unit,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
