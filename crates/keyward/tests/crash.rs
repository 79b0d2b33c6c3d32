//! Crash safety of the built `keyward` binary: `kill -9` mid-write must not lose an acknowledged write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
const STARTUP: Duration = Duration::from_secs(30);
const LISTENING: &str = "Keyward listening on http://";
const WRITERS: usize = 4;
/// Kill after `WRITE_FOR` of writing, once at least this many creates were acknowledged.
const ENOUGH_ACKS: usize = 100;
const WRITE_FOR: Duration = Duration::from_millis(1500);

/// A running `keyward serve`; dropping it kills the process.
struct Server {
    child: Child,
    addr: String,
    banner: Vec<String>,
    stderr: tempfile::NamedTempFile,
}

impl Server {
    fn start(cwd: &Path, data: &Path) -> Server {
        let stderr = tempfile::NamedTempFile::new().expect("stderr file");
        let mut cmd = Command::new(BIN);
        for var in [
            "KEYWARD_CONFIG",
            "KEYWARD_DATA_DIR",
            "KEYWARD_DATABASE_URL",
            "KEYWARD_LOG",
            "KEYWARD_LISTEN",
            "KEYWARD_TRUSTED_PROXIES",
            "KEYWARD_MASTER_KEY",
        ] {
            cmd.env_remove(var);
        }
        let child = cmd
            .current_dir(cwd)
            .arg("--data-dir")
            .arg(data)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr.reopen().expect("reopen stderr file")))
            .spawn()
            .expect("spawn keyward serve");
        let mut server = Server {
            child,
            addr: String::new(),
            banner: Vec::new(),
            stderr,
        };
        let stdout = server.child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + STARTUP;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let addr = line.strip_prefix(LISTENING).map(|a| a.trim().to_string());
                    server.banner.push(line);
                    if let Some(addr) = addr {
                        server.addr = addr;
                        return server;
                    }
                }
                Err(e) => panic!(
                    "keyward serve never printed `{LISTENING}` ({e:?}); stdout: {:?}; stderr: {}",
                    server.banner,
                    server.stderr_text()
                ),
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn stderr_text(&self) -> String {
        let mut text = String::new();
        let _ =
            std::fs::File::open(self.stderr.path()).and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    fn root_key(&self) -> String {
        self.banner
            .iter()
            .flat_map(|l| l.split_whitespace())
            .find(|w| w.starts_with("kw_rk_"))
            .unwrap_or_else(|| panic!("no root key printed: {:?}", self.banner))
            .to_string()
    }

    fn org_id(&self) -> String {
        self.banner
            .iter()
            .find_map(|l| {
                l.strip_prefix("Created org `default` (")?
                    .strip_suffix(").")
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no org id printed: {:?}", self.banner))
    }

    /// `kill -9`, then reaps the process.
    fn kill_9(&mut self) {
        let status = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -9 failed");
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every agent name in the org, following `has_more` through `limit=1000` pages.
async fn all_agent_names(
    client: &reqwest::Client,
    server: &Server,
    org: &str,
    key: &str,
) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut offset = 0usize;
    loop {
        let resp = client
            .get(server.url(&format!("/v1/orgs/{org}/agents?limit=1000&offset={offset}")))
            .bearer_auth(key)
            .send()
            .await
            .expect("list agents");
        assert_eq!(resp.status(), 200, "list agents at offset {offset}");
        let page: Value = resp.json().await.expect("list body");
        let agents = page["agents"].as_array().expect("agents array");
        for a in agents {
            names.insert(a["name"].as_str().expect("agent name").to_string());
        }
        offset += agents.len();
        if page["has_more"] != json!(true) {
            return names;
        }
        assert!(
            !agents.is_empty(),
            "has_more with an empty page at offset {offset}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_stream_of_writes_loses_no_acknowledged_write() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("d");
    let mut server = Server::start(cwd.path(), &data);
    let key = server.root_key();
    let org = server.org_id();
    let create_url = server.url(&format!("/v1/orgs/{org}/agents"));

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for task in 0..WRITERS {
        let (acked, refused, stop) = (acked.clone(), refused.clone(), stop.clone());
        let (url, key) = (create_url.clone(), key.clone());
        writers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{task}-{i}");
                i += 1;
                let sent = client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"name": name, "scopes": {"slack": ["chat:write"]}}))
                    .send()
                    .await;
                match sent {
                    Ok(resp) if resp.status() == 201 => acked.lock().unwrap().push(name),
                    Ok(resp) => {
                        let status = resp.status();
                        let body = resp.text().await.unwrap_or_default();
                        refused
                            .lock()
                            .unwrap()
                            .push(format!("{name}: {status} {body}"));
                    }
                    // The server is gone (killed): this write was never acknowledged.
                    Err(_) => break,
                }
            }
        }));
    }

    let started = Instant::now();
    loop {
        let n = acked.lock().unwrap().len();
        if n >= ENOUGH_ACKS && started.elapsed() >= WRITE_FOR {
            break;
        }
        assert!(
            started.elapsed() < STARTUP,
            "fewer than {ENOUGH_ACKS} creates acknowledged within {STARTUP:?}; refused: {:?}; stderr: {}",
            refused.lock().unwrap(),
            server.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let in_flight_at_kill = writers.iter().filter(|w| !w.is_finished()).count();
    server.kill_9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        tokio::time::timeout(STARTUP, w)
            .await
            .expect("a writer kept running after the kill")
            .expect("writer task panicked");
    }
    assert_eq!(
        in_flight_at_kill, WRITERS,
        "every writer must still be writing at the kill"
    );
    let acked: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let refused = refused.lock().unwrap().clone();
    assert!(
        refused.is_empty(),
        "creates refused before the kill: {refused:?}"
    );
    drop(server);

    let server = Server::start(cwd.path(), &data);
    assert!(
        server.banner.iter().all(|l| !l.contains("kw_rk_")),
        "the restart must find the existing org, not bootstrap a new one: {:?}",
        server.banner
    );
    let client = reqwest::Client::new();
    let existing = all_agent_names(&client, &server, &org, &key).await;
    let lost: Vec<&String> = acked.difference(&existing).collect();
    println!(
        "acknowledged before kill -9: {}; agents after restart: {}; lost: {}",
        acked.len(),
        existing.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged creates lost by kill -9: {lost:?}"
    );

    // The store is fully usable after recovery.
    let resp = client
        .post(server.url(&format!("/v1/orgs/{org}/agents")))
        .bearer_auth(&key)
        .json(&json!({"name": "after-crash", "scopes": {"slack": ["chat:write"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        201,
        "create after recovery: {}",
        resp.text().await.unwrap_or_default()
    );
    let resp = client
        .get(server.url(&format!("/v1/orgs/{org}/agents/by-name/after-crash")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "read back after recovery");
    let resp = client.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "/readyz after recovery");
}
