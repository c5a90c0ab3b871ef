//! `iotp-dlq`: list, inspect and replay dead letters through the DLQ handler's HTTP API.
//!
//!   iotp-dlq list [--reason R] [--device D] [--all]
//!   iotp-dlq show ID
//!   iotp-dlq replay (--id ID ... | --reason R | --device D | --all) [--dry-run]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iotp_core::probe;
use iotp_dlq_handler::{ReplayRequest, ReplayResult, Summary};

#[derive(Parser)]
#[command(about = "Inspect and replay parked dead letters")]
struct Args {
    /// The DLQ handler's API address.
    #[arg(long, env = "IOTP_DLQ_API", default_value = "127.0.0.1:9200")]
    api: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List parked dead letters.
    List {
        /// Only this reason code.
        #[arg(long)]
        reason: Option<String>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Include those already replayed.
        #[arg(long)]
        all: bool,
    },
    /// Show one, decoded.
    Show {
        /// Dead-letter id.
        id: String,
    },
    /// Put dead letters back on their Kafka topic.
    Replay {
        /// These ids.
        #[arg(long = "id")]
        ids: Vec<String>,
        /// All with this reason code.
        #[arg(long)]
        reason: Option<String>,
        /// All of this device.
        #[arg(long)]
        device: Option<String>,
        /// Every parked dead letter not yet replayed.
        #[arg(long)]
        all: bool,
        /// Only print what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iotp-dlq: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::List {
            reason,
            device,
            all,
        } => {
            let mut query = vec![format!("include_replayed={all}")];
            if let Some(r) = reason {
                query.push(format!("reason={r}"));
            }
            if let Some(d) = device {
                query.push(format!("device_id={d}"));
            }
            let body = http(
                &args.api,
                "GET",
                &format!("/dead-letters?{}", query.join("&")),
                None,
            )?;
            let letters: Vec<Summary> = serde_json::from_str(&body)?;
            println!(
                "{:<48} {:<12} {:<24} {:<16} {:>8}",
                "ID", "STAGE", "REASON", "DEVICE", "ATTEMPTS"
            );
            for l in &letters {
                println!(
                    "{:<48} {:<12} {:<24} {:<16} {:>8}",
                    l.id,
                    l.stage,
                    l.reason,
                    l.device_id.as_deref().unwrap_or("-"),
                    l.attempts
                );
            }
            eprintln!("{} dead letters", letters.len());
        }
        Command::Show { id } => println!(
            "{}",
            http(&args.api, "GET", &format!("/dead-letters/{id}"), None)?
        ),
        Command::Replay {
            ids,
            reason,
            device,
            all,
            dry_run,
        } => {
            if ids.is_empty() && reason.is_none() && device.is_none() && !all {
                anyhow::bail!("say which: --id, --reason, --device or --all");
            }
            let mut req = ReplayRequest {
                dry_run,
                ..ReplayRequest::default()
            };
            req.filter.ids = ids;
            req.filter.reason = reason;
            req.filter.device_id = device;
            let body = http(
                &args.api,
                "POST",
                "/dead-letters/replay",
                Some(&serde_json::to_string(&req)?),
            )?;
            let result: ReplayResult = serde_json::from_str(&body)?;
            for id in &result.ids {
                println!("{id}");
            }
            eprintln!(
                "{} {}",
                result.ids.len(),
                if result.dry_run {
                    "would be replayed (dry run)"
                } else {
                    "replayed"
                }
            );
        }
    }
    Ok(())
}

/// One request to the API, waiting as long as it takes (a replay of many letters may); the
/// body of a 2xx answer, else an error with it.
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
    let response = probe::blocking::request(addr, method, path, body, None)?;
    anyhow::ensure!(
        response.is_success(),
        "{method} {path}: HTTP {}: {}",
        response.status,
        response.body
    );
    Ok(response.body)
}
