//! iotp-dlq-handler: start-up, config, admin endpoints and shutdown are in place; the stage logic
//! lands with its issue.

use std::process::ExitCode;

use iotp_core::service::{self, BasicConfig};

fn main() -> ExitCode {
    service::run("dlq-handler", |ctx, _config: BasicConfig| {
        service::idle(ctx)
    })
}
