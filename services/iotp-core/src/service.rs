//! The process shell every service shares: options, config, logs, span export, admin port,
//! signals and the drain deadline. A service's `main` is one call to [`run`].

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Health};
use crate::config::{self, ServiceConfig};
use crate::logging;
use crate::metrics::metrics;
use crate::retry::Backoff;
use crate::shutdown::{self, EXIT_CONFIG, EXIT_DEADLINE, EXIT_FAILED, EXIT_OK};
use crate::trace;

/// Options every service binary takes.
#[derive(Debug, Parser)]
struct Args {
    /// TOML config file, layered over the defaults and under `IOTP__…` environment variables.
    #[arg(long, env = "IOTP_CONFIG")]
    config: Option<PathBuf>,
    /// Load and check the configuration, print the effective one (secrets hidden), and exit.
    #[arg(long)]
    check_config: bool,
}

/// What a running service gets from the shell.
#[derive(Clone)]
pub struct Context {
    /// Service name, e.g. `mqtt-bridge`.
    pub service: &'static str,
    /// Stable replica name.
    pub replica: String,
    /// Cancelled on the first SIGTERM/SIGINT: stop taking work, drain, commit, return.
    pub shutdown: CancellationToken,
    /// Readiness for `/readyz`.
    pub health: Health,
    /// How failed work is retried (`common.backoff`).
    pub backoff: Backoff,
}

/// Parse options, load config, and run `service` until it returns or the drain deadline passes.
pub fn run<C, F, Fut>(service: &'static str, body: F) -> ExitCode
where
    C: ServiceConfig + Send + 'static,
    F: FnOnce(Context, C) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    crate::allocator::purge_freed_pages_sooner();
    let args = Args::parse();
    let config: C = match config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{service}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        // Passwords in URIs and secret-named settings print as `***` (iotp_contract::redact).
        return match iotp_contract::redact::to_toml(&config) {
            Ok(text) => {
                println!("{text}");
                ExitCode::from(EXIT_OK)
            }
            Err(e) => {
                eprintln!("{service}: cannot print config: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    logging::init(config.common());
    let common = config.common();
    let spans = match trace::init(service, &common.replica, &common.tracing) {
        Ok(spans) => spans,
        Err(e) => {
            eprintln!("{service}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match runtime(config.common().worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{service}: cannot start runtime: {e}");
            spans.shutdown();
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = runtime.block_on(supervise(service, config, body));
    // The spans of the last batches, before the process goes.
    spans.shutdown();
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code)
}

/// One thread unless configured otherwise: a stage is one sequential loop, and on a
/// multi-threaded runtime the handoffs between workers (and to librdkafka's threads) cost more
/// than the work at these rates (futex wake-ups and context switches were the largest item in
/// the parser's profile).
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .build()
    }
}

async fn supervise<C, F, Fut>(service: &'static str, config: C, body: F) -> u8
where
    C: ServiceConfig,
    F: FnOnce(Context, C) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let common = config.common().clone();
    let shutdown = CancellationToken::new();
    shutdown::install_signal_handlers(shutdown.clone());
    let health = Health::default();
    let admin_stop = CancellationToken::new();
    let _stop_admin_on_exit = admin_stop.clone().drop_guard();
    match admin::serve(common.admin_listen, health.clone(), admin_stop).await {
        Ok(bound) => tracing::info!(service, replica = %common.replica, admin = %bound, "started"),
        Err(e) => {
            tracing::error!(service, error = %e, listen = %common.admin_listen, "cannot bind admin port");
            return EXIT_FAILED;
        }
    }
    metrics().up.with_label_values(&[service]).set(1);
    let ctx = Context {
        service,
        replica: common.replica.clone(),
        shutdown: shutdown.clone(),
        health: health.clone(),
        backoff: common.backoff,
    };
    let mut task = tokio::spawn(body(ctx, config));
    let joined = tokio::select! {
        joined = &mut task => joined,
        _ = shutdown.cancelled() => {
            health.set_ready(false);
            match tokio::time::timeout(common.shutdown_deadline, &mut task).await {
                Ok(joined) => joined,
                Err(_) => {
                    tracing::error!(service, deadline = ?common.shutdown_deadline, "drain deadline exceeded, exiting");
                    return EXIT_DEADLINE;
                }
            }
        }
    };
    match joined {
        Ok(Ok(())) => {
            tracing::info!(service, "stopped cleanly");
            EXIT_OK
        }
        Ok(Err(e)) => {
            tracing::error!(service, error = format!("{e:#}"), "service failed");
            EXIT_FAILED
        }
        Err(e) => {
            tracing::error!(service, error = %e, "service task panicked");
            EXIT_FAILED
        }
    }
}
