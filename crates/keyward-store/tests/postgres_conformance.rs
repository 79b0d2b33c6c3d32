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

impl Fresh {
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

/// One test per check taking `&dyn Store`.
macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some(fresh) = open().await else { return };
                conformance::$name(&fresh.store).await;
                fresh.finish().await;
            }
        )*
    };
}

/// One multi-threaded test per check that needs concurrency (taking `Arc<dyn Store>`).
macro_rules! concurrent_checks {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some(fresh) = open().await else { return };
                let shared: Arc<dyn Store> = Arc::new(fresh.store.clone());
                conformance::$name(shared).await;
                fresh.finish().await;
            }
        )*
    };
}

checks!(
    org_round_trips_through_create_get_and_first_org,
    org_names_are_unique,
    agent_round_trips_through_create_get_get_by_name_and_list,
    agent_names_are_unique_among_live_agents_and_reusable_after_revocation,
    list_agents_pages_by_created_at_and_filters_revoked,
    update_agent_refuses_stale_versions_and_revoked_agents,
    insert_key_refuses_keys_for_revoked_agents,
    find_key_by_digest_returns_the_key_and_its_agent_status,
    list_keys_filters_by_agent_kind_and_revocation,
    update_key_writes_mutable_fields_and_refuses_revoked_keys,
    revoke_key_cascades_to_derived_descendants,
    revoking_twice_fails_with_key_already_revoked,
    last_active_key_guard_protects_an_agents_only_key,
    last_active_key_guard_counts_the_cascade,
    last_active_key_guard_protects_the_orgs_last_root_key,
    idempotency_key_is_claimed_once_with_its_state_change,
    expired_idempotency_record_is_replaced_on_the_next_claim,
    rotate_key_inserts_the_successor_and_deprecates_the_old_key,
    rotate_key_refuses_a_revoked_old_key,
    state_changes_write_their_audit_events,
    list_audit_filters_and_pages,
    failed_state_changes_write_no_audit_event,
    usage_counts_add_up_and_read_back_by_hour,
    last_used_at_only_moves_forward,
    a_quota_threshold_is_announced_once_per_period,
    import_keys_inserts_all_or_nothing,
);

concurrent_checks!(
    concurrent_revocations_of_an_agents_last_two_keys_leave_one,
    concurrent_creates_of_one_agent_name_admit_exactly_one,
    concurrent_claims_of_one_idempotency_key_admit_exactly_one,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_checks_on_one_shared_store() {
    let Some(fresh) = open().await else { return };
    conformance::run_all(Arc::new(fresh.store.clone())).await;
    fresh.finish().await;
}
