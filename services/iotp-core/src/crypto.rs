//! The process-level rustls crypto provider. rustls picks one on its own only when exactly
//! one of its `ring` and `aws-lc-rs` features is in the build; this workspace has both (from
//! different dependencies), and building a `ClientConfig` then panics with "no process-level
//! CryptoProvider". Every place that builds a rustls configuration calls
//! [`install_default_provider`] first.

use std::sync::Once;

static INSTALL: Once = Once::new();

/// Install aws-lc-rs as the process's default rustls provider; idempotent, and harmless if
/// something else installed one first.
pub fn install_default_provider() {
    INSTALL.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn installing_twice_is_harmless_and_leaves_a_provider() {
        super::install_default_provider();
        super::install_default_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    #[test]
    fn a_tls_transport_names_the_file_it_cannot_read() {
        let Err(err) =
            crate::mqtt::tls_transport(std::path::Path::new("/nonexistent/ca.pem"), None, None)
        else {
            panic!("a transport from a missing file");
        };
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
