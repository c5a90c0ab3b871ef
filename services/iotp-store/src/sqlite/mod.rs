//! The embedded store: SQLite in WAL mode, one file, no server. The default for `make demo`
//! and for machines without MongoDB. This module opens the file (pragmas, schema, upgrades of
//! files from older versions), classifies SQLite's errors and runs each operation on the
//! blocking pool; the contract is implemented per concern in `twins.rs`, `readings.rs`,
//! `rollups.rs`, `archive.rs` and `prune.rs`, and the dedup guards of the readings and the
//! roll-ups in `runs.rs`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::StoreError;

mod archive;
mod prune;
mod readings;
mod rollups;
mod runs;
mod twins;

/// The embedded store: one connection to the file, used by one operation at a time on the
/// blocking pool. Cheap to clone: clones share the connection and the twin cache.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// The twins this process wrote last, with their versions (`twins.rs`).
    twins: Arc<Mutex<twins::TwinCache>>,
}

/// The store's error for a SQLite failure. Busy or locked (another process kept the write
/// lock beyond the busy timeout) and a full disk are transient: the same operation may succeed
/// later. A damaged or foreign file, and a stored value that does not convert to its Rust
/// type, are corrupt data. Everything else (SQL the schema does not take, a file that cannot
/// be opened, a read-only file) is a defect or a misconfiguration.
fn sqlite_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::DiskFull) => {
            StoreError::Unavailable(e.to_string())
        }
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            StoreError::Corrupt(e.to_string())
        }
        Some(_) => StoreError::Backend(e.to_string()),
        None => match e {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..) => StoreError::Corrupt(e.to_string()),
            _ => StoreError::Backend(e.to_string()),
        },
    }
}

/// The raw tier, in arrival order (the rowid): a commit's messages share pages. Its dedup guard
/// is `message_runs` (`runs.rs`); `messages_time` serves retention.
const MESSAGES: &str = "
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
    readings TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS messages_time ON messages (produced_at);
";

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
    version INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, device_id)
);
CREATE TABLE IF NOT EXISTS message_runs (
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    lo INTEGER NOT NULL,
    hi INTEGER NOT NULL,
    last_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, device_id, lo)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_runs (
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    lo INTEGER NOT NULL,
    hi INTEGER NOT NULL,
    last_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, device_id, lo)
) WITHOUT ROWID;

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
-- `online` alone: the liveness count scans it, the offline sweep finds online twins by it.
-- Files from before it had `(online, last_seen_at)`, rewritten by every twin write.
DROP INDEX IF EXISTS twins_online;
CREATE INDEX IF NOT EXISTS twins_by_online ON twins (online);
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

/// Page cache of each connection, KiB.
const CACHE_KIB: u32 = 24 * 1024;

/// WAL pages after which a commit copies the WAL back into the file (SQLite's default: 1,000).
const WAL_CHECKPOINT_PAGES: i64 = 8_000;

impl SqliteStore {
    /// Open (creating if needed) the store at `path`; `:memory:` for a private in-memory one.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path).map_err(sqlite_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite_error)?;
        // FULL: offsets are committed after the store's commit, so a committed transaction
        // must survive power loss; in WAL mode NORMAL can lose the last ones.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite_error)?;
        // The hot set of the writers: the twins and the roll-up buckets of every device (about
        // 1,000 pages for 1,000 devices); SQLite's 2 MiB default re-read them from the OS on
        // every batch (half the upserter's CPU was the kernel copying pages, perf).
        conn.pragma_update(None, "cache_size", -(CACHE_KIB as i64))
            .map_err(sqlite_error)?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)
            .map_err(sqlite_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(sqlite_error)?;
        conn.execute_batch(SCHEMA).map_err(sqlite_error)?;
        conn.execute_batch(MESSAGES).map_err(sqlite_error)?;
        // Columns added after a table first shipped: a store file from an older version gains them.
        add_column_if_missing(&conn, "twins", "seq_gaps", "INTEGER NOT NULL DEFAULT 0")?;
        add_column_if_missing(&conn, "twins", "version", "INTEGER NOT NULL DEFAULT 0")?;
        add_column_if_missing(&conn, "messages", "readings", "TEXT NOT NULL DEFAULT '[]'")?;
        readings::inline_readings_table(&mut conn)?;
        runs::upgrade(&mut conn, MESSAGES)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            twins: Arc::default(),
        })
    }

    /// Open the store at `path`, creating its directory if needed.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        Self::open(path)
    }

    /// Run `f` on the connection, on the blocking pool (SQLite calls block).
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // Poisoned: an operation panicked while it held the connection (a defect; its
            // transaction was rolled back when the panic dropped it).
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Backend("store connection poisoned by a panic".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| {
            // Cancelled only when the runtime shuts down under the operation.
            if e.is_cancelled() {
                StoreError::Unavailable(format!("store operation cancelled: {e}"))
            } else {
                StoreError::Backend(format!("store operation panicked: {e}"))
            }
        })?
    }
}

/// A write transaction that takes the write lock up front (`BEGIN IMMEDIATE`). Several
/// services share the store file: a deferred transaction that reads first and then writes
/// gets SQLITE_BUSY at once, without waiting, when another process wrote in between (its
/// snapshot is stale); an immediate one waits its turn under the busy timeout.
fn write_transaction(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, StoreError> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sqlite_error)
}

/// Whether the file's schema has an object for which `condition` (SQL over `sqlite_schema`'s
/// columns) holds: how the upgrades of files from older versions find what to do.
fn schema_has(conn: &Connection, condition: &str) -> Result<bool, StoreError> {
    conn.query_row(
        &format!("SELECT count(*) > 0 FROM sqlite_schema WHERE {condition}"),
        [],
        |r| r.get(0),
    )
    .map_err(sqlite_error)
}

/// Add `column` to `table` unless the file has it already (a file from an older version).
fn add_column_if_missing(
    conn: &Connection,
    table: &str,
    column: &str,
    declaration: &str,
) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare(&format!("PRAGMA table_info({table})"))
        .map_err(sqlite_error)?;
    let columns: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(1))
        .map_err(sqlite_error)?
        .collect::<Result<_, _>>()
        .map_err(sqlite_error)?;
    if !columns.iter().any(|c| c == column) {
        match conn.execute_batch(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
        )) {
            // Another process sharing the file added it first.
            Err(e) if e.to_string().contains("duplicate column name") => {}
            other => other.map_err(sqlite_error)?,
        }
    }
    Ok(())
}

/// A message of device `device` in tenant `acme` with an energy and a power reading, for the
/// backend's unit tests.
#[cfg(test)]
fn test_message(device: &str, seq_no: i64) -> crate::MessageRecord {
    crate::MessageRecord {
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

/// A store file of this test process's own under the temporary directory, removed first
/// (with its WAL and shared-memory files) if an earlier run left it.
#[cfg(test)]
fn test_file(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("iotp-{name}-{}.sqlite", std::process::id()));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    path
}

#[cfg(test)]
mod tests {
    //! What only the embedded store has: file upgrades, pruning by a moving clock. The rest of
    //! the contract is tested on every backend in `tests/store_contract.rs`.
    use super::*;
    use crate::{Observation, TwinStore};

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

    #[test]
    fn a_store_file_from_before_seq_gaps_is_upgraded() {
        let path = std::env::temp_dir().join(format!("iotp-old-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE twins (tenant TEXT NOT NULL, device_id TEXT NOT NULL, last_seq_no INTEGER NOT NULL,
                   last_seen_at INTEGER NOT NULL, last_values TEXT NOT NULL, firmware TEXT, config_version TEXT,
                   heartbeat_secs INTEGER, online INTEGER NOT NULL, alarms TEXT NOT NULL, PRIMARY KEY (tenant, device_id));
                 CREATE INDEX twins_online ON twins (online, last_seen_at);",
            )
            .expect("old schema");
        }
        let store = SqliteStore::open(&path).expect("upgrade");
        let indexes: Vec<String> = {
            let conn = store.conn.lock().expect("connection");
            let mut stmt = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'twins' AND sql IS NOT NULL")
                .expect("prepare");
            let names = stmt.query_map([], |r| r.get(0)).expect("query");
            names.collect::<Result<_, _>>().expect("names")
        };
        assert_eq!(indexes, ["twins_by_online"], "the old index is dropped");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(store.apply(vec![obs("d1", 1, 1000, 1.0)]))
            .expect("apply");
        assert_eq!(
            rt.block_on(store.twin("acme", "d1"))
                .expect("read")
                .expect("twin")
                .seq_gaps,
            0
        );
    }

    /// Observations already folded in leave the row alone; a newer one writes it.
    #[tokio::test]
    async fn a_twin_that_folds_to_itself_is_not_written() {
        let store = SqliteStore::open(Path::new(":memory:")).expect("store");
        let changes = || store.conn.lock().expect("connection").total_changes();
        store
            .apply(vec![obs("d1", 1, 1000, 1.0)])
            .await
            .expect("apply");
        let after_first = changes();
        store
            .apply(vec![obs("d1", 1, 1000, 1.0), obs("d1", 1, 1000, 1.0)])
            .await
            .expect("again");
        assert_eq!(changes(), after_first, "the same observation again");
        store
            .apply(vec![obs("d1", 2, 2000, 2.0)])
            .await
            .expect("newer");
        assert_eq!(changes(), after_first + 1);
        let twin = store.twin("acme", "d1").await.expect("read").expect("twin");
        assert_eq!((twin.last_seq_no, twin.last_seen_at), (2, 2000));
        assert_eq!(twin.last_values["temp"].value, 2.0);
    }

    #[test]
    fn a_write_lock_held_elsewhere_is_transient_and_a_foreign_file_is_corrupt() {
        let path = std::env::temp_dir().join(format!("iotp-busy-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        drop(SqliteStore::open(&path).expect("create"));
        let holder = Connection::open(&path).expect("open");
        holder
            .execute_batch("BEGIN IMMEDIATE")
            .expect("hold the write lock");
        let other = Connection::open(&path).expect("open");
        other
            .busy_timeout(std::time::Duration::ZERO)
            .expect("no wait");
        let busy = other
            .execute_batch("BEGIN IMMEDIATE")
            .expect_err("the lock is held");
        let e = sqlite_error(busy);
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(e.is_transient());
        let bad_sql = other
            .execute_batch("SELECT nope FROM twins")
            .expect_err("no column");
        assert!(matches!(sqlite_error(bad_sql), StoreError::Backend(_)));
        drop((holder, other));
        let _ = std::fs::remove_file(&path);

        let foreign =
            std::env::temp_dir().join(format!("iotp-foreign-{}.sqlite", std::process::id()));
        std::fs::write(&foreign, vec![b'x'; 8192]).expect("write");
        let e = SqliteStore::open(&foreign).err().expect("not a database");
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        assert!(!e.is_transient());
        let _ = std::fs::remove_file(&foreign);
    }
}
