//! Boots service binaries with exactly what their manifest gives them: the manifest's
//! environment (and nothing of the test's own), its mounted files written to a scratch
//! directory, its volumes as directories shared by whoever mounts the same volume, and the
//! container paths in settings rewritten to those host paths.
//!
//! Before a service starts, `--check-config` prints its effective configuration, and every
//! endpoint in it must come from the manifest: a broker or store address of 127.0.0.1 or
//! localhost is a default the manifest failed to override (inside a container it is the
//! container itself), and an embedded store must be on a mounted volume (else it lands in the
//! container's own layer, or on a read-only root filesystem). Then the endpoints are mapped to
//! the local brokers ([`Local`]); a MongoDB store becomes the embedded store on one shared
//! directory, as `docker-compose.embedded.yml` does; and because the local brokers are shared,
//! the run's topics, groups, dead-letter queues and MQTT session get names of its own (the
//! manifest's names are checked before that). The settings mapped are printed, so a reader
//! sees what the boot did not take from the manifest.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use iotp_core::probe;

use crate::checks::is_service;
use crate::launch::Launch;

/// The local brokers the manifests' host names are mapped to (`make up`): `IOTP_TEST_KAFKA`,
/// `IOTP_TEST_AMQP`, `IOTP_TEST_MQTT_PORT`, with the local defaults.
#[derive(Debug, Clone)]
pub struct Local {
    /// Kafka bootstrap address.
    pub kafka: String,
    /// RabbitMQ URI.
    pub amqp: String,
    /// Mosquitto host.
    pub mqtt_host: String,
    /// Mosquitto port (the project's own broker, 1884).
    pub mqtt_port: u16,
}

impl Local {
    /// From the environment, else the brokers `make up` starts.
    pub fn from_env() -> Self {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        Self {
            kafka: var("IOTP_TEST_KAFKA", "127.0.0.1:9092"),
            amqp: var("IOTP_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            mqtt_host: var("IOTP_TEST_MQTT_HOST", "127.0.0.1"),
            mqtt_port: var("IOTP_TEST_MQTT_PORT", "1884").parse().unwrap_or(1884),
        }
    }
}

/// One service, prepared to start.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Where the manifest declares it.
    pub source: String,
    /// The workload or Compose service name.
    pub name: String,
    /// `iotp-parser`, …
    pub binary: String,
    /// The manifest's environment, container paths rewritten to the scratch directory.
    pub env: BTreeMap<String, String>,
    /// Host directories of the container's volumes.
    pub volumes: Vec<PathBuf>,
}

/// Writes the launches' files and volumes under `dir` and rewrites the paths in their settings.
pub fn prepare(launches: &[Launch], dir: &Path) -> anyhow::Result<Vec<Prepared>> {
    let mut out = Vec::new();
    for l in launches.iter().filter(|l| is_service(l)) {
        let files = dir.join("files").join(&l.name);
        let mut mounts: Vec<(PathBuf, PathBuf)> = Vec::new();
        for (path, bytes) in &l.files {
            let host = files.join(path.strip_prefix("/").unwrap_or(path));
            std::fs::create_dir_all(host.parent().unwrap_or(dir))?;
            std::fs::write(&host, bytes)?;
            mounts.push((path.clone(), host));
        }
        let mut volumes = Vec::new();
        for (path, id) in &l.dirs {
            let host = dir.join("volumes").join(id.replace([':', '/'], "_"));
            std::fs::create_dir_all(&host)?;
            volumes.push(host.clone());
            mounts.push((path.clone(), host));
        }
        let env = l
            .env
            .iter()
            .map(|(k, v)| {
                let v = mounts
                    .iter()
                    .find_map(|(c, h)| Path::new(v).strip_prefix(c).ok().map(|rest| h.join(rest)))
                    .map(|p| p.display().to_string().trim_end_matches('/').to_string())
                    .unwrap_or_else(|| v.clone());
                (k.clone(), v)
            })
            .collect();
        out.push(Prepared {
            source: l.source.clone(),
            name: l.name.clone(),
            binary: l.binary().to_string(),
            env,
            volumes,
        });
    }
    Ok(out)
}

/// The service's effective configuration (`--check-config`) under its manifest's environment.
pub fn effective_config(bin_dir: &Path, p: &Prepared) -> anyhow::Result<toml::Table> {
    let out = Command::new(bin_dir.join(&p.binary))
        .arg("--check-config")
        .env_clear()
        .envs(&p.env)
        .output()
        .with_context(|| format!("cannot run {}", p.binary))?;
    if !out.status.success() {
        bail!(
            "{}: its configuration is refused: {}",
            p.source,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(toml::from_str(&String::from_utf8_lossy(&out.stdout))?)
}

fn get<'a>(t: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut v = t.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    Some(v)
}

fn host_of(address: &str) -> &str {
    let rest = address.split("://").nth(1).unwrap_or(address);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let rest = rest.split(['/', '?', ',']).next().unwrap_or(rest);
    rest.rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(rest)
        .trim_matches(['[', ']'])
}

fn loopback(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "::1" | "0.0.0.0" | "")
}

/// The endpoints of an effective configuration that do not come from the manifest.
pub fn endpoint_problems(p: &Prepared, config: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    let keys = [
        "kafka.brokers",
        "io.dead_letter.amqp_uri",
        "dead_letter.amqp_uri",
        "amqp_uri",
        "store.mongodb_uri",
        "mqtt.host",
    ];
    for key in keys {
        if let Some(value) = get(config, key).and_then(toml::Value::as_str) {
            for address in value.split(',') {
                if loopback(host_of(address)) {
                    out.push(format!(
                        "{}: {key} dials {} (a default: in a container that is the container \
                         itself; the manifest does not set it)",
                        p.source,
                        host_of(address)
                    ));
                }
            }
        }
    }
    if get(config, "store").is_some() && get(config, "store.mongodb_uri").is_none() {
        let path = get(config, "store.path")
            .and_then(toml::Value::as_str)
            .unwrap_or("");
        if !p.volumes.iter().any(|v| Path::new(path).starts_with(v)) {
            out.push(format!(
                "{}: store.path {path} is on no mounted volume (the store would be written into \
                 the container's own layer, not shared, or refused by a read-only root)",
                p.source
            ));
        }
    }
    out
}

/// Free local TCP port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The environment a prepared service starts with here: the manifest's, with its endpoints
/// mapped to `local`, a MongoDB store replaced by the embedded store at `store`, and its
/// listeners on free local ports. The brokers are shared (other tests, `make demo`), so the
/// run's names are its own, prefixed with `run` ([`run_names`]): topics, consumer groups,
/// dead-letter exchange and queues, and the bridge's MQTT session (client id, a share group
/// limited to tenant `demo`, a short expiry, so the broker keeps no queue for it afterwards).
/// The names the manifest gives are checked before (KEDA's triggers against them).
/// Returns the environment and the settings changed.
pub fn mapped_env(
    p: &Prepared,
    config: &toml::Table,
    local: &Local,
    store: &Path,
    run: &str,
) -> anyhow::Result<(BTreeMap<String, String>, Vec<String>)> {
    let mut env = p.env.clone();
    let mut changed = Vec::new();
    let mut set = |env: &mut BTreeMap<String, String>, key: &str, value: String| {
        let file_key = key.replacen("IOTP__", "IOTP_FILE__", 1);
        env.remove(&file_key);
        changed.push(format!("{key}={value}"));
        env.insert(key.to_string(), value);
    };
    let named = |name: &str| format!("{run}.{name}");
    let list = |v: Option<&toml::Value>| -> String {
        let items = v.and_then(toml::Value::as_array).into_iter().flatten();
        let items: Vec<String> = items
            .filter_map(toml::Value::as_str)
            .map(|t| format!("\"{}\"", named(t)))
            .collect();
        format!("[{}]", items.join(","))
    };
    let text = |key: &str| get(config, key).and_then(toml::Value::as_str).unwrap_or("");
    set(&mut env, "IOTP__KAFKA__BROKERS", local.kafka.clone());
    if get(config, "io.dead_letter.amqp_uri").is_some() {
        set(
            &mut env,
            "IOTP__IO__DEAD_LETTER__AMQP_URI",
            local.amqp.clone(),
        );
        set(
            &mut env,
            "IOTP__IO__DEAD_LETTER__EXCHANGE",
            named(text("io.dead_letter.exchange")),
        );
        set(
            &mut env,
            "IOTP__IO__INPUT_TOPICS",
            list(get(config, "io.input_topics")),
        );
        set(&mut env, "IOTP__IO__GROUP", named(text("io.group")));
        if !text("io.output_topic").is_empty() {
            set(
                &mut env,
                "IOTP__IO__OUTPUT_TOPIC",
                named(text("io.output_topic")),
            );
        }
    }
    if !text("raw_topic").is_empty() {
        set(&mut env, "IOTP__RAW_TOPIC", named(text("raw_topic")));
    }
    if get(config, "dead_letter.amqp_uri").is_some() {
        set(&mut env, "IOTP__DEAD_LETTER__AMQP_URI", local.amqp.clone());
        set(
            &mut env,
            "IOTP__DEAD_LETTER__EXCHANGE",
            named(text("dead_letter.exchange")),
        );
    }
    if get(config, "amqp_uri").is_some() {
        set(&mut env, "IOTP__AMQP_URI", local.amqp.clone());
        for key in [
            "dead_letter_exchange",
            "incoming_queue",
            "retry_exchange",
            "parking_queue",
        ] {
            let value = named(text(&format!("rabbitmq.{key}")));
            set(
                &mut env,
                &format!("IOTP__RABBITMQ__{}", key.to_uppercase()),
                value,
            );
        }
    }
    if get(config, "mqtt.host").is_some() {
        set(&mut env, "IOTP__MQTT__HOST", local.mqtt_host.clone());
        set(&mut env, "IOTP__MQTT__PORT", local.mqtt_port.to_string());
        set(&mut env, "IOTP__MQTT__CLIENT_ID", run.to_string());
        set(&mut env, "IOTP__MQTT__SESSION_EXPIRY", "30s".to_string());
        set(
            &mut env,
            "IOTP__MQTT__SUBSCRIPTIONS",
            format!("[\"$share/{run}/iot/demo/+/+\"]"),
        );
    }
    if get(config, "store.mongodb_uri").is_some() {
        env.remove("IOTP_FILE__STORE__MONGODB_URI");
        env.remove("IOTP__STORE__MONGODB_URI");
        set(&mut env, "IOTP__STORE__PATH", store.display().to_string());
    }
    let admin = free_port()?;
    set(
        &mut env,
        "IOTP__COMMON__ADMIN_LISTEN",
        format!("127.0.0.1:{admin}"),
    );
    if get(config, "api_listen").is_some() {
        set(
            &mut env,
            "IOTP__API_LISTEN",
            format!("127.0.0.1:{}", free_port()?),
        );
    }
    Ok((env, changed))
}

/// A running service.
pub struct Running {
    /// Where the manifest declares it.
    pub source: String,
    /// `iotp-parser`, …
    pub binary: String,
    /// Its admin port here.
    pub admin_port: u16,
    /// Its log file.
    pub log: PathBuf,
    child: Child,
}

impl Running {
    /// Start `binary` with exactly `env`.
    pub fn start(
        bin_dir: &Path,
        p: &Prepared,
        env: &BTreeMap<String, String>,
        logs: &Path,
    ) -> anyhow::Result<Self> {
        let log = logs.join(format!("{}.log", p.binary));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin_dir.join(&p.binary))
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", p.binary))?;
        let admin_port = env
            .get("IOTP__COMMON__ADMIN_LISTEN")
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no admin port"))?;
        Ok(Self {
            source: p.source.clone(),
            binary: p.binary.clone(),
            admin_port,
            log,
            child,
        })
    }

    /// Waits until `/readyz` answers 200, failing if the process exits first.
    pub fn wait_ready(&mut self, within: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.source,
                    self.log_tail()
                );
            }
            if probe::blocking::get(self.admin_port, "/readyz").is_ok_and(|r| r.is_success()) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                bail!(
                    "{} not ready after {within:?}:\n{}",
                    self.source,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sum of a metric on its admin port.
    pub fn metric(&self, name: &str) -> f64 {
        probe::blocking::get(self.admin_port, "/metrics")
            .map(|r| probe::sample_sum(&r.body, name, &[]))
            .unwrap_or(0.0)
    }

    /// SIGTERM, then the exit code (SIGKILL after `within`).
    pub fn stop(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(None)
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The run's own Kafka topics (the topology's, prefixed with `run`; 2 partitions, 1 hour
/// retention) and dead-letter topology (exchanges and queues), to create before a run.
pub fn run_names(
    run: &str,
) -> (
    Vec<iotp_contract::topology::TopicSpec>,
    iotp_contract::topology::RabbitTopology,
) {
    let t = iotp_contract::topology::topology();
    let topics = t
        .kafka
        .topics
        .iter()
        .map(|spec| iotp_contract::topology::TopicSpec {
            name: format!("{run}.{}", spec.name),
            partitions: 2,
            schema: spec.schema.clone(),
            retention_hours: 1,
            about: format!("boot test: {}", spec.about),
        })
        .collect();
    let r = &t.rabbitmq;
    let dead = iotp_contract::topology::RabbitTopology {
        dead_letter_exchange: format!("{run}.{}", r.dead_letter_exchange),
        incoming_queue: format!("{run}.{}", r.incoming_queue),
        retry_exchange: format!("{run}.{}", r.retry_exchange),
        retry_delays: r.retry_delays().into_iter().map(Into::into).collect(),
        parking_queue: format!("{run}.{}", r.parking_queue),
    };
    (topics, dead)
}
