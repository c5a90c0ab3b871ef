//! The embedded store's dedup guards: for each device, the runs of consecutive seqNos already
//! taken, one row per run (`lo`, `hi`, and `last_at`, the newest event time in it, by which
//! retention expires it). Two guards: `message_runs` (messages the upserter stored) and
//! `rollup_runs` (messages the aggregator folded).
//!
//! A key per message, as the primary key of the rows it guards (before), put each device's
//! newest keys on a leaf page of their own: with 1,000 devices a commit of 500 messages rewrote
//! about 500 pages, 11 KB of disk per message, and more as the store grew. A device's numbers
//! come one after another but for the gaps, so a device is one row or a few; a batch updates it
//! in place, and the guards of 1,000 devices fit in a few dozen pages. The rows they guard are
//! then kept in arrival order, where a commit's rows share pages.

use iotp_contract::devices::FastMap;

use rusqlite::{params, Connection, Transaction};

use super::{add_column_if_missing, schema_has, sqlite_error, write_transaction};
use crate::StoreError;

/// Which guard.
#[derive(Clone, Copy, Debug)]
pub(super) enum Guard {
    /// Messages stored in the raw tier (`messages`).
    Messages,
    /// Messages folded into roll-ups.
    Rollups,
}

impl Guard {
    fn table(self) -> &'static str {
        match self {
            Guard::Messages => "message_runs",
            Guard::Rollups => "rollup_runs",
        }
    }
}

/// One key to take: (tenant, deviceId, seqNo, producedAt).
pub(super) type Key<'a> = (&'a str, &'a str, i64, i64);

/// One run of consecutive seqNos of a device, `lo..=hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    lo: i64,
    hi: i64,
    last_at: i64,
}

/// Add `seq` to a device's runs (sorted by `lo`, neither overlapping nor touching): false when
/// a run holds it already.
fn add(runs: &mut Vec<Run>, seq: i64, at: i64) -> bool {
    let p = runs.partition_point(|r| r.lo <= seq);
    if p > 0 && runs[p - 1].hi >= seq {
        return false;
    }
    let joins_prev = p > 0 && runs[p - 1].hi.checked_add(1) == Some(seq);
    let joins_next = p < runs.len() && seq.checked_add(1) == Some(runs[p].lo);
    match (joins_prev, joins_next) {
        (true, true) => {
            let next = runs.remove(p);
            let prev = &mut runs[p - 1];
            prev.hi = next.hi;
            prev.last_at = prev.last_at.max(next.last_at).max(at);
        }
        (true, false) => {
            let prev = &mut runs[p - 1];
            prev.hi = seq;
            prev.last_at = prev.last_at.max(at);
        }
        (false, true) => {
            let next = &mut runs[p];
            next.lo = seq;
            next.last_at = next.last_at.max(at);
        }
        (false, false) => runs.insert(
            p,
            Run {
                lo: seq,
                hi: seq,
                last_at: at,
            },
        ),
    }
    true
}

/// Take `keys` in `guard`, inside the caller's write transaction: for each key, in order,
/// whether it is new. A key taken before, or earlier in the same call, is not.
///
/// Per device, one read (the runs starting up to one past its highest seqNo here, newest first,
/// down to the one at or below its lowest: every run these numbers can fall into or join) and
/// one write per run that changed.
pub(super) fn take(
    tx: &Transaction<'_>,
    guard: Guard,
    keys: &[Key<'_>],
) -> Result<Vec<bool>, StoreError> {
    let t = guard.table();
    // Newest first, from the last run that can be joined: read until the first run at or
    // below the lowest number (typically one row, one seek).
    let mut read = tx
        .prepare_cached(&format!(
            "SELECT lo, hi, last_at FROM {t} WHERE tenant = ?1 AND device_id = ?2 AND lo <= ?3
             ORDER BY lo DESC"
        ))
        .map_err(sqlite_error)?;
    let mut update = tx
        .prepare_cached(&format!(
            "UPDATE {t} SET hi = ?4, last_at = ?5 WHERE tenant = ?1 AND device_id = ?2 AND lo = ?3"
        ))
        .map_err(sqlite_error)?;
    let mut insert = tx
        .prepare_cached(&format!(
            "INSERT INTO {t} (tenant, device_id, lo, hi, last_at) VALUES (?1, ?2, ?3, ?4, ?5)"
        ))
        .map_err(sqlite_error)?;
    let mut remove = tx
        .prepare_cached(&format!(
            "DELETE FROM {t} WHERE tenant = ?1 AND device_id = ?2 AND lo = ?3"
        ))
        .map_err(sqlite_error)?;
    let mut by_device: FastMap<(&str, &str), Vec<usize>> = FastMap::default();
    for (i, k) in keys.iter().enumerate() {
        by_device.entry((k.0, k.1)).or_default().push(i);
    }
    let mut new = vec![false; keys.len()];
    for ((tenant, device), mut at) in by_device {
        // Stable: of a key given twice, the first is the new one.
        at.sort_by_key(|&i| keys[i].2);
        let (lowest, highest) = (keys[at[0]].2, keys[at[at.len() - 1]].2);
        let mut before = Vec::new();
        let mut rows = read
            .query(params![tenant, device, highest.saturating_add(1)])
            .map_err(sqlite_error)?;
        while let Some(r) = rows.next().map_err(sqlite_error)? {
            let run = Run {
                lo: r.get(0).map_err(sqlite_error)?,
                hi: r.get(1).map_err(sqlite_error)?,
                last_at: r.get(2).map_err(sqlite_error)?,
            };
            before.push(run);
            if run.lo <= lowest {
                break;
            }
        }
        drop(rows);
        before.reverse();
        let mut runs = before.clone();
        for &i in &at {
            new[i] = add(&mut runs, keys[i].2, keys[i].3);
        }
        for gone in before.iter().filter(|b| !runs.iter().any(|r| r.lo == b.lo)) {
            remove
                .execute(params![tenant, device, gone.lo])
                .map_err(sqlite_error)?;
        }
        for run in runs.iter().filter(|r| !before.contains(r)) {
            let stmt = if before.iter().any(|b| b.lo == run.lo) {
                &mut update
            } else {
                &mut insert
            };
            stmt.execute(params![tenant, device, run.lo, run.hi, run.last_at])
                .map_err(sqlite_error)?;
        }
    }
    Ok(new)
}

/// Forget the runs whose newest message is older than `cutoff` (event time): a message that
/// old is rejected as too old before it reaches the store, so it cannot come again.
pub(super) fn expire(tx: &Transaction<'_>, guard: Guard, cutoff: i64) -> Result<(), StoreError> {
    tx.execute(
        &format!("DELETE FROM {} WHERE last_at < ?1", guard.table()),
        params![cutoff],
    )
    .map(drop)
    .map_err(sqlite_error)
}

/// `SELECT` of the runs of `keys` (a table or subquery with tenant, device_id, seq_no,
/// produced_at), for upgrading a file whose guard was a key per message.
fn runs_of(guard: Guard, keys: &str) -> String {
    format!(
        "INSERT INTO {} (tenant, device_id, lo, hi, last_at)
         SELECT tenant, device_id, min(seq_no), max(seq_no), max(produced_at) FROM (
           SELECT tenant, device_id, seq_no, produced_at,
                  seq_no - row_number() OVER (PARTITION BY tenant, device_id ORDER BY seq_no) AS run
           FROM {keys})
         GROUP BY tenant, device_id, run",
        guard.table()
    )
}

/// Upgrade a file from before the guards were runs, in one write transaction (the services
/// sharing the file open it concurrently: the first one upgrades it, the others find nothing
/// to do): `messages` keyed by (tenant, deviceId, seqNo) is rewritten in arrival order and its
/// keys become `message_runs`; `rollup_applied` becomes `rollup_runs`; `seq_stats` (each
/// device's lowest, highest and count, now read off the runs) goes.
///
/// Keys that retention had already removed with their messages are not in the runs either:
/// such messages are rejected as too old before they reach the store.
pub(super) fn upgrade(conn: &mut Connection, messages_table: &str) -> Result<(), StoreError> {
    const KEYED: &str = "type = 'table' AND name = 'messages' AND sql LIKE '%WITHOUT ROWID%'";
    const APPLIED: &str = "type = 'table' AND name = 'rollup_applied'";
    const STATS: &str = "type = 'table' AND name = 'seq_stats'";
    let old = |c: &Connection| -> Result<bool, StoreError> {
        Ok(schema_has(c, KEYED)? || schema_has(c, APPLIED)? || schema_has(c, STATS)?)
    };
    // The usual case, a current file: no write lock taken at start-up.
    if !old(conn)? {
        return Ok(());
    }
    let tx = write_transaction(conn)?;
    if schema_has(&tx, KEYED)? {
        const COLUMNS: &str = "tenant, device_id, seq_no, msg_id, produced_at, received_at, site, asset, profile, stored_at, readings";
        tx.execute_batch(&format!(
            "ALTER TABLE messages RENAME TO messages_by_device;
             DROP INDEX IF EXISTS messages_time;
             {messages_table}
             INSERT INTO messages ({COLUMNS}) SELECT {COLUMNS} FROM messages_by_device ORDER BY stored_at;
             {runs};
             DROP TABLE messages_by_device;",
            runs = runs_of(Guard::Messages, "messages_by_device"),
        ))
        .map_err(sqlite_error)?;
    }
    if schema_has(&tx, APPLIED)? {
        add_column_if_missing(
            &tx,
            "rollup_applied",
            "produced_at",
            "INTEGER NOT NULL DEFAULT 0",
        )?;
        tx.execute_batch(&format!(
            "{}; DROP TABLE rollup_applied;",
            runs_of(Guard::Rollups, "rollup_applied")
        ))
        .map_err(sqlite_error)?;
    }
    tx.execute_batch("DROP TABLE IF EXISTS seq_stats;")
        .map_err(sqlite_error)?;
    tx.commit().map_err(sqlite_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(lo: i64, hi: i64) -> Run {
        Run { lo, hi, last_at: 0 }
    }

    #[test]
    fn a_number_joins_extends_or_splits_nothing() {
        let mut runs = vec![run(0, 3), run(6, 9)];
        assert!(!add(&mut runs, 2, 0), "inside a run");
        assert!(!add(&mut runs, 6, 0), "a run's first");
        assert!(add(&mut runs, 4, 0));
        assert_eq!(runs, [run(0, 4), run(6, 9)], "extends the run below");
        assert!(add(&mut runs, 5, 0));
        assert_eq!(runs, [run(0, 9)], "joins both");
        assert!(add(&mut runs, 12, 0));
        assert!(add(&mut runs, 11, 0));
        assert_eq!(runs, [run(0, 9), run(11, 12)], "starts one earlier");
        assert!(add(&mut runs, 20, 7));
        assert_eq!(
            runs[2],
            Run {
                lo: 20,
                hi: 20,
                last_at: 7
            },
            "a run of its own"
        );
        let mut empty = Vec::new();
        assert!(add(&mut empty, i64::MAX, 0));
        assert!(add(&mut empty, 0, 0));
        assert_eq!(
            empty,
            [run(0, 0), run(i64::MAX, i64::MAX)],
            "no overflow at the ends"
        );
    }

    fn guard() -> (Connection, Guard) {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "CREATE TABLE rollup_runs (tenant TEXT NOT NULL, device_id TEXT NOT NULL, lo INTEGER NOT NULL,
               hi INTEGER NOT NULL, last_at INTEGER NOT NULL, PRIMARY KEY (tenant, device_id, lo)) WITHOUT ROWID;",
        )
        .expect("schema");
        (conn, Guard::Rollups)
    }

    /// Every run: (tenant, deviceId, lo, hi).
    fn rows(conn: &Connection) -> Vec<(String, String, i64, i64)> {
        let mut stmt = conn
            .prepare(
                "SELECT tenant, device_id, lo, hi FROM rollup_runs ORDER BY tenant, device_id, lo",
            )
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    }

    #[test]
    fn keys_are_taken_once_and_stored_as_runs() {
        let (mut conn, g) = guard();
        let tx = write_transaction(&mut conn).expect("tx");
        let keys = [
            ("t", "a", 3, 10),
            ("t", "a", 1, 10),
            ("t", "b", 1, 10),
            ("t", "a", 2, 10),
            ("t", "a", 1, 10),
        ];
        assert_eq!(
            take(&tx, g, &keys).expect("take"),
            [true, true, true, true, false],
            "the second a/1 of the batch is not new"
        );
        tx.commit().expect("commit");
        assert_eq!(
            rows(&conn),
            [
                ("t".into(), "a".into(), 1, 3),
                ("t".into(), "b".into(), 1, 1)
            ]
        );

        let tx = write_transaction(&mut conn).expect("tx");
        let keys = [
            ("t", "a", 0, 5),
            ("t", "a", 2, 5),
            ("t", "a", 7, 5),
            ("t", "a", 5, 5),
        ];
        assert_eq!(
            take(&tx, g, &keys).expect("take"),
            [true, false, true, true]
        );
        tx.commit().expect("commit");
        assert_eq!(
            rows(&conn),
            [
                ("t".into(), "a".into(), 0, 3),
                ("t".into(), "a".into(), 5, 5),
                ("t".into(), "a".into(), 7, 7),
                ("t".into(), "b".into(), 1, 1)
            ]
        );

        // Filling the gaps joins the runs: one row again, and what it holds is still taken.
        let tx = write_transaction(&mut conn).expect("tx");
        let keys = [("t", "a", 6, 20), ("t", "a", 4, 20), ("t", "a", 3, 20)];
        assert_eq!(take(&tx, g, &keys).expect("take"), [true, true, false]);
        tx.commit().expect("commit");
        assert_eq!(
            rows(&conn),
            [
                ("t".into(), "a".into(), 0, 7),
                ("t".into(), "b".into(), 1, 1)
            ]
        );
        let last_at: i64 = conn
            .query_row(
                "SELECT last_at FROM rollup_runs WHERE device_id = 'a'",
                [],
                |r| r.get(0),
            )
            .expect("read");
        assert_eq!(last_at, 20);

        // Another tenant's device of the same name is another guard's row.
        let tx = write_transaction(&mut conn).expect("tx");
        assert_eq!(take(&tx, g, &[("u", "a", 0, 1)]).expect("take"), [true]);
        expire(&tx, g, 15).expect("expire");
        tx.commit().expect("commit");
        assert_eq!(
            rows(&conn),
            [("t".into(), "a".into(), 0, 7)],
            "runs whose newest message is older than 15 expire"
        );
    }
}
