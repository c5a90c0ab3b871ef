//! `iotp-dlq`: list, inspect and replay dead letters through the DLQ handler's HTTP API.
//!
//!   iotp-dlq [--token-file FILE] list [--reason R] [--device D] [--all]
//!   iotp-dlq [--token-file FILE] show ID
//!   iotp-dlq [--token-file FILE] replay (--id ID ... | --reason R | --device D | --all) [--dry-run]
//!
//! The API's bearer token comes from `--token-file` (or `IOTP_DLQ_TOKEN_FILE`), or itself from
//! `IOTP_DLQ_TOKEN`; never from the command line, where other users' `ps` would see it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use iotp_core::probe;
use iotp_dlq_handler::auth::read_token;
use iotp_dlq_handler::{ReplayRequest, ReplayResult, Summary};

/// The variable that holds the token itself.
const TOKEN_ENV: &str = "IOTP_DLQ_TOKEN";

#[derive(Parser)]
#[command(
    about = "Inspect and replay parked dead letters",
    after_help = "The API's bearer token: --token-file FILE (or IOTP_DLQ_TOKEN_FILE), or the \
                  token itself in IOTP_DLQ_TOKEN. Needed unless the service runs without \
                  api_token_file (loopback only)."
)]
struct Args {
    /// The DLQ handler's API address, `host:port`.
    #[arg(long, env = "IOTP_DLQ_API", default_value = "127.0.0.1:9200")]
    api: String,
    /// File holding the API's bearer token (the service's `api_token_file`).
    #[arg(long, env = "IOTP_DLQ_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
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

/// The API, and the token to show it.
struct Client {
    api: String,
    token: Option<String>,
}

/// The token from `--token-file`/`IOTP_DLQ_TOKEN_FILE` or `IOTP_DLQ_TOKEN` (one of them).
fn token(file: Option<&PathBuf>) -> anyhow::Result<Option<String>> {
    let from_env = std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty());
    match (file, from_env) {
        (Some(_), Some(_)) => {
            anyhow::bail!(
                "give the token one way: --token-file (IOTP_DLQ_TOKEN_FILE) or {TOKEN_ENV}"
            )
        }
        (Some(path), None) => Ok(Some(read_token(path)?)),
        (None, Some(token)) => {
            let token = token.trim();
            anyhow::ensure!(
                !token.contains(char::is_whitespace),
                "{TOKEN_ENV} holds whitespace inside the token"
            );
            Ok(Some(token.to_string()))
        }
        (None, None) => Ok(None),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let client = Client {
        token: token(args.token_file.as_ref())?,
        api: args.api,
    };
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
            let body = client.http("GET", &format!("/dead-letters?{}", query.join("&")), None)?;
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
            client.http("GET", &format!("/dead-letters/{id}"), None)?
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
                all,
                dry_run,
                ..ReplayRequest::default()
            };
            req.filter.ids = ids;
            req.filter.reason = reason;
            req.filter.device_id = device;
            let body = client.http(
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

impl Client {
    /// One request to the API, waiting as long as it takes (a replay of many letters may);
    /// the body of a 2xx answer, else an error with the API's message.
    fn http(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
        let authorization = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|a| ("Authorization", a.as_str()))
            .collect();
        let response =
            probe::blocking::request_with_headers(&self.api, method, path, &headers, body, None)
                .with_context(|| format!("{method} {path}"))?;
        if response.is_success() {
            return Ok(response.body);
        }
        if response.status == 401 {
            match self.token {
                None => anyhow::bail!(
                    "the dead-letter API at {} wants a bearer token (HTTP 401): give it with \
                     --token-file FILE, IOTP_DLQ_TOKEN_FILE or {TOKEN_ENV}",
                    self.api
                ),
                Some(_) => anyhow::bail!(
                    "the dead-letter API at {} refused the token (HTTP 401): it is not the \
                     one in the service's api_token_file",
                    self.api
                ),
            }
        }
        // The API answers errors as {"error": "…"}; anything else is shown as it came.
        let message = serde_json::from_str::<serde_json::Value>(&response.body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_string))
            .unwrap_or(response.body);
        anyhow::bail!("{method} {path}: HTTP {}: {message}", response.status)
    }
}
