//! One cancellation token for the process. The first SIGTERM or SIGINT cancels it (drain and
//! commit); a second one exits at once with [`EXIT_SECOND_SIGNAL`].

use tokio_util::sync::CancellationToken;

/// Clean exit.
pub const EXIT_OK: u8 = 0;
/// The service failed.
pub const EXIT_FAILED: u8 = 1;
/// The configuration is invalid.
pub const EXIT_CONFIG: u8 = 2;
/// Draining did not finish within the deadline.
pub const EXIT_DEADLINE: u8 = 3;
/// A second signal arrived while draining.
pub const EXIT_SECOND_SIGNAL: u8 = 130;

/// Cancel `token` on the first signal; exit the process on the second.
pub fn install_signal_handlers(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, draining");
        token.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal, exiting without draining");
        std::process::exit(EXIT_SECOND_SIGNAL.into());
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
