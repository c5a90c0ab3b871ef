//! Runs the fleet: one MQTT 5 connection per device, QoS 1, persistent sessions, at most
//! `max_inflight` unacknowledged publishes per device, an optional fleet-wide rate, and a
//! ledger of which message the broker acknowledged (PUBACK matched to the message by packet
//! id; a retransmission after a reconnect keeps its packet id).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Outgoing;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::device::{encode, Device, PayloadFault};
use crate::plan::{DevicePlan, Fault, Step};
use crate::scenario::Scenario;

/// Where and as whom the fleet publishes.
#[derive(Debug, Clone)]
pub struct Target {
    /// MQTT broker host.
    pub host: String,
    /// MQTT broker port.
    pub port: u16,
    /// Tenant of every device.
    pub tenant: String,
    /// First seqNo of every device (numbering continues across runs).
    pub seq_start: u64,
    /// Topics are `{prefix}/{tenant}/{deviceId}/{kind}`; the pipeline's prefix is `iot`.
    pub topic_prefix: String,
}

/// Live counters, for a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    /// Publishes handed to the client (telemetry, resends, heartbeats).
    pub published: AtomicU64,
    /// PUBACKs with a success reason.
    pub acked: AtomicU64,
    /// Connection errors (each followed by a reconnect).
    pub connection_errors: AtomicU64,
    /// Acks per second since the start.
    pub acks_per_second: Mutex<Vec<u64>>,
}

/// What one device sent and what the broker acknowledged. Index = seqNo - seq_start.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceLedger {
    /// Device id.
    pub id: String,
    /// In the registry.
    pub registered: bool,
    /// Readings per telemetry message.
    pub readings: i64,
    /// The fault each seqNo carries.
    #[serde(skip)]
    pub faults: Vec<Option<Fault>>,
    /// Publishes of each seqNo (a resend makes 2).
    #[serde(skip)]
    pub publishes: Vec<u16>,
    /// PUBACKs of each seqNo.
    #[serde(skip)]
    pub acks: Vec<u16>,
    /// Heartbeats acknowledged.
    pub heartbeats_acked: u64,
    /// Device time of the last acknowledged heartbeat, epoch ms.
    pub last_heartbeat_at: i64,
    /// PUBACKs with an error reason (the broker refused the message).
    pub refused: u64,
    /// Publishes lost by the client because the broker had no session on reconnect.
    pub abandoned: u64,
}

/// The whole run.
#[derive(Debug)]
pub struct FleetRun {
    /// Per device.
    pub devices: Vec<DeviceLedger>,
    /// First seqNo.
    pub seq_start: u64,
    /// When publishing started / ended, epoch ms.
    pub started_at: i64,
    /// When the last PUBACK arrived (or the run gave up), epoch ms.
    pub finished_at: i64,
}

impl FleetRun {
    /// Telemetry publishes acknowledged (resends included, heartbeats not).
    pub fn acked(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| d.acks.iter().map(|a| u64::from(*a)).sum::<u64>())
            .sum()
    }

    /// Heartbeats acknowledged.
    pub fn heartbeats(&self) -> u64 {
        self.devices.iter().map(|d| d.heartbeats_acked).sum()
    }

    /// Telemetry publishes attempted (resends included, heartbeats not).
    pub fn published(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| d.publishes.iter().map(|a| u64::from(*a)).sum::<u64>())
            .sum()
    }
}

#[derive(Debug, Clone, Copy)]
enum Item {
    Telemetry(usize),
    Heartbeat(i64),
}

struct Shared {
    order: VecDeque<Item>,
    inflight: HashMap<u16, Item>,
    ledger: DeviceLedger,
}

struct Run {
    target: Target,
    scenario: Scenario,
    interval: Option<Duration>,
    started: Instant,
    progress: Arc<Progress>,
}

/// Run the planned fleet to completion (or until acknowledgements stall).
pub async fn run(
    target: Target,
    scenario: &Scenario,
    plans: Vec<DevicePlan>,
    progress: Arc<Progress>,
) -> anyhow::Result<FleetRun> {
    let started_at = now_millis();
    let total_devices = plans.len();
    let run = Arc::new(Run {
        interval: (scenario.rate > 0)
            .then(|| Duration::from_secs_f64(total_devices as f64 / scenario.rate as f64)),
        target: target.clone(),
        scenario: scenario.clone(),
        started: Instant::now(),
        progress,
    });
    let mut tasks = Vec::with_capacity(total_devices);
    for (n, plan) in plans.into_iter().enumerate() {
        let run = run.clone();
        let delay = scenario
            .ramp_up
            .mul_f64(n as f64 / total_devices.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            run_device(plan, run).await
        }));
    }
    let mut devices = Vec::with_capacity(tasks.len());
    for t in tasks {
        devices.push(t.await??);
    }
    Ok(FleetRun {
        devices,
        seq_start: target.seq_start,
        started_at,
        finished_at: now_millis(),
    })
}

async fn run_device(plan: DevicePlan, run: Arc<Run>) -> anyhow::Result<DeviceLedger> {
    let t = &run.target;
    let max_inflight = run.scenario.max_inflight;
    let mut opts = MqttOptions::new(format!("sim-{}-{}", t.tenant, plan.id), &t.host, t.port);
    opts.set_keep_alive(Duration::from_secs(60))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(3600))
        .set_max_packet_size(Some(2 * 1024 * 1024))
        // Slots for the device's own window only: rumqttc's default is 65,535 of them per
        // client (about 16 MiB, written at connect), 16 GiB for a fleet of 1,000.
        .set_outgoing_inflight_upper_limit(u16::try_from(max_inflight).unwrap_or(u16::MAX));
    let (client, mut eventloop) = AsyncClient::new(opts, max_inflight + 8);
    let n = plan.seq_count as usize;
    let shared = Arc::new(Mutex::new(Shared {
        order: VecDeque::new(),
        inflight: HashMap::new(),
        ledger: DeviceLedger {
            id: plan.id.clone(),
            registered: plan.registered,
            readings: plan.profile.readings(),
            faults: plan.faults(),
            publishes: vec![0; n],
            acks: vec![0; n],
            heartbeats_acked: 0,
            last_heartbeat_at: 0,
            refused: 0,
            abandoned: 0,
        },
    }));
    let permits = Arc::new(Semaphore::new(max_inflight));
    let offline_until: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let last_ack = Arc::new(Mutex::new(Instant::now()));

    let events = {
        let shared = shared.clone();
        let permits = permits.clone();
        let offline_until = offline_until.clone();
        let last_ack = last_ack.clone();
        let run = run.clone();
        let stall = run.scenario.stall_timeout;
        tokio::spawn(async move {
            loop {
                if last_ack.lock().map(|t| t.elapsed() > stall).unwrap_or(true) {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
                    Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        let mut s = shared.lock().expect("device state");
                        // A retransmission keeps its packet id: only a new id takes the next
                        // queued message.
                        if !s.inflight.contains_key(&pkid) {
                            if let Some(item) = s.order.pop_front() {
                                s.inflight.insert(pkid, item);
                            }
                        }
                    }
                    Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        let mut s = shared.lock().expect("device state");
                        if let Some(item) = s.inflight.remove(&ack.pkid) {
                            let ok = matches!(
                                ack.reason,
                                PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                            );
                            match (ok, item) {
                                (true, Item::Telemetry(i)) => s.ledger.acks[i] += 1,
                                (true, Item::Heartbeat(at)) => {
                                    s.ledger.heartbeats_acked += 1;
                                    s.ledger.last_heartbeat_at = s.ledger.last_heartbeat_at.max(at);
                                }
                                (false, _) => s.ledger.refused += 1,
                            }
                            if ok {
                                run.progress.acked.fetch_add(1, Ordering::Relaxed);
                                let second = run.started.elapsed().as_secs() as usize;
                                if let Ok(mut v) = run.progress.acks_per_second.lock() {
                                    if v.len() <= second {
                                        v.resize(second + 1, 0);
                                    }
                                    v[second] += 1;
                                }
                            }
                            permits.add_permits(1);
                            if let Ok(mut t) = last_ack.lock() {
                                *t = Instant::now();
                            }
                        }
                    }
                    Ok(Ok(Event::Incoming(Packet::ConnAck(connack)))) => {
                        if !connack.session_present {
                            // rumqttc drops what was pending: the device gives those up.
                            let mut s = shared.lock().expect("device state");
                            let lost = s.inflight.len();
                            s.inflight.clear();
                            s.ledger.abandoned += lost as u64;
                            permits.add_permits(lost);
                        }
                    }
                    Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => {
                        let until = offline_until.lock().ok().and_then(|mut o| o.take());
                        match until {
                            Some(until) => {
                                tokio::time::sleep_until(until.into()).await;
                                if let Ok(mut t) = last_ack.lock() {
                                    *t = Instant::now();
                                }
                            }
                            None => break,
                        }
                    }
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(_)) => {
                        run.progress
                            .connection_errors
                            .fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
    };

    let topic = format!("{}/{}/{}/telemetry", t.topic_prefix, t.tenant, plan.id);
    let heartbeat_topic = format!("{}/{}/{}/heartbeat", t.topic_prefix, t.tenant, plan.id);
    let mut device = Device::new(plan.index);
    let mut rng = StdRng::seed_from_u64(run.scenario.seed ^ plan.index as u64);
    let mut tick = run.interval.map(tokio::time::interval);
    let mut last: Option<(usize, Vec<u8>)> = None;
    let mut highest = 0u64;
    let stall = run.scenario.stall_timeout;
    let send = |item: Item, topic: String, bytes: Vec<u8>| {
        let shared = shared.clone();
        let client = client.clone();
        let permits = permits.clone();
        let progress = run.progress.clone();
        async move {
            tokio::time::timeout(stall, permits.acquire())
                .await
                .map_err(|_| anyhow::anyhow!("no PUBACK for {stall:?}"))??
                .forget();
            {
                let mut s = shared.lock().expect("device state");
                if let Item::Telemetry(i) = item {
                    s.ledger.publishes[i] += 1;
                }
                s.order.push_back(item);
            }
            progress.published.fetch_add(1, Ordering::Relaxed);
            client
                .publish(topic, QoS::AtLeastOnce, false, bytes)
                .await?;
            anyhow::Ok(())
        }
    };
    let mut outcome = Ok(());
    for step in &plan.steps {
        if let Some(tick) = tick.as_mut() {
            tick.tick().await;
        }
        let result = match *step {
            Step::Telemetry { seq, fault } => {
                device.seq_no = t.seq_start + seq;
                highest = highest.max(device.seq_no);
                let payload_fault = fault.map(Fault::payload).unwrap_or(PayloadFault::None);
                let bytes = encode(device.next_message(&mut rng, now_millis()), payload_fault);
                last = Some((seq as usize, bytes.clone()));
                send(Item::Telemetry(seq as usize), topic.clone(), bytes).await
            }
            Step::Resend => match &last {
                Some((i, bytes)) => send(Item::Telemetry(*i), topic.clone(), bytes.clone()).await,
                None => Ok(()),
            },
            Step::Heartbeat => {
                let at = now_millis();
                send(
                    Item::Heartbeat(at),
                    heartbeat_topic.clone(),
                    device.heartbeat(highest, at),
                )
                .await
            }
            Step::Offline { first, count } => {
                go_offline(
                    &client,
                    &permits,
                    max_inflight,
                    &offline_until,
                    run.scenario.faults.offline_for,
                )
                .await;
                // Measure while offline, stamping each reading when it was taken.
                let gap = run.scenario.faults.offline_for / count.max(1) as u32;
                let mut backlog = Vec::with_capacity(count as usize);
                for seq in first..first + count {
                    tokio::time::sleep(gap).await;
                    device.seq_no = t.seq_start + seq;
                    highest = highest.max(device.seq_no);
                    backlog.push((
                        seq,
                        encode(
                            device.next_message(&mut rng, now_millis()),
                            PayloadFault::None,
                        ),
                    ));
                }
                let mut r = Ok(());
                for (seq, bytes) in backlog {
                    r = send(Item::Telemetry(seq as usize), topic.clone(), bytes).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
        };
        if let Err(e) = result {
            outcome = Err(e);
            break;
        }
    }
    // Wait for the last acknowledgements (or a stall), then leave.
    let drained = tokio::time::timeout(stall, permits.acquire_many(max_inflight as u32)).await;
    if let Ok(Ok(p)) = drained {
        p.forget();
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), events).await;
    if let Err(e) = outcome {
        eprintln!("device {}: {e:#}", plan.id);
    }
    let ledger = shared.lock().expect("device state").ledger.clone();
    Ok(ledger)
}

/// Wait until everything sent is acknowledged, then disconnect; the event loop sleeps through
/// the offline time before it reconnects.
async fn go_offline(
    client: &AsyncClient,
    permits: &Semaphore,
    max_inflight: usize,
    offline_until: &Mutex<Option<Instant>>,
    offline_for: Duration,
) {
    if let Ok(p) = permits.acquire_many(max_inflight as u32).await {
        drop(p);
    }
    if let Ok(mut o) = offline_until.lock() {
        *o = Some(Instant::now() + offline_for);
    }
    let _ = client.disconnect().await;
}

/// Wall clock, epoch ms.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
