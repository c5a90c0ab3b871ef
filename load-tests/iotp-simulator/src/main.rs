//! iotp-simulator: a fleet of devices over real MQTT connections publishing QoS 1 telemetry
//! and heartbeats, counting what the broker acknowledged.

mod device;
mod fleet;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = fleet::Args::parse();
    if let Some(path) = &args.write_registry {
        let text = device::registry_toml(
            &args.tenant,
            args.devices,
            args.registered.unwrap_or(args.devices),
        );
        return match std::fs::write(path, text) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("simulator: cannot write {}: {e}", path.display());
                ExitCode::FAILURE
            }
        };
    }
    match fleet::run(args).await {
        Ok(summary) => {
            println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            if summary.acked == summary.attempted {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "simulator: {} of {} messages were not acknowledged",
                    summary.attempted - summary.acked,
                    summary.attempted
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
