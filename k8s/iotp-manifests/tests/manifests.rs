//! The overlays and the Compose files as typed objects, cross-referenced; and that each check
//! fails when a manifest loses a setting (the mutations below).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use iotp_manifests::checks::{launch_problems, overlay_problems};
use iotp_manifests::launch::{from_overlay, ExternalSecrets, PROD_SECRETS};
use iotp_manifests::objects::{load, render, Object};
use iotp_manifests::{compose, root};

fn overlay(name: &str) -> Vec<Object> {
    render(&root().join("k8s/overlays").join(name)).expect("kubectl kustomize")
}

fn problems(label: &str, objects: &[Object], external: ExternalSecrets) -> Vec<String> {
    overlay_problems(objects, &from_overlay(label, objects, external), external)
}

#[test]
fn dev_and_prod_overlays_load_typed_and_cross_reference() {
    for (name, external) in [("dev", &[][..]), ("prod", PROD_SECRETS)] {
        let objects = overlay(name);
        let scaled = objects
            .iter()
            .filter(|o| matches!(o, Object::ScaledObject(_)))
            .count();
        assert_eq!(
            scaled, 6,
            "{name}: ScaledObjects for mqtt-bridge, parser, enricher, upserter, aggregator, dlq-handler"
        );
        assert!(objects
            .iter()
            .any(|o| matches!(o, Object::TriggerAuthentication(_))));
        let p = problems(name, &objects, external);
        assert!(p.is_empty(), "{name}:\n  {}", p.join("\n  "));
    }
}

#[test]
fn compose_with_mongodb_and_with_the_embedded_store_cross_reference() {
    let root = root();
    let vars =
        compose::env_file(&std::fs::read_to_string(root.join(".env.example")).unwrap()).unwrap();
    for files in [
        &["docker-compose.yml"][..],
        &["docker-compose.yml", "docker-compose.embedded.yml"],
    ] {
        let model = compose::load(&root, files).unwrap();
        let launches = compose::launches("compose", &model, &vars, &root).unwrap();
        assert!(
            launches.len() >= 10,
            "{files:?}: {} services",
            launches.len()
        );
        let p = launch_problems(&launches);
        assert!(p.is_empty(), "{files:?}:\n  {}", p.join("\n  "));
    }
}

/// Applies `edit` to the rendered dev overlay's YAML and returns the problems found.
fn dev_problems_after(edit: impl Fn(&str) -> String) -> Vec<String> {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("k8s/overlays/dev"))
        .output()
        .unwrap();
    let yaml = String::from_utf8(out.stdout).unwrap();
    let edited = edit(&yaml);
    assert!(edited != yaml, "the mutation changed nothing");
    let objects = load(&edited).unwrap();
    problems("dev", &objects, &[])
}

#[test]
fn a_scaled_object_on_another_group_or_topic_than_the_service_uses_is_found() {
    let p = dev_problems_after(|y| {
        y.replacen(
            "consumerGroup: iotp-enricher",
            "consumerGroup: iotp-enrich",
            1,
        )
    });
    assert!(
        p.iter()
            .any(|p| p.contains("ScaledObject/enricher") && p.contains("consumerGroup")),
        "{p:?}"
    );
    let p = dev_problems_after(|y| y.replacen("topic: iotp.enriched", "topic: iotp.validated", 1));
    assert!(
        p.iter().any(|p| p.contains("topic \"iotp.validated\"")),
        "{p:?}"
    );
}

#[test]
fn a_bridge_scaler_on_a_metric_the_bridge_does_not_export_is_found() {
    let p = dev_problems_after(|y| {
        y.replacen(
            "max(iotp_mqtt_broker_stored_messages",
            "max(iotp_mqtt_broker_queued_messages",
            1,
        )
    });
    assert!(
        p.iter()
            .any(|p| p.contains("ScaledObject/mqtt-bridge") && p.contains("prometheus trigger")),
        "{p:?}"
    );
}

#[test]
fn a_secret_key_or_mounted_file_the_service_needs_but_the_overlay_lacks_is_found() {
    // The MongoDB URI's Secret key renamed: the file IOTP_FILE__STORE__MONGODB_URI names is gone.
    let p = dev_problems_after(|y| {
        y.replacen(
            "  uri: |\n    bW9uZ29kYjov",
            "  url: |\n    bW9uZ29kYjov",
            1,
        )
    });
    assert!(
        p.iter()
            .any(|p| p.contains("IOTP_FILE__STORE__MONGODB_URI") && p.contains("nothing mounts")),
        "{p:?}"
    );
    // A ConfigMap key the services read through configMapKeyRef.
    let p = dev_problems_after(|y| {
        y.replacen(
            "kafka-bootstrap: kafka.iotp.svc:9092",
            "kafka-brokers: kafka.iotp.svc:9092",
            1,
        )
    });
    assert!(
        p.iter()
            .any(|p| p.contains("IOTP__KAFKA__BROKERS refers to nothing")),
        "{p:?}"
    );
}

#[test]
fn a_dead_letter_api_off_loopback_without_its_token_file_is_found() {
    // The variable gone: the API on 0.0.0.0 would have no token.
    let p = dev_problems_after(|y| {
        y.replacen(
            "name: IOTP__API_TOKEN_FILE",
            "name: IOTP__API_TOKEN_PATH",
            1,
        )
    });
    assert!(
        p.iter()
            .any(|p| p.contains("dlq-handler") && p.contains("without IOTP__API_TOKEN_FILE")),
        "{p:?}"
    );
    // The Secret's key renamed: the file the variable names is not mounted.
    let p = dev_problems_after(|y| y.replacen("\n  token: ", "\n  tokn: ", 1));
    assert!(
        p.iter()
            .any(|p| p.contains("IOTP__API_TOKEN_FILE") && p.contains("nothing mounts")),
        "{p:?}"
    );
}

#[test]
fn a_probe_or_service_on_a_port_the_service_does_not_listen_on_is_found() {
    let p = dev_problems_after(|y| y.replacen("value: 0.0.0.0:9200", "value: 0.0.0.0:9300", 1));
    assert!(
        p.iter()
            .any(|p| p.contains("Service/dlq-api") && p.contains("9200")),
        "{p:?}"
    );
    let p = dev_problems_after(|y| y.replacen("path: /readyz", "path: /healthz", 1));
    assert!(p.iter().any(|p| p.contains("readiness check")), "{p:?}");
}

#[test]
fn a_field_the_typed_object_does_not_have_is_refused() {
    let typo = "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata: {name: x}\nspec:\n  scaleTargetRef: {name: x}\n  maxReplicas: 3\n  triggers: []\n";
    let err = load(typo)
        .expect_err("maxReplicas is not a ScaledObject field")
        .to_string();
    assert!(err.contains("ScaledObject/x"), "{err}");
    let typo = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  selectr: {a: b}\n";
    let err = format!(
        "{:#}",
        load(typo).expect_err("selectr is not a Service field")
    );
    assert!(err.contains(".spec.selectr"), "{err}");
}

#[test]
fn a_registry_mounted_with_sub_path_which_never_reloads_is_found() {
    let p = dev_problems_after(|y| {
        y.replacen(
            "        - mountPath: /etc/iotp/registry\n          name: registry\n",
            "        - mountPath: /etc/iotp/registry/registry.toml\n          name: registry\n          subPath: registry.toml\n",
            1,
        )
    });
    assert!(p.iter().any(|p| p.contains("subPath")), "{p:?}");
}

/// The prod overlay's PodMonitor (k8s/monitoring): every service scraped on its admin port,
/// with the labels the alert rules select on; a scrape of another port or without the `job`
/// label is found.
#[test]
fn a_pod_monitor_missing_a_service_port_or_the_rules_labels_is_found() {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("k8s/overlays/prod"))
        .output()
        .unwrap();
    let yaml = String::from_utf8(out.stdout).unwrap();
    let objects = load(&yaml).unwrap();
    assert!(objects.iter().any(|o| matches!(o, Object::PodMonitor(_))));
    assert!(objects
        .iter()
        .any(|o| matches!(o, Object::PrometheusRule(_))));
    let prod_problems_after = |from: &str, to: &str| {
        let edited = yaml.replacen(from, to, 1);
        assert!(edited != yaml, "the mutation changed nothing");
        problems("prod", &load(&edited).unwrap(), PROD_SECRETS)
    };
    let p = prod_problems_after(
        "    path: /metrics\n    port: admin\n",
        "    path: /metrics\n    port: metrics\n",
    );
    assert!(
        p.iter()
            .any(|p| p.contains("PodMonitor/iotp") && p.contains("does not name")),
        "{p:?}"
    );
    let p = prod_problems_after("    - replacement: iotp\n      targetLabel: job\n", "");
    assert!(p.iter().any(|p| p.contains("does not set job")), "{p:?}");
}
