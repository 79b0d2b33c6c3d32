//! The reads on the verification path, a key by its digest (a verify-cache miss) and a key's
//! allowed uses in a period (the first use of a period of a key with a quota), done on the
//! calling thread through a small pool of plain `rusqlite` connections.
//!
//! Why not sqlx, like every other query: sqlx runs each SQLite connection on a thread of its
//! own, so a query is two thread hand-offs (the request's task wakes the connection's thread,
//! which wakes the task again). A point read of a database the OS has cached takes tens of
//! microseconds; with verification misses arriving from many connections, the hand-offs
//! around them were 40% of the server's CPU time in a profile (the scheduler's switch and
//! wake-up paths) and most of a miss's latency. Reading here, synchronously, costs the one
//! read: it holds its async worker for that read's duration, which is the price of any
//! short CPU-bound step in a handler. The cost of the choice: on a database the OS has not
//! cached yet (a large one, just after a reboot), the first reads wait on the disk while they
//! hold a worker.
//!
//! A connection is taken from the pool for one query and put back; a thread that finds none
//! free opens one, up to [`MAX_CONNECTIONS`] (one per thread that reads at once, so the cap is
//! only reached with more worker threads than that). When none can be had (or opened), or
//! SQLite reports the database busy, the caller falls back to the sqlx path, which waits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use keyward_core::token::TokenDigest;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::codec::Columns;
use crate::{KeyWithAgent, StoreError, StoreResult};

/// At most this many connections read at once on this path.
const MAX_CONNECTIONS: usize = 16;

/// A read never waits for a lock here (a WAL checkpoint's, held briefly): it falls back at once
/// to the sqlx path, which waits without holding an async worker.
const BUSY_WAIT: Duration = Duration::ZERO;

pub(super) struct HotReads {
    path: PathBuf,
    pool: Mutex<Pool>,
    /// Signalled when a connection closes after [`HotReads::close`].
    drained: Condvar,
    /// [`MAX_CONNECTIONS`], but for tests.
    cap: usize,
}

impl std::fmt::Debug for HotReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotReads")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Pool {
    idle: Vec<Connection>,
    open: usize,
    /// Closed with the store: no connection is handed out or kept any more.
    closed: bool,
}

impl HotReads {
    /// Reads `path` (a database the caller has opened and migrated); connections are opened
    /// when first needed.
    pub(super) fn new(path: PathBuf) -> HotReads {
        HotReads::with_cap(path, MAX_CONNECTIONS)
    }

    /// With at most `cap` connections (none: every read takes the sqlx path).
    pub(super) fn with_cap(path: PathBuf, cap: usize) -> HotReads {
        HotReads {
            path,
            pool: Mutex::new(Pool::default()),
            drained: Condvar::new(),
            cap,
        }
    }

    /// How many connections this path has open.
    #[cfg(test)]
    pub(super) fn opened(&self) -> usize {
        self.pool().open
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        // The pool is a list of idle connections: a panic elsewhere cannot leave it half-changed.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection of the pool, or a new one; `None` when the pool is closed or at its cap, or
    /// a new connection could not be opened (the sqlx path, whose connections are open already,
    /// may still answer: out of file descriptors, say).
    fn take(&self) -> Option<Connection> {
        {
            let mut pool = self.pool();
            if pool.closed {
                return None;
            }
            if let Some(c) = pool.idle.pop() {
                return Some(c);
            }
            if pool.open >= self.cap {
                return None;
            }
            pool.open += 1;
        }
        let opened = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| c.busy_timeout(BUSY_WAIT).map(|()| c));
        if opened.is_err() {
            self.pool().open -= 1;
            self.drained.notify_all();
        }
        opened.ok()
    }

    fn put(&self, c: Connection) {
        let mut pool = self.pool();
        if pool.closed {
            drop(c);
            pool.open -= 1;
            self.drained.notify_all();
        } else {
            pool.idle.push(c);
        }
    }

    /// Closes every connection: the idle ones now, a busy one as its read returns it (this
    /// waits for those: one read each, never waiting on a lock). From now on every read takes
    /// the sqlx path (closed too, so it fails as the rest of the store does). Called before the
    /// sqlx pools close, so that the writer's connection is the last one and checkpoints the WAL
    /// into the database file.
    pub(super) fn close(&self) {
        let mut pool = self.pool();
        pool.closed = true;
        pool.open -= pool.idle.len();
        pool.idle.clear();
        while pool.open > 0 {
            pool = self.drained.wait(pool).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The key with this digest (the store's `KEY_BY_DIGEST`). `None`: this path could not
    /// run it now (no connection to be had, or the database busy); ask the sqlx path.
    pub(super) fn key_by_digest(
        &self,
        digest: &TokenDigest,
    ) -> Option<StoreResult<Option<KeyWithAgent>>> {
        self.run(|conn| read(conn, digest))
    }

    /// The allowed uses of `key_id` in hours `[since_ms, until_ms)` (the store's
    /// `ALLOWED_BETWEEN`); `None` as for [`HotReads::key_by_digest`].
    pub(super) fn allowed_between(
        &self,
        key_id: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Option<StoreResult<u64>> {
        self.run(|conn| {
            conn.prepare_cached(super::ALLOWED_BETWEEN)
                .and_then(|mut stmt| {
                    stmt.query_row(rusqlite::params![key_id, since_ms, until_ms], |row| {
                        row.get::<_, i64>(0)
                    })
                })
                .map(|n| n.max(0) as u64)
                .map_err(Failed::Sqlite)
        })
    }

    /// Runs `query` on a connection of the pool, or answers `None` (ask the sqlx path) when
    /// none can be had or the database is busy.
    fn run<T>(
        &self,
        query: impl FnOnce(&Connection) -> Result<T, Failed>,
    ) -> Option<StoreResult<T>> {
        let conn = self.take()?;
        let found = query(&conn);
        if matches!(&found, Err(Failed::Sqlite(e)) if is_busy(e)) {
            self.put(conn);
            return None;
        }
        // A connection whose statement failed otherwise is dropped rather than reused.
        match found {
            Ok(v) => {
                self.put(conn);
                Some(Ok(v))
            }
            Err(Failed::Map(e)) => {
                self.put(conn);
                Some(Err(e))
            }
            Err(Failed::Sqlite(e)) => {
                drop(conn);
                self.pool().open -= 1;
                self.drained.notify_all();
                Some(Err(map_err(e)))
            }
        }
    }
}

enum Failed {
    Sqlite(rusqlite::Error),
    Map(StoreError),
}

/// Where each of [`super::KEY_BY_DIGEST`]'s columns is, by name: read off the statement once,
/// as its column list is fixed by its text. rusqlite finds a column by name with a scan of every
/// column's name (`sqlite3_column_name`, a `strlen` and a case-insensitive compare each), and the
/// row's mapper asks for 27 columns by name: that scan was 15% of a verify-cache miss's read
/// (`perf` of `examples/miss_cost.rs`).
static COLUMNS: OnceLock<HashMap<String, usize>> = OnceLock::new();

fn read(conn: &Connection, digest: &TokenDigest) -> Result<Option<KeyWithAgent>, Failed> {
    let mut stmt = conn
        .prepare_cached(&super::KEY_BY_DIGEST)
        .map_err(Failed::Sqlite)?;
    let columns = COLUMNS.get_or_init(|| {
        stmt.column_names()
            .into_iter()
            .enumerate()
            .map(|(i, name)| (name.to_string(), i))
            .collect()
    });
    // The mapping's own errors (a corrupt stored value) are not rusqlite's: carried out beside.
    let mut mapped = None;
    stmt.query_row([&digest.0[..]], |row| {
        mapped = Some(super::key_with_agent(&Row { row, columns }));
        Ok(())
    })
    .optional()
    .map_err(Failed::Sqlite)?;
    mapped.transpose().map_err(Failed::Map)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn map_err(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(
            rusqlite::ErrorCode::DatabaseBusy
            | rusqlite::ErrorCode::DatabaseLocked
            | rusqlite::ErrorCode::CannotOpen
            | rusqlite::ErrorCode::SystemIoFailure,
        ) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Internal(e.to_string()),
    }
}

/// A rusqlite row read through the backends' [`Columns`].
struct Row<'a, 'b> {
    row: &'a rusqlite::Row<'b>,
    columns: &'a HashMap<String, usize>,
}

impl Row<'_, '_> {
    fn get<T: rusqlite::types::FromSql>(&self, col: &str) -> StoreResult<T> {
        let i = *self
            .columns
            .get(col)
            .ok_or_else(|| StoreError::Internal(format!("column {col}: no such column")))?;
        self.row
            .get(i)
            .map_err(|e| StoreError::Internal(format!("column {col}: {e}")))
    }
}

impl Columns for Row<'_, '_> {
    fn text(&self, col: &str) -> StoreResult<String> {
        self.get(col)
    }
    fn opt_text(&self, col: &str) -> StoreResult<Option<String>> {
        self.get(col)
    }
    fn int(&self, col: &str) -> StoreResult<i64> {
        self.get(col)
    }
    fn opt_int(&self, col: &str) -> StoreResult<Option<i64>> {
        self.get(col)
    }
    fn bytes(&self, col: &str) -> StoreResult<Vec<u8>> {
        self.get(col)
    }
    fn opt_bytes(&self, col: &str) -> StoreResult<Option<Vec<u8>>> {
        self.get(col)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// `close` returns only once a connection in use has come back and been closed, so the
    /// store's writer can close last; nothing is handed out afterwards.
    #[test]
    fn close_waits_for_a_connection_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER);")
            .unwrap();
        let hot = Arc::new(HotReads::new(path));
        let in_use = hot.take().unwrap();
        assert_eq!(hot.opened(), 1);
        let returner = {
            let hot = Arc::clone(&hot);
            std::thread::spawn(move || {
                // Long enough for `close` to be waiting (if it returned early, the count below
                // would still be 1).
                std::thread::sleep(Duration::from_millis(50));
                hot.put(in_use);
            })
        };
        hot.close();
        assert_eq!(hot.opened(), 0, "close waited for the connection in use");
        assert!(hot.take().is_none(), "a closed pool hands nothing out");
        returner.join().unwrap();
    }

    fn wal_db(dir: &tempfile::TempDir) -> PathBuf {
        let path = dir.path().join("k.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER);")
            .unwrap();
        path
    }

    /// A database another connection holds locked: the read does not wait; it answers "ask
    /// the sqlx path" and keeps its connection for the next read.
    #[test]
    fn a_busy_database_falls_back_at_once_and_keeps_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = wal_db(&dir);
        let locker = Connection::open(&path).unwrap();
        locker
            .execute_batch(
                "PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; INSERT INTO t VALUES (1);",
            )
            .unwrap();
        let hot = HotReads::new(path);
        assert!(hot.key_by_digest(&TokenDigest([1; 32])).is_none());
        assert_eq!(hot.opened(), 1, "the connection is kept");
        assert_eq!(hot.pool().idle.len(), 1, "and back in the pool");
    }

    /// A database that cannot be opened on this path: the read answers "ask the sqlx path"
    /// (whose connections are open already) and keeps no connection count.
    #[test]
    fn a_connection_that_cannot_be_opened_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let hot = HotReads::new(dir.path().join("no such dir").join("k.db"));
        assert!(hot.key_by_digest(&TokenDigest([1; 32])).is_none());
        assert!(hot.allowed_between("k", 0, 1).is_none());
        assert_eq!(hot.opened(), 0);
    }

    /// A statement that fails for another reason (here: no such table) is an error, and its
    /// connection is closed rather than reused.
    #[test]
    fn a_failed_read_is_an_error_and_drops_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let hot = HotReads::new(wal_db(&dir));
        match hot.key_by_digest(&TokenDigest([1; 32])) {
            Some(Err(StoreError::Internal(e))) => assert!(e.contains("no such table"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(hot.opened(), 0);
        assert!(hot.pool().idle.is_empty());
    }
}
