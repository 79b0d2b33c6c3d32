//! Upgrades over data on PostgreSQL: migration 0004 moves each key's last use out of
//! `keys.last_used_at` into `key_last_used`. The test opens a store (every migration applied),
//! puts the database back in its state before 0004 with a key last used at a known time, opens
//! the store again (which applies 0004 over that data) and reads the key. Only when
//! `KEYWARD_TEST_DATABASE_URL` is set, as the conformance suite. (SQLite's upgrade is tested
//! in `sqlite::tests`, from a database built by migrations 1-3.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Utc};
use keyward_core::token::TokenKind;
use keyward_store::conformance;
use keyward_store::Store;
use sqlx::{Connection, Executor};
use uuid::Uuid;

/// A time a key was last used, in the stores' milliseconds.
const LAST_USED_MS: i64 = 1_795_000_000_123;

fn last_used() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(LAST_USED_MS).unwrap()
}

/// Creates an org (its root key never used), closes the store; answers the key's id.
async fn seed_and_close(store: impl Store) -> Uuid {
    let key = seed(&store).await;
    assert_eq!(
        store.get_key(key).await.unwrap().unwrap().last_used_at,
        None
    );
    store.close().await;
    key
}

/// Creates an org; answers its root key's id.
async fn seed(store: &dyn Store) -> Uuid {
    let org = conformance::org(&conformance::unique("upgrade"));
    let root = conformance::key(org.id, None, TokenKind::Root);
    store
        .create_org(&org, &root, &conformance::event(org.id, "org.create"))
        .await
        .unwrap();
    root.id
}

/// SQL that returns a database to its state before 0004, with `key` last used at
/// `LAST_USED_MS` as the previous version recorded it.
fn before_0004(key: Uuid) -> Vec<String> {
    vec![
        format!("UPDATE keys SET last_used_at = {LAST_USED_MS} WHERE id = '{key}'"),
        "DROP TABLE key_last_used".to_string(),
        "DELETE FROM _sqlx_migrations WHERE version = 4".to_string(),
    ]
}

#[tokio::test]
async fn postgres_0004_carries_each_keys_last_use_over() {
    let Some(url) = std::env::var("KEYWARD_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("KEYWARD_TEST_DATABASE_URL not set; skipping");
        return;
    };
    let schema = format!("kwm_{}", Uuid::now_v7().simple());
    let open = || keyward_store::postgres::PostgresStore::connect_in_schema(&url, &schema);
    let store = open().await.unwrap();
    let key = seed_and_close(store).await;

    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    conn.execute(format!("SET search_path TO \"{schema}\"").as_str())
        .await
        .unwrap();
    for sql in before_0004(key) {
        conn.execute(sql.as_str()).await.unwrap();
    }

    let store = open().await.unwrap();
    let stored = store.get_key(key).await.unwrap().unwrap();
    store.close().await;
    // Dropped before asserting, so a failure leaves no schema behind.
    conn.execute(format!("DROP SCHEMA \"{schema}\" CASCADE").as_str())
        .await
        .unwrap();
    assert_eq!(stored.last_used_at, Some(last_used()));
    let _ = conn.close().await;
}
