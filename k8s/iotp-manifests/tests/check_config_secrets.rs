//! Secrets never printed: every service binary (each `services/*/src/main.rs`) runs
//! `--check-config` with passwords set through the environment (`IOTP__…` and `IOTP_FILE__…`),
//! and none of them may appear in what it prints, on stdout or stderr; the hosts, users and
//! other settings around them must. Also when the configuration is refused: the error names
//! the setting, not its value. Needs the service binaries (`cargo test --workspace` builds
//! them; so does `cargo build --workspace --bins`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use iotp_manifests::root;

/// Every secret below; none may be printed.
const SECRETS: [&str; 10] = [
    "amqp-pw-S3CRET",
    "mongo-pw-S3CRET",
    "mongo-user-pw-S3CRET",
    "mongo-tls-S3CRET",
    "kafka-sasl-S3CRET",
    "kafka-key-S3CRET",
    "kafka-keystore-S3CRET",
    "kafka-pem-S3CRET",
    "kafka-oauth-S3CRET",
    "mqtt-pw-S3CRET",
];

fn bin_dir() -> PathBuf {
    // target/debug/deps/check_config_secrets-… → target/debug
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The service binaries: the packages under `services/` with a `src/main.rs`.
fn services() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root().join("services"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("src/main.rs").exists())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// The environment of `service`: its own keys only (unknown keys are refused), every secret
/// it can take, and recognisable hosts around them.
fn environment(service: &str, scratch: &std::path::Path) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: &str| env.insert(k.to_string(), v.to_string());
    // Files the settings name: a secret's file (its contents never printed, its path is) and
    // certificates (checked to exist at start).
    let secret_file = |name: &str, text: &str| {
        let path = scratch.join(format!("{service}-{name}"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let sasl_password = secret_file("kafka-sasl-password", "kafka-sasl-S3CRET\n");
    let ca = secret_file("ca.pem", "");
    let cert = secret_file("client.pem", "");
    let key = secret_file("client.key", "");
    set("IOTP__KAFKA__BROKERS", "kafka-0.example:9092");
    set("IOTP__KAFKA__SECURITY_PROTOCOL", "sasl_ssl");
    set("IOTP__KAFKA__SSL_CA_LOCATION", &ca);
    set("IOTP__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512");
    set("IOTP__KAFKA__SASL_USERNAME", "pipeline-user");
    set("IOTP__KAFKA__SASL_PASSWORD_FILE", &sasl_password);
    set(
        "IOTP__KAFKA__PROPERTIES",
        r#"{"ssl.key.password"="kafka-key-S3CRET", "ssl.keystore.password"="kafka-keystore-S3CRET", "ssl.key.pem"="-----BEGIN PRIVATE KEY-----kafka-pem-S3CRET", "sasl.oauthbearer.client.secret"="kafka-oauth-S3CRET"}"#,
    );
    let amqp = "amqps://iotp:amqp-pw-S3CRET@rabbitmq.example:5671/%2f";
    let amqp_tls = |section: &str, set: &mut dyn FnMut(&str, &str) -> Option<String>| {
        set(&format!("{section}__CA_FILE"), &ca);
        set(&format!("{section}__CERT_FILE"), &cert);
        set(&format!("{section}__KEY_FILE"), &key);
    };
    match service {
        "iotp-mqtt-bridge" => {
            set("IOTP__DEAD_LETTER__AMQP_URI", amqp);
            amqp_tls("IOTP__DEAD_LETTER__AMQP_TLS", &mut set);
            set("IOTP__MQTT__IDENTITY", "acl");
            set("IOTP__MQTT__HOST", "mosquitto.example");
            set("IOTP__MQTT__USERNAME", "bridge-user");
            set("IOTP__MQTT__PASSWORD", "mqtt-pw-S3CRET");
        }
        "iotp-dlq-handler" => {
            set("IOTP__AMQP_URI", amqp);
            amqp_tls("IOTP__AMQP_TLS", &mut set);
        }
        _ => {
            set("IOTP__IO__DEAD_LETTER__AMQP_URI", amqp);
            amqp_tls("IOTP__IO__DEAD_LETTER__AMQP_TLS", &mut set);
        }
    }
    if matches!(service, "iotp-parser" | "iotp-enricher" | "iotp-aggregator") {
        let registry = root().join("k8s/base/registry.toml");
        set("IOTP__REGISTRY_FILE", &registry.display().to_string());
    }
    if matches!(
        service,
        "iotp-enricher" | "iotp-upserter" | "iotp-aggregator" | "iotp-dlq-handler"
    ) {
        // Through a file, as the manifests give it.
        let file = scratch.join(format!("{service}-mongodb-uri"));
        std::fs::write(
            &file,
            "mongodb://iotp:mongo-pw-S3CRET@mongo-0.example:27017,mongo-1.example:27017/iotp\
             ?replicaSet=rs0&tlsCertificateKeyFilePassword=mongo-tls-S3CRET\n",
        )
        .unwrap();
        set("IOTP_FILE__STORE__MONGODB_URI", &file.display().to_string());
        let password = secret_file("mongodb-password", "mongo-user-pw-S3CRET\n");
        set("IOTP__STORE__MONGODB_USER", "iotp-service-user");
        set("IOTP__STORE__MONGODB_PASSWORD_FILE", &password);
        set("IOTP__STORE__MONGODB_AUTH_SOURCE", "admin");
        set("IOTP__STORE__MONGODB_TLS", "true");
        set("IOTP__STORE__MONGODB_TLS_CA_FILE", &ca);
    }
    env
}

fn check_config(service: &str, env: &BTreeMap<String, String>) -> (Output, String) {
    let bin = bin_dir().join(service);
    assert!(
        bin.exists(),
        "no {} : build the service binaries first (`cargo build --workspace --bins`; \
         `cargo test --workspace` does)",
        bin.display()
    );
    let out = Command::new(&bin)
        .arg("--check-config")
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    let printed = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, printed)
}

fn leaked(printed: &str) -> Vec<&'static str> {
    SECRETS
        .iter()
        .copied()
        .filter(|s| printed.contains(s))
        .collect()
}

#[test]
fn no_service_prints_a_secret_given_through_the_environment() {
    let services = services();
    assert_eq!(services.len(), 6, "the six services: {services:?}");
    let scratch = std::env::temp_dir().join(format!("iotp-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    for service in &services {
        let env = environment(service, &scratch);
        let (out, printed) = check_config(service, &env);
        assert!(
            out.status.success(),
            "{service} refused its configuration: {printed}"
        );
        assert_eq!(
            leaked(&printed),
            Vec::<&str>::new(),
            "{service}:\n{printed}"
        );
        let config: toml::Table = String::from_utf8_lossy(&out.stdout)
            .parse()
            .unwrap_or_else(|e| panic!("{service}: not TOML ({e}):\n{printed}"));
        // The rest stays readable: hosts, users, the non-secret properties.
        let mut visible = vec![
            "kafka-0.example:9092",
            "amqps://iotp:***@rabbitmq.example:5671/%2f",
            "sasl_username = \"pipeline-user\"",
            "security_protocol = \"sasl_ssl\"",
            "\"ssl.key.password\" = \"***\"",
            // Paths of secret files and certificates print; their contents never do.
            "kafka-sasl-password",
            "client.pem",
            "client.key",
        ];
        if env.contains_key("IOTP_FILE__STORE__MONGODB_URI") {
            visible.push("mongodb://iotp:***@mongo-0.example:27017,mongo-1.example:27017/iotp");
            visible.push("tlsCertificateKeyFilePassword=***");
            visible.push("mongodb_user = \"iotp-service-user\"");
            visible.push("mongodb-password");
        }
        if service == "iotp-mqtt-bridge" {
            visible.extend(["mosquitto.example", "bridge-user", "password = \"***\""]);
        }
        for v in visible {
            assert!(
                printed.contains(v),
                "{service}: {v:?} not printed:\n{printed}"
            );
        }
        assert!(config.contains_key("kafka"), "{service}: {config:?}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn a_refused_configuration_does_not_quote_the_secret_it_refused() {
    let scratch = std::env::temp_dir().join(format!("iotp-refused-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    for service in &services() {
        let mut env = environment(service, &scratch);
        // The properties as one string instead of a table: figment quotes such a value.
        env.insert(
            "IOTP__KAFKA__PROPERTIES".into(),
            "sasl.password=kafka-sasl-S3CRET".into(),
        );
        let (out, printed) = check_config(service, &env);
        assert_eq!(out.status.code(), Some(2), "{service}: refused:\n{printed}");
        assert_eq!(
            leaked(&printed),
            Vec::<&str>::new(),
            "{service}:\n{printed}"
        );
        assert!(
            printed.contains("PROPERTIES"),
            "{service}: the error names the setting:\n{printed}"
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
