//! The readings part of the storage contract (raw tier): one [`MessageRecord`] per message,
//! stored exactly once per (tenant, deviceId, seqNo), and what an audit reads back.

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// One message's readings: the unit of idempotency is (tenant, deviceId, seqNo).
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    /// Tenant (an MQTT topic level: no `/`).
    pub tenant: String,
    /// Device id, unique within the tenant (no `/`).
    pub device_id: String,
    /// The device's own sequence number: with tenant and device, the idempotency key.
    pub seq_no: i64,
    /// Message id the device gave it (kept for audits; not a key).
    pub msg_id: String,
    /// Device time, epoch ms.
    pub produced_at: i64,
    /// Bridge time, epoch ms.
    pub received_at: i64,
    /// Site tag from the registry, if the device has one.
    pub site: Option<String>,
    /// Asset tag from the registry, if the device has one.
    pub asset: Option<String>,
    /// Device profile name from the registry (which metrics, units, heartbeat).
    pub profile: String,
    /// `(metric, value, unit)` in canonical units.
    pub readings: Vec<(String, f64, Option<String>)>,
}

impl From<iotp_contract::EnrichedTelemetry> for MessageRecord {
    /// The store's view of an enriched record.
    fn from(r: iotp_contract::EnrichedTelemetry) -> Self {
        Self {
            tenant: r.header.tenant,
            device_id: r.header.device_id,
            seq_no: r.header.seq_no,
            msg_id: r.header.msg_id,
            produced_at: r.header.produced_at,
            received_at: r.header.received_at,
            site: r.site,
            asset: r.asset,
            profile: r.profile,
            readings: r
                .readings
                .into_iter()
                .map(|x| (x.metric, x.value, x.unit))
                .collect(),
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Messages newly stored.
    pub stored: u64,
    /// Messages already stored (redeliveries, replays): skipped.
    pub duplicates: u64,
}

/// One stored message as an audit sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Device id (the tenant is the query's).
    pub device_id: String,
    /// The device's sequence number.
    pub seq_no: i64,
    /// Message id the device gave it.
    pub msg_id: String,
    /// Device time, epoch ms.
    pub produced_at: i64,
    /// When the store took it (store clock), epoch ms.
    pub stored_at: i64,
    /// Readings stored for it (more than the device sent means a duplicate).
    pub readings: i64,
}

/// Where a page of [`ReadingStore::stored_messages`] ended: give it back for the page after.
/// Each store pages in the order it keeps (the embedded store by arrival, MongoDB by deviceId
/// and seqNo), so a cursor is good only for the kind of store that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor(Position);

/// The last message of a page, as its store finds it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Position {
    /// The embedded store's row number.
    Row(i64),
    /// (deviceId, seqNo).
    Key(String, i64),
}

impl PageCursor {
    pub(crate) fn new(position: Position) -> Self {
        Self(position)
    }

    pub(crate) fn position(&self) -> &Position {
        &self.0
    }
}

/// The error for a cursor another kind of store made.
pub(crate) fn foreign_cursor(position: &Position) -> StoreError {
    StoreError::Backend(format!(
        "page cursor {position:?} was made by another kind of store"
    ))
}

/// A page of stored messages.
#[derive(Debug, Clone)]
pub struct StoredPage {
    /// The page's messages, in the store's order.
    pub messages: Vec<StoredMessage>,
    /// Where to go on from; `None` when this page was the last.
    pub next: Option<PageCursor>,
}

/// The readings part of the storage contract (raw tier).
///
/// No method retries by itself; each may be called again after a transient error
/// ([`StoreError::is_transient`]), as its doc says why.
pub trait ReadingStore: Send + Sync + 'static {
    /// Store each message exactly once, whatever the redeliveries; the whole batch is durable
    /// when this returns Ok.
    ///
    /// Safe to call again: the embedded store writes the batch in one transaction (all or
    /// nothing). MongoDB keeps a key per message (`pending`, then `done`): called again, the
    /// same store takes its own pending keys back at once and writes only the readings still
    /// missing; keys another writer left pending are taken over after their lease expires
    /// (before that the batch fails with [`StoreError::Conflict`]). Messages a failed call
    /// completed are then reported as duplicates.
    ///
    /// Takes the batch, as [`crate::TwinStore::apply`] does.
    fn write_messages(
        &self,
        messages: Vec<MessageRecord>,
    ) -> impl Future<Output = Result<WriteReport, StoreError>> + Send;
    /// Messages stored (for one tenant, or all). A read: safe to call again.
    fn message_count(
        &self,
        tenant: Option<&str>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Readings stored (for one tenant, or all). A read: safe to call again.
    fn reading_count(
        &self,
        tenant: Option<&str>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// A tenant's stored messages, at most `limit`, from the start or from where the page
    /// of `after` ended, in the store's own order (see [`PageCursor`]). A read: safe to call
    /// again.
    fn stored_messages(
        &self,
        tenant: &str,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> impl Future<Output = Result<StoredPage, StoreError>> + Send;
    /// Recompute the seqNo gaps of these devices (numbers between the lowest and highest
    /// stored that were never stored) into their twins; returns the total over them. The
    /// embedded store reads them off its dedup guard, each device's runs of seqNos stored (so
    /// this is a row or a few per device, and expiring old readings does not turn them into
    /// gaps).
    ///
    /// Safe to call again: each device's count is computed afresh and set, not added to.
    fn update_seq_gaps(
        &self,
        devices: &[(String, String)],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
