//! Bearer-token authentication of the dead-letter API: the API returns raw device payloads
//! (which may carry personal data) and puts records back on Kafka, so every request must carry
//! `Authorization: Bearer <token>`, the token being the contents of the file `api_token_file`
//! names. The token is never in the configuration, never logged, and the service keeps only
//! its SHA-256 digest: a presented token is hashed and the digests compared in constant time,
//! so neither the time taken nor an early mismatch says how much of a guess was right, or how
//! long the token is. The CLI reads the token from a file with the same rules ([`read_token`]).
//!
//! Without `api_token_file`, the service starts only if the API listens on a loopback address
//! (the default, 127.0.0.1:9200), and says loudly at start that it is unauthenticated. The
//! reason for allowing that case: loopback is reachable only from the machine (or pod)
//! itself, where the store file and the broker credentials are within reach anyway; and it
//! keeps `make demo`, the load tool and local use working without set-up. Every other address
//! (docker-compose, Kubernetes) needs the token, checked with the configuration at start
//! (`--check-config` included), and the manifests in this repository configure one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest token accepted: `openssl rand -hex 32` makes 64 characters.
pub const MIN_TOKEN_LEN: usize = 32;

/// Why a token file is refused. No message holds the file's contents.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file cannot be read.
    #[error("cannot read token file {path}: {error}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// Shorter than [`MIN_TOKEN_LEN`] (surrounding whitespace does not count).
    #[error("token in {path} is {len} characters long; it must have at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32`)")]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A character a bearer token cannot hold (RFC 6750 `b64token`: letters, digits and
    /// `-._~+/`, then optional `=`).
    #[error("token in {path} has a character a bearer token cannot hold (allowed: letters, digits, -._~+/ and trailing =)")]
    BadCharacter {
        /// The file.
        path: PathBuf,
    },
}

/// The token in `path`: its contents without surrounding whitespace (the trailing newline of
/// `echo` or a Secret), at least [`MIN_TOKEN_LEN`] characters of RFC 6750's `b64token`.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|error| TokenError::Unreadable {
        path: path.to_path_buf(),
        error,
    })?;
    let token = text.trim();
    let body = token.trim_end_matches('=');
    if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
    {
        return Err(TokenError::BadCharacter {
            path: path.to_path_buf(),
        });
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort {
            path: path.to_path_buf(),
            len: token.len(),
        });
    }
    Ok(token.to_string())
}

/// The API's token, kept as its SHA-256 digest.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl Token {
    /// The token in `path` ([`read_token`]).
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        Ok(Self::new(&read_token(path)?))
    }

    fn new(token: &str) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the token: the digests compared in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.digest).into()
    }
}

/// The credentials of an `Authorization: Bearer <token>` header (the scheme in any case).
fn bearer(value: &HeaderValue) -> Option<&str> {
    let (scheme, credentials) = value.to_str().ok()?.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// Middleware: the request goes on only with the right token; otherwise 401 with
/// `WWW-Authenticate: Bearer` (RFC 6750: `error="invalid_token"` when a token was sent).
/// Refusals are logged with the peer and path, never with what was sent.
pub async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    let presented = request.headers().get(AUTHORIZATION).and_then(bearer);
    if presented.is_some_and(|p| token.matches(p)) {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let sent = presented.is_some();
    tracing::warn!(%peer, method = %request.method(), path = %request.uri().path(), token_sent = sent,
        "dead-letter API request refused: missing or wrong bearer token");
    let (challenge, message) = if sent {
        (
            r#"Bearer realm="iotp-dlq", error="invalid_token""#,
            "the bearer token is wrong",
        )
    } else {
        (
            r#"Bearer realm="iotp-dlq""#,
            "this API needs a bearer token (Authorization: Bearer <token>)",
        )
    };
    (
        StatusCode::UNAUTHORIZED,
        [(WWW_AUTHENTICATE, challenge)],
        Json(json!({ "error": message })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("iotp-token-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn a_token_file_is_trimmed_checked_and_never_quoted() {
        let good = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            read_token(&file("good", &format!("{good}\n"))).expect("good"),
            good
        );
        let padded = format!("{good}+/==");
        assert_eq!(read_token(&file("b64", &padded)).expect("b64"), padded);
        let short = read_token(&file("short", "s3cr3t-short\n")).expect_err("short");
        assert!(
            matches!(short, TokenError::TooShort { len: 12, .. }),
            "{short}"
        );
        assert!(!short.to_string().contains("s3cr3t"), "{short}");
        let spaced = format!("{good} {good}");
        let bad = read_token(&file("space", &spaced)).expect_err("space");
        assert!(matches!(bad, TokenError::BadCharacter { .. }));
        assert!(!bad.to_string().contains(good), "{bad}");
        let missing = read_token(Path::new("/nonexistent/token")).expect_err("missing");
        assert!(
            missing.to_string().contains("/nonexistent/token"),
            "{missing}"
        );
    }

    #[test]
    fn only_the_same_token_matches_and_debug_shows_nothing() {
        let token = Token::new("0123456789abcdef0123456789abcdef");
        assert!(token.matches("0123456789abcdef0123456789abcdef"));
        assert!(!token.matches("0123456789abcdef0123456789abcdeF"));
        assert!(!token.matches("0123456789abcdef"));
        assert!(!token.matches(""));
        assert_eq!(format!("{token:?}"), "Token(***)");
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        let value = |v: &str| HeaderValue::from_str(v).expect("header");
        assert_eq!(bearer(&value("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&value("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&value("Basic abc")), None);
        assert_eq!(bearer(&value("Bearer")), None);
    }
}
