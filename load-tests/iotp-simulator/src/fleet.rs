//! Runs the fleet: one MQTT 5 connection per device, QoS 1, persistent sessions, a bounded
//! number of unacknowledged publishes per device, and an optional fleet-wide rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::Serialize;

use crate::device::Device;

/// Options.
#[derive(Debug, Parser, Clone)]
#[command(about = "Simulate a device fleet publishing telemetry over MQTT")]
pub struct Args {
    /// MQTT broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// MQTT broker port (the project's Mosquitto is 1884).
    #[arg(long, default_value_t = 1884)]
    pub port: u16,
    /// Tenant of every device.
    #[arg(long, default_value = "demo")]
    pub tenant: String,
    /// Number of devices (one connection each).
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Telemetry messages per device.
    #[arg(long, default_value_t = 100)]
    pub messages: u64,
    /// Fleet-wide publish rate, messages/s (0 = as fast as the broker acknowledges).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// First sequence number of every device (a device's numbering continues across runs).
    #[arg(long, default_value_t = 0)]
    pub seq_start: u64,
    /// Seed for the readings.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Give up waiting for acknowledgements after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Write a device registry (TOML) for the fleet to this file and exit.
    #[arg(long)]
    pub write_registry: Option<std::path::PathBuf>,
    /// With --write-registry: register only the first N devices (the rest are unknown to the
    /// pipeline and end up quarantined).
    #[arg(long)]
    pub registered: Option<usize>,
}

/// What happened.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Devices that took part.
    pub devices: usize,
    /// Publishes attempted.
    pub attempted: u64,
    /// Publishes the broker acknowledged (PUBACK).
    pub acked: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Acknowledged messages per second.
    pub rate: f64,
}

/// Run the fleet to completion.
pub async fn run(args: Args) -> anyhow::Result<Summary> {
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let per_device_interval =
        (args.rate > 0).then(|| Duration::from_secs_f64(args.devices as f64 / args.rate as f64));
    let mut tasks = Vec::with_capacity(args.devices);
    for index in 0..args.devices {
        let args = args.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            run_device(index, args, per_device_interval, acked).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let acked = acked.load(Ordering::Relaxed);
    Ok(Summary {
        devices: args.devices,
        attempted: args.devices as u64 * args.messages,
        acked,
        seconds,
        rate: acked as f64 / seconds,
    })
}

async fn run_device(
    index: usize,
    args: Args,
    interval: Option<Duration>,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut device = Device::new(index);
    device.seq_no = args.seq_start;
    let mut opts = MqttOptions::new(
        format!("sim-{}-{}", args.tenant, device.id),
        &args.host,
        args.port,
    );
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(3600));
    let (client, mut eventloop) = AsyncClient::new(opts, 128);
    let topic = format!("iot/{}/{}/telemetry", args.tenant, device.id);
    let mut rng = StdRng::seed_from_u64(args.seed ^ index as u64);
    let total = args.messages;
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut tick = interval.map(tokio::time::interval);
            for _ in 0..total {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let payload = device.next_payload(&mut rng, now_millis());
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let mut done = 0u64;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    while done < total && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                done += 1;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => {
                // rumqttc reconnects on the next poll; the session resends what was not acked.
                eprintln!("device {index}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    publisher.await??;
    client.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    Ok(())
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
