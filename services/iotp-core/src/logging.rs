//! Structured logs: JSON in containers, human text on a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{Common, LogFormat};

/// Install the global subscriber. Call once, before anything logs.
pub fn init(common: &Common) {
    let filter = EnvFilter::try_new(&common.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match common.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let result = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}
