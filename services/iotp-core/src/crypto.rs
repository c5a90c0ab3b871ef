//! The process-level rustls crypto provider. ring (rcgen, mongodb) and aws-lc-rs (lapin's
//! rustls) are both in the dependency graph, so rustls cannot pick one by itself and building
//! any rustls configuration without a process default panics ("no process-level
//! CryptoProvider available"). Every path that builds one (the AMQP connection, the tests'
//! TLS terminators) calls [`install_default_provider`] first.

use std::sync::Once;

static INSTALL: Once = Once::new();

/// Install aws-lc-rs as the process's rustls crypto provider, once; later calls do nothing.
pub fn install_default_provider() {
    INSTALL.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}
