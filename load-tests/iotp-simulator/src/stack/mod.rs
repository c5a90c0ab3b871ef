//! The pipeline under test: its own Kafka-protocol broker (Tansu, SQLite or in-memory engine,
//! unless one is given), the six services as child processes of this tool (so their CPU time
//! and RSS can be read from /proc), one or more replicas each, and what a chaos run does to
//! them while the fleet publishes: scale a service, `kill -9` a replica (started again with
//! its name), `kill -9` Tansu, restart RabbitMQ or Mosquitto (the run's own, see
//! [`brokers`]).
//!
//! Every operation takes `&self`: the chaos phase runs them while the monitor reads the
//! [`Roster`] (who lives now, what the ones gone used) and the fleet publishes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use iotp_contract::topology::{topology, RabbitTopology};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::process::Command;

use crate::chaos::Chaos;
use crate::load::ServiceEnv;
use crate::report::{reading, PerProcess, Totals, MACHINE};

mod brokers;
mod ops;
mod process;
mod replica;

pub use process::{cpu_seconds, disk_written, machine_busy_seconds, rss_bytes, scrape, wakeups};
use replica::{Replica, Shared};

/// The services, in start order.
pub const SERVICES: [&str; 6] = [
    "mqtt-bridge",
    "parser",
    "enricher",
    "upserter",
    "aggregator",
    "dlq-handler",
];

/// How long a replica may take to report ready.
const READY_WITHIN: Duration = Duration::from_secs(90);

/// How long a replica may take to exit after SIGTERM: its drain deadline
/// (`common.shutdown_deadline`, 25 s) and some.
const EXIT_WITHIN: Duration = Duration::from_secs(40);

/// How to run the stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Where the service binaries are (`target/release`).
    pub bin_dir: PathBuf,
    /// Logs, store, registry go here.
    pub run_dir: PathBuf,
    /// Mosquitto port (the machine's; a run with its own Mosquitto takes another).
    pub mqtt_port: u16,
    /// Start a Mosquitto of the run's own (from `dev/mosquitto.conf`) even if nothing restarts
    /// it: a test that must not depend on the machine's.
    pub own_mosquitto: bool,
    /// Kafka bootstrap `host:port`.
    pub kafka: String,
    /// Start Tansu (this binary) on the `kafka` port; `None`: use a running broker.
    pub tansu: Option<PathBuf>,
    /// Tansu's storage engine: `sqlite` (a file in the run directory) or `memory`.
    pub engine: String,
    /// First admin port (replica 0 of each service on consecutive ones, see
    /// [`replica::admin_port`]).
    pub admin_port: u16,
    /// Dead-letter API port of the DLQ handler.
    pub api_port: u16,
    /// Extra environment, per service or for all (`--service-env`).
    pub env: Vec<ServiceEnv>,
    /// Tenants the run's bridge subscribes to (its own shared group and client ids, so a run
    /// never takes, nor leaves behind for, another run's or the demo's bridge).
    pub tenants: Vec<String>,
    /// RabbitMQ, where the run declares its own dead-letter topology (a run with its own
    /// RabbitMQ node takes that one's).
    pub amqp_uri: String,
    /// Replicas at the start and the brokers the run restarts (then its own).
    pub chaos: Chaos,
    /// The repository (for `dev/mosquitto.conf`).
    pub repo: PathBuf,
    /// The iotp-pki CA directory of a TLS run (scenario `tls`): the run starts its own
    /// Mosquitto from dev/mosquitto-tls.conf, the bridge connects with the `iotp-bridge`
    /// certificate. `None`: plain MQTT.
    pub tls: Option<PathBuf>,
    /// Partitions of every Kafka topic, instead of the topology's (`iotp-topology apply
    /// --partitions`).
    pub partitions: Option<i32>,
}

impl StackConfig {
    /// The run's bridge shared-subscription group; it prefixes the client ids and the run's
    /// dead-letter topology.
    pub fn bridge_group(&self) -> String {
        format!(
            "load-bridge-{}",
            self.tenants.first().map(String::as_str).unwrap_or("run")
        )
    }

    /// A TLS run's CA certificate and the bridge's certificate and key (issued by
    /// [`Stack::start`]).
    pub fn bridge_tls(&self) -> Option<BridgeTls> {
        self.tls.as_ref().map(|dir| BridgeTls {
            ca_file: dir.join(iotp_pki::CA_CERT),
            cert_file: dir
                .join("bridge")
                .join(format!("{}.pem", iotp_pki::BRIDGE_NAME)),
            key_file: dir
                .join("bridge")
                .join(format!("{}.key", iotp_pki::BRIDGE_NAME)),
        })
    }

    /// The MQTT client id of bridge replica `index`: its persistent session.
    pub fn bridge_client_id(&self, index: usize) -> String {
        format!("{}-{index}", self.bridge_group())
    }

    /// The run's own dead-letter exchange and queues (the pipeline's names with the run's
    /// prefix, same retry delays): a concurrent run, a test or the demo never takes this run's
    /// dead letters, nor this run theirs.
    pub fn dead_letter_topology(&self) -> RabbitTopology {
        let r = &topology().rabbitmq;
        let prefix = self.bridge_group();
        RabbitTopology {
            dead_letter_exchange: format!("{prefix}.{}", r.dead_letter_exchange),
            incoming_queue: format!("{prefix}.{}", r.incoming_queue),
            retry_exchange: format!("{prefix}.{}", r.retry_exchange),
            retry_delays: r.retry_delays().into_iter().map(Into::into).collect(),
            parking_queue: format!("{prefix}.{}", r.parking_queue),
        }
    }
}

/// The files of the bridge's TLS identity.
#[derive(Debug, Clone)]
pub struct BridgeTls {
    /// The CA certificate (the broker's issuer).
    pub ca_file: PathBuf,
    /// The bridge's certificate, CN `iotp-bridge`.
    pub cert_file: PathBuf,
    /// Its key.
    pub key_file: PathBuf,
}

impl BridgeTls {
    /// A TLS transport with this identity.
    pub fn transport(&self) -> anyhow::Result<rumqttc::Transport> {
        iotp_core::mqtt::tls_transport(&self.ca_file, Some(&self.cert_file), Some(&self.key_file))
    }
}

/// Make the CA in `dir` (if it holds none) and issue the broker's certificate (localhost,
/// 127.0.0.1) and the bridge's.
fn prepare_ca(dir: &Path) -> anyhow::Result<()> {
    let mut ca = match iotp_pki::Ca::open(dir) {
        Ok(ca) => ca,
        Err(iotp_pki::PkiError::NoCa(_)) => iotp_pki::Ca::init(dir, "iotp load-test CA", 30)?,
        Err(e) => return Err(e.into()),
    };
    let validity = iotp_pki::Validity::days(30)?;
    ca.issue_broker(
        "mosquitto",
        &["localhost".to_string(), "127.0.0.1".to_string()],
        validity,
    )?;
    ca.issue_bridge(iotp_pki::BRIDGE_NAME, validity)?;
    Ok(())
}

/// A live process of the stack as the monitor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Service (or `tansu`).
    pub service: String,
    /// Replica name (`load-parser-1`, `tansu`).
    pub replica: String,
    /// Process id.
    pub pid: u32,
    /// Admin port (0: none).
    pub admin_port: u16,
}

/// Who lives now, and what the processes that are gone used.
#[derive(Debug, Default)]
pub struct Roster {
    /// The live processes.
    pub live: Vec<Member>,
    /// CPU seconds each process that exited used in all, by service.
    pub gone_cpu: Vec<(String, f64)>,
    /// Every bridge client id a replica ever used.
    pub bridge_ids: BTreeSet<String>,
}

impl Roster {
    fn add(&mut self, m: Member) {
        self.live.push(m);
    }

    fn remove(&mut self, pid: u32, cpu: f64) {
        if let Some(i) = self.live.iter().position(|m| m.pid == pid) {
            let m = self.live.remove(i);
            self.gone_cpu.push((m.service, cpu));
        }
    }
}

/// `read` summed per service over the live processes, plus what `gone` processes left; every
/// service listed (0 when it has none), our broker when it runs.
fn per_service<'a>(
    roster: &'a Roster,
    read: impl Fn(u32) -> f64,
    gone: impl Iterator<Item = (&'a str, f64)>,
) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = SERVICES
        .iter()
        .map(|s| s.to_string())
        .chain(
            roster
                .live
                .iter()
                .any(|m| m.service == "tansu")
                .then(|| "tansu".into()),
        )
        .map(|s| (s, 0.0))
        .collect();
    let live = roster
        .live
        .iter()
        .map(|m| (m.service.as_str(), read(m.pid)));
    for (service, value) in live.chain(gone) {
        if let Some(slot) = out.iter_mut().find(|(s, _)| s == service) {
            slot.1 += value;
        }
    }
    out
}

/// A replica that exited on its own (not stopped by the run), started again.
#[derive(Debug, Clone)]
pub struct Crash {
    /// Its name.
    pub replica: String,
    /// When it was found gone, epoch ms.
    pub at: i64,
    /// Its exit code (`None`: ended by a signal).
    pub code: Option<i32>,
}

/// The running stack.
pub struct Stack {
    cfg: StackConfig,
    registry: PathBuf,
    /// Store file.
    pub store_path: PathBuf,
    dead: RabbitTopology,
    replicas: tokio::sync::Mutex<Vec<Replica>>,
    roster: Arc<Mutex<Roster>>,
    tansu: tokio::sync::Mutex<Option<brokers::Broker>>,
    mosquitto: tokio::sync::Mutex<Option<brokers::Broker>>,
    rabbitmq: Option<brokers::RabbitNode>,
    rng: Mutex<StdRng>,
    /// Start replicas that exit on their own again (chaos runs, as Kubernetes would).
    supervise: bool,
    crashes: Mutex<Vec<Crash>>,
}

impl Stack {
    /// Start the brokers (those asked for), create the topology, start every service's
    /// replicas and wait until each reports ready.
    pub async fn start(cfg: &StackConfig, registry: &Path, seed: u64) -> anyhow::Result<Self> {
        let mut cfg = cfg.clone();
        std::fs::create_dir_all(cfg.run_dir.join("logs"))?;
        if let Some(dir) = &cfg.tls {
            prepare_ca(dir).with_context(|| format!("the CA in {}", dir.display()))?;
        }
        let mosquitto = if cfg.own_mosquitto || cfg.chaos.restarts_mosquitto() || cfg.tls.is_some()
        {
            let m = brokers::mosquitto(&cfg.repo, &cfg.run_dir, cfg.tls.as_deref()).await?;
            cfg.mqtt_port = m.port;
            Some(m)
        } else {
            None
        };
        let rabbitmq = if cfg.chaos.restarts_rabbitmq() {
            let r = brokers::RabbitNode::start(&cfg.run_dir).await?;
            cfg.amqp_uri = r.uri();
            Some(r)
        } else {
            None
        };
        let roster: Arc<Mutex<Roster>> = Arc::default();
        let tansu = match &cfg.tansu {
            Some(bin) => {
                let b = brokers::tansu(bin, &cfg.kafka, &cfg.engine, &cfg.run_dir).await?;
                lock(&roster).add(tansu_member(b.pid));
                Some(b)
            }
            None => None,
        };
        let mut apply = Command::new(cfg.bin_dir.join("iotp-topology"));
        apply.args(["apply", "--brokers", &cfg.kafka]);
        if let Some(n) = cfg.partitions {
            apply.args(["--partitions", &n.to_string()]);
        }
        let status = apply
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
        let stack = Self {
            store_path: cfg.run_dir.join("iotp.sqlite"),
            registry: registry.to_path_buf(),
            dead,
            replicas: tokio::sync::Mutex::default(),
            roster,
            tansu: tokio::sync::Mutex::new(tansu),
            mosquitto: tokio::sync::Mutex::new(mosquitto),
            rabbitmq,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            supervise: !cfg.chaos.is_empty(),
            crashes: Mutex::default(),
            cfg,
        };
        for service in SERVICES {
            let n = stack.cfg.chaos.initial_replicas(service);
            stack.scale(service, n).await?;
        }
        Ok(stack)
    }

    /// The CA directory of a TLS run.
    pub fn tls_ca_dir(&self) -> Option<PathBuf> {
        self.cfg.tls.clone()
    }

    /// The bridge's TLS identity in a TLS run.
    pub fn bridge_tls(&self) -> Option<BridgeTls> {
        self.cfg.bridge_tls()
    }

    /// The MQTT port the fleet and the bridge use.
    pub fn mqtt_port(&self) -> u16 {
        self.cfg.mqtt_port
    }

    /// Who lives now and what the gone used, shared with the monitor.
    pub fn roster(&self) -> Arc<Mutex<Roster>> {
        self.roster.clone()
    }

    /// The live processes now.
    pub fn members(&self) -> Vec<Member> {
        lock(&self.roster).live.clone()
    }

    /// Admin ports of the live replicas of `service`.
    pub fn ports(&self, service: &str) -> Vec<u16> {
        self.members()
            .into_iter()
            .filter(|m| m.service == service)
            .map(|m| m.admin_port)
            .collect()
    }

    /// Every client id a bridge replica used in this run.
    pub fn bridge_client_ids(&self) -> Vec<String> {
        lock(&self.roster).bridge_ids.iter().cloned().collect()
    }

    /// What each service (all its replicas) and our broker had used so far: CPU seconds (the
    /// exited replicas' included), and the wake-ups (voluntary context switches) of the live
    /// threads and the bytes the live processes wrote to storage (replicas that exited are not
    /// counted in those two); last, the whole machine's busy CPU seconds as [`MACHINE`].
    pub fn totals(&self) -> PerProcess<Totals> {
        let roster = lock(&self.roster);
        let gone = roster.gone_cpu.iter().map(|(s, c)| (s.as_str(), *c));
        let cpu = per_service(&roster, cpu_seconds, gone);
        let woke = per_service(&roster, |pid| wakeups(pid) as f64, std::iter::empty());
        let wrote = per_service(&roster, |pid| disk_written(pid) as f64, std::iter::empty());
        let machine = Totals {
            cpu_seconds: machine_busy_seconds(),
            ..Totals::default()
        };
        cpu.iter()
            .map(|(name, seconds)| {
                let totals = Totals {
                    cpu_seconds: *seconds,
                    wakeups: reading(&woke, name),
                    disk_bytes: reading(&wrote, name),
                };
                (name.clone(), totals)
            })
            .chain([(MACHINE.to_string(), machine)])
            .collect()
    }

    fn shared(&self) -> Shared<'_> {
        Shared {
            cfg: &self.cfg,
            registry: &self.registry,
            store_path: &self.store_path,
            dead: &self.dead,
        }
    }

    /// Start replica `index` of `service`; its name and admin port.
    async fn spawn_replica(
        &self,
        service: &'static str,
        index: usize,
    ) -> anyhow::Result<(String, u16)> {
        let r = replica::spawn(&self.shared(), service, index)?;
        let (name, port) = (r.name(), r.admin_port);
        {
            let mut roster = lock(&self.roster);
            roster.add(Member {
                service: service.to_string(),
                replica: name.clone(),
                pid: r.pid,
                admin_port: port,
            });
            if service == "mqtt-bridge" {
                roster.bridge_ids.insert(self.cfg.bridge_client_id(index));
            }
        }
        self.replicas.lock().await.push(r);
        Ok((name, port))
    }

    /// Wait until replica `name` on `port` is ready.
    async fn ready(&self, name: &str, port: u16) -> anyhow::Result<Duration> {
        replica::wait_ready(name, port, READY_WITHIN)
            .await
            .with_context(|| format!("in {}", self.cfg.run_dir.join("logs").display()))
    }

    /// Stop a replica: `signal`, then wait for its exit (`kill -9` after [`EXIT_WITHIN`]); its
    /// exit code (`None`: ended by a signal).
    async fn stop_replica(&self, mut r: Replica, signal: &str) -> Option<i32> {
        process::signal(r.pid, signal);
        let (status, cpu) = process::reap(&mut r.child, r.pid, EXIT_WITHIN).await;
        lock(&self.roster).remove(r.pid, cpu);
        status.and_then(|s| s.code())
    }

    /// SIGTERM every replica (last service first, highest index first), one after the
    /// other; each one's exit code by replica name.
    pub async fn stop_services(&self) -> Vec<(String, Option<i32>)> {
        let mut all = std::mem::take(&mut *self.replicas.lock().await);
        all.sort_by_key(|r| {
            (
                SERVICES.iter().position(|s| *s == r.service).unwrap_or(0),
                r.index,
            )
        });
        let mut out = Vec::new();
        while let Some(r) = all.pop() {
            let name = r.name();
            let code = self.stop_replica(r, "TERM").await;
            out.push((name, code));
        }
        out.reverse();
        if let Err(e) = self.delete_dead_letter_topology().await {
            eprintln!("iotp-load: cannot delete the run's dead-letter queues: {e:#}");
        }
        out
    }

    async fn delete_dead_letter_topology(&self) -> anyhow::Result<()> {
        let conn = iotp_core::amqp::connect(&self.cfg.amqp_uri).await?;
        iotp_core::amqp::delete_topology(&conn.create_channel().await?, &self.dead).await?;
        let _ = conn.close(200, "deleted".into()).await;
        Ok(())
    }

    /// Stop the brokers we started.
    pub async fn stop_brokers(self) {
        if let Some(mut t) = self.tansu.lock().await.take() {
            t.stop("KILL", Duration::from_secs(10)).await;
        }
        if let Some(mut m) = self.mosquitto.lock().await.take() {
            m.stop("TERM", Duration::from_secs(30)).await;
        }
        if let Some(r) = self.rabbitmq {
            r.stop().await;
        }
    }
}

fn tansu_member(pid: u32) -> Member {
    Member {
        service: "tansu".into(),
        replica: "tansu".into(),
        pid,
        admin_port: 0,
    }
}

/// The lock, even if a thread panicked holding it (the data stays usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
