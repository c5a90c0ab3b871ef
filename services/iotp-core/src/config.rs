//! Layered configuration: built-in defaults, then an optional TOML file, then environment
//! variables `IOTP__SECTION__KEY`. Unknown keys are errors; durations read like "500ms";
//! cross-field rules are checked at start-up and every problem is reported at once.
//! A secret can come from a file instead (a Kubernetes Secret volume, a Compose secret):
//! `IOTP_FILE__STORE__MONGODB_URI=/run/secrets/mongodb-uri` sets `store.mongodb_uri` to the
//! file's contents, so the value is in neither the environment nor the manifest.
//! Printed configurations hide their secrets: `--check-config` and the `Debug` of every config
//! struct show URI passwords and secret-named settings as `***` (`iotp_contract::redact`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use iotp_contract::redact;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Prefix of configuration environment variables (`IOTP__KAFKA__BROKERS=…`).
pub const ENV_PREFIX: &str = "IOTP__";

/// Prefix of variables naming a file that holds a setting's value
/// (`IOTP_FILE__AMQP_URI=/run/secrets/amqp-uri`); one trailing newline is dropped.
pub const FILE_ENV_PREFIX: &str = "IOTP_FILE__";

/// A service's configuration.
pub trait ServiceConfig: Serialize + DeserializeOwned + Default {
    /// The settings every service has.
    fn common(&self) -> &Common;
    /// Cross-field rules; return every broken rule.
    fn validate(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Settings every service has.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Common {
    /// Stable replica name (pod name, `bridge-0`): the Kafka `group.instance.id`, the MQTT client id.
    pub replica: String,
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub admin_listen: SocketAddr,
    /// How long SIGTERM may take to drain and commit before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
    /// Log output: `auto` (JSON unless stdout is a terminal), `json` or `text`.
    pub log_format: LogFormat,
    /// Log filter, `tracing_subscriber` syntax (`info,iotp_core=debug`).
    pub log_level: String,
    /// How every failed piece of work is retried, and when the service gives up on it.
    pub backoff: crate::retry::Backoff,
    /// Async worker threads: 1 runs everything on the main thread (blocking store calls still
    /// get their own threads).
    pub worker_threads: usize,
    /// Span export over OTLP (off unless an endpoint is set; README, "Tracing").
    pub tracing: crate::trace::TracingConfig,
}

impl Default for Common {
    fn default() -> Self {
        Self {
            replica: default_replica(),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 9100)),
            shutdown_deadline: Duration::from_secs(25),
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            backoff: crate::retry::Backoff::default(),
            worker_threads: 1,
            tracing: crate::trace::TracingConfig::default(),
        }
    }
}

fn default_replica() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local-0".into())
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Text,
}

// `Debug` of the shared sections that hold secrets, through the one redaction rule
// (`iotp_contract::redact`, also what `--check-config` prints): URI passwords and secret-named
// settings print as `***`. Every other config struct derives `Debug` and holds these, so its
// `Debug` hides them too. A new shared section with a secret gets its impl here.

impl std::fmt::Debug for crate::kafka::KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        iotp_contract::redact::debug("KafkaConfig", self, f)
    }
}

impl std::fmt::Debug for crate::mqtt::MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        iotp_contract::redact::debug("MqttConfig", self, f)
    }
}

impl std::fmt::Debug for crate::dead_letter::DeadLetterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        iotp_contract::redact::debug("DeadLetterConfig", self, f)
    }
}

/// Configuration problems, all of them.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

/// Load `C` from defaults, `file` (if given) and the environment.
pub fn load<C: ServiceConfig>(file: Option<&Path>) -> Result<C, ConfigError> {
    // vars() would panic on a variable that is not Unicode; such a one names no setting.
    let vars = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    let files = from_files(vars, FILE_ENV_PREFIX)?;
    load_from(file, Env::prefixed(ENV_PREFIX).split("__"), files)
}

/// A secret kept in a file (a password, a token): its contents less one trailing newline
/// (`\n` or `\r\n`). The error names the file, never its contents.
pub fn read_secret(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let text = text.strip_suffix('\n').unwrap_or(&text);
            let text = text.strip_suffix('\r').unwrap_or(text);
            Ok(text.to_string())
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The settings `IOTP_FILE__SECTION__KEY=path` variables name, read from their files. A file
/// that cannot be read is a configuration problem; its contents are never in the message.
fn from_files(
    vars: impl Iterator<Item = (String, String)>,
    prefix: &str,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut values = Vec::new();
    let mut problems = Vec::new();
    for (name, path) in vars {
        let Some(key) = name.strip_prefix(prefix) else {
            continue;
        };
        let key = key.split("__").collect::<Vec<_>>().join(".").to_lowercase();
        match read_secret(Path::new(&path)) {
            Ok(text) => values.push((key, text)),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(values)
    } else {
        Err(ConfigError(problems))
    }
}

fn load_from<C: ServiceConfig>(
    file: Option<&Path>,
    env: Env,
    files: Vec<(String, String)>,
) -> Result<C, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(C::default()));
    if let Some(file) = file {
        if !file.exists() {
            return Err(ConfigError(vec![format!(
                "config file {} does not exist",
                file.display()
            )]));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    figment = figment.merge(env);
    for (key, value) in files {
        figment = figment.merge(Serialized::default(&key, value));
    }
    let config: C = figment
        .extract()
        .map_err(|e| ConfigError(e.into_iter().map(describe).collect()))?;
    let mut problems = config.validate();
    problems.extend(validate_common(config.common()));
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError(problems))
    }
}

/// A configuration error as text, without the value it found: a mistyped setting may be a
/// secret (a password, or Kafka properties written as one string) and figment would quote it.
/// The key, where it came from and what was expected stay; URI passwords in what is left are
/// hidden too (`iotp_contract::redact`).
fn describe(mut e: figment::Error) -> String {
    use figment::error::{Actual, Kind};
    let hide = |actual: &mut Actual| {
        let kind = match actual {
            Actual::Str(_) => "a string",
            Actual::Bytes(_) => "bytes",
            Actual::Char(_) => "a character",
            Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
            Actual::Float(_) => "a float",
            Actual::Bool(_) => "a boolean",
            Actual::Other(_) => "a value",
            _ => return,
        };
        *actual = Actual::Other(kind.into());
    };
    let secret = e.path.iter().any(|p| redact::is_secret_key(p));
    match &mut e.kind {
        Kind::InvalidType(actual, _)
        | Kind::InvalidValue(actual, _)
        | Kind::Unsupported(actual)
        | Kind::UnsupportedKey(actual, _) => hide(actual),
        Kind::UnknownVariant(found, _) if secret => *found = redact::REDACTED.into(),
        Kind::Message(message) if secret => *message = "invalid value".into(),
        _ => {}
    }
    redact::uri(&e.to_string()).into_owned()
}

fn validate_common(common: &Common) -> Vec<String> {
    let mut problems = common.backoff.problems();
    problems.extend(common.tracing.problems());
    if common.worker_threads == 0 {
        problems.push("common.worker_threads must be at least 1".into());
    }
    if common.replica.is_empty() {
        problems.push("common.replica must not be empty".into());
    }
    if common.shutdown_deadline < Duration::from_secs(1) {
        problems.push("common.shutdown_deadline must be at least 1s".into());
    }
    if tracing_subscriber::EnvFilter::try_new(&common.log_level).is_err() {
        problems.push(format!(
            "common.log_level {:?} is not a valid filter",
            common.log_level
        ));
    }
    problems
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct TestConfig {
        common: Common,
        #[serde(with = "humantime_serde")]
        poll: Duration,
        batch: usize,
    }

    impl ServiceConfig for TestConfig {
        fn common(&self) -> &Common {
            &self.common
        }
        fn validate(&self) -> Vec<String> {
            if self.batch == 0 {
                vec!["batch must be > 0".into()]
            } else {
                vec![]
            }
        }
    }

    fn env(prefix: &str) -> Env {
        Env::prefixed(prefix).split("__")
    }

    #[test]
    fn layers_defaults_file_env() {
        let dir = std::env::temp_dir().join(format!("iotp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "batch = 7\npoll = \"500ms\"\n[common]\nreplica = \"from-file\"\n",
        )
        .expect("write");
        figment::Jail::expect_with(|jail| {
            jail.set_env("T1__COMMON__REPLICA", "from-env");
            let c: TestConfig = load_from(Some(&file), env("T1__"), Vec::new()).expect("load");
            assert_eq!(c.batch, 7);
            assert_eq!(c.poll, Duration::from_millis(500));
            assert_eq!(c.common.replica, "from-env");
            assert_eq!(c.common.shutdown_deadline, Duration::from_secs(25));
            Ok(())
        });
    }

    #[test]
    fn secrets_come_from_files_named_by_the_environment() {
        let dir = std::env::temp_dir().join(format!("iotp-cfg-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let secret = dir.join("replica");
        std::fs::write(&secret, "from-secret\n").expect("write");
        let vars = [
            (
                "T5_FILE__COMMON__REPLICA".to_string(),
                secret.display().to_string(),
            ),
            ("UNRELATED".to_string(), "/nowhere".to_string()),
        ];
        let files = from_files(vars.into_iter(), "T5_FILE__").expect("read");
        assert_eq!(files, vec![("common.replica".into(), "from-secret".into())]);
        figment::Jail::expect_with(|jail| {
            jail.set_env("T5__BATCH", "1");
            let c: TestConfig = load_from(None, env("T5__"), files.clone()).expect("load");
            assert_eq!(c.common.replica, "from-secret");
            Ok(())
        });
        let missing = [(
            "T5_FILE__BATCH".to_string(),
            "/nonexistent/secret".to_string(),
        )];
        let err = from_files(missing.into_iter(), "T5_FILE__").expect_err("unreadable");
        assert!(err.to_string().contains("T5_FILE__BATCH"), "{err}");
    }

    #[test]
    fn debug_of_the_shared_sections_hides_their_secrets() {
        let kafka = crate::kafka::KafkaConfig {
            brokers: "kafka-0:9092".into(),
            properties: [
                ("sasl.password", "kafka-pw-1"),
                ("ssl.key.password", "key-pw-2"),
                ("sasl.username", "pipeline"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        };
        let mqtt = crate::mqtt::MqttConfig {
            username: Some("bridge".into()),
            password: Some("mqtt-pw-3".into()),
            ..Default::default()
        };
        let io = crate::consume::StageIo {
            dead_letter: crate::dead_letter::DeadLetterConfig {
                amqp_uri: "amqp://iotp:amqp-pw-4@rabbitmq:5672/%2f".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let printed = format!("{kafka:?}\n{mqtt:#?}\n{io:?}");
        for secret in ["kafka-pw-1", "key-pw-2", "mqtt-pw-3", "amqp-pw-4"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        for visible in [
            "kafka-0:9092",
            "pipeline",
            "bridge",
            "iotp:***@rabbitmq:5672",
        ] {
            assert!(printed.contains(visible), "{visible} not in {printed}");
        }
    }

    #[test]
    fn a_refused_value_is_not_quoted_in_the_error() {
        #[derive(Debug, Default, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        struct Secrets {
            common: Common,
            password: Option<String>,
            properties: std::collections::BTreeMap<String, String>,
            batch: u16,
        }
        impl ServiceConfig for Secrets {
            fn common(&self) -> &Common {
                &self.common
            }
        }
        let cases = [
            ("T6__PASSWORD", "[\"pw-in-a-list-1\"]", "PASSWORD"),
            (
                "T6__PROPERTIES",
                "sasl.password=pw-as-text-2",
                "expected a map",
            ),
            ("T6__BATCH", "amqp://u:pw-in-uri-3@host", "expected u16"),
        ];
        for (var, value, kept) in cases {
            figment::Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let err = load_from::<Secrets>(None, env("T6__"), Vec::new()).expect_err(var);
                let text = err.to_string();
                assert!(!text.contains("pw-"), "{var}: the value is quoted: {text}");
                assert!(text.contains(kept), "{var}: {kept:?} not in {text}");
                Ok(())
            });
        }
    }

    #[test]
    fn unknown_keys_and_rule_violations_are_all_reported() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("T2__BATHC", "3");
            let err =
                load_from::<TestConfig>(None, env("T2__"), Vec::new()).expect_err("unknown key");
            assert!(err.to_string().contains("bathc"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("T3__COMMON__SHUTDOWN_DEADLINE", "10ms");
            let err = load_from::<TestConfig>(None, env("T3__"), Vec::new()).expect_err("rules");
            // batch defaults to 0 and the deadline is too short: both are listed.
            assert_eq!(err.0.len(), 2, "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("T4__POLL", "soon");
            jail.set_env("T4__BATCH", "1");
            assert!(load_from::<TestConfig>(None, env("T4__"), Vec::new()).is_err());
            Ok(())
        });
    }
}
