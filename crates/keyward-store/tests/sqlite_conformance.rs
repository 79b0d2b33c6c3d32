//! Runs the backend-agnostic conformance suite (`keyward_store::conformance`) on the SQLite
//! backend: one test per check, each on a fresh database file (so a failure is named after the
//! rule it broke), and one test running every check on a single shared store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use keyward_store::conformance;
use keyward_store::sqlite::SqliteStore;
use keyward_store::Store;
use tempfile::TempDir;

/// A fresh store in a temporary directory, which lives as long as the harness.
struct Fresh {
    _dir: TempDir,
    store: SqliteStore,
}

async fn open() -> Option<Fresh> {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("keyward.db"))
        .await
        .expect("open the SQLite store");
    Some(Fresh { _dir: dir, store })
}

#[async_trait::async_trait]
impl conformance::Harness for Fresh {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    async fn finish(self) {
        self.store.close().await;
    }
}

keyward_store::conformance_tests!(open);
