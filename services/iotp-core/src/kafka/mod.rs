//! Kafka adapters: the client settings every service shares, the one producer path
//! ([`sink`]), the batch consumer ([`source`], which leaves its group on the way out:
//! `leave.rs`; its lag: `stats.rs`) and topic administration ([`admin`]).

pub mod admin;
mod bundling;
mod leave;
pub mod sink;
pub mod source;
mod stats;

pub use admin::{consumer_lag, count_carried, count_records, ensure_topics};
pub use sink::KafkaSink;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use serde::{Deserialize, Serialize};

/// Kafka connection and client settings. Its `Debug` (in `config.rs`) hides secret properties.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// How long the producer waits to fill a batch.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// How long the producer retries one record before reporting it failed (the runtime then
    /// retries it again, with backoff, without acknowledging upstream).
    #[serde(with = "humantime_serde")]
    pub message_timeout: Duration,
    /// Producer compression: none, lz4, zstd, snappy, gzip.
    pub compression: String,
    /// Produce requests in flight per broker connection
    /// (`max.in.flight.requests.per.connection`), 1 to 5: the idempotent producer keeps each
    /// partition's order up to 5. librdkafka sends one partition per produce request, so a
    /// batch bound for 12 partitions is 12 requests, and with 1 in flight they go one round
    /// trip after another.
    pub max_in_flight: u32,
    /// Longest a consumer's fetch waits for data (`fetch.wait.max.ms`): each hop can add this
    /// much latency when a partition is quiet. librdkafka's 500 ms made device→store p50 1.3 s
    /// over three hops in a paced run here. Tansu holds every fetch this long, data or not
    /// (README, "Tansu"): 10 ms instead of 20 took device→store p50 from 195–200 ms to
    /// 149–163 at 9,000 msgs/s, for about 8% more of Tansu's CPU and none of ours
    /// (docs/performance.md, session 23).
    #[serde(with = "humantime_serde")]
    pub fetch_wait: Duration,
    /// Most fetched-ahead data a consumer holds, KiB (`queued.max.messages.kbytes`): a bound
    /// on memory when the input topic has a backlog. librdkafka's 64 MiB put the enricher at
    /// 92 MiB RSS in the standard load test here, and 8 MiB still 84 MiB once the consumer
    /// no longer paused when it was full (`fetch.queue.backoff.ms` below); 2 MiB kept every
    /// stage's throughput (docs/performance.md, session 18).
    pub prefetch_kib: u32,
    /// Largest bundle the producer writes, bytes; 0 writes every record as a Kafka record of
    /// its own. With bundles on, the records of a batch bound for one partition travel as
    /// one Kafka record (`iotp_contract::bundle`, `schemas/bundle/v1.avsc`), and consumers
    /// hand its items to their stage one by one: librdkafka's per-record costs are paid per
    /// bundle. A record larger than this travels alone, as before. Consumers read both
    /// forms whatever this says. Lag (`iotp_consumer_lag`, KEDA's trigger) counts Kafka
    /// records, so a bundle of a full batch is many messages. 16 KiB by default: the
    /// unthrottled standard run cost 14.8–15.0 µs of our CPU per message with bundles and
    /// 15.9–16.9 without; 64 KiB cost the same CPU as 16 but put the aggregator at 58–70 MiB
    /// steady against 50–53 (docs/performance.md, session 22).
    pub bundle_max_bytes: usize,
    /// `security.protocol`: `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: String,
    /// CA certificates (PEM) the brokers' certificates are checked against
    /// (`ssl.ca.location`); unset: the system's.
    pub ssl_ca_location: Option<PathBuf>,
    /// This service's client certificate (PEM, `ssl.certificate.location`), for brokers that
    /// require one; its expiry is exported (`iotp_tls_cert_expiry_timestamp_seconds`).
    pub ssl_certificate_location: Option<PathBuf>,
    /// The client certificate's private key (PEM, `ssl.key.location`).
    pub ssl_key_location: Option<PathBuf>,
    /// SASL mechanism (`sasl.mechanism`): `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// SASL user name (`sasl.username`).
    pub sasl_username: Option<String>,
    /// File holding the SASL password (`sasl.password`; one trailing newline dropped), read
    /// when a client is built: the password is in no setting, log or printed configuration.
    pub sasl_password_file: Option<PathBuf>,
    /// Extra librdkafka properties, e.g. `"ssl.endpoint.identification.algorithm" = "none"`.
    pub properties: BTreeMap<String, String>,
}

/// `security.protocol` values librdkafka knows.
const SECURITY_PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];

/// SASL mechanisms passed through (OAUTHBEARER and GSSAPI need more than a password).
const SASL_MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// librdkafka properties the typed settings above set; giving them in `properties` too is an error.
const TYPED_PROPERTIES: [&str; 7] = [
    "security.protocol",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
];

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            linger: Duration::from_millis(5),
            message_timeout: Duration::from_secs(30),
            compression: "none".into(),
            max_in_flight: 1,
            fetch_wait: Duration::from_millis(10),
            prefetch_kib: 2048,
            bundle_max_bytes: 16_384,
            security_protocol: "plaintext".into(),
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password_file: None,
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// Rules for `validate()`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.brokers.trim().is_empty() {
            out.push("kafka.brokers must not be empty".into());
        }
        if !(1..=2_097_151).contains(&self.prefetch_kib) {
            out.push("kafka.prefetch_kib must be between 1 and 2097151".into());
        }
        for key in ["max.in.flight.requests.per.connection", "max.in.flight"] {
            if self.properties.contains_key(key) {
                out.push(format!(
                    "kafka.properties.{key}: use the kafka.max_in_flight setting"
                ));
            }
        }
        if !(1..=5).contains(&self.max_in_flight) {
            out.push(
                "kafka.max_in_flight must be between 1 and 5 (the idempotent producer's limit)"
                    .into(),
            );
        }
        if self.bundle_max_bytes > 900_000 {
            out.push(
                "kafka.bundle_max_bytes must be at most 900000 (under the producer's message.max.bytes)"
                    .into(),
            );
        }
        if !["none", "lz4", "zstd", "snappy", "gzip"].contains(&self.compression.as_str()) {
            out.push(format!(
                "kafka.compression {:?} is not one of none, lz4, zstd, snappy, gzip",
                self.compression
            ));
        }
        for key in [
            "enable.idempotence",
            "acks",
            "enable.auto.commit",
            "enable.auto.offset.store",
        ] {
            if self.properties.contains_key(key) {
                out.push(format!(
                    "kafka.properties.{key} is set by the runtime and cannot be overridden"
                ));
            }
        }
        out.extend(self.security_problems());
        out
    }

    /// The TLS and SASL rules: known protocol and mechanism, TLS files only with TLS, SASL
    /// settings only with SASL, certificate and key together, the files readable.
    fn security_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let protocol = self.security_protocol.as_str();
        if !SECURITY_PROTOCOLS.contains(&protocol) {
            out.push(format!(
                "kafka.security_protocol {protocol:?} is not one of {}",
                SECURITY_PROTOCOLS.join(", ")
            ));
        }
        let tls = protocol.ends_with("ssl");
        let sasl = protocol.starts_with("sasl_");
        for key in TYPED_PROPERTIES.iter().chain(["sasl.password"].iter()) {
            if self.properties.contains_key(*key) {
                out.push(format!(
                    "kafka.properties.{key}: use the kafka.{} setting",
                    match *key {
                        "sasl.password" => "sasl_password_file".to_string(),
                        "sasl.mechanisms" => "sasl_mechanism".to_string(),
                        k => k.replace('.', "_"),
                    }
                ));
            }
        }
        let files = [
            ("ssl_ca_location", &self.ssl_ca_location),
            ("ssl_certificate_location", &self.ssl_certificate_location),
            ("ssl_key_location", &self.ssl_key_location),
        ];
        for (name, path) in files {
            let Some(path) = path else { continue };
            if !tls {
                out.push(format!(
                    "kafka.{name} needs kafka.security_protocol ssl or sasl_ssl"
                ));
            }
            if let Err(e) = std::fs::metadata(path) {
                out.push(format!("kafka.{name}: cannot read {}: {e}", path.display()));
            }
        }
        if self.ssl_certificate_location.is_some() != self.ssl_key_location.is_some() {
            out.push(
                "kafka.ssl_certificate_location and kafka.ssl_key_location go together".into(),
            );
        }
        match (&self.sasl_mechanism, sasl) {
            (Some(m), true) if !SASL_MECHANISMS.contains(&m.as_str()) => out.push(format!(
                "kafka.sasl_mechanism {m:?} is not one of {}",
                SASL_MECHANISMS.join(", ")
            )),
            (None, true) => out.push(format!(
                "kafka.security_protocol {protocol} needs kafka.sasl_mechanism"
            )),
            _ => {}
        }
        let sasl_settings = [
            ("sasl_mechanism", self.sasl_mechanism.is_some()),
            ("sasl_username", self.sasl_username.is_some()),
            ("sasl_password_file", self.sasl_password_file.is_some()),
        ];
        for (name, set) in sasl_settings {
            if set && !sasl {
                out.push(format!(
                    "kafka.{name} needs kafka.security_protocol sasl_plaintext or sasl_ssl"
                ));
            }
        }
        if let Some(path) = &self.sasl_password_file {
            if let Err(e) = std::fs::metadata(path) {
                out.push(format!(
                    "kafka.sasl_password_file: cannot read {}: {e}",
                    path.display()
                ));
            }
        }
        out
    }

    /// The settings every client shares: brokers, client id, TLS and SASL, then `properties`.
    /// Reads the SASL password file; records the expiry of the configured certificates.
    pub(crate) fn base(&self, client_id: &str) -> Result<ClientConfig, KafkaError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id)
            .set("security.protocol", &self.security_protocol);
        if let Some(path) = &self.ssl_ca_location {
            crate::tls::record_expiry("kafka", "ca", path);
            c.set("ssl.ca.location", path.display().to_string());
        }
        if let Some(path) = &self.ssl_certificate_location {
            crate::tls::record_expiry("kafka", "client", path);
            c.set("ssl.certificate.location", path.display().to_string());
        }
        if let Some(path) = &self.ssl_key_location {
            c.set("ssl.key.location", path.display().to_string());
        }
        if let Some(mechanism) = &self.sasl_mechanism {
            c.set("sasl.mechanism", mechanism);
        }
        if let Some(user) = &self.sasl_username {
            c.set("sasl.username", user);
        }
        if let Some(path) = &self.sasl_password_file {
            let password = crate::config::read_secret(path).map_err(|e| {
                KafkaError::ClientCreation(format!("kafka.sasl_password_file: {e}"))
            })?;
            c.set("sasl.password", password);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        Ok(c)
    }

    /// Settings of an idempotent producer: acks=all, ordered per partition, retried by librdkafka up to
    /// `message_timeout`.
    ///
    /// `kafka.max_in_flight` produce requests in flight per connection.
    pub fn producer_config(&self, client_id: &str) -> Result<ClientConfig, KafkaError> {
        let mut c = self.base(client_id)?;
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "max.in.flight.requests.per.connection",
                self.max_in_flight.to_string(),
            )
            .set("linger.ms", self.linger.as_millis().to_string())
            .set(
                "message.timeout.ms",
                self.message_timeout.as_millis().to_string(),
            )
            .set("compression.type", &self.compression)
            .set("queue.buffering.max.messages", "100000");
        // Explicit properties win over these defaults.
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        Ok(c)
    }

    /// Admin client for topic management.
    pub fn admin(&self, client_id: &str) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
        self.base(client_id)?.create()
    }

    /// Consumer settings for a group member: static membership from `replica` (a restarted
    /// replica with the same name takes its partitions back; one that goes away leaves the
    /// group explicitly, see [`source::KafkaSource::leave`]), offsets stored only by the
    /// runtime (auto-commit commits stored offsets only).
    pub fn consumer_config(&self, group: &str, replica: &str) -> Result<ClientConfig, KafkaError> {
        let mut c = self.base(replica)?;
        c.set("group.id", group)
            .set("group.instance.id", replica)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "30000")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("fetch.wait.max.ms", self.fetch_wait.as_millis().to_string())
            .set("queued.max.messages.kbytes", self.prefetch_kib.to_string())
            // A consumer whose prefetch is full postpones its next fetch of the partition by
            // this much; librdkafka's 1 s stopped every stage with a backlog for a second each
            // time it caught up with its queue (the unthrottled standard run drained at about
            // 20,000 msgs/s instead of 30,000–40,000, docs/performance.md, session 18). One
            // fetch wait: no longer than a quiet partition's fetch takes anyway.
            .set(
                "fetch.queue.backoff.ms",
                self.fetch_wait.as_millis().to_string(),
            )
            // Consumer lag per partition (`stats.rs`): one small report every 15 s.
            .set("statistics.interval.ms", "15000");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        // librdkafka reports the LeaveGroup response of a leave only in a `cgrp` debug line
        // (see `leave.rs`); the line reaches the log at debug level only.
        let debug = match self.properties.get("debug").map(|d| d.trim()) {
            Some(d) if !d.is_empty() => format!("{d},{}", leave::DEBUG_CONTEXT),
            _ => leave::DEBUG_CONTEXT.to_string(),
        };
        c.set("debug", debug).set_log_level(RDKafkaLogLevel::Debug);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("iotp-kafka-sec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn get(c: &ClientConfig, key: &str) -> Option<String> {
        c.get(key).map(str::to_string)
    }

    #[test]
    fn tls_and_sasl_settings_become_librdkafka_properties() {
        let password = file("sasl-password", "kafka-pw-1\n");
        let kafka = KafkaConfig {
            security_protocol: "sasl_ssl".into(),
            ssl_ca_location: Some(PathBuf::from("/etc/iotp/kafka/ca.pem")),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("iotp-parser".into()),
            sasl_password_file: Some(password),
            ..KafkaConfig::default()
        };
        let c = kafka.base("parser-0").expect("config");
        assert_eq!(get(&c, "security.protocol").as_deref(), Some("sasl_ssl"));
        assert_eq!(
            get(&c, "ssl.ca.location").as_deref(),
            Some("/etc/iotp/kafka/ca.pem")
        );
        assert_eq!(get(&c, "sasl.mechanism").as_deref(), Some("SCRAM-SHA-512"));
        assert_eq!(get(&c, "sasl.username").as_deref(), Some("iotp-parser"));
        assert_eq!(get(&c, "sasl.password").as_deref(), Some("kafka-pw-1"));
        // Debug shows the settings (the file's path), never the password.
        let printed = format!("{kafka:?}");
        assert!(!printed.contains("kafka-pw-1"), "{printed}");
        assert!(printed.contains("sasl-password"), "{printed}");
        assert!(!format!("{c:?}").contains("kafka-pw-1"));
    }

    #[test]
    fn an_unreadable_password_file_fails_the_client_naming_the_file() {
        let kafka = KafkaConfig {
            security_protocol: "sasl_plaintext".into(),
            sasl_mechanism: Some("PLAIN".into()),
            sasl_username: Some("u".into()),
            sasl_password_file: Some(PathBuf::from("/nonexistent/kafka-pw")),
            ..KafkaConfig::default()
        };
        let err = kafka.producer_config("p").expect_err("no password");
        assert!(err.to_string().contains("/nonexistent/kafka-pw"), "{err}");
        assert!(kafka
            .problems()
            .iter()
            .any(|p| p.contains("sasl_password_file")));
    }

    #[test]
    fn inconsistent_security_settings_are_all_reported() {
        let kafka = KafkaConfig {
            security_protocol: "tls".into(),
            ..KafkaConfig::default()
        };
        assert_eq!(kafka.problems().len(), 1, "{:?}", kafka.problems());
        let cert = file("client.pem", "");
        let kafka = KafkaConfig {
            ssl_certificate_location: Some(cert),
            sasl_username: Some("u".into()),
            properties: [("sasl.password".to_string(), "x".to_string())].into(),
            ..KafkaConfig::default()
        };
        let problems = kafka.problems().join("\n");
        for expected in [
            "kafka.ssl_certificate_location needs kafka.security_protocol ssl",
            "go together",
            "kafka.sasl_username needs",
            "kafka.properties.sasl.password: use the kafka.sasl_password_file",
        ] {
            assert!(problems.contains(expected), "{expected} not in {problems}");
        }
        let kafka = KafkaConfig {
            security_protocol: "sasl_ssl".into(),
            ..KafkaConfig::default()
        };
        assert!(kafka.problems()[0].contains("needs kafka.sasl_mechanism"));
        let kafka = KafkaConfig {
            security_protocol: "sasl_ssl".into(),
            sasl_mechanism: Some("GSSAPI".into()),
            ..KafkaConfig::default()
        };
        assert!(kafka.problems()[0].contains("GSSAPI"));
        assert!(KafkaConfig::default().problems().is_empty());
    }

    #[test]
    fn a_full_prefetch_pauses_a_consumer_for_one_fetch_wait_not_librdkafkas_second() {
        let kafka = KafkaConfig {
            fetch_wait: Duration::from_millis(35),
            prefetch_kib: 1024,
            ..KafkaConfig::default()
        };
        let c = kafka
            .consumer_config("iotp-parser", "parser-0")
            .expect("config");
        assert_eq!(get(&c, "fetch.wait.max.ms").as_deref(), Some("35"));
        assert_eq!(get(&c, "fetch.queue.backoff.ms").as_deref(), Some("35"));
        assert_eq!(
            get(&c, "queued.max.messages.kbytes").as_deref(),
            Some("1024")
        );
        // A property set by hand still wins.
        let kafka = KafkaConfig {
            properties: [("fetch.queue.backoff.ms".to_string(), "500".to_string())].into(),
            ..KafkaConfig::default()
        };
        let c = kafka
            .consumer_config("iotp-parser", "parser-0")
            .expect("config");
        assert_eq!(get(&c, "fetch.queue.backoff.ms").as_deref(), Some("500"));
    }

    #[test]
    fn produce_requests_in_flight_are_a_setting_within_the_idempotent_limit() {
        let c = KafkaConfig::default()
            .producer_config("parser-0")
            .expect("config");
        assert_eq!(
            get(&c, "max.in.flight.requests.per.connection").as_deref(),
            Some("1")
        );
        let five = KafkaConfig {
            max_in_flight: 5,
            ..KafkaConfig::default()
        };
        assert!(five.problems().is_empty(), "{:?}", five.problems());
        let c = five.producer_config("parser-0").expect("config");
        assert_eq!(
            get(&c, "max.in.flight.requests.per.connection").as_deref(),
            Some("5")
        );
        for bad in [0, 6] {
            let kafka = KafkaConfig {
                max_in_flight: bad,
                ..KafkaConfig::default()
            };
            assert!(
                kafka
                    .problems()
                    .iter()
                    .any(|p| p.contains("kafka.max_in_flight")),
                "{bad}: {:?}",
                kafka.problems()
            );
        }
        let by_hand = KafkaConfig {
            properties: [(
                "max.in.flight.requests.per.connection".to_string(),
                "1000".to_string(),
            )]
            .into(),
            ..KafkaConfig::default()
        };
        assert!(
            by_hand
                .problems()
                .iter()
                .any(|p| p.contains("use the kafka.max_in_flight setting")),
            "{:?}",
            by_hand.problems()
        );
    }
}
