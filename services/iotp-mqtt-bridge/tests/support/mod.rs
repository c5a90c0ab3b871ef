//! Test harness: the project's Mosquitto on a free port, bridge processes, a device fleet
//! publishing with a real MQTT client, and a Kafka reader. Broker addresses come from
//! `IOTP_TEST_KAFKA` (default 127.0.0.1:9092); `dev/brokers.sh up` starts it.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iotp_contract::{Codec, RawEnvelope};
use iotp_core::probe;
pub use iotp_core::testkit::{create_topic, kafka_brokers, read_topic_until, unique};

use rdkafka::Message;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Outgoing;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = repo_root().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} failed");
}

/// A Mosquitto started from `dev/mosquitto.conf` (the project's configuration).
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        Self::start_on(dir, port)
    }

    fn start_on(dir: &Path, port: u16) -> Self {
        let template = std::fs::read_to_string(repo_root().join("dev/mosquitto.conf")).unwrap();
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let conf = template
            .replace("@PORT@", &port.to_string())
            .replace("@BIND@", "127.0.0.1")
            .replace("@USER@", &user)
            .replace("@DIR@", dir.to_str().unwrap());
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        // The project's Mosquitto (`IOTP_MOSQUITTO`, set by the Makefile to the version
        // dev/brokers.sh installs); Debian 12's 2.0.11 overshoots the receive maximum.
        let binary = std::env::var("IOTP_MOSQUITTO").unwrap_or_else(|_| "mosquitto".into());
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary} (dev/brokers.sh up installs it): {e}")
            });
        if let Err(e) = probe::blocking::wait_for_port(port, Duration::from_secs(20)) {
            panic!("mosquitto did not start: {e}");
        }
        Self {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// SIGTERM (Mosquitto saves its state), wait, start again on the same port.
    pub fn restart(&mut self) {
        signal(&self.child, "TERM");
        self.child.wait().unwrap();
        let port = self.port;
        let dir = self.dir.clone();
        *self = Self::start_on(&dir, port);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bridge process.
pub struct Bridge {
    child: Option<Child>,
    pub replica: String,
    pub admin_port: u16,
}

pub struct BridgeSpec {
    pub mqtt_port: u16,
    pub topic: String,
    pub subscription: String,
    pub kafka: String,
    pub log_dir: PathBuf,
    /// Extra `IOTP__…` settings.
    pub env: Vec<(String, String)>,
}

impl Bridge {
    pub fn start(spec: &BridgeSpec, replica: &str) -> Self {
        let admin_port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.log_dir.join(format!("{replica}.log")))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_iotp-mqtt-bridge"))
            .env("IOTP__COMMON__REPLICA", replica)
            .env(
                "IOTP__COMMON__ADMIN_LISTEN",
                format!("127.0.0.1:{admin_port}"),
            )
            .env("IOTP__COMMON__LOG_FORMAT", "text")
            .env("IOTP__MQTT__PORT", spec.mqtt_port.to_string())
            .env(
                "IOTP__MQTT__SUBSCRIPTIONS",
                format!("[\"{}\"]", spec.subscription),
            )
            .env("IOTP__COMMON__BACKOFF__MAX", "1s")
            .env("IOTP__KAFKA__BROKERS", &spec.kafka)
            .env("IOTP__RAW_TOPIC", &spec.topic)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            replica: replica.to_string(),
            admin_port,
        }
    }

    /// Its `/metrics` text (empty while it does not answer).
    pub fn metrics(&self) -> String {
        probe::blocking::get(self.admin_port, "/metrics")
            .map(|r| r.body)
            .unwrap_or_default()
    }

    /// The status of a GET on its admin port (0 while it does not answer).
    pub fn status(&self, path: &str) -> u16 {
        probe::blocking::get(self.admin_port, path).map_or(0, |r| r.status)
    }

    pub fn wait_ready(&self) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if self.status("/readyz") == 200 {
                return;
            }
            assert!(Instant::now() < until, "bridge {} not ready", self.replica);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    /// SIGTERM and the exit code.
    pub fn terminate(&mut self) -> i32 {
        let mut child = self.child.take().unwrap();
        signal(&child, "TERM");
        child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What one device sent and which of its messages the broker acknowledged.
#[derive(Debug, Default)]
pub struct SentLog {
    pub acked: BTreeMap<String, Vec<i64>>,
}

impl SentLog {
    pub fn total(&self) -> usize {
        self.acked.values().map(Vec::len).sum()
    }
}

/// `devices` devices, each on its own MQTT 5 connection, each publishing `per_device` QoS 1
/// messages `iot/{tenant}/dev-{i}/telemetry` with payload `{"deviceId","seqNo"}`; returns the
/// PUBACKed (device, seqNo) pairs.
pub async fn publish_fleet(port: u16, tenant: &str, devices: usize, per_device: i64) -> SentLog {
    let mut tasks = Vec::new();
    for d in 0..devices {
        let tenant = tenant.to_string();
        tasks.push(tokio::spawn(async move {
            let device = format!("dev-{d:04}");
            let mut opts = MqttOptions::new(format!("{tenant}-{device}"), "127.0.0.1", port);
            // A hundred devices connect at once; on a loaded two-core machine some CONNACKs
            // came later than rumqttc's default 5 s.
            opts.set_keep_alive(Duration::from_secs(30))
                .set_connection_timeout(30);
            let (client, mut eventloop) = AsyncClient::new(opts, 64);
            let topic = format!("iot/{tenant}/{device}/telemetry");
            let publisher = {
                let client = client.clone();
                let device = device.clone();
                tokio::spawn(async move {
                    for seq in 0..per_device {
                        let payload = format!(
                            "{{\"deviceId\":\"{device}\",\"seqNo\":{seq},\"t\":{}}}",
                            iotp_contract::now_millis()
                        );
                        client
                            .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                            .await
                            .unwrap();
                    }
                })
            };
            let mut pkid_to_seq: HashMap<u16, i64> = HashMap::new();
            let mut next_seq = 0i64;
            let mut acked = Vec::new();
            let until = Instant::now() + Duration::from_secs(120);
            while (acked.len() as i64) < per_device && Instant::now() < until {
                match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                    Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        pkid_to_seq.insert(pkid, next_seq);
                        next_seq += 1;
                    }
                    Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(seq) = pkid_to_seq.remove(&ack.pkid) {
                            acked.push(seq);
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("device {device}: {e}"),
                    Err(_) => break,
                }
            }
            publisher.await.unwrap();
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
            acked.sort_unstable();
            (device, acked)
        }));
    }
    let mut log = SentLog::default();
    for t in tasks {
        let (device, acked) = t.await.unwrap();
        log.acked.insert(device, acked);
    }
    log
}

/// One record read back from the raw topic.
#[derive(Debug)]
pub struct Seen {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub envelope: RawEnvelope,
    pub seq_no: i64,
    pub raw: Vec<u8>,
}

/// Read `topic` from the beginning until every acked message was seen (or `timeout`).
pub async fn read_until_complete(topic: &str, sent: &SentLog, timeout: Duration) -> Vec<Seen> {
    let codec = Codec::<RawEnvelope>::latest().unwrap();
    let mut wanted: HashSet<(String, i64)> = sent
        .acked
        .iter()
        .flat_map(|(d, seqs)| seqs.iter().map(move |s| (d.clone(), *s)))
        .collect();
    let mut seen = Vec::new();
    if wanted.is_empty() {
        return seen;
    }
    read_topic_until(topic, timeout, |msg| {
        let raw = msg.payload().unwrap().to_vec();
        let envelope = codec.decode(&raw).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&envelope.payload).unwrap();
        let seq_no = body["seqNo"].as_i64().unwrap();
        wanted.remove(&(envelope.device_id.clone(), seq_no));
        seen.push(Seen {
            partition: msg.partition(),
            offset: msg.offset(),
            key: String::from_utf8(msg.key().unwrap_or_default().to_vec()).unwrap(),
            envelope,
            seq_no,
            raw,
        });
        wanted.is_empty()
    })
    .await;
    seen
}

/// Acked messages never seen in Kafka.
pub fn missing(sent: &SentLog, seen: &[Seen]) -> Vec<(String, i64)> {
    let got: HashSet<(&str, i64)> = seen
        .iter()
        .map(|s| (s.envelope.device_id.as_str(), s.seq_no))
        .collect();
    sent.acked
        .iter()
        .flat_map(|(d, seqs)| seqs.iter().map(move |s| (d.clone(), *s)))
        .filter(|(d, s)| !got.contains(&(d.as_str(), *s)))
        .collect()
}

pub fn assert_none_missing(sent: &SentLog, seen: &[Seen]) {
    let missing = missing(sent, seen);
    assert!(
        missing.is_empty(),
        "{} of {} PUBACKed messages missing from kafka ({} records read), e.g. {:?}",
        missing.len(),
        sent.total(),
        seen.len(),
        &missing[..missing.len().min(5)]
    );
}

/// The interpreter with fastavro: `IOTP_PYTHON`, else the venv `make test` prepares.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("IOTP_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap();
    PathBuf::from(home).join(".cache/iotp/venv/bin/python")
}

/// Decode raw topic records with fastavro and `schemas/` only; returns one JSON value each.
pub fn decode_with_fastavro(dir: &Path, records: &[&Seen]) -> Vec<serde_json::Value> {
    let values: Vec<&[u8]> = records.iter().map(|r| r.raw.as_slice()).collect();
    decode_values_with_fastavro(dir, &values)
}

/// Decode single-object encoded values with fastavro and `schemas/` only; one JSON value each.
pub fn decode_values_with_fastavro(dir: &Path, values: &[&[u8]]) -> Vec<serde_json::Value> {
    let mut files = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let path = dir.join(format!("record-{i:03}.avro"));
        std::fs::write(&path, v).unwrap();
        files.push(path);
    }
    let out = Command::new(python())
        .arg(repo_root().join("schemas/interop/decode.py"))
        .args(&files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (make test creates the venv with fastavro)",
                python().display()
            )
        });
    assert!(
        out.status.success(),
        "decode.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Forward `port` to the test Kafka from now on (until then nothing listens there, so a client
/// bootstrapping from it gets no broker: Kafka is down). The client learns the broker's own
/// address from its metadata and goes there directly after that.
pub async fn open_kafka_at(port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let target = kafka_brokers();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

/// What the broker still holds for the session `client_id`: whether it exists, and how many
/// device messages it sends within `wait`. Ends the session (only for after the bridges stopped).
pub async fn session_holds(port: u16, client_id: &str, wait: Duration) -> (bool, usize) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_clean_start(false)
        .set_session_expiry_interval(Some(0))
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let mut present = None;
    let mut messages = 0;
    let until = tokio::time::Instant::now() + wait;
    while let Ok(event) = tokio::time::timeout_at(until, eventloop.poll()).await {
        match event.unwrap() {
            Event::Incoming(Packet::ConnAck(ack)) => present = Some(ack.session_present),
            // A resumed bridge session is still subscribed to the broker's `$SYS` counters,
            // which arrive live while we wait: not something the session held.
            Event::Incoming(Packet::Publish(p)) if !p.topic.starts_with(b"$SYS/") => messages += 1,
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    (present.expect("connected"), messages)
}

/// A test's own Mosquitto, a raw topic with `partitions` partitions, and a bridge spec
/// subscribed to a fresh tenant's devices.
pub struct Setup {
    pub mosquitto: Mosquitto,
    pub spec: BridgeSpec,
    pub tenant: String,
}

pub async fn setup(name: &str, partitions: i32) -> Setup {
    let dir = scratch_dir(name);
    let mosquitto = Mosquitto::start(&dir);
    let tenant = unique("t");
    let topic = unique("test.raw.");
    create_topic(&topic, partitions).await;
    let spec = BridgeSpec {
        mqtt_port: mosquitto.port,
        topic,
        subscription: format!("$share/iotp-bridge/iot/{tenant}/+/+"),
        kafka: kafka_brokers(),
        log_dir: dir,
        env: Vec::new(),
    };
    Setup {
        mosquitto,
        spec,
        tenant,
    }
}
