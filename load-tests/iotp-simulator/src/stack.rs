//! The pipeline under test: its own Kafka-protocol broker (Tansu, SQLite or in-memory engine,
//! unless one is given), the six services as child processes of this tool (so their CPU time and RSS can
//! be read from /proc), their metrics.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::load::ServiceEnv;
use anyhow::Context as _;
use iotp_contract::topology::{topology, RabbitTopology};
use iotp_core::probe;
use tokio::process::{Child, Command};

/// The services, in start order, with their admin port offset.
pub const SERVICES: [&str; 6] = [
    "mqtt-bridge",
    "parser",
    "enricher",
    "upserter",
    "aggregator",
    "dlq-handler",
];

/// How to run the stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Where the service binaries are (`target/release`).
    pub bin_dir: PathBuf,
    /// Logs, store, registry go here.
    pub run_dir: PathBuf,
    /// Mosquitto port.
    pub mqtt_port: u16,
    /// Kafka bootstrap `host:port`.
    pub kafka: String,
    /// Start Tansu (this binary) on the `kafka` port; `None`: use a running broker.
    pub tansu: Option<PathBuf>,
    /// Tansu's storage engine: `sqlite` (a file in the run directory) or `memory`.
    pub engine: String,
    /// First admin port (services take consecutive ones).
    pub admin_port: u16,
    /// Dead-letter API port of the DLQ handler.
    pub api_port: u16,
    /// Extra environment, per service or for all (`--service-env`).
    pub env: Vec<ServiceEnv>,
    /// Tenants the run's bridge subscribes to (its own shared group and client id, so a run
    /// never takes, nor leaves behind for, another run's or the demo's bridge).
    pub tenants: Vec<String>,
    /// RabbitMQ, where the run declares its own dead-letter topology.
    pub amqp_uri: String,
}

impl StackConfig {
    /// The run's bridge client id.
    pub fn bridge_client_id(&self) -> String {
        format!(
            "load-bridge-{}",
            self.tenants.first().map(String::as_str).unwrap_or("run")
        )
    }

    /// The run's own dead-letter exchange and queues (the pipeline's names with the run's
    /// prefix, same retry delays): a concurrent run, a test or the demo never takes this run's
    /// dead letters, nor this run theirs.
    pub fn dead_letter_topology(&self) -> RabbitTopology {
        let r = &topology().rabbitmq;
        let prefix = self.bridge_client_id();
        RabbitTopology {
            dead_letter_exchange: format!("{prefix}.{}", r.dead_letter_exchange),
            incoming_queue: format!("{prefix}.{}", r.incoming_queue),
            retry_exchange: format!("{prefix}.{}", r.retry_exchange),
            retry_delays: r.retry_delays().into_iter().map(Into::into).collect(),
            parking_queue: format!("{prefix}.{}", r.parking_queue),
        }
    }
}

/// A running service.
pub struct Service {
    /// Name (`parser`, …).
    pub name: &'static str,
    /// Its process.
    pub child: Child,
    /// Process id.
    pub pid: u32,
    /// Admin port (`/metrics`, `/readyz`).
    pub admin_port: u16,
}

/// The running stack.
pub struct Stack {
    /// Services.
    pub services: Vec<Service>,
    /// Our own broker, if we started one.
    pub tansu: Option<(Child, u32)>,
    /// Store file.
    pub store_path: PathBuf,
    /// The run's own dead-letter topology, deleted when the services stop.
    dead_letters: (String, RabbitTopology),
    /// The bridge's MQTT client id (its persistent session on the broker) and the port.
    pub bridge_session: (String, u16),
}

impl Stack {
    /// Start the broker (if asked), create the topology, start every service and wait until
    /// each reports ready.
    pub async fn start(cfg: &StackConfig, registry: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(cfg.run_dir.join("logs"))?;
        let tansu = match &cfg.tansu {
            Some(bin) => {
                let port = cfg.kafka.rsplit(':').next().unwrap_or("9094");
                let log = std::fs::File::create(cfg.run_dir.join("logs/tansu.log"))?;
                let child = Command::new(bin)
                    .args(["broker", "--listener-url"])
                    .arg(format!("tcp://{}", cfg.kafka))
                    .arg("--advertised-listener-url")
                    .arg(format!("tcp://{}", cfg.kafka))
                    .arg("--storage-engine")
                    .arg(match cfg.engine.as_str() {
                        "memory" => "memory://tansu/".to_string(),
                        // Relative to its working directory, the run directory.
                        _ => "sqlite://tansu.db".to_string(),
                    })
                    .current_dir(&cfg.run_dir)
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("cannot start {}", bin.display()))?;
                let pid = child.id().unwrap_or(0);
                probe::wait_for_port(port.parse()?, Duration::from_secs(30)).await?;
                Some((child, pid))
            }
            None => None,
        };
        let status = Command::new(cfg.bin_dir.join("iotp-topology"))
            .args(["apply", "--brokers", &cfg.kafka])
            .stdout(Stdio::null())
            .status()
            .await
            .context("iotp-topology")?;
        anyhow::ensure!(status.success(), "iotp-topology apply failed: {status}");
        let dead = cfg.dead_letter_topology();
        let conn = iotp_core::amqp::connect(&cfg.amqp_uri)
            .await
            .context("rabbitmq")?;
        iotp_core::amqp::declare_topology(&conn.create_channel().await?, &dead)
            .await
            .context("declaring the run's dead-letter topology")?;
        let _ = conn.close(200, "declared".into()).await;
        let store_path = cfg.run_dir.join("iotp.sqlite");
        let mut services = Vec::new();
        for (i, name) in SERVICES.into_iter().enumerate() {
            let admin_port = cfg.admin_port + i as u16;
            let log = std::fs::File::create(cfg.run_dir.join(format!("logs/{name}.log")))?;
            let mut cmd = Command::new(cfg.bin_dir.join(format!("iotp-{name}")));
            cmd.env("IOTP__COMMON__REPLICA", format!("load-{name}-0"))
                .env(
                    "IOTP__COMMON__ADMIN_LISTEN",
                    format!("127.0.0.1:{admin_port}"),
                )
                .env("IOTP__COMMON__LOG_FORMAT", "json")
                .env("IOTP__KAFKA__BROKERS", &cfg.kafka)
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true);
            match name {
                "mqtt-bridge" => {
                    let group = cfg.bridge_client_id();
                    let filters: Vec<String> = cfg
                        .tenants
                        .iter()
                        .map(|t| format!("\"$share/{group}/iot/{t}/+/+\""))
                        .collect();
                    cmd.env("IOTP__MQTT__PORT", cfg.mqtt_port.to_string())
                        .env("IOTP__MQTT__CLIENT_ID", &group)
                        .env(
                            "IOTP__MQTT__SUBSCRIPTIONS",
                            format!("[{}]", filters.join(",")),
                        )
                        // A killed run's queue must not outlive the run for long.
                        .env("IOTP__MQTT__SESSION_EXPIRY", "10m");
                }
                "dlq-handler" => {
                    cmd.env("IOTP__STORE__PATH", &store_path)
                        .env("IOTP__API_LISTEN", format!("127.0.0.1:{}", cfg.api_port))
                        .env("IOTP__AMQP_URI", &cfg.amqp_uri)
                        .env("IOTP__RABBITMQ__INCOMING_QUEUE", &dead.incoming_queue)
                        .env("IOTP__RABBITMQ__PARKING_QUEUE", &dead.parking_queue)
                        .env("IOTP__RABBITMQ__RETRY_EXCHANGE", &dead.retry_exchange);
                }
                // The Kafka stages.
                stage => {
                    cmd.env("IOTP__IO__DEAD_LETTER__AMQP_URI", &cfg.amqp_uri)
                        .env(
                            "IOTP__IO__DEAD_LETTER__EXCHANGE",
                            &dead.dead_letter_exchange,
                        );
                    if stage != "upserter" {
                        cmd.env("IOTP__REGISTRY_FILE", registry);
                    }
                    if stage != "parser" {
                        cmd.env("IOTP__STORE__PATH", &store_path);
                    }
                }
            }
            for e in &cfg.env {
                if e.service.as_deref().is_none_or(|s| s == name) {
                    cmd.env(&e.key, &e.value);
                }
            }
            let child = cmd.spawn().with_context(|| {
                format!("cannot start iotp-{name} from {}", cfg.bin_dir.display())
            })?;
            let pid = child.id().unwrap_or(0);
            services.push(Service {
                name,
                child,
                pid,
                admin_port,
            });
        }
        let stack = Self {
            services,
            tansu,
            store_path,
            dead_letters: (cfg.amqp_uri.clone(), dead),
            bridge_session: (cfg.bridge_client_id(), cfg.mqtt_port),
        };
        for s in &stack.services {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if probe::get(s.admin_port, "/readyz")
                    .await
                    .is_ok_and(|r| r.is_success())
                {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "iotp-{} not ready after 60 s: see {}",
                    s.name,
                    cfg.run_dir.join(format!("logs/{}.log", s.name)).display()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(stack)
    }

    /// Every process of the stack, the services in start order then our broker: (name, pid).
    pub fn processes(&self) -> Vec<(String, u32)> {
        let services = self.services.iter().map(|s| (s.name.to_string(), s.pid));
        let broker = self
            .tansu
            .as_ref()
            .map(|(_, pid)| ("tansu".to_string(), *pid));
        services.chain(broker).collect()
    }

    /// CPU seconds each service (and our broker) used so far.
    pub fn cpu(&self) -> Vec<(String, f64)> {
        per_process(&self.processes(), cpu_seconds)
    }

    /// The service called `name` (`upserter`, …), if it runs.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// SIGTERM every service (last started first); each one's exit code.
    pub async fn stop_services(&mut self) -> Vec<(String, Option<i32>)> {
        let mut out = Vec::new();
        for s in self.services.iter_mut().rev() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &s.pid.to_string()])
                .status();
            let code = match tokio::time::timeout(Duration::from_secs(40), s.child.wait()).await {
                Ok(Ok(status)) => status.code(),
                _ => {
                    let _ = s.child.kill().await;
                    None
                }
            };
            out.push((s.name.to_string(), code));
        }
        out.reverse();
        if let Err(e) = self.delete_dead_letter_topology().await {
            eprintln!("iotp-load: cannot delete the run's dead-letter queues: {e:#}");
        }
        out
    }

    async fn delete_dead_letter_topology(&self) -> anyhow::Result<()> {
        let (uri, topology) = &self.dead_letters;
        let conn = iotp_core::amqp::connect(uri).await?;
        iotp_core::amqp::delete_topology(&conn.create_channel().await?, topology).await?;
        let _ = conn.close(200, "deleted".into()).await;
        Ok(())
    }

    /// Stop our broker, if we started one.
    pub async fn stop_broker(mut self) {
        if let Some((mut child, _)) = self.tansu.take() {
            let _ = child.kill().await;
        }
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of a process (0 if it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

/// Resident set size of a process, bytes (0 if it is gone).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// `read` of each process of `processes` (from [`Stack::processes`]), by name.
pub fn per_process<T>(processes: &[(String, u32)], read: impl Fn(u32) -> T) -> Vec<(String, T)> {
    processes
        .iter()
        .map(|(name, pid)| (name.clone(), read(*pid)))
        .collect()
}

/// The Prometheus text of the admin port `port`; `None` while it does not answer with 2xx.
pub async fn scrape(port: u16) -> Option<String> {
    probe::get(port, "/metrics")
        .await
        .ok()
        .filter(|r| r.is_success())
        .map(|r| r.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(rss_bytes(pid) > 1024 * 1024);
        assert!(cpu_seconds(pid) > 0.0);
        assert_eq!(rss_bytes(u32::MAX), 0);
    }
}
