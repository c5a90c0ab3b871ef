use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

use super::*;

const NOW: i64 = 1_800_000_000_000;

const REGISTRY: &str = r#"
[profiles.meter]
metrics = { energy = { unit = "Wh", min = 0.0, max = 1e12, cumulative = true }, power = { unit = "W", min = 0.0, max = 100000.0 } }

[[devices]]
tenant = "acme"
id = "m-1"
profile = "meter"
"#;

fn envelope(payload: Vec<u8>) -> RawEnvelope {
    RawEnvelope {
        envelope_id: "e".into(),
        tenant: "acme".into(),
        device_id: "m-1".into(),
        kind: "telemetry".into(),
        mqtt_topic: "iot/acme/m-1/telemetry".into(),
        content_type: None,
        payload,
        received_at: NOW,
        client_identity: None,
        bridge_id: "b".into(),
        redelivered: false,
        user_properties: HashMap::new(),
    }
}

fn good() -> serde_json::Value {
    json!({
        "msgId": "msg-1", "deviceId": "m-1", "seqNo": 7, "producedAt": NOW - 1000, "schemaVersion": 1,
        "readings": [{"metric": "energy", "value": 1.5, "unit": "kWh"}, {"metric": "power", "value": 300}]
    })
}

fn run(v: &serde_json::Value) -> Result<Telemetry, Rejection> {
    let registry = Registry::parse(REGISTRY, Path::new("r.toml")).expect("registry");
    validate(
        &envelope(serde_json::to_vec(v).expect("json")),
        &Rules::default(),
        Some(&registry),
        NOW,
    )
}

fn reason(v: serde_json::Value) -> &'static str {
    run(&v).expect_err("must be rejected").reason
}

fn with(field: &str, value: serde_json::Value) -> serde_json::Value {
    let mut v = good();
    v[field] = value;
    v
}

fn without(field: &str) -> serde_json::Value {
    let mut v = good();
    v.as_object_mut().expect("object").remove(field);
    v
}

#[test]
fn valid_json_becomes_canonical_telemetry() {
    let t = run(&good()).expect("valid");
    assert_eq!(t.header.seq_no, 7);
    assert_eq!(t.header.msg_id, "msg-1");
    assert_eq!(t.header.received_at, NOW);
    assert_eq!(t.readings.len(), 2);
    assert_eq!(
        t.readings[0].unit.as_deref(),
        Some("kWh"),
        "parser keeps device units; the enricher converts"
    );
}

#[test]
fn valid_cbor_gives_the_same_record() {
    let mut cbor = Vec::new();
    ciborium::into_writer(&good(), &mut cbor).expect("cbor");
    let mut env = envelope(cbor);
    env.content_type = Some("application/cbor".into());
    let registry = Registry::parse(REGISTRY, Path::new("r.toml")).expect("registry");
    let from_cbor = validate(&env, &Rules::default(), Some(&registry), NOW).expect("cbor valid");
    assert_eq!(from_cbor, run(&good()).expect("json valid"));
}

#[test]
fn header_rules() {
    assert_eq!(reason(without("msgId")), "missing_field");
    assert_eq!(reason(with("msgId", json!(5))), "bad_field_type");
    assert_eq!(reason(without("seqNo")), "missing_field");
    assert_eq!(reason(with("seqNo", json!(-1))), "bad_seq_no");
    assert_eq!(reason(with("seqNo", json!(1.5))), "bad_seq_no");
    assert_eq!(reason(with("seqNo", json!("7"))), "bad_seq_no");
    assert_eq!(
        reason(with("producedAt", json!("yesterday"))),
        "bad_field_type"
    );
    assert_eq!(
        reason(with("producedAt", json!(NOW + 301_000))),
        "produced_in_future"
    );
    assert!(
        run(&with("producedAt", json!(NOW + 299_000))).is_ok(),
        "within clock skew"
    );
    assert_eq!(
        reason(with("producedAt", json!(NOW - 181 * 24 * 3600 * 1000))),
        "too_old"
    );
    assert_eq!(reason(with("deviceId", json!("m-2"))), "device_mismatch");
    assert_eq!(
        reason(with("schemaVersion", json!(9))),
        "unsupported_payload_version"
    );
}

#[test]
fn reading_rules() {
    assert_eq!(reason(without("readings")), "missing_field");
    assert_eq!(reason(with("readings", json!({}))), "bad_field_type");
    assert_eq!(
        reason(with("readings", json!([{"metric": "energy"}]))),
        "missing_field"
    );
    assert_eq!(
        reason(with(
            "readings",
            json!([{"metric": "energy", "value": "x"}])
        )),
        "bad_field_type"
    );
    assert_eq!(
        reason(with("readings", json!([{"metric": "colour", "value": 1}]))),
        "unknown_metric"
    );
    assert_eq!(
        reason(with("readings", json!([{"metric": "power", "value": -5}]))),
        "out_of_range"
    );
    assert_eq!(
        reason(with(
            "readings",
            json!([{"metric": "power", "value": 200, "unit": "kW"}])
        )),
        "out_of_range"
    );
    assert_eq!(
        reason(with(
            "readings",
            json!([{"metric": "power", "value": 2, "unit": "Cel"}])
        )),
        "bad_unit"
    );
    let many: Vec<_> = (0..300)
        .map(|_| json!({"metric": "power", "value": 1}))
        .collect();
    assert_eq!(reason(with("readings", json!(many))), "too_many_readings");
}

#[test]
fn envelope_rules() {
    let registry = Registry::parse(REGISTRY, Path::new("r.toml")).expect("registry");
    let rules = Rules::default();
    let check = |env: RawEnvelope| {
        validate(&env, &rules, Some(&registry), NOW)
            .expect_err("reject")
            .reason
    };

    let mut env = envelope(serde_json::to_vec(&good()).expect("json"));
    env.device_id.clear();
    assert_eq!(check(env), "bad_topic");

    let mut env = envelope(serde_json::to_vec(&good()).expect("json"));
    env.kind = "config".into();
    assert_eq!(check(env), "unknown_kind");

    assert_eq!(check(envelope(vec![b' '; 70 * 1024])), "payload_too_large");
    assert_eq!(check(envelope(b"not json".to_vec())), "malformed_payload");

    let mut env = envelope(b"{}".to_vec());
    env.content_type = Some("text/csv".into());
    assert_eq!(check(env), "unsupported_content_type");
}

#[test]
fn rejections_carry_identity() {
    let r = run(&with("seqNo", json!(-3))).expect_err("reject");
    assert_eq!(r.tenant.as_deref(), Some("acme"));
    assert_eq!(r.device_id.as_deref(), Some("m-1"));
    assert!(!r.transient);
}

#[test]
fn heartbeats_need_no_readings_and_unknown_devices_pass_to_the_enricher() {
    let registry = Registry::parse(REGISTRY, Path::new("r.toml")).expect("registry");
    let mut env = envelope(serde_json::to_vec(&without("readings")).expect("json"));
    env.kind = "heartbeat".into();
    assert!(validate(&env, &Rules::default(), Some(&registry), NOW)
        .expect("heartbeat")
        .readings
        .is_empty());

    let mut v = with("deviceId", json!("stranger"));
    v["readings"] = json!([{"metric": "anything", "value": 1}]);
    let mut env = envelope(serde_json::to_vec(&v).expect("json"));
    env.device_id = "stranger".into();
    assert!(validate(&env, &Rules::default(), Some(&registry), NOW).is_ok());
}

#[test]
fn a_client_identity_must_name_the_topics_tenant_and_device() {
    let registry = Registry::parse(REGISTRY, Path::new("r.toml")).expect("registry");
    let check = |identity: Option<&str>| {
        let mut env = envelope(serde_json::to_vec(&good()).expect("json"));
        env.client_identity = identity.map(str::to_string);
        validate(&env, &Rules::default(), Some(&registry), NOW)
    };
    for accepted in [None, Some(""), Some("acme/m-1")] {
        assert!(check(accepted).is_ok(), "{accepted:?}");
    }
    for refused in ["acme/m-2", "other/m-1", "acme", "acme/m-1/extra", "cn=m-1"] {
        let r = check(Some(refused)).expect_err(refused);
        assert_eq!(r.reason, "identity_mismatch", "{refused}");
        // The dead letter is filed under the topic's tenant and device.
        assert_eq!(r.tenant.as_deref(), Some("acme"));
        assert_eq!(r.device_id.as_deref(), Some("m-1"));
    }
}
