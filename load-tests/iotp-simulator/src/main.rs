//! iotp-simulator: a fleet of devices over real MQTT connections publishing QoS 1 telemetry
//! and heartbeats, counting what the broker acknowledged. `iotp-load` runs the same fleet
//! against a pipeline it starts, and audits the result.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use iotp_simulator::fleet::{self, Progress, Target};
use iotp_simulator::scenario::Scenario;
use iotp_simulator::{device, plan};
use serde::Serialize;

/// Options.
#[derive(Debug, Parser, Clone)]
#[command(about = "Simulate a device fleet publishing telemetry over MQTT")]
struct Args {
    /// Scenario file (load-tests/scenarios/*.toml); the flags below override its fleet.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// MQTT broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// MQTT broker port (the project's Mosquitto is 1884).
    #[arg(long, default_value_t = 1884)]
    port: u16,
    /// Tenant of every device.
    #[arg(long, default_value = "demo")]
    tenant: String,
    /// Number of devices (one connection each).
    #[arg(long)]
    devices: Option<usize>,
    /// Telemetry messages per device.
    #[arg(long)]
    messages: Option<u64>,
    /// Fleet-wide publish rate, messages/s (0 = as fast as the broker acknowledges).
    #[arg(long)]
    rate: Option<u64>,
    /// First sequence number of every device (a device's numbering continues across runs).
    #[arg(long, default_value_t = 0)]
    seq_start: u64,
    /// Seed for the readings and fault placement.
    #[arg(long)]
    seed: Option<u64>,
    /// Write a device registry (TOML) for the fleet to this file and exit.
    #[arg(long)]
    write_registry: Option<PathBuf>,
    /// With --write-registry: register only the first N devices (the rest are unknown to the
    /// pipeline and end up quarantined).
    #[arg(long)]
    registered: Option<usize>,
}

/// What happened.
#[derive(Debug, Serialize)]
struct Summary {
    devices: usize,
    attempted: u64,
    acked: u64,
    seconds: f64,
    rate: f64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut scenario = match &args.scenario {
        Some(path) => match Scenario::load(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("simulator: {e:#}");
                return ExitCode::from(2);
            }
        },
        None => Scenario::default(),
    };
    scenario.devices = args.devices.unwrap_or(scenario.devices);
    scenario.messages_per_device = args.messages.unwrap_or(scenario.messages_per_device);
    scenario.rate = args.rate.unwrap_or(scenario.rate);
    scenario.seed = args.seed.unwrap_or(scenario.seed);
    if let Some(path) = &args.write_registry {
        let text = device::registry_toml(
            &args.tenant,
            scenario.devices,
            args.registered.unwrap_or(scenario.devices),
        );
        return match std::fs::write(path, text) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("simulator: cannot write {}: {e}", path.display());
                ExitCode::FAILURE
            }
        };
    }
    let target = Target {
        host: args.host.clone(),
        port: args.port,
        tenant: args.tenant.clone(),
        seq_start: args.seq_start,
        topic_prefix: "iot".into(),
        tls: scenario.tls.then(|| scenario.ca_dir.clone()).flatten(),
    };
    let plans = plan::plan(&scenario);
    let devices = plans.len();
    match fleet::run(target, &scenario, plans, Arc::new(Progress::default())).await {
        Ok(run) => {
            let (attempted, acked) = (run.published(), run.acked());
            let summary = Summary {
                devices,
                attempted,
                acked,
                seconds: run.seconds(),
                rate: run.ack_rate(),
            };
            println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            if acked >= attempted {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "simulator: {} of {attempted} messages were not acknowledged",
                    attempted - acked
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("simulator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
