//! HTTP API over the archive: list, inspect (decoded where the bytes are a known record),
//! replay one, by filter, or all, with a dry run.
//!
//! - `GET  /dead-letters?reason=&stage=&tenant=&device_id=&include_replayed=&limit=`
//! - `GET  /dead-letters/{id}` (ids contain slashes)
//! - `POST /dead-letters/replay` with a JSON filter (`ids`, `reason`, …, or `"all": true`)
//!   and `dry_run`
//!
//! Every route, and every path without one, wants the bearer token when one is configured
//! ([`crate::auth`]). Requests are strict, because a filter that lost a field matches more
//! than was meant: an unknown query parameter or body field (`reasn`, `dry_rn`) is a 400 that
//! names it; a replay with no filter at all is a 400 unless it says `"all": true`; `limit`
//! above [`MAX_LIMIT`] is a 400 that says the maximum (rather than fewer letters than asked
//! for, silently). Errors are JSON, `{"error": "…"}`. A store or Kafka failure answers 500
//! with an error id and nothing of the failure's text (it can name tables, hosts, or hold
//! data); the log has the text under the same id.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use iotp_contract::{Codec, DeadLetter, EnrichedTelemetry, RawEnvelope, Telemetry};
use iotp_store::{Archived, DeadLetterArchive, LetterFilter, Store};

use crate::auth::{self, Token};

/// Most letters one listing or replay takes; the store's default when `limit` is 0 or absent.
pub const MAX_LIMIT: usize = 1000;

/// What the handlers share.
pub struct Api {
    /// The archive.
    pub store: Store,
    /// Where replays go.
    pub sink: iotp_core::kafka::KafkaSink,
}

/// The routes, behind the bearer token if one is given.
pub fn router(api: Arc<Api>, token: Option<Token>) -> Router {
    let routes = Router::new()
        .route("/dead-letters", get(list))
        .route("/dead-letters/replay", post(replay))
        // Ids contain slashes (stage/topic/partition/offset).
        .route("/dead-letters/{*id}", get(show))
        .with_state(api);
    match token {
        // `layer`, not `route_layer`: unknown paths are refused too, so an unauthenticated
        // caller does not learn which exist.
        Some(token) => routes.layer(axum::middleware::from_fn_with_state(
            token,
            auth::require_token,
        )),
        None => routes,
    }
}

/// One line of a listing.
#[derive(Debug, Serialize, Deserialize)]
pub struct Summary {
    /// Id.
    pub id: String,
    /// Stage.
    pub stage: String,
    /// Reason code.
    pub reason: String,
    /// Error text.
    pub error: String,
    /// Tenant.
    pub tenant: Option<String>,
    /// Device.
    pub device_id: Option<String>,
    /// Attempts.
    pub attempts: i32,
    /// Source topic.
    pub source_topic: Option<String>,
    /// Parked at, epoch ms.
    pub parked_at: i64,
    /// Replayed at, epoch ms.
    pub replayed_at: Option<i64>,
    /// Payload size.
    pub bytes: usize,
}

impl From<&Archived> for Summary {
    fn from(a: &Archived) -> Self {
        let l = &a.letter;
        Self {
            id: l.id.clone(),
            stage: l.stage.clone(),
            reason: l.reason_code.clone(),
            error: l.error.clone(),
            tenant: l.tenant.clone(),
            device_id: l.device_id.clone(),
            attempts: l.attempts,
            source_topic: l.source_topic.clone(),
            parked_at: a.parked_at,
            replayed_at: a.replayed_at,
            bytes: l.payload.len(),
        }
    }
}

/// Replay request: which letters (the fields of [`LetterFilter`], flat), or `all`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayRequest {
    /// Which dead letters.
    #[serde(flatten)]
    pub filter: LetterFilter,
    /// Every parked letter not yet replayed (up to `limit`): required when the filter names
    /// nothing, so a body that lost its filter does not replay everything.
    pub all: bool,
    /// Only say what would be replayed.
    pub dry_run: bool,
}

/// The body fields of a replay request, for the message that refuses an unknown one.
const REPLAY_FIELDS: &str =
    "ids, reason, stage, tenant, device_id, include_replayed, limit, all, dry_run";

/// Replay result.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplayResult {
    /// Ids replayed (or, in a dry run, that would be).
    pub ids: Vec<String>,
    /// Whether it was a dry run.
    pub dry_run: bool,
}

/// An error answer: its status and the message of `{"error": …}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
    }
}

/// A failure of the store or of Kafka: logged with its text under a new error id; the answer
/// has the id only.
fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    let id = uuid::Uuid::new_v4();
    tracing::error!(error_id = %id, error = %e, "dead-letter API: {what} failed");
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("internal error, id {id} (the service log has the details)"),
    }
}

/// A `limit` within [`MAX_LIMIT`] (0: the default, [`MAX_LIMIT`]).
fn check_limit(filter: &LetterFilter) -> Result<(), ApiError> {
    if filter.limit > MAX_LIMIT {
        return Err(bad_request(format!(
            "limit {} is over the maximum of {MAX_LIMIT}",
            filter.limit
        )));
    }
    Ok(())
}

async fn list(
    State(api): State<Arc<Api>>,
    query: Result<Query<LetterFilter>, QueryRejection>,
) -> Result<Json<Vec<Summary>>, ApiError> {
    let Query(filter) = query.map_err(|e| bad_request(e.body_text()))?;
    check_limit(&filter)?;
    let letters = api
        .store
        .letters(&filter)
        .await
        .map_err(|e| internal("listing", e))?;
    Ok(Json(letters.iter().map(Summary::from).collect()))
}

async fn show(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let filter = LetterFilter {
        ids: vec![id.clone()],
        include_replayed: true,
        limit: 1,
        ..LetterFilter::default()
    };
    let letters = api
        .store
        .letters(&filter)
        .await
        .map_err(|e| internal("reading a letter", e))?;
    let Some(archived) = letters.first() else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no dead letter {id}"),
        });
    };
    Ok(Json(
        json!({ "summary": Summary::from(archived), "decoded": decode(&archived.letter) }),
    ))
}

/// The request, refused unless every field is known, the filter names letters or says `all`
/// (not both), and the limit is within the maximum. A malformed body is a 400 too (axum says
/// 422), with serde's words: they name the field and where it is.
fn replay_request(
    body: Result<Json<ReplayRequest>, JsonRejection>,
) -> Result<ReplayRequest, ApiError> {
    let Json(req) = body.map_err(|e| match e {
        JsonRejection::MissingJsonContentType(_) => ApiError {
            status: e.status(),
            message: e.body_text(),
        },
        e if e.body_text().contains("unknown field") => {
            bad_request(format!("{} (the fields: {REPLAY_FIELDS})", e.body_text()))
        }
        e => bad_request(e.body_text()),
    })?;
    let f = &req.filter;
    let names_letters = !f.ids.is_empty()
        || f.reason.is_some()
        || f.stage.is_some()
        || f.tenant.is_some()
        || f.device_id.is_some();
    match (names_letters, req.all) {
        (false, false) => Err(bad_request(
            "the filter names no letters: give ids, reason, stage, tenant or device_id, \
             or \"all\": true to replay every parked letter",
        )),
        (true, true) => Err(bad_request(
            "\"all\": true replays every parked letter; it does not go with ids, reason, \
             stage, tenant or device_id",
        )),
        _ => {
            check_limit(f)?;
            Ok(req)
        }
    }
}

async fn replay(
    State(api): State<Arc<Api>>,
    body: Result<Json<ReplayRequest>, JsonRejection>,
) -> Result<Json<ReplayResult>, ApiError> {
    let req = replay_request(body)?;
    let letters = api
        .store
        .letters(&req.filter)
        .await
        .map_err(|e| internal("finding letters to replay", e))?;
    let ids: Vec<String> = letters.iter().map(|a| a.letter.id.clone()).collect();
    if !req.dry_run {
        for (done, a) in letters.iter().enumerate() {
            let stopped = |e: &dyn std::fmt::Display| {
                let mut error = internal("replay", e);
                error.message = format!(
                    "replay stopped after {done} of {} letters: {}",
                    letters.len(),
                    error.message
                );
                error
            };
            // The archive keeps no trace context: a replay from it starts none.
            crate::replay::replay(&api.sink, &a.letter, None)
                .await
                .map_err(|e| stopped(&e))?;
            api.store
                .mark_replayed(
                    std::slice::from_ref(&a.letter.id),
                    iotp_contract::now_millis(),
                )
                .await
                .map_err(|e| stopped(&e))?;
        }
        tracing::info!(count = ids.len(), "dead letters replayed");
    }
    Ok(Json(ReplayResult {
        ids,
        dry_run: req.dry_run,
    }))
}

/// The payload decoded as whichever pipeline record it is, else as text or hex.
fn decode(letter: &DeadLetter) -> Value {
    let bytes = &letter.payload;
    if let Ok(env) = Codec::<RawEnvelope>::latest().and_then(|c| c.decode(bytes)) {
        let device_payload = match std::str::from_utf8(&env.payload) {
            Ok(text) => {
                serde_json::from_str::<Value>(text).unwrap_or(Value::String(text.to_string()))
            }
            Err(_) => Value::String(hex(&env.payload)),
        };
        return json!({ "schema": "raw-envelope", "mqttTopic": env.mqtt_topic, "contentType": env.content_type,
                       "receivedAt": env.received_at, "devicePayload": device_payload });
    }
    if let Ok(t) = Codec::<Telemetry>::latest().and_then(|c| c.decode(bytes)) {
        return json!({ "schema": "telemetry", "record": format!("{t:?}") });
    }
    if let Ok(t) = Codec::<EnrichedTelemetry>::latest().and_then(|c| c.decode(bytes)) {
        return json!({ "schema": "enriched", "record": format!("{t:?}") });
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => json!({ "schema": null, "text": text }),
        Err(_) => json!({ "schema": null, "hex": hex(bytes) }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failure_is_logged_under_an_id_and_answered_with_the_id_only() {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let failure = "store backend: no such table: dead_letters";
        let error = tracing::subscriber::with_default(subscriber, || internal("listing", failure));
        assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            !error.message.contains("no such table"),
            "{}",
            error.message
        );
        let id = error
            .message
            .split("id ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("an id in the answer");
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        let logged = String::from_utf8(log.0.lock().expect("log").clone()).expect("utf-8");
        assert!(
            logged.contains(id) && logged.contains(failure),
            "the log has the id and the text: {logged}"
        );
    }
}
