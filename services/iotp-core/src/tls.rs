//! Certificates the services present or trust, watched for expiry: every configured client
//! certificate and CA file sets `iotp_tls_cert_expiry_timestamp_seconds{link,role}` to its
//! notAfter (Unix seconds; the earliest one when the file holds a chain or a bundle) when the
//! client that uses it is built. The alert `IotpTlsCertificateExpiresSoon` fires 30 days
//! before (k8s/monitoring).

use std::path::Path;

use x509_parser::pem::Pem;

/// Why a certificate file's expiry could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ExpiryError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file holds no PEM certificate that parses.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: String,
    },
}

/// The earliest notAfter (Unix seconds) of the PEM certificates in `pem`, if any parses.
pub fn not_after(pem: &[u8]) -> Option<i64> {
    Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .filter_map(|p| {
            p.parse_x509()
                .ok()
                .map(|c| c.validity().not_after.timestamp())
        })
        .min()
}

/// The earliest notAfter of the certificates in the PEM file at `path`.
pub fn file_not_after(path: &Path) -> Result<i64, ExpiryError> {
    let pem = std::fs::read(path).map_err(|source| ExpiryError::Read {
        path: path.display().to_string(),
        source,
    })?;
    not_after(&pem).ok_or_else(|| ExpiryError::NoCertificate {
        path: path.display().to_string(),
    })
}

/// Set the expiry gauge of the certificate at `path`, used on `link` (`kafka`, `amqp`,
/// `mongodb`) as `role` (`client`: the certificate presented; `ca`: the one trusted). A file
/// that cannot be read is logged, not fatal here: the client that uses it reports the failure.
pub fn record_expiry(link: &str, role: &str, path: &Path) {
    match file_not_after(path) {
        Ok(at) => crate::metrics::metrics()
            .tls_cert_expiry_timestamp_seconds
            .with_label_values(&[link, role])
            .set(at),
        Err(e) => tracing::warn!(link, role, error = %e, "certificate expiry unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_after: (i32, u8, u8)) -> String {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").pem()
    }

    #[test]
    fn the_earliest_not_after_of_a_bundle_is_its_expiry() {
        let late = cert((2040, 1, 1));
        let early = cert((2031, 6, 30));
        // 2031-06-30T00:00:00Z
        assert_eq!(not_after(early.as_bytes()), Some(1_940_544_000));
        let bundle = format!("{late}{early}");
        assert_eq!(not_after(bundle.as_bytes()), Some(1_940_544_000));
        assert_eq!(not_after(b"not a certificate"), None);
    }

    #[test]
    fn a_file_sets_the_gauge_with_its_link_and_role() {
        let dir = std::env::temp_dir().join(format!("iotp-tls-expiry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("client.pem");
        std::fs::write(&path, cert((2035, 1, 1))).expect("write");
        record_expiry("test-link", "client", &path);
        let gauge = crate::metrics::metrics()
            .tls_cert_expiry_timestamp_seconds
            .with_label_values(&["test-link", "client"]);
        assert_eq!(gauge.get(), 2_051_222_400);
        let missing = file_not_after(&dir.join("absent.pem")).expect_err("absent");
        assert!(missing.to_string().contains("absent.pem"), "{missing}");
    }
}
