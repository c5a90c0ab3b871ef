//! The brokers a run starts for itself: Tansu (always, unless given one), and for a chaos run
//! that restarts them, a Mosquitto and a RabbitMQ node of its own — restarting the machine's
//! shared ones would break every other test and run that uses them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use iotp_core::probe;
use tokio::process::{Child, Command};

use super::process::{self, free_port};

/// How long a broker may take to listen again.
const LISTENING_WITHIN: Duration = Duration::from_secs(120);

/// A broker process of the run.
pub struct Broker {
    /// Its process.
    pub child: Child,
    /// Process id.
    pub pid: u32,
    /// Port it listens on.
    pub port: u16,
    /// How to start it again.
    command: (PathBuf, Vec<String>, Vec<(String, String)>),
    /// Working directory and log file.
    dir: PathBuf,
    log: PathBuf,
}

impl Broker {
    /// Start `program args` in `dir` (with `env`), its output appended to `log`, and wait until
    /// it listens on `port`; how long that took.
    async fn start(
        program: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        dir: &Path,
        log: PathBuf,
        port: u16,
    ) -> anyhow::Result<(Self, Duration)> {
        let started = Instant::now();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(&program)
            .args(&args)
            .envs(env.iter().cloned())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let pid = child.id().unwrap_or(0);
        probe::wait_for_port(port, LISTENING_WITHIN)
            .await
            .with_context(|| format!("{} not listening on :{port}", program.display()))?;
        Ok((
            Self {
                child,
                pid,
                port,
                command: (program, args, env),
                dir: dir.to_path_buf(),
                log,
            },
            started.elapsed(),
        ))
    }

    /// Start it again with the same command (after it exited); how long until it listened.
    pub async fn start_again(&mut self) -> anyhow::Result<Duration> {
        let (program, args, env) = self.command.clone();
        let (again, took) = Self::start(
            program,
            args,
            env,
            &self.dir.clone(),
            self.log.clone(),
            self.port,
        )
        .await?;
        *self = again;
        Ok(took)
    }

    /// Send `signal`, wait for the exit (`kill -9` after `within`); the CPU seconds it used.
    pub async fn stop(&mut self, signal: &str, within: Duration) -> f64 {
        process::signal(self.pid, signal);
        process::reap(&mut self.child, self.pid, within).await.1
    }
}

/// Tansu on `kafka` (`host:port`) with `engine` (`sqlite`: `tansu.db` in `dir`, or
/// `memory`).
pub async fn tansu(bin: &Path, kafka: &str, engine: &str, dir: &Path) -> anyhow::Result<Broker> {
    let port: u16 = kafka.rsplit(':').next().unwrap_or("9094").parse()?;
    let storage = match engine {
        "memory" => "memory://tansu/",
        // Relative to its working directory, the run directory.
        _ => "sqlite://tansu.db",
    };
    let args = [
        "broker",
        "--listener-url",
        &format!("tcp://{kafka}"),
        "--advertised-listener-url",
        &format!("tcp://{kafka}"),
        "--storage-engine",
        storage,
    ]
    .map(String::from)
    .to_vec();
    let log = dir.join("logs/tansu.log");
    Ok(
        Broker::start(bin.to_path_buf(), args, vec![], dir, log, port)
            .await?
            .0,
    )
}

/// The project's Mosquitto binary: `IOTP_MOSQUITTO`, else the one dev/brokers.sh installs.
fn mosquitto_binary() -> PathBuf {
    std::env::var_os("IOTP_MOSQUITTO")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/iotp/mosquitto-2.0.21/usr/sbin/mosquitto")
        })
}

/// A Mosquitto of the run's own, from the project's `dev/mosquitto.conf` (same queue limits,
/// persistence in `dir/mosquitto`), on a free port; with `tls` (a CA directory holding the
/// broker's certificate) from `dev/mosquitto-tls.conf` and the ACL `dev/mosquitto.acl`.
pub async fn mosquitto(repo: &Path, dir: &Path, tls: Option<&Path>) -> anyhow::Result<Broker> {
    let file = if tls.is_some() {
        "dev/mosquitto-tls.conf"
    } else {
        "dev/mosquitto.conf"
    };
    let template = std::fs::read_to_string(repo.join(file))
        .with_context(|| format!("{file} (run from the repository's root)"))?;
    let data = dir.join("mosquitto");
    std::fs::create_dir_all(&data)?;
    let port = free_port()?;
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let conf = template
        .replace("@PORT@", &port.to_string())
        .replace("@BIND@", "127.0.0.1")
        .replace("@USER@", &user)
        .replace("@DIR@", &data.to_string_lossy())
        .replace("@PKI@", &tls.unwrap_or(dir).to_string_lossy())
        .replace("@ACL@", &repo.join("dev/mosquitto.acl").to_string_lossy());
    let path = data.join("mosquitto.conf");
    std::fs::write(&path, conf)?;
    let args = vec!["-c".to_string(), path.to_string_lossy().into_owned()];
    let log = dir.join("logs/mosquitto.out");
    Ok(
        Broker::start(mosquitto_binary(), args, vec![], &data, log, port)
            .await?
            .0,
    )
}

/// A RabbitMQ node of the run's own (its name, data and Erlang cookie in `dir/rabbitmq`,
/// no plugins), on a free port. Started in the foreground as our child, so it goes with us.
pub struct RabbitNode {
    /// The node's process.
    pub broker: Broker,
    /// `name@localhost`.
    pub node: String,
    env: Vec<(String, String)>,
}

/// Where Debian's package puts RabbitMQ's scripts (the ones in /usr/sbin switch to the
/// `rabbitmq` user and the machine's node).
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

impl RabbitNode {
    /// Start it; its AMQP URI is [`RabbitNode::uri`].
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let data = dir.join("rabbitmq");
        std::fs::create_dir_all(&data)?;
        std::fs::write(data.join("enabled_plugins"), "[].\n")?;
        let port = free_port()?;
        let node = format!("iotp-load-{}@localhost", std::process::id());
        let d = |sub: &str| data.join(sub).to_string_lossy().into_owned();
        let env: Vec<(String, String)> = [
            // The cookie rabbitmqctl and the node share.
            ("HOME", d("")),
            ("RABBITMQ_NODENAME", node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", port.to_string()),
            ("RABBITMQ_DIST_PORT", free_port()?.to_string()),
            ("RABBITMQ_MNESIA_BASE", d("mnesia")),
            ("RABBITMQ_LOG_BASE", d("log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins")),
            // Not the machine's rabbitmq-env.conf (it names the machine's node).
            ("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf")),
            ("RABBITMQ_CONFIG_FILE", d("rabbitmq")),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .to_vec();
        let log = dir.join("logs/rabbitmq.out");
        let program = Path::new(RABBITMQ_BIN).join("rabbitmq-server");
        let (broker, _) = Broker::start(program, vec![], env.clone(), &data, log, port).await?;
        Ok(Self { broker, node, env })
    }

    /// Its AMQP URI.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.broker.port)
    }

    /// `rabbitmqctl -n <node> <args>`.
    async fn ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let status = Command::new(Path::new(RABBITMQ_BIN).join("rabbitmqctl"))
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "rabbitmqctl {args:?}: {status}");
        Ok(())
    }

    /// Stop and start the RabbitMQ application (the Erlang node stays up; durable exchanges
    /// and quorum queues, with their messages, come back); how long until AMQP listened again.
    pub async fn restart_app(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.ctl(&["stop_app"]).await?;
        self.ctl(&["start_app"]).await?;
        probe::wait_for_port(self.broker.port, LISTENING_WITHIN).await?;
        Ok(started.elapsed())
    }

    /// Stop the node.
    pub async fn stop(mut self) {
        if self.ctl(&["stop"]).await.is_err() {
            process::signal(self.broker.pid, "KILL");
        }
        let _ = process::reap(
            &mut self.broker.child,
            self.broker.pid,
            Duration::from_secs(30),
        )
        .await;
    }
}
