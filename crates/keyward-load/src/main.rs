//! `keyward-load`: the load test of the hot path (the traffic-controls issue's benchmark).
//!
//! It initialises a fresh data dir with the release `keyward` binary, seeds N agent keys
//! straight into the store (one import per batch: seeding through the API would spend its time
//! in fsyncs), starts `keyward serve`, and measures over loopback, with HTTP/1.1 keep-alive
//! connections and an HDR histogram:
//! - how long `serve` takes to answer `/healthz` (ready time);
//! - a first pass verifying every key once (all cache misses), then the server's RSS: its first
//!   keys at a fixed rate (`--miss-rate`, open loop: the latency of a miss at that load), the
//!   rest as fast as 16 connections go (closed loop: the rate of misses the server sustains);
//! - `GET /healthz` (a static handler on the same HTTP stack), `POST /v1/keys/verify` and
//!   `GET /v1/me`, at each connection count, as req/s and p50/p99/p99.9, with the ratio of each
//!   to the static handler.
//!
//! The generator shares the machine with the server, as the targets assume.
//!
//! Then the same static and verify requests against a reference server on bare hyper
//! (`keyward-bare`, built beside this binary): `/healthz` and a verify-shaped handler that does only what
//! any handler of that shape must (read and parse the JSON body, SHA-256 the key, one hash-map
//! lookup, serialize an answer of the same shape with serde). Its ratio is the ceiling a
//! verification on this machine and HTTP stack can reach; the gap between it and Keyward's ratio
//! is Keyward's own work (the caller's authentication, the checks, the counters).
//!
//! Run: `cargo build --release -p keyward && cargo run --release -p keyward-load -- --keys 10000`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use hyper::Request;
use hyper_util::rt::TokioIo;
use keyward_core::model::{
    Agent, AgentStatus, AgentType, AuditEvent, Key, Outcome, Quota, QuotaPeriod, TraceContext,
};
use keyward_core::scope::Scope;
use keyward_core::token::{self, Environment, TokenKind};
use keyward_store::sqlite::SqliteStore;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(about = "Load test of Keyward's verification path")]
struct Args {
    /// How many agent keys to seed.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Connection counts to measure at.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    connections: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of (static, verify, me) per connection count; the table shows the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The keyward binary to start.
    #[arg(long, default_value = "target/release/keyward")]
    bin: PathBuf,
    /// Run on this PostgreSQL database instead of the embedded SQLite store. It must be empty:
    /// use a fresh schema (`...?options=-csearch_path%3Dkwload_1`, created beforehand).
    #[arg(long)]
    database_url: Option<String>,
    /// Drive only this endpoint (`static`, `verify` or `me`) for `--seconds` at the first
    /// connection count after the first pass, print its figures and stop: a steady load to
    /// attach a profiler to (the server's pid is printed before it starts).
    #[arg(long, value_enum)]
    only: Option<Endpoint>,
    /// Cache misses per second in the open-loop part of the first pass (its first half of the
    /// keys, at most 10 s of them): the latency of a miss at that load.
    #[arg(long, default_value_t = 5_000.0, value_parser = positive_rate)]
    miss_rate: f64,
    /// Give every seeded key a daily quota (of a billion uses: never reached). A key's first
    /// use in a period then also reads its count so far from the store, so the first pass
    /// measures that path.
    #[arg(long)]
    quota: bool,
}

/// The quota `--quota` gives every key.
const LOAD_QUOTA: Quota = Quota {
    limit: 1_000_000_000,
    period: QuotaPeriod::Day,
};

/// How long the open-loop part of the first pass lasts at most.
const MISS_PACED_SECONDS: f64 = 10.0;

/// A rate of requests per second: finite and above zero.
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        Ok(_) => Err(format!("{s} is not a rate above zero")),
        Err(e) => Err(format!("{s}: {e}")),
    }
}

/// The endpoints measured, each with the requests that drive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Endpoint {
    Static,
    Verify,
    Me,
}

/// What makes the `i`th request of a run.
type MakeRequest = Arc<dyn Fn(u64) -> Request<Full<Bytes>> + Send + Sync>;

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Static => "static",
            Endpoint::Verify => "verify",
            Endpoint::Me => "me",
        }
    }

    /// The `i`th request of a run of this endpoint: keys are taken in a scattered order, so that
    /// consecutive requests do not read neighbouring snapshots.
    fn requests(self, wire: &Arc<Wire>) -> MakeRequest {
        let w = wire.clone();
        match self {
            Endpoint::Static => Arc::new(|_| get("/healthz", None)),
            Endpoint::Verify => Arc::new(move |i| w.verify(i * 7919)),
            Endpoint::Me => Arc::new(move |i| w.me(i * 7919)),
        }
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Kills the server when the run ends, however it ends.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User and system CPU time a process has used so far, from `/proc/<pid>/stat` (fields 14 and
/// 15, in clock ticks of 10 ms): coarse, but over a run of seconds it says where the cores went.
fn cpu_time(pid: &str) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; the fields after its `)` are fixed.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Option<Duration> {
        Some(Duration::from_millis(f.get(i)?.parse::<u64>().ok()? * 10))
    };
    // After `)`: field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    Some((tick(11)?, tick(12)?))
}

/// One measurement and the CPU it took.
struct Measured {
    run: Run,
    cpu: CpuUse,
}

impl Measured {
    /// Microseconds of `d` (a CPU time of the run) per request answered.
    fn us_per_request(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e6 / self.run.requests.max(1) as f64
    }

    /// `req/s, p50, p99, errors, server CPU (user + sys) and generator CPU per request`; the CPU
    /// only for a run of a second or more (it is counted in ticks of 10 ms).
    fn summary(&self) -> String {
        let cpu = if self.run.elapsed >= Duration::from_secs(1) {
            format!(
                "server CPU µs/req {:.1} + {:.1}, generator {:.1}",
                self.us_per_request(self.cpu.server_user),
                self.us_per_request(self.cpu.server_sys),
                self.us_per_request(self.cpu.client)
            )
        } else {
            "CPU not measured (a run under 1 s; it is counted in 10 ms ticks)".to_string()
        };
        format!(
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, errors {}, {cpu}",
            self.run.rps(),
            self.run.ms(0.5),
            self.run.ms(0.99),
            self.run.ms(0.999),
            self.run.errors,
        )
    }
}

/// Runs one measurement, with the CPU the server (`pid`) and this process used meanwhile.
async fn measure(
    pid: u32,
    f: impl std::future::Future<Output = Result<Run, Failure>>,
) -> Result<Measured, Failure> {
    let (run, cpu) = with_cpu(pid, f).await;
    Ok(Measured { run: run?, cpu })
}

/// CPU used by the server and by this generator over one measurement.
#[derive(Default, Clone, Copy)]
struct CpuUse {
    server_user: Duration,
    server_sys: Duration,
    client: Duration,
}

/// Runs `f`, reporting the CPU the server (`pid`) and this process used meanwhile.
async fn with_cpu<T>(pid: u32, f: impl std::future::Future<Output = T>) -> (T, CpuUse) {
    let pid = pid.to_string();
    let s0 = cpu_time(&pid).unwrap_or_default();
    let c0 = cpu_time("self").unwrap_or_default();
    let out = f.await;
    let s1 = cpu_time(&pid).unwrap_or_default();
    let c1 = cpu_time("self").unwrap_or_default();
    let cpu = CpuUse {
        server_user: s1.0.saturating_sub(s0.0),
        server_sys: s1.1.saturating_sub(s0.1),
        client: (c1.0 + c1.1).saturating_sub(c0.0 + c0.1),
    };
    (out, cpu)
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `keyward` with the run's data dir and, when given, database URL.
fn keyward(bin: &PathBuf, data: &std::path::Path, db: Option<&str>) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["--log", "warn", "--data-dir"]).arg(data);
    if let Some(url) = db {
        cmd.args(["--database-url", url]);
    }
    cmd
}

fn init(
    bin: &PathBuf,
    data: &std::path::Path,
    db: Option<&str>,
) -> Result<(Uuid, String), Failure> {
    let out = keyward(bin, data, db).args(["init", "--json"]).output()?;
    if !out.status.success() {
        return Err(format!(
            "keyward init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let org: Uuid = v["org_id"].as_str().ok_or("no org_id")?.parse()?;
    let key = v["root_key"].as_str().ok_or("no root_key")?.to_string();
    Ok((org, key))
}

fn event(org_id: Uuid, action: &str, now: keyward_core::model::Timestamp) -> AuditEvent {
    AuditEvent {
        id: Uuid::now_v7(),
        org_id,
        occurred_at: now,
        action: action.into(),
        outcome: Outcome::Success,
        error_code: None,
        actor_key_id: None,
        actor_agent_id: None,
        target_type: None,
        target_id: None,
        client_ip: None,
        request_id: None,
        trace: TraceContext::default(),
        details: serde_json::json!({ "via": "keyward-load" }),
    }
}

fn agent_key(
    org_id: Uuid,
    agent_id: Uuid,
    scopes: &[Scope],
    quota: Option<Quota>,
    now: keyward_core::model::Timestamp,
) -> Result<(Key, String), Failure> {
    let (mut key, plain) = Key::mint(
        org_id,
        Some(agent_id),
        TokenKind::Agent,
        Environment::Live,
        scopes.to_vec(),
        now,
    )?;
    key.quota = quota;
    Ok((key, plain.expose().to_string()))
}

/// Seeds one agent with `n` keys, each with `quota` if given; returns every plaintext.
async fn seed(
    data: &std::path::Path,
    db: Option<&str>,
    org_id: Uuid,
    n: usize,
    quota: Option<Quota>,
) -> Result<Vec<String>, Failure> {
    let store: Box<dyn keyward_store::Store> = match db {
        Some(url) => Box::new(keyward_store::postgres::PostgresStore::connect(url).await?),
        None => Box::new(SqliteStore::open(&data.join("keyward.db")).await?),
    };
    let now = keyward_core::clock::truncate_to_millis(chrono_now());
    let scopes = vec![Scope::parse("slack:chat:write")?];
    let agent = Agent {
        id: Uuid::now_v7(),
        org_id,
        name: "load-agent".into(),
        display_name: None,
        agent_type: AgentType::Agent,
        status: AgentStatus::Active,
        scopes: [("slack".to_string(), vec!["chat:write".to_string()])].into(),
        metadata: Default::default(),
        policy: Default::default(),
        capabilities: vec![],
        did: None,
        owner_user_id: None,
        parent_agent_id: None,
        version: 1,
        created_at: now,
        updated_at: now,
        revoked_at: None,
    };
    let (first, first_plain) = agent_key(org_id, agent.id, &scopes, quota, now)?;
    store
        .create_agent(&agent, &first, &[event(org_id, "agent.create", now)], None)
        .await?;
    let mut tokens = Vec::with_capacity(n);
    tokens.push(first_plain);
    while tokens.len() < n {
        let batch = (n - tokens.len()).min(20_000);
        let mut keys = Vec::with_capacity(batch);
        for _ in 0..batch {
            let (k, p) = agent_key(org_id, agent.id, &scopes, quota, now)?;
            keys.push(k);
            tokens.push(p);
        }
        store
            .import_keys(&keys, &event(org_id, "key.import", now))
            .await?;
    }
    store.close().await;
    Ok(tokens)
}

fn chrono_now() -> keyward_core::model::Timestamp {
    use keyward_core::clock::Clock;
    keyward_core::clock::SystemClock.now()
}

/// Spawns a server and reads its address from the line of its output that starts with
/// `prefix`. The guard owns the process before anything can fail, so it is stopped however the
/// run ends.
fn spawn_listening(mut cmd: Command, prefix: &str) -> Result<Server, Failure> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut server = Server {
        child,
        addr: ([127, 0, 0, 1], 0).into(),
    };
    let mut lines = BufReader::new(stdout).lines();
    server.addr = loop {
        let line = lines.next().ok_or("the server exited before listening")??;
        if let Some(a) = line.strip_prefix(prefix) {
            break a.trim().parse()?;
        }
    };
    Ok(server)
}

async fn start(
    bin: &PathBuf,
    data: &std::path::Path,
    db: Option<&str>,
) -> Result<(Server, Duration), Failure> {
    let started = Instant::now();
    let mut cmd = keyward(bin, data, db);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    let server = spawn_listening(cmd, "Keyward listening on http://")?;
    let addr = server.addr;
    loop {
        if let Ok(s) = send_once(addr, get("/healthz", None)).await {
            if s == 200 {
                return Ok((server, started.elapsed()));
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err("serve not ready within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn get(path: &str, bearer: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::get(path).header("host", "127.0.0.1");
    if let Some(k) = bearer {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(Full::new(Bytes::new())).unwrap_or_default()
}

/// Every key's request parts, built once, so that the generator does no per-request formatting
/// or header validation that the static handler's requests do not (its CPU is taken from the
/// server it shares the machine with).
///
/// They are leaked to `'static`: a clone of a `'static` `Bytes` (or a `HeaderValue` made from
/// one) copies a pointer, where a clone of an owned one is an atomic increment of a reference
/// count that both of the generator's threads share, the line bouncing between the cores on
/// every verify request but not on the static ones (whose parts are constants).
struct Wire {
    root: HeaderValue,
    bearers: Vec<HeaderValue>,
    verify_bodies: Vec<Bytes>,
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

impl Wire {
    fn new(root: &str, tokens: &[String]) -> Result<Wire, Failure> {
        let bearer = |t: &str| -> Result<HeaderValue, Failure> {
            let v = HeaderValue::from_maybe_shared(Bytes::from_static(
                leak(format!("Bearer {t}")).as_bytes(),
            ))?;
            Ok(v)
        };
        Ok(Wire {
            root: bearer(root)?,
            bearers: tokens.iter().map(|t| bearer(t)).collect::<Result<_, _>>()?,
            verify_bodies: tokens
                .iter()
                .map(|t| Bytes::from_static(leak(format!("{{\"key\":\"{t}\"}}")).as_bytes()))
                .collect(),
        })
    }

    /// `POST /v1/keys/verify` of key `i` (modulo the key count) by the root key.
    fn verify(&self, i: u64) -> Request<Full<Bytes>> {
        let body = &self.verify_bodies[i as usize % self.verify_bodies.len()];
        Request::post("/v1/keys/verify")
            .header("host", HOST.clone())
            .header("authorization", self.root.clone())
            .header("content-type", JSON.clone())
            .body(Full::new(body.clone()))
            .unwrap_or_default()
    }

    /// `GET /v1/me` with key `i` (modulo the key count).
    fn me(&self, i: u64) -> Request<Full<Bytes>> {
        Request::get("/v1/me")
            .header("host", HOST.clone())
            .header(
                "authorization",
                self.bearers[i as usize % self.bearers.len()].clone(),
            )
            .body(Full::new(Bytes::new()))
            .unwrap_or_default()
    }
}

/// How many distinct tokens the flood sends.
const FLOOD_TOKENS: usize = 64;

static HOST: HeaderValue = HeaderValue::from_static("127.0.0.1");
static JSON: HeaderValue = HeaderValue::from_static("application/json");

async fn send_once(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<u16, Failure> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// What one measurement saw.
struct Run {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
}

impl Run {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// When a run stops, and when its requests are sent.
#[derive(Debug, Clone, Copy, Default)]
struct Plan {
    /// Stop after this long.
    deadline: Option<Duration>,
    /// Stop after this many requests.
    total: Option<u64>,
    /// Open loop at this many requests per second: request `i` is due `i / rate` seconds after
    /// the start, whenever the answers before it came. Without it, each connection sends its next
    /// request as soon as it has the last answer (closed loop: as fast as the server answers).
    rate: Option<f64>,
}

impl Plan {
    /// Closed loop, for `d`.
    fn lasting(d: Duration) -> Plan {
        Plan {
            deadline: Some(d),
            ..Plan::default()
        }
    }

    /// Closed loop, `n` requests.
    fn requests(n: u64) -> Plan {
        Plan {
            total: Some(n),
            ..Plan::default()
        }
    }

    /// Open loop, `n` requests at `rate` per second.
    fn paced(n: u64, rate: f64) -> Plan {
        Plan {
            total: Some(n),
            rate: Some(rate),
            ..Plan::default()
        }
    }

    /// When the request numbered `i` is due, for an open loop.
    fn due(&self, started: Instant, i: u64) -> Option<Instant> {
        self.rate
            .map(|r| started + Duration::from_secs_f64(i as f64 / r))
    }

    /// For request `i`, taken by a connection that is free at `now`: when to send it (`None`:
    /// at once) and when its latency counts from (`None`: from when it is sent). See [`drive`].
    fn schedule(
        &self,
        started: Instant,
        i: u64,
        now: Instant,
    ) -> (Option<Instant>, Option<Instant>) {
        match self.due(started, i) {
            Some(due) if due > now => (Some(due), None),
            Some(due) => (None, Some(due)),
            None => (None, None),
        }
    }
}

/// Drives `conns` keep-alive connections, each sending `make(i)` in a loop, as `plan` says.
///
/// In an open loop, a request's latency counts from when it was due if its connection was still
/// waiting for an earlier answer then (the server's slowness delays it, and is charged to it, so
/// the histogram does not hide a stall behind the few requests sent during it), and otherwise
/// from when it was sent: tokio's timer wakes on whole milliseconds, and that lateness is the
/// generator's. The connections should outnumber the requests in flight at the rate asked for:
/// once all are busy, a due request waits for one (and that wait is charged to it), which with
/// 16 connections at 5,000/s begins when answers plus the timer's lateness pass 3.2 ms.
async fn drive(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    conns: usize,
    plan: Plan,
    expect_status: u16,
    make: MakeRequest,
) -> Result<Run, Failure> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let make = make.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let (mut requests, mut errors) = (0u64, 0u64);
            let expect = expect_status;
            let stream = match source {
                // Another loopback address, so the server sees a different client.
                Some(ip) => {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind(SocketAddr::new(ip, 0))?;
                    socket.connect(addr).await?
                }
                None => tokio::net::TcpStream::connect(addr).await?,
            };
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            loop {
                if plan.deadline.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if plan.total.is_some_and(|t| i >= t) {
                    break;
                }
                let (send_at, counted_from) = plan.schedule(started, i, Instant::now());
                if let Some(t) = send_at {
                    tokio::time::sleep_until(t.into()).await;
                }
                let t0 = counted_from.unwrap_or_else(Instant::now);
                let resp = sender.send_request(make(i)).await?;
                let ok = resp.status().as_u16() == expect
                    || (expect == 0 && resp.status().as_u16() >= 400);
                resp.into_body().collect().await?;
                // Saturating: a backlog past the histogram's 60 s bound counts as 60 s rather
                // than ending the run.
                hist.saturating_record(t0.elapsed().as_micros().max(1) as u64);
                requests += 1;
                if !ok {
                    errors += 1;
                }
            }
            Ok::<_, Failure>((hist, requests, errors))
        }));
    }
    let mut run = Run {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        hist: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
    };
    for t in tasks {
        let (h, r, e) = t.await??;
        run.hist.add(h)?;
        run.requests += r;
        run.errors += e;
    }
    run.elapsed = started.elapsed();
    Ok(run)
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let args = Args::parse();
    if !args.bin.exists() {
        return Err(format!(
            "{} not found: run `cargo build --release -p keyward` first",
            args.bin.display()
        )
        .into());
    }
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let db = args.database_url.as_deref();
    let (org_id, root) = init(&args.bin, &data, db)?;
    let t = Instant::now();
    let tokens = Arc::new(
        seed(
            &data,
            db,
            org_id,
            args.keys,
            args.quota.then_some(LOAD_QUOTA),
        )
        .await?,
    );
    println!(
        "seeded {} keys in {:.1} s",
        tokens.len(),
        t.elapsed().as_secs_f64()
    );

    let (server, ready) = start(&args.bin, &data, db).await?;
    let pid = server.child.id();
    println!(
        "keyward serve ready in {:.0} ms with {} keys (RSS {:.0} MiB, pid {pid})",
        ready.as_secs_f64() * 1000.0,
        tokens.len(),
        rss_mib(pid).unwrap_or(0.0)
    );

    // One pass over every key: each verification is a cache miss. Its first keys are verified
    // at a fixed rate (open loop), for the latency of a miss at that load; the rest as fast as
    // the server answers 16 connections (closed loop), for the rate of misses it sustains, with
    // latencies that are mostly the queue of 16 requests on a machine the generator shares.
    let wire = Arc::new(Wire::new(&root, &tokens)?);
    let paced = (tokens.len() as u64 / 2).min((args.miss_rate * MISS_PACED_SECONDS) as u64);
    let rate = args.miss_rate;
    if paced > 0 {
        let w = wire.clone();
        let label = format!("first pass, {paced} keys (cache misses), open loop at {rate:.0}/s");
        let make: MakeRequest = Arc::new(move |i| w.verify(i));
        first_pass_run(pid, server.addr, Plan::paced(paced, rate), make, &label).await?;
        // The same open loop against the static handler: the latency this machine, this HTTP
        // stack and this generator give any request at that rate, which a miss's figures include.
        let label = format!("the static handler, {paced} requests, open loop at {rate:.0}/s");
        let make = Endpoint::Static.requests(&wire);
        first_pass_run(pid, server.addr, Plan::paced(paced, rate), make, &label).await?;
    }
    let w = wire.clone();
    let rest = tokens.len() as u64 - paced;
    let label = if paced > 0 {
        format!("first pass, the other {rest} keys (cache misses), closed loop")
    } else {
        format!("first pass, {rest} keys (cache misses), closed loop")
    };
    let make: MakeRequest = Arc::new(move |i| w.verify(i + paced));
    first_pass_run(pid, server.addr, Plan::requests(rest), make, &label).await?;
    println!(
        "RSS after every key was verified once: {:.0} MiB",
        rss_mib(pid).unwrap_or(0.0)
    );

    if let Some(only) = args.only {
        let conns = args.connections.first().copied().unwrap_or(64);
        println!(
            "driving {} only over {conns} connections; server pid {pid}",
            only.name()
        );
        let make = only.requests(&wire);
        let secs = Duration::from_secs(args.seconds);
        let m = measure(
            pid,
            drive(server.addr, None, conns, Plan::lasting(secs), 200, make),
        )
        .await?;
        println!("{}: {}", only.name(), m.summary());
        return Ok(());
    }

    println!(
        "\n| conns | endpoint | req/s (round of verify's median) | vs static: median (range) of {} rounds | p50 ms | p99 ms | p99.9 ms | errors (all rounds) | server CPU µs/req (user + sys) | generator CPU µs/req |",
        args.rounds.max(1)
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let secs = Duration::from_secs(args.seconds);
    for &conns in &args.connections {
        // Rounds of static, verify, me back to back: each ratio compares runs seconds apart, so
        // the machine's drift (a shared VM's speed moves by tens of percent over minutes) cancels
        // out of it; the table shows the median round and the range over rounds.
        let rounds = rounds_of(pid, server.addr, conns, secs, args.rounds, &wire, true).await?;
        if std::env::var("KEYWARD_LOAD_DEBUG").is_ok() {
            for round in &rounds {
                for (name, m) in ["static", "verify", "me"].iter().zip(round) {
                    let qs: Vec<String> = [0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]
                        .iter()
                        .map(|q| format!("p{}={:.2}", q * 100.0, m.run.ms(*q)))
                        .collect();
                    println!("  {name}: {:.0} req/s {}", m.run.rps(), qs.join(" "));
                }
            }
        }
        // Every row's req/s, latencies and CPU come from one round, the one whose verify/static
        // ratio is the median (so verify's req/s over static's is its ratio); each row's ratio
        // column is the median and range of its own ratios over the rounds.
        let ratio_of = |r: &[Measured], i: usize| 100.0 * r[i].run.rps() / r[0].run.rps();
        let shown = {
            let mut order: Vec<usize> = (0..rounds.len()).collect();
            order.sort_by(|a, b| ratio_of(&rounds[*a], 1).total_cmp(&ratio_of(&rounds[*b], 1)));
            order[order.len() / 2]
        };
        for (i, name) in [
            "GET /healthz (static)",
            "POST /v1/keys/verify",
            "GET /v1/me",
        ]
        .iter()
        .enumerate()
        {
            let ratios: Vec<f64> = rounds.iter().map(|r| ratio_of(r, i)).collect();
            let mut order: Vec<usize> = (0..rounds.len()).collect();
            order.sort_by(|a, b| ratios[*a].total_cmp(&ratios[*b]));
            let m = &rounds[shown][i];
            let (lo, hi) = (ratios[order[0]], ratios[order[order.len() - 1]]);
            println!(
                "| {conns} | {name} | {:.0} | {:.0}% ({:.0}-{:.0}%) | {:.2} | {:.2} | {:.2} | {} | {:.1} + {:.1} | {:.1} |",
                m.run.rps(),
                ratios[order[order.len() / 2]],
                lo,
                hi,
                m.run.ms(0.5),
                m.run.ms(0.99),
                m.run.ms(0.999),
                rounds.iter().map(|r| r[i].run.errors).sum::<u64>(),
                m.us_per_request(m.cpu.server_user),
                m.us_per_request(m.cpu.server_sys),
                m.us_per_request(m.cpu.client),
            );
        }
    }
    println!("\nRSS at the end: {:.0} MiB", rss_mib(pid).unwrap_or(0.0));

    // A flood of random well-formed (valid checksum, never issued) tokens from 127.0.0.2 while
    // valid keys are verified from 127.0.0.1: valid throughput against the same run without the
    // flood, and how many flood tokens reached the store (cache misses) per distinct token.
    let conns = 32;
    let w = wire.clone();
    let valid = move |i: u64| w.verify(i * 7919);
    let valid = Arc::new(valid);
    let alone = drive(
        server.addr,
        None,
        conns,
        Plan::lasting(secs),
        200,
        valid.clone(),
    )
    .await?;
    let misses_before = cache_misses(server.addr).await?;
    let flood_addr: std::net::IpAddr = "127.0.0.2".parse()?;
    // A fixed set of tokens, each sent again and again: "at most one store read per distinct
    // token" is then something the count below can break.
    let flood_tokens: Vec<String> = (0..FLOOD_TOKENS)
        .map(|_| {
            token::generate(Environment::Live, TokenKind::Agent).map(|t| t.expose().to_string())
        })
        .collect::<Result<_, _>>()?;
    let flood_wire = Arc::new(Wire::new(&root, &flood_tokens)?);
    let bogus = Arc::new(move |i: u64| flood_wire.me(i));
    let flood = tokio::spawn(drive(
        server.addr,
        Some(flood_addr),
        conns,
        Plan::lasting(secs),
        0,
        bogus,
    ));
    let during = drive(server.addr, None, conns, Plan::lasting(secs), 200, valid).await?;
    let flood = flood.await??;
    let misses = cache_misses(server.addr)
        .await?
        .saturating_sub(misses_before);
    if std::env::var("KEYWARD_LOAD_DEBUG").is_ok() {
        let (_, body) = fetch(server.addr, "/metrics").await?;
        for l in body.lines().filter(|l| {
            l.contains("auth_failures")
                || l.contains("verify_cache")
                || l.contains("flush")
                || (l.contains("request_duration") && l.contains("verify"))
        }) {
            println!("  {l}");
        }
    }
    println!(
        "\nflood from 127.0.0.2 ({conns} conns): {:.0} req/s of unknown tokens ({} sent, {} missed the cache, so at most that many store reads, of {FLOOD_TOKENS} distinct tokens)",
        flood.rps(), flood.requests, misses
    );
    println!(
        "valid verify from 127.0.0.1 ({conns} conns): {:.0} req/s alone, {:.0} req/s during the flood ({:.0}%), p99 {:.2} ms",
        alone.rps(), during.rps(), 100.0 * during.rps() / alone.rps(), during.ms(0.99)
    );
    drop(server);

    // The reference: the same requests against bare hyper, with the same connection counts and
    // rounds (and Keyward stopped, so the two do not share the machine).
    let list = dir.path().join("tokens.txt");
    std::fs::write(&list, tokens.join("\n"))?;
    let bare = bare::start(&list)?;
    println!(
        "\nbare hyper reference (GET /healthz, and a verify-shaped POST /v1/keys/verify: body, JSON, SHA-256, lookup, JSON answer)"
    );
    println!(
        "\n| conns | static req/s | verify-shaped req/s | verify-shaped vs static: median (range) of {} rounds | server CPU µs/req, static (user + sys) | server CPU µs/req, verify-shaped | generator CPU µs/req, static / verify-shaped |",
        args.rounds.max(1)
    );
    println!("|---|---|---|---|---|---|---|");
    let pid = bare.child.id();
    for &conns in &args.connections {
        let mut rounds = rounds_of(pid, bare.addr, conns, secs, args.rounds, &wire, false).await?;
        let errors: u64 = rounds.iter().flatten().map(|m| m.run.errors).sum();
        if errors > 0 {
            return Err(format!(
                "the bare server answered {errors} requests with an unexpected status"
            )
            .into());
        }
        let ratio = |r: &Vec<Measured>| 100.0 * r[1].run.rps() / r[0].run.rps();
        rounds.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
        let m = &rounds[rounds.len() / 2];
        println!(
            "| {conns} | {:.0} | {:.0} | {:.0}% ({:.0}-{:.0}%) | {:.1} + {:.1} | {:.1} + {:.1} | {:.1} / {:.1} |",
            m[0].run.rps(),
            m[1].run.rps(),
            ratio(m),
            ratio(&rounds[0]),
            ratio(&rounds[rounds.len() - 1]),
            m[0].us_per_request(m[0].cpu.server_user),
            m[0].us_per_request(m[0].cpu.server_sys),
            m[1].us_per_request(m[1].cpu.server_user),
            m[1].us_per_request(m[1].cpu.server_sys),
            m[0].us_per_request(m[0].cpu.client),
            m[1].us_per_request(m[1].cpu.client),
        );
    }
    Ok(())
}

/// One run of the first pass, over 16 connections to the server at `addr` (process `pid`),
/// printed after `label`.
async fn first_pass_run(
    pid: u32,
    addr: SocketAddr,
    plan: Plan,
    make: MakeRequest,
    label: &str,
) -> Result<(), Failure> {
    let m = measure(pid, drive(addr, None, 16, plan, 200, make)).await?;
    println!("{label} over 16 conns: {}", m.summary());
    Ok(())
}

/// `rounds` rounds of the static, verify and (with `me`) `GET /v1/me` requests back to back
/// against the server at `addr` (process `pid`), each over `conns` connections for `secs`:
/// each ratio then compares runs seconds apart, so the machine's drift (a shared VM's speed
/// moves by tens of percent over minutes) cancels out of it.
async fn rounds_of(
    pid: u32,
    addr: SocketAddr,
    conns: usize,
    secs: Duration,
    rounds: usize,
    wire: &Arc<Wire>,
    me: bool,
) -> Result<Vec<Vec<Measured>>, Failure> {
    let mut out = Vec::new();
    for _ in 0..rounds.max(1) {
        // One timed run of `make`'s requests over `conns` connections, all answered 200.
        let timed = |endpoint: Endpoint| {
            let make = endpoint.requests(wire);
            measure(
                pid,
                drive(addr, None, conns, Plan::lasting(secs), 200, make),
            )
        };
        let mut round = vec![
            timed(Endpoint::Static).await?,
            timed(Endpoint::Verify).await?,
        ];
        if me {
            round.push(timed(Endpoint::Me).await?);
        }
        out.push(round);
    }
    Ok(out)
}

async fn fetch(addr: SocketAddr, path: &str) -> Result<(u16, String), Failure> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(get(path, None)).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The server's count of verify-cache misses (each is one store read), from `/metrics`.
async fn cache_misses(addr: SocketAddr) -> Result<u64, Failure> {
    let (_, text) = fetch(addr, "/metrics").await?;
    Ok(text
        .lines()
        .find(|l| l.starts_with("keyward_verify_cache_total{result=\"miss\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64)
}

/// Starting the bare-hyper reference server (`src/bin/keyward-bare.rs`).
mod bare {
    use std::path::Path;
    use std::process::Command;

    use super::{Failure, Server};

    /// Starts the reference server, built beside this binary, over the tokens in `list`.
    pub fn start(list: &Path) -> Result<Server, Failure> {
        let exe = std::env::current_exe()?;
        let bin = exe.with_file_name("keyward-bare");
        if !bin.exists() {
            return Err(format!(
                "{} not found: run `cargo build --release -p keyward-load` first",
                bin.display()
            )
            .into());
        }
        let mut cmd = Command::new(&bin);
        cmd.arg(list);
        super::spawn_listening(cmd, "bare listening on ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_loop_spaces_its_requests_by_the_rate_and_a_closed_one_has_no_schedule() {
        let start = Instant::now();
        let plan = Plan::paced(10, 4_000.0);
        assert_eq!(plan.due(start, 0), Some(start));
        assert_eq!(plan.due(start, 1), Some(start + Duration::from_micros(250)));
        assert_eq!(plan.due(start, 8_000), Some(start + Duration::from_secs(2)));
        assert_eq!(Plan::requests(10).due(start, 5), None);
        assert_eq!(Plan::lasting(Duration::from_secs(1)).due(start, 5), None);
    }

    #[test]
    fn an_open_loop_request_counts_from_when_it_was_due_only_if_its_connection_was_late() {
        let start = Instant::now();
        let plan = Plan::paced(10, 1_000.0);
        let due = start + Duration::from_millis(3);
        // A connection free before the request is due waits for it, and times it from its send:
        // the timer's lateness is the generator's.
        let early = due - Duration::from_micros(500);
        assert_eq!(plan.schedule(start, 3, early), (Some(due), None));
        // One still busy when it fell due (a slow answer before it) sends at once and times it
        // from when it was due: the wait is the server's.
        let late = due + Duration::from_millis(7);
        assert_eq!(plan.schedule(start, 3, late), (None, Some(due)));
        assert_eq!(plan.schedule(start, 3, due), (None, Some(due)));
        // A closed loop sends at once and times from the send.
        assert_eq!(Plan::requests(10).schedule(start, 3, late), (None, None));
    }

    #[test]
    fn a_miss_rate_must_be_a_finite_number_above_zero() {
        assert_eq!(positive_rate("5000"), Ok(5_000.0));
        assert_eq!(positive_rate("0.5"), Ok(0.5));
        for bad in ["0", "-3", "inf", "NaN", "fast", ""] {
            assert!(positive_rate(bad).is_err(), "{bad} was accepted");
        }
    }
}
