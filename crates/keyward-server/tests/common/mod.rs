//! The HTTP test harness: starts the real server in-process on 127.0.0.1:0 through the one seam
//! (`keyward_server::serve`) over an SQLite store in a temp dir, with a manual clock so expiry and
//! overlap windows are tested without sleeping.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use keyward_core::clock::{Clock, ManualClock};
use keyward_server::{MasterKey, ServerConfig};
use keyward_store::sqlite::SqliteStore;
use keyward_store::Store;
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::oneshot;

/// A running server and what tests need to drive it.
pub struct TestServer {
    pub base: String,
    pub org_id: String,
    pub root_key: String,
    pub clock: Arc<ManualClock>,
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    /// (database URL, schema) when running on PostgreSQL.
    pg_schema: Option<(String, String)>,
    _dir: TempDir,
}

/// A response: status, headers and the JSON body (`Value::Null` when not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Resp {
    /// The error code of an error body, or "" for a success.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// Asserts the response is an error in the contract's shape with this status and code.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        assert_eq!(self.code(), code, "unexpected code; body: {}", self.body);
        let e = &self.body["error"];
        assert_eq!(
            e["status"].as_u64(),
            Some(status as u64),
            "status repeated inside"
        );
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "message present"
        );
        assert!(e["request_id"]
            .as_str()
            .is_some_and(|r| r.starts_with("req_") || !r.is_empty()));
        assert!(e["details"].is_object(), "details is an object");
    }

    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        &self.body
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The fixed instant every test server's clock starts at.
pub fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

impl TestServer {
    /// Starts a server with default settings.
    pub async fn start() -> TestServer {
        TestServer::start_with(Vec::new()).await
    }

    /// Starts a server trusting these proxies for `X-Forwarded-For`.
    pub async fn start_with(trusted_proxies: Vec<ipnet::IpNet>) -> TestServer {
        TestServer::start_configured(|c| c.trusted_proxies = trusted_proxies).await
    }

    /// Starts a server after `configure` adjusted its settings.
    pub async fn start_configured(configure: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        // With KEYWARD_TEST_DATABASE_URL set, every HTTP test runs on PostgreSQL, in a fresh
        // schema dropped when the server is; otherwise on SQLite in a temp dir.
        let (store, pg_schema): (Arc<dyn Store>, Option<(String, String)>) =
            match postgres_store().await {
                Some((store, url, schema)) => (store, Some((url, schema))),
                None => (
                    Arc::new(
                        SqliteStore::open(&dir.path().join("keyward.db"))
                            .await
                            .unwrap(),
                    ),
                    None,
                ),
            };
        let clock = Arc::new(ManualClock::new(t0()));
        let (org, key) =
            keyward_server::bootstrap::create_org(store.as_ref(), clock.as_ref(), "test-org")
                .await
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let mut config = ServerConfig {
            trusted_proxies: Vec::new(),
            master_key: MasterKey::from_bytes([42u8; 32]),
            clock: clock.clone() as Arc<dyn Clock>,
            cache: Default::default(),
            usage_flush_interval: std::time::Duration::from_millis(200),
            failed_auth_limit: Some(keyward_server::DEFAULT_FAILED_AUTH_LIMIT),
            rate_limit_backend: keyward_server::RateLimitBackend::Local,
        };
        configure(&mut config);
        let s = store.clone();
        tokio::spawn(async move {
            keyward_server::serve(config, s, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestServer {
            base: format!("http://{addr}"),
            org_id: org.id.to_string(),
            root_key: key.expose().to_string(),
            clock,
            store,
            http: reqwest::Client::new(),
            shutdown: Some(tx),
            pg_schema,
            _dir: dir,
        }
    }

    /// Creates another org directly in the store, returning (org_id, root_key).
    pub async fn new_org(&self, name: &str) -> (String, String) {
        let (org, key) =
            keyward_server::bootstrap::create_org(self.store.as_ref(), self.clock.as_ref(), name)
                .await
                .unwrap();
        (org.id.to_string(), key.expose().to_string())
    }

    /// (database URL, schema) when the server runs on PostgreSQL; otherwise `None`, after
    /// printing that the test is skipped because only PostgreSQL can do `what`.
    pub fn postgres_or_skip(&self, what: &str) -> Option<(&str, &str)> {
        let pg = self
            .pg_schema
            .as_ref()
            .map(|(url, schema)| (url.as_str(), schema.as_str()));
        if pg.is_none() {
            eprintln!("skipped: needs KEYWARD_TEST_DATABASE_URL (only PostgreSQL {what})");
        }
        pg
    }

    /// Moves the server's clock forward.
    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    /// Sends a request with an optional bearer key, extra headers and JSON body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Resp {
        let mut rb = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        for (n, v) in headers {
            rb = rb.header(*n, *v);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, key: &str) -> Resp {
        self.send(Method::GET, path, Some(key), &[], None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> Resp {
        self.send(Method::POST, path, Some(key), &[], Some(body))
            .await
    }

    pub async fn patch(&self, path: &str, key: &str, body: Value) -> Resp {
        self.send(Method::PATCH, path, Some(key), &[], Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, key: &str) -> Resp {
        self.send(Method::DELETE, path, Some(key), &[], None).await
    }

    /// `/v1/orgs/{this org}` + suffix.
    pub fn org_path(&self, suffix: &str) -> String {
        format!("/v1/orgs/{}{}", self.org_id, suffix)
    }

    /// Creates an agent with these provider scopes; returns (agent JSON, key JSON, api_key).
    pub async fn create_agent(&self, name: &str, scopes: Value) -> (Value, Value, String) {
        let r = self
            .post(
                &self.org_path("/agents"),
                &self.root_key,
                json!({ "name": name, "scopes": scopes }),
            )
            .await;
        let b = r.assert_status(201).clone();
        let api_key = b["api_key"].as_str().unwrap().to_string();
        (b["agent"].clone(), b["key"].clone(), api_key)
    }

    /// Creates an agent with `body` as given (must succeed); returns the whole 201 body.
    pub async fn create_agent_with(&self, body: Value) -> Value {
        self.post(&self.org_path("/agents"), &self.root_key, body)
            .await
            .assert_status(201)
            .clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Best effort, without blocking the test's runtime: psql drops the schema on its own.
        if let Some((url, schema)) = self.pg_schema.take() {
            drop_schema(&url, &schema);
        }
    }
}

/// A PostgreSQL store in a fresh schema, with the database URL and the schema's name, when
/// KEYWARD_TEST_DATABASE_URL is set; `None` otherwise. The caller drops the schema
/// ([`drop_schema`]).
pub async fn postgres_store() -> Option<(Arc<dyn Store>, String, String)> {
    let url = std::env::var("KEYWARD_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())?;
    let schema = format!("kwh_{}", uuid::Uuid::now_v7().simple());
    let store = keyward_store::postgres::PostgresStore::connect_in_schema(&url, &schema)
        .await
        .unwrap();
    Some((Arc::new(store), url, schema))
}

/// Drops a test's PostgreSQL schema, best effort and without waiting: `psql` does it on its own.
pub fn drop_schema(url: &str, schema: &str) {
    let _ = std::process::Command::new("psql")
        .arg(url)
        .args([
            "-q",
            "-c",
            &format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

/// Settings for a server whose chores stay out of a test's way: no failed-auth throttle, the
/// local rate limiter, and a usage flush interval of an hour (nothing is flushed unless the test
/// flushes it or the server stops).
pub fn quiet_config(clock: Arc<dyn Clock>) -> ServerConfig {
    ServerConfig {
        trusted_proxies: Vec::new(),
        master_key: MasterKey::from_bytes([42u8; 32]),
        clock,
        cache: Default::default(),
        usage_flush_interval: std::time::Duration::from_secs(3600),
        failed_auth_limit: None,
        rate_limit_backend: keyward_server::RateLimitBackend::Local,
    }
}

/// The server's state over a fresh SQLite store, without HTTP, for tests that drive
/// `AppState` directly (a request dropped midway, a background chore run by hand). The usage
/// flush interval is an hour: nothing runs unless the test runs it.
pub struct Bare {
    pub state: keyward_server::AppState,
    pub store: Arc<SqliteStore>,
    pub clock: Arc<ManualClock>,
    pub org: keyward_core::model::Org,
    /// The org's root key.
    pub root: keyward_core::secret::Secret,
    /// Holds the store's files: bind it (`dir: _dir`) for as long as the store is used.
    pub dir: TempDir,
}

impl Bare {
    pub async fn start() -> Bare {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("k.db")).await.unwrap());
        let clock = Arc::new(ManualClock::new(t0()));
        let (org, root) =
            keyward_server::bootstrap::create_org(store.as_ref(), clock.as_ref(), "o")
                .await
                .unwrap();
        let state = Bare::state_over(store.clone(), clock.clone());
        Bare {
            state,
            store,
            clock,
            org,
            root,
            dir,
        }
    }

    /// The state `Bare` holds, over any store, with [`quiet_config`].
    pub fn state_over(store: Arc<dyn Store>, clock: Arc<ManualClock>) -> keyward_server::AppState {
        keyward_server::AppState::new(quiet_config(clock), store)
    }

    /// The root key's snapshot, through the verify cache (filled from the store on a miss).
    pub async fn root_snapshot(&self) -> Arc<keyward_server::cache::Prepared> {
        self.state
            .cache
            .lookup(
                self.state.store.as_ref(),
                &self.state.meter,
                self.root.expose(),
                self.clock.now_ms(),
            )
            .await
            .unwrap()
            .unwrap()
    }
}
