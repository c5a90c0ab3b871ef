use std::collections::BTreeMap;

use super::*;

#[test]
fn a_uri_keeps_scheme_user_and_hosts_and_loses_its_password() {
    let cases = [
        (
            "amqp://iotp:s3cret@rabbitmq:5672/%2f",
            "amqp://iotp:***@rabbitmq:5672/%2f",
        ),
        (
            "mongodb://iotp:pw@db-0:27017,db-1:27017/iotp?replicaSet=rs0&authSource=admin",
            "mongodb://iotp:***@db-0:27017,db-1:27017/iotp?replicaSet=rs0&authSource=admin",
        ),
        // Unencoded '/', '@' and '?' in a password are hidden with it.
        ("amqp://u:p/a@ss?w@host/vh", "amqp://u:***@host/vh"),
        // A password-less user, or no user at all: nothing to hide.
        ("amqp://guest@host/", "amqp://guest@host/"),
        ("SASL_SSL://broker:9093", "SASL_SSL://broker:9093"),
        // A query parameter that names a secret.
        (
            "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=pw#frag",
            "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=***#frag",
        ),
        // Every URI of a text.
        (
            "primary amqp://a:one@h1/ then amqp://b:two@h2/",
            "primary amqp://a:***@h1/ then amqp://b:***@h2/",
        ),
        ("kafka:9092", "kafka:9092"),
    ];
    for (text, want) in cases {
        assert_eq!(uri(text), want, "{text}");
    }
    assert!(matches!(uri("kafka:9092"), Cow::Borrowed(_)));
}

#[test]
fn keys_that_name_a_secret() {
    for key in [
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "ssl.key.pem",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.assertion.private.key.pem",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "password",
        "MQTT_PASSWORD",
        "api_token",
        "ssl_key",
    ] {
        assert!(is_secret_key(key), "{key}");
    }
    for key in [
        "sasl.username",
        "sasl.mechanism",
        "ssl.key.location",
        "ssl.certificate.pem",
        "ssl.ca.location",
        "api_token_file",
        "sasl_password_file",
        "mongodb_password_file",
        "ssl.keystore.location",
        "sasl.oauthbearer.token.endpoint.url",
        "brokers",
        "amqp_uri",
    ] {
        assert!(!is_secret_key(key), "{key}");
    }
}

#[derive(Serialize)]
struct Kafka {
    brokers: String,
    properties: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Service {
    amqp_uri: String,
    prefetch: u16,
    kafka: Kafka,
    mqtt_password: Option<String>,
    mongodb_uris: Vec<String>,
}

fn service() -> Service {
    Service {
        amqp_uri: "amqp://iotp:amqp-pw-1@rabbitmq:5672/%2f".into(),
        prefetch: 100,
        kafka: Kafka {
            brokers: "kafka-0:9092".into(),
            properties: [
                ("sasl.password", "sasl-pw-2"),
                ("ssl.key.pem", "-----BEGIN PRIVATE KEY-----pem-3"),
                ("sasl.username", "pipeline"),
                ("security.protocol", "sasl_ssl"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        },
        mqtt_password: Some("mqtt-pw-4".into()),
        mongodb_uris: vec!["mongodb://iotp:mongo-pw-5@db/iotp".into()],
    }
}

const SECRETS: [&str; 5] = ["amqp-pw-1", "sasl-pw-2", "pem-3", "mqtt-pw-4", "mongo-pw-5"];

#[test]
fn printed_toml_hides_every_secret_and_keeps_the_rest_in_order() {
    let text = to_toml(&service()).expect("print");
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret} in\n{text}");
    }
    for visible in [
        "amqp://iotp:***@rabbitmq:5672/%2f",
        "kafka-0:9092",
        "\"sasl.password\" = \"***\"",
        "\"sasl.username\" = \"pipeline\"",
        "mqtt_password = \"***\"",
        "mongodb://iotp:***@db/iotp",
        "prefetch = 100",
    ] {
        assert!(text.contains(visible), "{visible} not in\n{text}");
    }
    // The same text toml writes, but for the secrets: fields in their declared order.
    let plain = toml::to_string_pretty(&service()).expect("plain");
    assert_eq!(text.lines().count(), plain.lines().count());
    let at = |t: &str, k: &str| t.find(k).expect("key");
    assert!(at(&text, "amqp_uri") < at(&text, "prefetch"));
    let back: toml::Table = text.parse().expect("still TOML");
    assert_eq!(back["prefetch"].as_integer(), Some(100));
}

#[test]
fn debug_hides_every_secret_and_nested_values_under_a_secret_key() {
    struct Wrapper(Service);
    impl fmt::Debug for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            debug("Service", &self.0, f)
        }
    }
    for text in [
        format!("{:?}", Wrapper(service())),
        format!("{:#?}", Wrapper(service())),
    ] {
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret} in\n{text}");
        }
        assert!(text.starts_with("Service {"), "{text}");
        assert!(
            text.contains("rabbitmq:5672") && text.contains("pipeline"),
            "{text}"
        );
    }

    #[derive(Serialize)]
    struct Nested {
        secrets: BTreeMap<String, Vec<String>>,
    }
    let nested = Nested {
        secrets: [("list".to_string(), vec!["nested-6".to_string()])].into(),
    };
    let text = to_toml(&nested).expect("print");
    assert!(
        !text.contains("nested-6") && text.contains(REDACTED),
        "{text}"
    );
}
