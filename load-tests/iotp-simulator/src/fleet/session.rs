//! One device's MQTT 5 session: publishes its plan with at most `max_inflight` unacknowledged
//! messages, matches each PUBACK to the message by packet id, and keeps the ledger.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{Outgoing, Transport};
use tokio::sync::Semaphore;

use super::{now_millis, DeviceLedger, Progress, Target};
use crate::device::{encode, Device, PayloadFault};
use crate::plan::{DevicePlan, Fault, Step};
use crate::scenario::Scenario;

/// A publish awaiting its PUBACK.
#[derive(Debug, Clone, Copy)]
enum Item {
    /// Telemetry message of this ledger index (seqNo - seq_start).
    Telemetry(usize),
    /// Heartbeat stamped at this device time, epoch ms.
    Heartbeat(i64),
}

/// A device's state, shared by its publisher and its event loop.
struct Shared {
    /// Published, not yet given a packet id by the client, in publish order.
    order: VecDeque<Item>,
    /// By packet id, awaiting the PUBACK.
    inflight: HashMap<u16, Item>,
    ledger: DeviceLedger,
}

/// What every device of a fleet run shares.
pub(super) struct Run {
    pub(super) target: Target,
    pub(super) scenario: Scenario,
    /// Time between two publishes of one device, when the scenario sets a rate.
    pub(super) interval: Option<Duration>,
    pub(super) started: Instant,
    pub(super) progress: Arc<Progress>,
}

/// One device's connection, from its first publish until its last PUBACK (or a stall); its
/// ledger.
pub(super) async fn run_device(
    plan: DevicePlan,
    run: Arc<Run>,
    transport: Option<Transport>,
) -> anyhow::Result<DeviceLedger> {
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
    if let Some(transport) = transport {
        opts.set_transport(transport);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, max_inflight + 8);
    let shared = Arc::new(Mutex::new(Shared {
        order: VecDeque::new(),
        inflight: HashMap::new(),
        ledger: DeviceLedger::new(
            plan.id.clone(),
            plan.registered,
            plan.profile.readings(),
            plan.faults(),
        ),
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
