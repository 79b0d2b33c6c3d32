//! Several real `keyward serve` processes on one PostgreSQL (and one Redis): revocations made
//! through one node are enforced by the other, shared rate limits and quotas add up across
//! nodes, and a node cut off from PostgreSQL or Redis degrades the way the README promises.
//!
//! Faults are injected with a TCP proxy inside the test between a node and PostgreSQL (or Redis):
//! cutting it drops every connection and refuses new ones, as a crashed or unreachable server
//! would, without disturbing the other tests that share the real servers.
//!
//! Needs `KEYWARD_TEST_DATABASE_URL` (and `KEYWARD_TEST_REDIS_URL` for the shared rate limits);
//! skipped without them. CI sets both. The measured figures are printed (run with
//! `--nocapture` to see them); the assertions are about behaviour, with generous time bounds
//! that only catch a node that never converges.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
const STARTUP: Duration = Duration::from_secs(60);
/// The staleness bound the nodes run with here (short, so the outage test is quick).
const MAX_STALENESS_MS: u64 = 2000;
/// One master key for every node: signing secrets encrypted by one node are read by the others.
const MASTER_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

fn env_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("{var} not set; skipping");
            None
        }
    }
}

/// A fresh schema of the test database: its URL (for the nodes) and a cleanup guard.
struct Schema {
    base: String,
    name: String,
}

impl Schema {
    async fn fresh(base: &str) -> Schema {
        use sqlx::Connection;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("kwt_multi_{}_{nanos}", std::process::id());
        let mut admin = sqlx::PgConnection::connect(base).await.unwrap();
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let _ = admin.close().await;
        Schema {
            base: base.to_string(),
            name,
        }
    }

    /// The database URL in this schema, through `host_port` instead of the real server's.
    fn url_via(&self, host_port: Option<SocketAddr>) -> String {
        let mut base = self.base.clone();
        if let Some(hp) = host_port {
            base = base.replace("127.0.0.1:5432", &hp.to_string());
            assert_ne!(
                base, self.base,
                "the test database must be at 127.0.0.1:5432"
            );
        }
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-csearch_path%3D{}", self.name)
    }

    async fn drop_it(self) {
        use sqlx::Connection;
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.base).await {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
                .execute(&mut admin)
                .await;
            let _ = admin.close().await;
        }
    }
}

/// A TCP proxy to `target` that can be cut (every connection dropped and the port closed, so
/// new connections are refused, as when the server is down) and restored on the same port.
struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    state: Mutex<Option<tokio::task::JoinHandle<()>>>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            target,
            state: Mutex::new(None),
            conns: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (target, conns) = (self.target, self.conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(task.abort_handle());
            }
        });
        *self.state.lock().unwrap() = Some(task);
    }

    /// Closes the port and drops every connection through the proxy.
    fn cut(&self) {
        if let Some(task) = self.state.lock().unwrap().take() {
            task.abort();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Listens on the same port again.
    async fn restore(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot rebind {}: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }
}

/// A running `keyward serve`; dropping it kills the process.
struct Node {
    child: Child,
    addr: String,
    banner: Vec<String>,
    stderr: tempfile::NamedTempFile,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(database_url: &str, redis_url: Option<&str>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir.path())
            .env("KEYWARD_MASTER_KEY", MASTER_KEY)
            .env("KEYWARD_LOG", "info")
            .args(["--data-dir", &dir.path().display().to_string()])
            .args(["--database-url", database_url])
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--failed-auth-per-minute", "0"])
            .args(["--max-staleness-ms", &MAX_STALENESS_MS.to_string()]);
        for var in [
            "KEYWARD_CONFIG",
            "KEYWARD_DATA_DIR",
            "KEYWARD_DATABASE_URL",
            "KEYWARD_LISTEN",
            "KEYWARD_RATE_LIMIT_BACKEND",
            "KEYWARD_REDIS_URL",
        ] {
            cmd.env_remove(var);
        }
        if let Some(r) = redis_url {
            cmd.args(["--rate-limit-backend", "redis", "--redis-url", r]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr.reopen().unwrap()))
            .spawn()
            .unwrap();
        // Owned by the node from here on, so a failed start still kills the process.
        let mut node = Node {
            child,
            addr: String::new(),
            banner: Vec::new(),
            stderr,
            _dir: dir,
        };
        let stdout = node.child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + STARTUP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no listening line; stdout {:?}; stderr {}",
                    node.banner,
                    node.stderr_text()
                )
            });
            let addr = line
                .strip_prefix("Keyward listening on http://")
                .map(|a| a.trim().to_string());
            node.banner.push(line);
            if let Some(addr) = addr {
                node.addr = addr;
                return node;
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn root_key(&self) -> String {
        self.banner
            .iter()
            .find_map(|l| l.split_whitespace().find(|w| w.starts_with("kw_rk_")))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no root key printed: {:?}", self.banner))
    }

    fn org_id(&self) -> String {
        self.banner
            .iter()
            .find_map(|l| {
                let rest = l.strip_prefix("Created org `default` (")?;
                Some(rest.strip_suffix(").")?.to_string())
            })
            .unwrap_or_else(|| panic!("no org line: {:?}", self.banner))
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http.request(method, url).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// `POST /v1/keys/verify` of `key` through `node`: the answer's code, or the HTTP error code.
async fn verify_code(http: &reqwest::Client, node: &Node, root: &str, key: &str) -> String {
    let (status, body) = call(
        http,
        reqwest::Method::POST,
        node.url("/v1/keys/verify"),
        root,
        Some(json!({ "key": key })),
    )
    .await;
    if status == 200 {
        body["code"].as_str().unwrap_or("?").to_string()
    } else {
        format!(
            "HTTP {status} {}",
            body["error"]["code"].as_str().unwrap_or("?")
        )
    }
}

/// Creates an agent with one key and the given key settings; returns (agent id, key id, token).
async fn agent_with_key(
    http: &reqwest::Client,
    node: &Node,
    root: &str,
    org: &str,
    name: &str,
    key: Value,
) -> (String, String, String) {
    let (status, body) = call(
        http,
        reqwest::Method::POST,
        node.url(&format!("/v1/orgs/{org}/agents")),
        root,
        Some(json!({ "name": name, "key": key })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    (
        body["agent"]["id"].as_str().unwrap().to_string(),
        body["key"]["id"].as_str().unwrap().to_string(),
        body["api_key"].as_str().unwrap().to_string(),
    )
}

async fn mint(
    http: &reqwest::Client,
    node: &Node,
    root: &str,
    org: &str,
    agent: &str,
) -> (String, String) {
    let (status, body) = call(
        http,
        reqwest::Method::POST,
        node.url(&format!("/v1/orgs/{org}/agents/{agent}/keys")),
        root,
        Some(json!({ "name": "extra" })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    (
        body["key"]["id"].as_str().unwrap().to_string(),
        body["api_key"].as_str().unwrap().to_string(),
    )
}

/// Counts `200`s and `429`s carrying `refusal`; anything else fails the test.
fn tally(answers: &[(u16, Value)], refusal: &str) -> (usize, usize) {
    let (mut ok, mut refused) = (0, 0);
    for (status, body) in answers {
        match status {
            200 => ok += 1,
            429 if body["error"]["code"] == refusal => refused += 1,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    (ok, refused)
}

/// The node's `keyward_ratelimit_fallback_total`.
async fn fallback_count(http: &reqwest::Client, node: &Node) -> f64 {
    let text = http
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("keyward_ratelimit_fallback_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_agree_on_revocations_rate_limits_and_quotas() {
    let Some(db) = env_url("KEYWARD_TEST_DATABASE_URL") else {
        return;
    };
    let Some(redis) = env_url("KEYWARD_TEST_REDIS_URL") else {
        return;
    };
    let schema = Schema::fresh(&db).await;
    let url = schema.url_via(None);
    let n1 = Node::start(&url, Some(&redis));
    let n2 = Node::start(&url, Some(&redis));
    let (root, org) = (n1.root_key(), n1.org_id());
    assert!(
        !n2.banner.iter().any(|l| l.contains("kw_rk_")),
        "the second node must not bootstrap again: {:?}",
        n2.banner
    );
    let http = client();

    // --- Revocation through node 1, seen by node 2: 100 times.
    let (agent, _, _) = agent_with_key(&http, &n1, &root, &org, "revokee", json!({})).await;
    let mut latencies = Vec::new();
    for _ in 0..100 {
        let (key_id, token) = mint(&http, &n1, &root, &org, &agent).await;
        // Node 2 has the key cached (twice: the second is a hit).
        for _ in 0..2 {
            assert_eq!(verify_code(&http, &n2, &root, &token).await, "VALID");
        }
        let (status, body) = call(
            &http,
            reqwest::Method::POST,
            n1.url(&format!("/v1/keys/{key_id}/revoke")),
            &root,
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let acked = Instant::now();
        loop {
            let code = verify_code(&http, &n2, &root, &token).await;
            if code != "VALID" {
                assert_eq!(code, "REVOKED_API_KEY");
                latencies.push(acked.elapsed());
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(10),
                "node 2 still honours a key revoked through node 1 10 s ago"
            );
        }
    }
    latencies.sort();
    eprintln!(
        "revocation through node 1 refused by node 2 (100 revocations, from the revoke's 200): \
         p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap())
    );

    // --- A signed request accepted by node 1 is a replay on node 2 (and on node 1).
    let (status, body) = call(
        &http,
        reqwest::Method::POST,
        n1.url(&format!("/v1/orgs/{org}/agents/{agent}/keys")),
        &root,
        Some(json!({ "name": "signer", "requires_signature": true })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let signer = body["api_key"].as_str().unwrap().to_string();
    let secret = body["signing_secret"].as_str().unwrap().to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let signature = keyward_core::token::sign_request(&secret, "GET", "/v1/me", ts, b"");
    let signed = |node: &Node| {
        http.get(node.url("/v1/me"))
            .bearer_auth(&signer)
            .header("X-Timestamp", ts.to_string())
            .header("X-Signature", &signature)
            .send()
    };
    let first = signed(&n1).await.unwrap();
    assert_eq!(first.status(), 200);
    for node in [&n2, &n1] {
        let replay: Value = signed(node).await.unwrap().json().await.unwrap();
        assert_eq!(
            replay["error"]["code"], "SIGNATURE_REPLAYED",
            "a signature is used once across all nodes: {replay}"
        );
    }

    // --- A shared rate limit of 10 per hour (burst 10) across both nodes admits 10, not 20.
    let (_, _, limited) = agent_with_key(
        &http,
        &n1,
        &root,
        &org,
        "limited",
        json!({ "rate_limit": { "limit": 10, "period_s": 3600, "burst": 10 } }),
    )
    .await;
    let mut answers = Vec::new();
    for i in 0..40 {
        let node = if i % 2 == 0 { &n1 } else { &n2 };
        answers.push(
            call(
                &http,
                reqwest::Method::GET,
                node.url("/v1/me"),
                &limited,
                None,
            )
            .await,
        );
    }
    let (allowed, refused) = tally(&answers, "RATE_LIMITED");
    eprintln!(
        "shared rate limit 10/h over two nodes, 40 calls: {allowed} allowed, {refused} refused"
    );
    assert_eq!(
        (allowed, refused),
        (10, 30),
        "the limit is global, not per node"
    );

    // --- A quota of 100 under 300 concurrent calls spread over both nodes: exactly 100.
    let (_, quota_key_id, quota_key) = agent_with_key(
        &http,
        &n1,
        &root,
        &org,
        "metered",
        json!({ "quota": { "limit": 100, "period": "day" } }),
    )
    .await;
    let calls: Vec<_> = (0..300)
        .map(|i| {
            let http = http.clone();
            let url = if i % 2 == 0 {
                n1.url("/v1/me")
            } else {
                n2.url("/v1/me")
            };
            let key = quota_key.clone();
            tokio::spawn(async move { call(&http, reqwest::Method::GET, url, &key, None).await })
        })
        .collect();
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    let (ok, exceeded) = tally(&answers, "QUOTA_EXCEEDED");
    eprintln!(
        "quota 100 under 300 concurrent calls over two nodes: {ok} allowed, {exceeded} refused"
    );
    assert_eq!(
        (ok, exceeded),
        (100, 200),
        "the quota is exact across nodes"
    );
    // Both nodes' usage counts add up in the store (each flushes its own within a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, usage) = call(
            &http,
            reqwest::Method::GET,
            n2.url(&format!("/v1/keys/{quota_key_id}/usage")),
            &root,
            None,
        )
        .await;
        assert_eq!(status, 200, "{usage}");
        assert_eq!(usage["quota"]["used"], 100, "{usage}");
        if usage["total"]["allowed"] == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "usage never added up: {usage}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    drop(n1);
    drop(n2);
    schema.drop_it().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_postgres_refuses_stale_answers_and_catches_up() {
    let Some(db) = env_url("KEYWARD_TEST_DATABASE_URL") else {
        return;
    };
    let schema = Schema::fresh(&db).await;
    let pg: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start(pg).await;
    let n1 = Node::start(&schema.url_via(None), None);
    let n2 = Node::start(&schema.url_via(Some(proxy.addr)), None);
    let (root, org) = (n1.root_key(), n1.org_id());
    let http = client();
    let (agent, _, _) = agent_with_key(&http, &n1, &root, &org, "outage", json!({})).await;
    let (key_id, token) = mint(&http, &n1, &root, &org, &agent).await;
    assert_eq!(verify_code(&http, &n2, &root, &token).await, "VALID");
    let (status, _) = call(&http, reqwest::Method::GET, n2.url("/readyz"), &root, None).await;
    assert_eq!(status, 200);

    // PostgreSQL goes away for node 2 for 10 seconds; meanwhile the key is revoked through
    // node 1, which still reaches it.
    let cut = Instant::now();
    proxy.cut();
    let (status, body) = call(
        &http,
        reqwest::Method::POST,
        n1.url(&format!("/v1/keys/{key_id}/revoke")),
        &root,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut not_ready_after = None;
    let mut last_valid = None;
    let mut answers = std::collections::BTreeMap::<String, u32>::new();
    while cut.elapsed() < Duration::from_secs(10) {
        let code = verify_code(&http, &n2, &root, &token).await;
        if code == "VALID" {
            last_valid = Some(cut.elapsed());
        }
        *answers.entry(code).or_default() += 1;
        if not_ready_after.is_none() {
            let (status, _) =
                call(&http, reqwest::Method::GET, n2.url("/readyz"), &root, None).await;
            if status == 503 {
                not_ready_after = Some(cut.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let not_ready_after = not_ready_after.expect("node 2 never reported not-ready");
    eprintln!(
        "PostgreSQL cut off from node 2 for 10 s: not ready after {:.0} ms; last VALID answer \
         for the key revoked meanwhile at {}; answers during the outage: {answers:?}",
        ms(not_ready_after),
        last_valid.map_or("never".to_string(), |d| format!("{:.0} ms", ms(d)))
    );
    // The promise: no cached answer older than the staleness bound (plus one heartbeat for the
    // watch to have been proven live last, and a request's time).
    let bound = Duration::from_millis(MAX_STALENESS_MS + 500 + 250);
    if let Some(t) = last_valid {
        assert!(
            t <= bound,
            "node 2 honoured a revoked key {t:?} into the outage (bound {bound:?})"
        );
    }
    assert!(
        answers
            .keys()
            .all(|c| c == "VALID" || c.starts_with("HTTP 503")),
        "during the outage node 2 answers from its cache or 503s: {answers:?}"
    );

    proxy.restore().await;
    let restored = Instant::now();
    loop {
        let (status, _) = call(&http, reqwest::Method::GET, n2.url("/readyz"), &root, None).await;
        if status == 200 {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(30),
            "node 2 not ready 30 s after PostgreSQL came back; stderr: {}",
            n2.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready_after = restored.elapsed();
    let code = verify_code(&http, &n2, &root, &token).await;
    eprintln!(
        "PostgreSQL back: node 2 ready after {:.0} ms, and answers {code} for the key revoked \
         during the outage",
        ms(ready_after)
    );
    assert_eq!(
        code, "REVOKED_API_KEY",
        "node 2 caught up with the revocation"
    );
    // Writes through node 2 work again, and node 1 sees them.
    let (status, body) = call(
        &http,
        reqwest::Method::POST,
        n2.url(&format!("/v1/orgs/{org}/agents/{agent}/pause")),
        &root,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, again) = mint(&http, &n1, &root, &org, &agent).await;
    assert_eq!(verify_code(&http, &n1, &root, &again).await, "AGENT_PAUSED");
    let log = n2.stderr_text();
    assert!(
        log.contains("change watch lost"),
        "the outage is logged: {log}"
    );
    assert!(
        log.contains("change watch is back"),
        "the recovery is logged: {log}"
    );

    drop(n1);
    drop(n2);
    schema.drop_it().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_redis_goes_away_falls_back_to_its_local_limiter() {
    let Some(db) = env_url("KEYWARD_TEST_DATABASE_URL") else {
        return;
    };
    let Some(redis) = env_url("KEYWARD_TEST_REDIS_URL") else {
        return;
    };
    let target: SocketAddr = redis
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .expect("KEYWARD_TEST_REDIS_URL must be redis://host:port[/db] with an IP address");
    let proxy = Proxy::start(target).await;
    let via_proxy = redis.replace(&target.to_string(), &proxy.addr.to_string());
    let schema = Schema::fresh(&db).await;
    let node = Node::start(&schema.url_via(None), Some(&via_proxy));
    let (root, org) = (node.root_key(), node.org_id());
    let http = client();
    let (_, _, key) = agent_with_key(
        &http,
        &node,
        &root,
        &org,
        "fallback",
        json!({ "rate_limit": { "limit": 5, "period_s": 3600, "burst": 5 } }),
    )
    .await;
    let me = |http: reqwest::Client, url: String, key: String| async move {
        call(&http, reqwest::Method::GET, url, &key, None).await.0
    };
    for _ in 0..3 {
        assert_eq!(me(http.clone(), node.url("/v1/me"), key.clone()).await, 200);
    }
    proxy.cut();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(me(http.clone(), node.url("/v1/me"), key.clone()).await);
    }
    eprintln!("Redis cut: 12 calls of a 5/h key answered {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "the local limiter takes over with the same limit: never no limit ({statuses:?})"
    );
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429));
    let fallback = fallback_count(&http, &node).await;
    assert!(
        fallback >= 12.0,
        "every local decision is counted: {fallback}"
    );
    let log = node.stderr_text();
    assert!(
        log.contains("Redis is unavailable"),
        "the fallback is logged: {log}"
    );
    assert!(!log.contains(&via_proxy), "the Redis URL is not logged");

    // Redis back: once a decision is Redis's again (not counted as a fallback), the node shares
    // its limits again. Redis still holds the 3 uses from before the cut, so 2 more are allowed
    // there in all.
    proxy.restore().await;
    let mut shared = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while shared.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the node never went back to Redis: {shared:?}; stderr: {}",
            node.stderr_text()
        );
        let before = fallback_count(&http, &node).await;
        let status = me(http.clone(), node.url("/v1/me"), key.clone()).await;
        if fallback_count(&http, &node).await == before {
            shared.push(status);
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    eprintln!("Redis back: 4 calls decided by Redis answered {shared:?}");
    assert_eq!(
        shared,
        vec![200, 200, 429, 429],
        "shared state resumes from Redis"
    );
    assert!(node.stderr_text().contains("Redis answers again"));

    drop(node);
    schema.drop_it().await;
}
