//! The embedded store: SQLite in WAL mode, one file, no server. The default for `make demo`
//! and for machines without MongoDB.

use std::collections::hash_map::{Entry, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::{
    fold, fold_reading, Archived, Bucket, DeadLetterArchive, FoldReport, LetterFilter,
    MessageRecord, Observation, PruneReport, Pruning, ReadingStore, Retention, RollupStore,
    StoreError, StoredMessage, Twin, TwinStore, WriteReport, GRANULARITIES,
};
use iotp_core::contract::DeadLetter;

/// A SQLite-backed store.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS twins (
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    last_seq_no INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    last_values TEXT NOT NULL,
    firmware TEXT,
    config_version TEXT,
    heartbeat_secs INTEGER,
    online INTEGER NOT NULL,
    alarms TEXT NOT NULL,
    seq_gaps INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, device_id)
);
CREATE TABLE IF NOT EXISTS messages (
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    seq_no INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    produced_at INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    site TEXT,
    asset TEXT,
    profile TEXT NOT NULL,
    stored_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, device_id, seq_no)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS readings (
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    seq_no INTEGER NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    unit TEXT,
    produced_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, device_id, seq_no, metric)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS readings_time ON readings (produced_at);
CREATE TABLE IF NOT EXISTS seq_stats (
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    min_seq INTEGER NOT NULL,
    max_seq INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    PRIMARY KEY (tenant, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_applied (
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    seq_no INTEGER NOT NULL,
    produced_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, device_id, seq_no)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollup_applied_time ON rollup_applied (produced_at);
CREATE INDEX IF NOT EXISTS messages_time ON messages (produced_at);

CREATE TABLE IF NOT EXISTS rollups (
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    granularity TEXT NOT NULL,
    bucket_start INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    first REAL NOT NULL,
    first_at INTEGER NOT NULL,
    last REAL NOT NULL,
    last_at INTEGER NOT NULL,
    unit TEXT,
    cumulative INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    published_revision INTEGER NOT NULL DEFAULT 0,
    bucket_end INTEGER NOT NULL,
    PRIMARY KEY (tenant, device_id, metric, granularity, bucket_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollups_start ON rollups (granularity, bucket_start);
CREATE INDEX IF NOT EXISTS rollups_unpublished ON rollups (bucket_end) WHERE revision > published_revision;
CREATE TABLE IF NOT EXISTS rollup_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS twins_online ON twins (online, last_seen_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    reason TEXT NOT NULL,
    error TEXT NOT NULL,
    source_topic TEXT,
    source_partition INTEGER,
    source_offset INTEGER,
    key BLOB,
    payload BLOB NOT NULL,
    tenant TEXT,
    device_id TEXT,
    attempts INTEGER NOT NULL,
    first_failure_at INTEGER NOT NULL,
    last_failure_at INTEGER NOT NULL,
    parked_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    replayed_at INTEGER,
    replays INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dead_letters_expiry ON dead_letters (expires_at);
";

impl SqliteStore {
    /// Open (creating if needed) the store at `path`; `:memory:` for a private in-memory one.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(backend)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        // Columns added after a table first shipped: a store file from an older version gains them.
        add_column_if_missing(&conn, "twins", "seq_gaps", "INTEGER NOT NULL DEFAULT 0")?;
        add_column_if_missing(
            &conn,
            "rollup_applied",
            "produced_at",
            "INTEGER NOT NULL DEFAULT 0",
        )?;
        // A file from before `seq_stats` (kept by `write_messages`) gets it from the messages.
        conn.execute(
            "INSERT OR IGNORE INTO seq_stats (tenant, device_id, min_seq, max_seq, stored)
             SELECT tenant, device_id, min(seq_no), max(seq_no), count(*) FROM messages
             WHERE NOT EXISTS (SELECT 1 FROM seq_stats) GROUP BY tenant, device_id",
            [],
        )
        .map_err(backend)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Open the store at `path`, creating its directory if needed.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(backend)?;
        }
        Self::open(path)
    }

    async fn count_rows(
        &self,
        table: &'static str,
        tenant: Option<&str>,
    ) -> Result<u64, StoreError> {
        let tenant = tenant.map(String::from);
        self.with(move |conn| {
            conn.query_row(
                &format!("SELECT count(*) FROM {table} WHERE ?1 IS NULL OR tenant = ?1"),
                params![tenant],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(backend)
        })
        .await
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| backend("store mutex poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(backend)?
    }
}

/// A write transaction that takes the write lock up front (`BEGIN IMMEDIATE`). Several
/// services share the store file: a deferred transaction that reads first and then writes
/// gets SQLITE_BUSY at once, without waiting, when another process wrote in between (its
/// snapshot is stale); an immediate one waits its turn under the busy timeout.
fn write_transaction(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, StoreError> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(backend)
}

fn add_column_if_missing(
    conn: &Connection,
    table: &str,
    column: &str,
    declaration: &str,
) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare(&format!("PRAGMA table_info({table})"))
        .map_err(backend)?;
    let columns: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(1))
        .map_err(backend)?
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    if !columns.iter().any(|c| c == column) {
        match conn.execute_batch(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
        )) {
            // Another process sharing the file added it first.
            Err(e) if e.to_string().contains("duplicate column name") => {}
            other => other.map_err(backend)?,
        }
    }
    Ok(())
}

fn read_twin(conn: &Connection, tenant: &str, device_id: &str) -> Result<Option<Twin>, StoreError> {
    conn.query_row(
        "SELECT last_seq_no, last_seen_at, last_values, firmware, config_version, heartbeat_secs, online, alarms, seq_gaps
         FROM twins WHERE tenant = ?1 AND device_id = ?2",
        params![tenant, device_id],
        |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, Option<String>>(3)?,
                row.get::<_, Option<String>>(4)?,
                row.get::<_, Option<i64>>(5)?,
                row.get::<_, bool>(6)?,
                row.get::<_, String>(7)?,
                row.get::<_, i64>(8)?,
            ))
        },
    )
    .optional()
    .map_err(backend)?
    .map(|(last_seq_no, last_seen_at, values, firmware, config_version, heartbeat, online, alarms, seq_gaps)| {
        Ok(Twin {
            tenant: tenant.to_string(),
            device_id: device_id.to_string(),
            last_seq_no,
            last_seen_at,
            last_values: serde_json::from_str(&values).map_err(backend)?,
            firmware,
            config_version,
            heartbeat_secs: heartbeat.map(|h| h as u64),
            online,
            alarms: serde_json::from_str(&alarms).map_err(backend)?,
            seq_gaps,
        })
    })
    .transpose()
}

impl TwinStore for SqliteStore {
    async fn apply(&self, observations: &[Observation]) -> Result<(), StoreError> {
        let observations = observations.to_vec();
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            let mut twins: std::collections::HashMap<(String, String), Twin> = std::collections::HashMap::new();
            for obs in &observations {
                let key = (obs.tenant.clone(), obs.device_id.clone());
                let current = match twins.remove(&key) {
                    Some(t) => Some(t),
                    None => read_twin(&tx, &obs.tenant, &obs.device_id)?,
                };
                twins.insert(key, fold(current, obs));
            }
            for t in twins.values() {
                tx.execute(
                    "INSERT INTO twins (tenant, device_id, last_seq_no, last_seen_at, last_values, firmware, config_version, heartbeat_secs, online, alarms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (tenant, device_id) DO UPDATE SET
                       last_seq_no = excluded.last_seq_no, last_seen_at = excluded.last_seen_at,
                       last_values = excluded.last_values, firmware = excluded.firmware,
                       config_version = excluded.config_version, heartbeat_secs = excluded.heartbeat_secs,
                       online = excluded.online, alarms = excluded.alarms",
                    params![
                        t.tenant,
                        t.device_id,
                        t.last_seq_no,
                        t.last_seen_at,
                        serde_json::to_string(&t.last_values).map_err(backend)?,
                        t.firmware,
                        t.config_version,
                        t.heartbeat_secs.map(|h| h as i64),
                        t.online,
                        serde_json::to_string(&t.alarms).map_err(backend)?,
                    ],
                )
                .map_err(backend)?;
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn twin(&self, tenant: &str, device_id: &str) -> Result<Option<Twin>, StoreError> {
        let (tenant, device_id) = (tenant.to_string(), device_id.to_string());
        self.with(move |conn| read_twin(conn, &tenant, &device_id))
            .await
    }

    async fn mark_offline(&self, now_ms: i64, missed: u32) -> Result<u64, StoreError> {
        self.with(move |conn| {
            let n = conn
                .execute(
                    "UPDATE twins SET online = 0,
                       alarms = CASE WHEN alarms LIKE '%\"offline\"%' THEN alarms
                                     WHEN alarms = '[]' THEN '[\"offline\"]'
                                     ELSE substr(alarms, 1, length(alarms) - 1) || ',\"offline\"]' END
                     WHERE online = 1 AND heartbeat_secs IS NOT NULL
                       AND last_seen_at < ?1 - heartbeat_secs * 1000 * ?2",
                    params![now_ms, missed],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }
}

impl ReadingStore for SqliteStore {
    async fn write_messages(&self, messages: &[MessageRecord]) -> Result<WriteReport, StoreError> {
        let messages = messages.to_vec();
        self.with(move |conn| {
            let now = iotp_core::now_millis();
            let tx = write_transaction(conn)?;
            let mut report = WriteReport::default();
            {
                let mut message = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO messages (tenant, device_id, seq_no, msg_id, produced_at, received_at, site, asset, profile, stored_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    )
                    .map_err(backend)?;
                let mut reading = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO readings (tenant, device_id, seq_no, metric, value, unit, produced_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .map_err(backend)?;
                // Per device: lowest and highest seqNo stored by this batch, and how many.
                let mut stats: HashMap<(&str, &str), (i64, i64, i64)> = HashMap::new();
                for m in &messages {
                    let inserted = message
                        .execute(params![m.tenant, m.device_id, m.seq_no, m.msg_id, m.produced_at, m.received_at, m.site, m.asset, m.profile, now])
                        .map_err(backend)?;
                    if inserted == 0 {
                        report.duplicates += 1;
                        continue;
                    }
                    report.stored += 1;
                    let s = stats
                        .entry((&m.tenant, &m.device_id))
                        .or_insert((m.seq_no, m.seq_no, 0));
                    *s = (s.0.min(m.seq_no), s.1.max(m.seq_no), s.2 + 1);
                    for (metric, value, unit) in &m.readings {
                        reading.execute(params![m.tenant, m.device_id, m.seq_no, metric, value, unit, m.produced_at]).map_err(backend)?;
                    }
                }
                let mut stat = tx
                    .prepare_cached(
                        "INSERT INTO seq_stats (tenant, device_id, min_seq, max_seq, stored) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (tenant, device_id) DO UPDATE SET min_seq = min(min_seq, excluded.min_seq),
                           max_seq = max(max_seq, excluded.max_seq), stored = stored + excluded.stored",
                    )
                    .map_err(backend)?;
                for ((tenant, device), (lo, hi, n)) in stats {
                    stat.execute(params![tenant, device, lo, hi, n]).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)?;
            Ok(report)
        })
        .await
    }

    async fn message_count(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        self.count_rows("messages", tenant).await
    }

    async fn reading_count(&self, tenant: Option<&str>) -> Result<u64, StoreError> {
        self.count_rows("readings", tenant).await
    }

    async fn stored_messages(
        &self,
        tenant: &str,
        after: Option<(String, i64)>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let tenant = tenant.to_string();
        let (after_device, after_seq) = after.unwrap_or((String::new(), i64::MIN));
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT m.device_id, m.seq_no, m.msg_id, m.produced_at, m.stored_at,
                            (SELECT count(*) FROM readings r WHERE r.tenant = m.tenant AND r.device_id = m.device_id AND r.seq_no = m.seq_no)
                     FROM messages m
                     WHERE m.tenant = ?1 AND (m.device_id, m.seq_no) > (?2, ?3)
                     ORDER BY m.device_id, m.seq_no LIMIT ?4",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![tenant, after_device, after_seq, limit as i64], |r| {
                    Ok(StoredMessage {
                        device_id: r.get(0)?,
                        seq_no: r.get(1)?,
                        msg_id: r.get(2)?,
                        produced_at: r.get(3)?,
                        stored_at: r.get(4)?,
                        readings: r.get(5)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn update_seq_gaps(&self, devices: &[(String, String)]) -> Result<u64, StoreError> {
        let devices = devices.to_vec();
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            let mut total = 0u64;
            for (tenant, device) in &devices {
                let gaps: i64 = tx
                    .query_row(
                        "SELECT max_seq - min_seq + 1 - stored FROM seq_stats WHERE tenant = ?1 AND device_id = ?2",
                        params![tenant, device],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(backend)?
                    .unwrap_or(0);
                tx.execute("UPDATE twins SET seq_gaps = ?3 WHERE tenant = ?1 AND device_id = ?2", params![tenant, device, gaps])
                    .map_err(backend)?;
                total += gaps.max(0) as u64;
            }
            tx.commit().map_err(backend)?;
            Ok(total)
        })
        .await
    }
}

/// (tenant, deviceId, metric, granularity, bucket start).
type BucketKey<'a> = (&'a str, &'a str, &'a str, &'a str, i64);

const BUCKET_COLUMNS: &str = "tenant, device_id, metric, granularity, bucket_start, count, sum, min, max, first, first_at, last, last_at, unit, cumulative, revision";

fn read_bucket(r: &rusqlite::Row<'_>) -> rusqlite::Result<Bucket> {
    Ok(Bucket {
        tenant: r.get(0)?,
        device_id: r.get(1)?,
        metric: r.get(2)?,
        granularity: r.get(3)?,
        bucket_start: r.get(4)?,
        count: r.get(5)?,
        sum: r.get(6)?,
        min: r.get(7)?,
        max: r.get(8)?,
        first: r.get(9)?,
        first_at: r.get(10)?,
        last: r.get(11)?,
        last_at: r.get(12)?,
        unit: r.get(13)?,
        cumulative: r.get(14)?,
        revision: r.get(15)?,
    })
}

impl RollupStore for SqliteStore {
    async fn fold(
        &self,
        messages: &[MessageRecord],
        cumulative: &[String],
        watermark: i64,
    ) -> Result<FoldReport, StoreError> {
        let (messages, cumulative) = (messages.to_vec(), cumulative.to_vec());
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            let mut report = FoldReport::default();
            {
                let mut applied = tx
                    .prepare_cached("INSERT OR IGNORE INTO rollup_applied (tenant, device_id, seq_no, produced_at) VALUES (?1, ?2, ?3, ?4)")
                    .map_err(backend)?;
                let mut read = tx
                    .prepare_cached(&format!(
                        "SELECT {BUCKET_COLUMNS} FROM rollups WHERE tenant = ?1 AND device_id = ?2 AND metric = ?3 AND granularity = ?4 AND bucket_start = ?5"
                    ))
                    .map_err(backend)?;
                let mut write = tx
                    .prepare_cached(&format!(
                        "INSERT INTO rollups ({BUCKET_COLUMNS}, bucket_end) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
                         ON CONFLICT (tenant, device_id, metric, granularity, bucket_start) DO UPDATE SET
                           count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max,
                           first = excluded.first, first_at = excluded.first_at, last = excluded.last, last_at = excluded.last_at,
                           revision = excluded.revision"
                    ))
                    .map_err(backend)?;
                // Each bucket the batch touches is read once, folded in memory in message order,
                // and written once.
                let mut buckets: HashMap<BucketKey<'_>, (Option<Bucket>, i64)> = HashMap::new();
                for m in &messages {
                    if applied.execute(params![m.tenant, m.device_id, m.seq_no, m.produced_at]).map_err(backend)? == 0 {
                        report.duplicates += 1;
                        continue;
                    }
                    report.applied += 1;
                    for (metric, value, unit) in &m.readings {
                        for (granularity, len) in GRANULARITIES {
                            let start = m.produced_at.div_euclid(len) * len;
                            let key = (m.tenant.as_str(), m.device_id.as_str(), metric.as_str(), granularity, start);
                            let slot = match buckets.entry(key) {
                                Entry::Occupied(e) => e.into_mut(),
                                Entry::Vacant(e) => {
                                    let current = read
                                        .query_row(params![m.tenant, m.device_id, metric, granularity, start], read_bucket)
                                        .optional()
                                        .map_err(backend)?;
                                    e.insert((current, start + len))
                                }
                            };
                            slot.0 = Some(fold_reading(slot.0.take(), key, *value, m.produced_at, unit, cumulative.contains(metric)));
                        }
                    }
                }
                for (b, end) in buckets.into_values().filter_map(|(b, end)| Some((b?, end))) {
                    write
                        .execute(params![
                            b.tenant, b.device_id, b.metric, b.granularity, b.bucket_start, b.count, b.sum, b.min, b.max,
                            b.first, b.first_at, b.last, b.last_at, b.unit, b.cumulative, b.revision, end
                        ])
                        .map_err(backend)?;
                }
            }
            tx.execute(
                "INSERT INTO rollup_state (name, value) VALUES ('watermark', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                params![watermark],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(report)
        })
        .await
    }

    async fn watermark(&self) -> Result<i64, StoreError> {
        self.with(|conn| {
            conn.query_row(
                "SELECT value FROM rollup_state WHERE name = 'watermark'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map(|v| v.unwrap_or(i64::MIN))
            .map_err(backend)
        })
        .await
    }

    async fn closed_unpublished(
        &self,
        lateness_ms: i64,
        limit: usize,
    ) -> Result<Vec<Bucket>, StoreError> {
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {BUCKET_COLUMNS} FROM rollups
                     WHERE revision > published_revision
                       AND bucket_end + ?1 <= (SELECT value FROM rollup_state WHERE name = 'watermark')
                     ORDER BY bucket_end LIMIT ?2"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map(params![lateness_ms, limit as i64], read_bucket).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn mark_published(&self, buckets: &[Bucket]) -> Result<(), StoreError> {
        let buckets = buckets.to_vec();
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            for b in &buckets {
                tx.execute(
                    "UPDATE rollups SET published_revision = max(published_revision, ?6)
                     WHERE tenant = ?1 AND device_id = ?2 AND metric = ?3 AND granularity = ?4 AND bucket_start = ?5",
                    params![b.tenant, b.device_id, b.metric, b.granularity, b.bucket_start, b.revision],
                )
                .map_err(backend)?;
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn buckets(&self, tenant: &str, device_id: &str) -> Result<Vec<Bucket>, StoreError> {
        let (tenant, device_id) = (tenant.to_string(), device_id.to_string());
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {BUCKET_COLUMNS} FROM rollups WHERE tenant = ?1 AND device_id = ?2 ORDER BY granularity, metric, bucket_start"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map(params![tenant, device_id], read_bucket).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }
}

impl Pruning for SqliteStore {
    async fn prune(&self, now_ms: i64, retention: &Retention) -> Result<PruneReport, StoreError> {
        let r = *retention;
        self.with(move |conn| {
            let cutoff = |d: std::time::Duration| now_ms - d.as_millis() as i64;
            let tx = write_transaction(conn)?;
            let raw = tx
                .execute(
                    "DELETE FROM messages WHERE produced_at < ?1",
                    params![cutoff(r.raw)],
                )
                .map_err(backend)?;
            tx.execute(
                "DELETE FROM readings WHERE produced_at < ?1",
                params![cutoff(r.raw)],
            )
            .map_err(backend)?;
            // A message older than the raw tier is rejected as too_old before it reaches the
            // store, so its dedup key may go with it.
            tx.execute(
                "DELETE FROM rollup_applied WHERE produced_at < ?1",
                params![cutoff(r.raw)],
            )
            .map_err(backend)?;
            let hourly = tx
                .execute(
                    "DELETE FROM rollups WHERE granularity = 'hour' AND bucket_start < ?1",
                    params![cutoff(r.hourly)],
                )
                .map_err(backend)?;
            let daily = tx
                .execute(
                    "DELETE FROM rollups WHERE granularity = 'day' AND bucket_start < ?1",
                    params![cutoff(r.daily)],
                )
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(PruneReport {
                raw: raw as u64,
                hourly: hourly as u64,
                daily: daily as u64,
            })
        })
        .await
    }
}

impl DeadLetterArchive for SqliteStore {
    async fn archive(
        &self,
        l: &DeadLetter,
        parked_at: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let l = l.clone();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO dead_letters (id, stage, reason, error, source_topic, source_partition, source_offset, key, payload,
                   tenant, device_id, attempts, first_failure_at, last_failure_at, parked_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, error = excluded.error,
                   attempts = max(attempts, excluded.attempts), last_failure_at = max(last_failure_at, excluded.last_failure_at),
                   parked_at = excluded.parked_at, expires_at = excluded.expires_at, replayed_at = NULL",
                params![
                    l.id, l.stage, l.reason_code, l.error, l.source_topic, l.source_partition, l.source_offset, l.key, l.payload,
                    l.tenant, l.device_id, l.attempts, l.first_failure_at, l.last_failure_at, parked_at, expires_at
                ],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn letters(&self, f: &LetterFilter) -> Result<Vec<Archived>, StoreError> {
        let f = f.clone();
        self.with(move |conn| {
            let mut sql = String::from(
                "SELECT id, stage, reason, error, source_topic, source_partition, source_offset, key, payload, tenant, device_id,
                        attempts, first_failure_at, last_failure_at, parked_at, expires_at, replayed_at, replays
                 FROM dead_letters WHERE 1 = 1",
            );
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            for (column, value) in [("reason", &f.reason), ("stage", &f.stage), ("tenant", &f.tenant), ("device_id", &f.device_id)] {
                if let Some(v) = value {
                    args.push(v.clone().into());
                    sql.push_str(&format!(" AND {column} = ?{}", args.len()));
                }
            }
            if !f.ids.is_empty() {
                let mut marks = Vec::new();
                for id in &f.ids {
                    args.push(id.clone().into());
                    marks.push(format!("?{}", args.len()));
                }
                sql.push_str(&format!(" AND id IN ({})", marks.join(", ")));
            }
            if !f.include_replayed {
                sql.push_str(" AND replayed_at IS NULL");
            }
            let limit = if f.limit == 0 { 1000 } else { f.limit };
            sql.push_str(&format!(" ORDER BY parked_at, id LIMIT {limit}"));
            let mut stmt = conn.prepare(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok(Archived {
                        letter: DeadLetter {
                            id: r.get(0)?,
                            stage: r.get(1)?,
                            reason_code: r.get(2)?,
                            error: r.get(3)?,
                            source_topic: r.get(4)?,
                            source_partition: r.get(5)?,
                            source_offset: r.get(6)?,
                            key: r.get(7)?,
                            payload: r.get(8)?,
                            tenant: r.get(9)?,
                            device_id: r.get(10)?,
                            attempts: r.get(11)?,
                            first_failure_at: r.get(12)?,
                            last_failure_at: r.get(13)?,
                        },
                        parked_at: r.get(14)?,
                        expires_at: r.get(15)?,
                        replayed_at: r.get(16)?,
                        replays: r.get(17)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn mark_replayed(&self, ids: &[String], at: i64) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.with(move |conn| {
            let tx = write_transaction(conn)?;
            for id in &ids {
                tx.execute(
                    "UPDATE dead_letters SET replayed_at = ?2, replays = replays + 1 WHERE id = ?1",
                    params![id, at],
                )
                .map_err(backend)?;
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn prune_letters(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.with(move |conn| {
            conn.execute(
                "DELETE FROM dead_letters WHERE expires_at < ?1",
                params![now_ms],
            )
            .map(|n| n as u64)
            .map_err(backend)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    //! What only the embedded store has: file upgrades, pruning by a moving clock. The rest of
    //! the contract is tested on every backend in `tests/store_contract.rs`.
    use super::*;

    fn obs(device: &str, seq_no: i64, at: i64, value: f64) -> Observation {
        Observation {
            tenant: "acme".into(),
            device_id: device.into(),
            seq_no,
            produced_at: at,
            readings: vec![("temp".into(), value, Some("Cel".into()))],
            firmware: None,
            config_version: Some("cfg-1".into()),
            heartbeat_secs: Some(60),
        }
    }

    fn message(device: &str, seq_no: i64) -> MessageRecord {
        MessageRecord {
            tenant: "acme".into(),
            device_id: device.into(),
            seq_no,
            msg_id: format!("m{seq_no}"),
            produced_at: 1000 + seq_no,
            received_at: 1001 + seq_no,
            site: None,
            asset: None,
            profile: "meter".into(),
            readings: vec![
                ("energy".into(), seq_no as f64, Some("Wh".into())),
                ("power".into(), 1.0, Some("W".into())),
            ],
        }
    }

    #[test]
    fn a_store_file_from_before_seq_gaps_is_upgraded() {
        let path = std::env::temp_dir().join(format!("iotp-old-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE twins (tenant TEXT NOT NULL, device_id TEXT NOT NULL, last_seq_no INTEGER NOT NULL,
                   last_seen_at INTEGER NOT NULL, last_values TEXT NOT NULL, firmware TEXT, config_version TEXT,
                   heartbeat_secs INTEGER, online INTEGER NOT NULL, alarms TEXT NOT NULL, PRIMARY KEY (tenant, device_id));",
            )
            .expect("old schema");
        }
        let store = SqliteStore::open(&path).expect("upgrade");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(store.apply(&[obs("d1", 1, 1000, 1.0)]))
            .expect("apply");
        assert_eq!(
            rt.block_on(store.twin("acme", "d1"))
                .expect("read")
                .expect("twin")
                .seq_gaps,
            0
        );
    }

    #[tokio::test]
    async fn seq_stats_are_rebuilt_from_the_messages_of_an_older_file() {
        let path = std::env::temp_dir().join(format!("iotp-stats-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let store = SqliteStore::open(&path).expect("open");
        let written: Vec<_> = [0, 1, 3, 7].iter().map(|s| message("d1", *s)).collect();
        store.write_messages(&written).await.expect("write");
        let devices = [("acme".to_string(), "d1".to_string())];
        assert_eq!(store.update_seq_gaps(&devices).await.expect("gaps"), 4);
        store
            .with(|c| c.execute("DELETE FROM seq_stats", []).map_err(backend))
            .await
            .expect("as before seq_stats");
        drop(store);
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(
            store.update_seq_gaps(&devices).await.expect("gaps"),
            4,
            "2, 4, 5, 6 missing"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn each_tier_expires_on_its_own_schedule() {
        const DAY: i64 = 86_400_000;
        let store = SqliteStore::open(Path::new(":memory:")).expect("open");
        let retention = Retention {
            raw: std::time::Duration::from_secs(2 * 86_400),
            hourly: std::time::Duration::from_secs(5 * 86_400),
            daily: std::time::Duration::from_secs(9 * 86_400),
        };
        let old = MessageRecord {
            produced_at: 0,
            ..message("d1", 1)
        };
        store
            .write_messages(std::slice::from_ref(&old))
            .await
            .expect("write");
        store.fold(&[old], &[], 0).await.expect("fold");
        let count = |g: &'static str| {
            let store = store.clone();
            async move {
                store
                    .buckets("acme", "d1")
                    .await
                    .expect("buckets")
                    .iter()
                    .filter(|b| b.granularity == g)
                    .count()
            }
        };
        // The clock moves: day 1 keeps all; day 3 drops raw; day 6 drops hourly; day 10 daily.
        assert_eq!(
            store.prune(DAY, &retention).await.expect("prune"),
            PruneReport::default()
        );
        assert_eq!(
            store.prune(3 * DAY, &retention).await.expect("prune"),
            PruneReport {
                raw: 1,
                hourly: 0,
                daily: 0
            }
        );
        assert_eq!(store.message_count(None).await.expect("count"), 0);
        assert_eq!(store.reading_count(None).await.expect("count"), 0);
        assert_eq!((count("hour").await, count("day").await), (2, 2));
        assert_eq!(
            store.prune(6 * DAY, &retention).await.expect("prune"),
            PruneReport {
                raw: 0,
                hourly: 2,
                daily: 0
            }
        );
        assert_eq!((count("hour").await, count("day").await), (0, 2));
        assert_eq!(
            store.prune(10 * DAY, &retention).await.expect("prune"),
            PruneReport {
                raw: 0,
                hourly: 0,
                daily: 2
            }
        );
        assert_eq!(count("day").await, 0);
    }
}
