//! The MongoDB client's options: the connection string, then this service's own credentials
//! and TLS from `[store]` (`mongodb_user`, `mongodb_password_file`, `mongodb_auth_source`,
//! `mongodb_tls`, `mongodb_tls_ca_file`), so each service can log in as its own user with a
//! password kept in a file (a Kubernetes Secret volume), never in the URI or the environment.
//! A setting given here wins over the same one in the URI.

use mongodb::options::{ClientOptions, Credential, Tls, TlsOptions};

use crate::{StoreConfig, StoreError};

/// The client options for `uri` with `config`'s credentials and TLS; reads the password file.
pub(crate) async fn client_options(
    uri: &str,
    config: &StoreConfig,
) -> Result<ClientOptions, StoreError> {
    let mut options = ClientOptions::parse(uri)
        .await
        .map_err(|e| StoreError::Backend(format!("store.mongodb_uri: {}", e.kind)))?;
    let password = match &config.mongodb_password_file {
        Some(path) => Some(read_password(path)?),
        None => None,
    };
    apply(&mut options, config, password);
    Ok(options)
}

/// The password in `path`, less one trailing newline. The error names the file, not its text.
fn read_password(path: &std::path::Path) -> Result<String, StoreError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StoreError::Backend(format!(
            "store.mongodb_password_file: cannot read {}: {e}",
            path.display()
        ))
    })?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text.strip_suffix('\r').unwrap_or(text).to_string())
}

/// `config`'s credentials and TLS onto `options` (what the URI set stays unless overridden).
pub(crate) fn apply(options: &mut ClientOptions, config: &StoreConfig, password: Option<String>) {
    let has_credentials =
        config.mongodb_user.is_some() || password.is_some() || config.mongodb_auth_source.is_some();
    if has_credentials {
        let mut credential = options
            .credential
            .take()
            .unwrap_or_else(|| Credential::builder().build());
        if let Some(user) = &config.mongodb_user {
            credential.username = Some(user.clone());
        }
        if password.is_some() {
            credential.password = password;
        }
        if let Some(source) = &config.mongodb_auth_source {
            credential.source = Some(source.clone());
        }
        options.credential = Some(credential);
    }
    if config.mongodb_tls {
        let mut tls = match options.tls.take() {
            Some(Tls::Enabled(tls)) => tls,
            _ => TlsOptions::builder().build(),
        };
        if let Some(ca) = &config.mongodb_tls_ca_file {
            tls.ca_file_path = Some(ca.clone());
        }
        options.tls = Some(Tls::Enabled(tls));
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    async fn options(uri: &str, config: &StoreConfig) -> ClientOptions {
        client_options(uri, config).await.expect("options")
    }

    fn with(f: impl FnOnce(&mut StoreConfig)) -> StoreConfig {
        let mut config = StoreConfig {
            mongodb_uri: Some("mongodb://db-0:27017".into()),
            ..StoreConfig::default()
        };
        f(&mut config);
        config
    }

    #[tokio::test]
    async fn nothing_set_leaves_the_uri_alone() {
        let o = options("mongodb://db-0:27017/?tls=false", &with(|_| {})).await;
        assert!(o.credential.is_none());
        assert!(matches!(o.tls, Some(Tls::Disabled)), "{:?}", o.tls);
    }

    #[tokio::test]
    async fn user_password_file_and_auth_source_become_the_credential() {
        let dir = std::env::temp_dir().join(format!("iotp-mongo-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("password");
        std::fs::write(&file, "s3cret-from-file\n").expect("write");
        let config = with(|c| {
            c.mongodb_user = Some("iotp-upserter".into());
            c.mongodb_password_file = Some(file.clone());
            c.mongodb_auth_source = Some("admin".into());
        });
        let o = options("mongodb://db-0:27017", &config).await;
        let credential = o.credential.expect("credential");
        assert_eq!(credential.username.as_deref(), Some("iotp-upserter"));
        assert_eq!(credential.password.as_deref(), Some("s3cret-from-file"));
        assert_eq!(credential.source.as_deref(), Some("admin"));
    }

    #[tokio::test]
    async fn settings_win_over_the_uri_and_keep_what_they_do_not_name() {
        let config = with(|c| c.mongodb_user = Some("iotp-enricher".into()));
        let o = options("mongodb://old:pw@db-0:27017/?authSource=iotp", &config).await;
        let credential = o.credential.expect("credential");
        assert_eq!(credential.username.as_deref(), Some("iotp-enricher"));
        assert_eq!(credential.password.as_deref(), Some("pw"));
        assert_eq!(credential.source.as_deref(), Some("iotp"));
    }

    #[tokio::test]
    async fn tls_with_a_ca_file() {
        let config = with(|c| {
            c.mongodb_tls = true;
            c.mongodb_tls_ca_file = Some(PathBuf::from("/run/secrets/mongodb-ca.pem"));
        });
        let o = options("mongodb://db-0:27017", &config).await;
        match o.tls {
            Some(Tls::Enabled(tls)) => assert_eq!(
                tls.ca_file_path.as_deref(),
                Some(std::path::Path::new("/run/secrets/mongodb-ca.pem"))
            ),
            other => panic!("TLS not enabled: {other:?}"),
        }
    }

    #[tokio::test]
    async fn tls_keeps_the_uri_tls_options() {
        let config = with(|c| c.mongodb_tls = true);
        let o = options(
            "mongodb://db-0:27017/?tls=true&tlsCAFile=/etc/ca.pem&tlsAllowInvalidCertificates=true",
            &config,
        )
        .await;
        match o.tls {
            Some(Tls::Enabled(tls)) => {
                assert_eq!(tls.ca_file_path, Some(PathBuf::from("/etc/ca.pem")));
                assert_eq!(tls.allow_invalid_certificates, Some(true));
            }
            other => panic!("TLS not enabled: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unreadable_password_file_names_the_file() {
        let config = with(|c| c.mongodb_password_file = Some("/nonexistent/mongo-pw".into()));
        let err = client_options("mongodb://db-0:27017", &config)
            .await
            .expect_err("unreadable");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/mongo-pw"), "{text}");
        assert!(!err.is_transient());
    }

    #[test]
    fn the_password_is_not_in_debug() {
        let mut o = ClientOptions::default();
        let config = with(|c| c.mongodb_user = Some("u".into()));
        apply(&mut o, &config, Some("pw-in-options-1".into()));
        assert!(!format!("{o:?}").contains("pw-in-options-1"));
    }
}
