//! Runs the backend-agnostic conformance suite (`keyward_store::conformance`) on the PostgreSQL
//! backend: one test per check, each in a fresh schema of the database named by
//! `KEYWARD_TEST_DATABASE_URL` (so a failure is named after the rule it broke and no test sees
//! another's rows), and one test running every check on a single shared store. Without that
//! variable every test returns early: a machine with no PostgreSQL still runs the rest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use keyward_store::conformance;
use keyward_store::postgres::PostgresStore;
use keyward_store::Store;
use sqlx::Connection;
use uuid::Uuid;

/// The database URL, or `None` (after saying so) when these tests should not run.
fn database_url() -> Option<String> {
    match std::env::var("KEYWARD_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("KEYWARD_TEST_DATABASE_URL not set; skipping");
            None
        }
    }
}

/// A fresh store in a new schema; the guard drops the schema when the test is done with it.
struct Fresh {
    url: String,
    schema: String,
    store: PostgresStore,
}

async fn open() -> Option<Fresh> {
    let url = database_url()?;
    let schema = format!("kwt_{}", Uuid::now_v7().simple());
    let store = PostgresStore::connect_in_schema(&url, &schema)
        .await
        .expect("open the PostgreSQL store");
    Some(Fresh { url, schema, store })
}

#[async_trait::async_trait]
impl conformance::Harness for Fresh {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    /// Closes the store and drops its schema (best effort: a leftover schema harms nothing but
    /// space, and must not fail a test that passed).
    async fn finish(self) {
        self.store.close().await;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.url).await {
            let drop = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
            if let Err(e) = sqlx::query(&drop).execute(&mut conn).await {
                eprintln!("could not drop schema {}: {e}", self.schema);
            }
            let _ = conn.close().await;
        }
    }
}

keyward_store::conformance_tests!(open);
