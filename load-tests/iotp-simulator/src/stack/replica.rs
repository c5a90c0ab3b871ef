//! One replica of a service as a child process: its name (`load-{service}-{index}`, the
//! Kafka `group.instance.id`), its admin port, its environment; started again with the same
//! name and port after a crash, as a Kubernetes StatefulSet would.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use iotp_contract::topology::RabbitTopology;
use tokio::process::{Child, Command};

use super::{process, StackConfig, SERVICES};

/// A running replica.
pub struct Replica {
    /// Service (`parser`, …).
    pub service: &'static str,
    /// Its index: replica `load-{service}-{index}`.
    pub index: usize,
    /// Its process.
    pub child: Child,
    /// Process id.
    pub pid: u32,
    /// Admin port (`/metrics`, `/readyz`).
    pub admin_port: u16,
}

impl Replica {
    /// The replica's name (`load-parser-0`).
    pub fn name(&self) -> String {
        replica_name(self.service, self.index)
    }
}

/// The name of replica `index` of `service`.
pub fn replica_name(service: &str, index: usize) -> String {
    format!("load-{service}-{index}")
}

/// The admin port of replica `index` of `service`: replica 0 of each service on consecutive
/// ports from the first, as before there were replicas; replica `i` six ports further per `i`.
pub fn admin_port(first: u16, service: &str, index: usize) -> u16 {
    let s = SERVICES.iter().position(|n| *n == service).unwrap_or(0);
    first + (s + SERVICES.len() * index) as u16
}

/// What every replica is started with, whatever its service.
pub struct Shared<'a> {
    /// The stack's settings (brokers, ports, tenants).
    pub cfg: &'a StackConfig,
    /// Device registry file.
    pub registry: &'a Path,
    /// The embedded store file.
    pub store_path: &'a Path,
    /// The run's dead-letter exchange and queues.
    pub dead: &'a RabbitTopology,
}

/// Start replica `index` of `service` (its log appended to `logs/{replica}.log`).
pub fn spawn(sh: &Shared<'_>, service: &'static str, index: usize) -> anyhow::Result<Replica> {
    let cfg = sh.cfg;
    let replica = replica_name(service, index);
    let admin_port = admin_port(cfg.admin_port, service, index);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.run_dir.join(format!("logs/{replica}.log")))?;
    let mut cmd = Command::new(cfg.bin_dir.join(format!("iotp-{service}")));
    cmd.env("IOTP__COMMON__REPLICA", &replica)
        .env(
            "IOTP__COMMON__ADMIN_LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )
        .env("IOTP__COMMON__LOG_FORMAT", "json")
        .env("IOTP__KAFKA__BROKERS", &cfg.kafka)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    match service {
        "mqtt-bridge" => {
            let group = cfg.bridge_group();
            let filters: Vec<String> = cfg
                .tenants
                .iter()
                .map(|t| format!("\"$share/{group}/iot/{t}/+/+\""))
                .collect();
            cmd.env("IOTP__MQTT__PORT", cfg.mqtt_port.to_string())
                .env("IOTP__MQTT__CLIENT_ID", cfg.bridge_client_id(index))
                .env(
                    "IOTP__MQTT__SUBSCRIPTIONS",
                    format!("[{}]", filters.join(",")),
                )
                // A killed run's queue must not outlive the run for long.
                .env("IOTP__MQTT__SESSION_EXPIRY", "10m")
                // The run's own presence topics: its replicas never take over another run's
                // orphaned sessions on a shared broker.
                .env(
                    "IOTP__MQTT__PRESENCE_PREFIX",
                    format!("iotp-bridges/{group}"),
                )
                // A PUBLISH Kafka refuses for good goes to the run's dead-letter exchange,
                // where the audit finds it.
                .env("IOTP__DEAD_LETTER__AMQP_URI", &cfg.amqp_uri)
                .env("IOTP__DEAD_LETTER__EXCHANGE", &sh.dead.dead_letter_exchange);
            if let Some(tls) = cfg.bridge_tls() {
                cmd.env("IOTP__MQTT__TLS__CA_FILE", &tls.ca_file)
                    .env("IOTP__MQTT__TLS__CERT_FILE", &tls.cert_file)
                    .env("IOTP__MQTT__TLS__KEY_FILE", &tls.key_file);
            }
        }
        "dlq-handler" => {
            cmd.env("IOTP__STORE__PATH", sh.store_path)
                .env(
                    "IOTP__API_LISTEN",
                    format!("127.0.0.1:{}", cfg.api_port + index as u16),
                )
                .env("IOTP__AMQP_URI", &cfg.amqp_uri)
                .env("IOTP__RABBITMQ__INCOMING_QUEUE", &sh.dead.incoming_queue)
                .env("IOTP__RABBITMQ__PARKING_QUEUE", &sh.dead.parking_queue)
                .env("IOTP__RABBITMQ__RETRY_EXCHANGE", &sh.dead.retry_exchange);
        }
        // The Kafka stages.
        stage => {
            cmd.env("IOTP__IO__DEAD_LETTER__AMQP_URI", &cfg.amqp_uri)
                .env(
                    "IOTP__IO__DEAD_LETTER__EXCHANGE",
                    &sh.dead.dead_letter_exchange,
                );
            if stage != "upserter" {
                cmd.env("IOTP__REGISTRY_FILE", sh.registry);
            }
            if stage != "parser" {
                cmd.env("IOTP__STORE__PATH", sh.store_path);
            }
        }
    }
    for e in &cfg.env {
        if e.service.as_deref().is_none_or(|s| s == service) {
            cmd.env(&e.key, &e.value);
        }
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start iotp-{service} from {}", cfg.bin_dir.display()))?;
    let pid = child.id().unwrap_or(0);
    Ok(Replica {
        service,
        index,
        child,
        pid,
        admin_port,
    })
}

/// Wait until the replica on `admin_port` reports ready; how long that took.
pub async fn wait_ready(
    replica: &str,
    admin_port: u16,
    within: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !process::ready(admin_port).await {
        anyhow::ensure!(
            started.elapsed() < within,
            "{replica} not ready after {within:?}: see its log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_zero_keeps_the_old_ports_and_replicas_never_share_one() {
        assert_eq!(admin_port(9301, "mqtt-bridge", 0), 9301);
        assert_eq!(admin_port(9301, "dlq-handler", 0), 9306);
        assert_eq!(admin_port(9301, "mqtt-bridge", 1), 9307);
        let mut ports: Vec<u16> = SERVICES
            .iter()
            .flat_map(|s| (0..crate::chaos::MAX_REPLICAS).map(|i| admin_port(9301, s, i)))
            .collect();
        let n = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), n);
        assert_eq!(replica_name("parser", 2), "load-parser-2");
    }
}
