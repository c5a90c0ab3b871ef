//! iotp-load: run a scenario through the whole pipeline and prove what happened.
//!
//! Starts a Kafka-protocol broker of its own (Tansu, in-memory engine) and the six services
//! (as child processes, for their CPU and memory), drives the scenario's fleet over MQTT,
//! waits until the store and the dead-letter archive have settled, audits the result against
//! the PUBACK ledger, measures the forward-only ceiling on the same broker, and writes
//! `report.md`, `report.json` and plots. Exit 0 only if the audit passed and every service
//! stopped cleanly; 1 if not; 2 if the test could not be run to the end.
//!
//! The phases are in [`iotp_simulator::load`]; this is their command line.

use std::process::ExitCode;

use clap::Parser;
use iotp_simulator::load::{self, Options};

#[tokio::main]
async fn main() -> ExitCode {
    match load::run(Options::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("iotp-load: {e:#}");
            ExitCode::from(2)
        }
    }
}
