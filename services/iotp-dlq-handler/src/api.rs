//! HTTP API over the archive: list, inspect (decoded where the bytes are a known record),
//! replay one, by filter, or all, with a dry run.
//!
//! - `GET  /dead-letters?reason=&stage=&tenant=&device_id=&include_replayed=&limit=`
//! - `GET  /dead-letters/{id}` (ids contain slashes)
//! - `POST /dead-letters/replay` with a JSON filter (`ids`, `reason`, …) and `dry_run`

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use iotp_contract::{Codec, DeadLetter, EnrichedTelemetry, RawEnvelope, Telemetry};
use iotp_store::{Archived, DeadLetterArchive, LetterFilter, Store};

/// What the handlers share.
pub struct Api {
    /// The archive.
    pub store: Store,
    /// Where replays go.
    pub sink: iotp_core::kafka::KafkaSink,
}

/// The routes.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/dead-letters", get(list))
        .route("/dead-letters/replay", post(replay))
        // Ids contain slashes (stage/topic/partition/offset).
        .route("/dead-letters/{*id}", get(show))
        .with_state(api)
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

/// Replay request.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplayRequest {
    /// Which dead letters.
    #[serde(flatten)]
    pub filter: LetterFilter,
    /// Only say what would be replayed.
    pub dry_run: bool,
}

/// Replay result.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplayResult {
    /// Ids replayed (or, in a dry run, that would be).
    pub ids: Vec<String>,
    /// Whether it was a dry run.
    pub dry_run: bool,
}

type ApiError = (StatusCode, String);

fn internal(e: impl std::fmt::Display) -> ApiError {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn list(
    State(api): State<Arc<Api>>,
    Query(filter): Query<LetterFilter>,
) -> Result<Json<Vec<Summary>>, ApiError> {
    let letters = api.store.letters(&filter).await.map_err(internal)?;
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
    let letters = api.store.letters(&filter).await.map_err(internal)?;
    let Some(archived) = letters.first() else {
        return Err((StatusCode::NOT_FOUND, format!("no dead letter {id}")));
    };
    Ok(Json(
        json!({ "summary": Summary::from(archived), "decoded": decode(&archived.letter) }),
    ))
}

async fn replay(
    State(api): State<Arc<Api>>,
    Json(req): Json<ReplayRequest>,
) -> Result<Json<ReplayResult>, ApiError> {
    let letters = api.store.letters(&req.filter).await.map_err(internal)?;
    let ids: Vec<String> = letters.iter().map(|a| a.letter.id.clone()).collect();
    if !req.dry_run {
        for a in &letters {
            crate::replay::replay(&api.sink, &a.letter)
                .await
                .map_err(internal)?;
            api.store
                .mark_replayed(
                    std::slice::from_ref(&a.letter.id),
                    iotp_contract::now_millis(),
                )
                .await
                .map_err(internal)?;
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
