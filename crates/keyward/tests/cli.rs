//! End-to-end tests of the built `keyward` binary, run the way an operator runs it (API.md §9).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
/// How long a server may take to print its listening line, or a one-shot command to finish.
const STARTUP: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM / SIGINT.
const SHUTDOWN: Duration = Duration::from_secs(15);
const LISTENING: &str = "Keyward listening on http://";

/// Every variable the binary reads, removed from each child so the tests' own environment can't leak in.
const KEYWARD_ENV: &[&str] = &[
    "KEYWARD_CONFIG",
    "KEYWARD_DATA_DIR",
    "KEYWARD_DATABASE_URL",
    "KEYWARD_LOG",
    "KEYWARD_LISTEN",
    "KEYWARD_TRUSTED_PROXIES",
    "KEYWARD_MASTER_KEY",
];

/// A `keyward` command running in `cwd` with a clean `KEYWARD_*` environment.
fn keyward(cwd: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(cwd);
    for var in KEYWARD_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs a one-shot command to completion, killing it (and failing) if it takes longer than `STARTUP`.
fn run(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyward");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(STARTUP) {
        Ok(out) => out.expect("wait for keyward"),
        Err(_) => {
            signal(pid, "-KILL");
            panic!("`keyward {cmd:?}` did not finish within {STARTUP:?}");
        }
    }
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}

/// A running `keyward serve`; dropping it kills the process.
struct Server {
    child: Child,
    addr: String,
    /// Stdout lines up to and including the listening line.
    banner: Vec<String>,
    stderr: tempfile::NamedTempFile,
}

impl Server {
    /// Spawns `cmd` (a `keyward ... serve ...` command) and waits for its listening line.
    fn start(cmd: &mut Command) -> Server {
        let stderr = tempfile::NamedTempFile::new().expect("stderr file");
        let child = cmd
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
            // Keeps draining stdout for the process's whole life so it never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep reading so the pipe stays empty.
                    continue;
                }
            }
        });
        let deadline = Instant::now() + STARTUP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let addr = line.strip_prefix(LISTENING).map(str::to_string);
                    server.banner.push(line);
                    if let Some(addr) = addr {
                        server.addr = addr.trim().to_string();
                        return server;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "keyward serve printed no `{LISTENING}` line within {STARTUP:?}; stdout so far: {:?}; stderr: {}",
                    server.banner,
                    server.stderr_text()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = server.wait_exit(STARTUP);
                    panic!(
                        "keyward serve closed stdout before listening (exit: {status:?}); stdout: {:?}; stderr: {}",
                        server.banner,
                        server.stderr_text()
                    );
                }
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

    /// The root key printed on this start, if one was.
    fn printed_root_key(&self) -> Option<String> {
        self.banner.iter().find_map(|l| find_token(l, "kw_rk_"))
    }

    /// The org id from the "Created org `default` (<uuid>)." line, if one was printed.
    fn printed_org_id(&self) -> Option<String> {
        self.banner.iter().find_map(|l| {
            let rest = l.strip_prefix("Created org `default` (")?;
            Some(rest.strip_suffix(").")?.to_string())
        })
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` and waits for the process to exit, failing if it does not within `SHUTDOWN`.
    fn stop_with(mut self, sig: &str) -> ExitStatus {
        signal(self.child.id(), sig);
        match self.wait_exit(SHUTDOWN) {
            Some(status) => status,
            None => panic!(
                "keyward serve did not exit within {SHUTDOWN:?} of {sig}; stderr: {}",
                self.stderr_text()
            ),
        }
    }

    /// SIGTERM, then asserts a clean exit.
    fn stop(self) {
        let stderr = self.stderr.path().to_path_buf();
        let status = self.stop_with("-TERM");
        assert!(
            status.success(),
            "keyward serve exited with {status} after SIGTERM; stderr: {}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first whitespace-delimited word of `line` that starts with `prefix`.
fn find_token(line: &str, prefix: &str) -> Option<String> {
    line.split_whitespace()
        .find(|w| w.starts_with(prefix))
        .map(|w| {
            w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .to_string()
        })
}

fn assert_root_key_shape(key: &str) {
    let body = key
        .strip_prefix("kw_rk_")
        .unwrap_or_else(|| panic!("not a root key: {key}"));
    assert_eq!(body.len(), 36, "root key body must be 36 characters: {key}");
    assert!(
        body.chars().all(|c| c.is_ascii_alphanumeric()),
        "root key body must be base62: {key}"
    );
}

fn assert_uuid(s: &str) {
    let groups: Vec<usize> = s.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "not a UUID: {s}");
    assert!(
        s.chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "not a lowercase UUID: {s}"
    );
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

async fn get(server: &Server, path: &str, key: Option<&str>) -> (reqwest::StatusCode, Value) {
    let mut req = reqwest::Client::new().get(server.url(path));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status();
    let text = resp.text().await.expect("response body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(server: &Server, path: &str, key: &str, body: Value) -> (reqwest::StatusCode, Value) {
    let resp = reqwest::Client::new()
        .post(server.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = resp.status();
    let text = resp.text().await.expect("response body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Creates an agent in `org` with `root` (asserting the 201); returns the whole body (`agent`,
/// `key`, `api_key`).
async fn create_agent(server: &Server, org: &str, root: &str, name: &str, scopes: Value) -> Value {
    let (status, body) = post(
        server,
        &format!("/v1/orgs/{org}/agents"),
        root,
        json!({"name": name, "scopes": scopes}),
    )
    .await;
    assert_eq!(status, 201, "creating agent {name}: {body}");
    body
}

/// `keyward serve --listen 127.0.0.1:0 --data-dir <data>` in `cwd`.
fn serve_on(cwd: &Path, data: &Path) -> Server {
    Server::start(
        keyward(cwd)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data),
    )
}

/// Parses the `{"org_id", "root_key"}` line printed by `init --json` / `orgs create --json`.
fn org_json(out: &Output) -> (String, String) {
    assert!(
        out.status.success(),
        "command failed with {}: {}",
        out.status,
        stderr_of(out)
    );
    let v: Value = serde_json::from_str(stdout_of(out).trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", stdout_of(out)));
    let org_id = v["org_id"].as_str().expect("org_id").to_string();
    let root_key = v["root_key"].as_str().expect("root_key").to_string();
    assert_uuid(&org_id);
    assert_root_key_shape(&root_key);
    (org_id, root_key)
}

#[tokio::test]
async fn serve_with_no_flags_bootstraps_default_org_prints_root_key_once_and_writes_it_0600() {
    let cwd = tempfile::tempdir().unwrap();
    let server = Server::start(keyward(cwd.path()).args(["serve", "--listen", "127.0.0.1:0"]));

    let key = server
        .printed_root_key()
        .unwrap_or_else(|| panic!("no kw_rk_ key on stdout: {:?}", server.banner));
    assert_root_key_shape(&key);
    let key_lines = server
        .banner
        .iter()
        .filter(|l| l.contains("kw_rk_"))
        .count();
    assert_eq!(
        key_lines, 1,
        "the root key must be printed exactly once: {:?}",
        server.banner
    );
    let org_id = server.printed_org_id().unwrap_or_else(|| {
        panic!(
            "no \"Created org `default` (<id>).\" line: {:?}",
            server.banner
        )
    });
    assert_uuid(&org_id);

    let data = cwd.path().join("keyward-data");
    let root_key_file = data.join("root-key");
    let master_key_file = data.join("master.key");
    assert_eq!(
        read_trimmed(&root_key_file),
        key,
        "root-key file must hold the printed key"
    );
    assert!(
        data.join("keyward.db").is_file(),
        "the embedded database lives in ./keyward-data"
    );
    #[cfg(unix)]
    {
        assert_eq!(mode(&root_key_file), 0o600, "root-key must be mode 0600");
        assert_eq!(
            mode(&master_key_file),
            0o600,
            "master.key must be mode 0600"
        );
        assert_eq!(
            mode(&data) & 0o077,
            0,
            "the data dir must not be open to group/other"
        );
    }
    let master = read_trimmed(&master_key_file);
    let master_bytes = base64::engine::general_purpose::STANDARD
        .decode(&master)
        .expect("master.key is standard base64");
    assert_eq!(master_bytes.len(), 32, "master.key holds 32 bytes");

    let (status, _) = get(&server, "/healthz", None).await;
    assert_eq!(status, 200, "GET /healthz");
    let (status, body) = get(&server, &format!("/v1/orgs/{org_id}"), Some(&key)).await;
    assert_eq!(
        status, 200,
        "GET /v1/orgs/{{org}} with the printed root key: {body}"
    );
    assert_eq!(body["id"], org_id.as_str());
    assert_eq!(body["name"], "default");

    server.stop();

    let again = Server::start(keyward(cwd.path()).args(["serve", "--listen", "127.0.0.1:0"]));
    assert!(
        again
            .banner
            .iter()
            .all(|l| !l.contains("kw_rk_") && !l.contains("Created org")),
        "a restart must not create or print a new root key: {:?}",
        again.banner
    );
    assert_eq!(
        read_trimmed(&root_key_file),
        key,
        "root-key file must be unchanged"
    );
    assert_eq!(
        read_trimmed(&master_key_file),
        master,
        "master.key must be unchanged"
    );
    let (status, body) = get(&again, &format!("/v1/orgs/{org_id}"), Some(&key)).await;
    assert_eq!(
        status, 200,
        "the root key must still work after a restart: {body}"
    );
    again.stop();
}

#[tokio::test]
async fn init_json_prints_org_and_key_and_refuses_a_second_time() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("d");

    let out = run(keyward(cwd.path())
        .arg("init")
        .arg("--json")
        .arg("--data-dir")
        .arg(&data));
    let (org_id, key) = org_json(&out);
    assert_eq!(
        read_trimmed(&data.join("root-key")),
        key,
        "init writes <data_dir>/root-key"
    );
    #[cfg(unix)]
    assert_eq!(
        mode(&data.join("root-key")),
        0o600,
        "root-key must be mode 0600"
    );

    let second = run(keyward(cwd.path())
        .args(["init", "--json"])
        .arg("--data-dir")
        .arg(&data));
    assert_eq!(second.status.code(), Some(1), "a second init must exit 1");
    assert!(
        stdout_of(&second).trim().is_empty(),
        "no JSON on a refused init: {}",
        stdout_of(&second)
    );
    assert!(
        stderr_of(&second).contains("already initialized"),
        "stderr must say why: {}",
        stderr_of(&second)
    );
    assert_eq!(
        read_trimmed(&data.join("root-key")),
        key,
        "a refused init must leave root-key alone"
    );

    // The server then adopts the org that init created instead of bootstrapping another.
    let server = serve_on(cwd.path(), &data);
    assert_eq!(
        server.printed_root_key(),
        None,
        "serve after init must print no key: {:?}",
        server.banner
    );
    let (status, body) = get(&server, &format!("/v1/orgs/{org_id}"), Some(&key)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "default");
    server.stop();
}

#[tokio::test]
async fn orgs_create_json_adds_an_org_whose_root_key_works_against_a_running_server() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("d");
    let server = serve_on(cwd.path(), &data);
    let default_org = server.printed_org_id().expect("default org id");

    let out = run(keyward(cwd.path())
        .args(["orgs", "create", "acme", "--json"])
        .arg("--data-dir")
        .arg(&data));
    let (org_id, key) = org_json(&out);
    assert_ne!(org_id, default_org);

    let (status, body) = get(&server, &format!("/v1/orgs/{org_id}"), Some(&key)).await;
    assert_eq!(
        status, 200,
        "the new org's root key must work on the running server: {body}"
    );
    assert_eq!(body["name"], "acme");
    // The new root key can create agents.
    create_agent(
        &server,
        &org_id,
        &key,
        "bot",
        json!({"slack": ["chat:write"]}),
    )
    .await;
    let (status, body) = get(&server, &format!("/v1/orgs/{default_org}"), Some(&key)).await;
    assert_eq!(
        status, 403,
        "another org's root key must not read `default`: {body}"
    );
    assert_eq!(body["error"]["code"], "NOT_A_MEMBER");
    server.stop();
}

#[test]
fn orgs_create_with_a_taken_or_empty_name_exits_1_with_an_error_on_stderr() {
    let cwd = tempfile::tempdir().unwrap();
    let first = run(keyward(cwd.path()).args(["orgs", "create", "acme", "--json"]));
    org_json(&first);

    let dup = run(keyward(cwd.path()).args(["orgs", "create", "acme", "--json"]));
    assert_eq!(
        dup.status.code(),
        Some(1),
        "duplicate org name: {}",
        stderr_of(&dup)
    );
    assert!(
        stdout_of(&dup).trim().is_empty(),
        "no JSON on failure: {}",
        stdout_of(&dup)
    );
    let err = stderr_of(&dup);
    assert!(
        err.contains("error") && err.contains("acme"),
        "stderr must name the taken org: {err}"
    );

    let empty = run(keyward(cwd.path()).args(["orgs", "create", "", "--json"]));
    assert_eq!(
        empty.status.code(),
        Some(1),
        "empty org name: {}",
        stderr_of(&empty)
    );
    assert!(
        stderr_of(&empty).contains("name"),
        "stderr must explain: {}",
        stderr_of(&empty)
    );
}

#[test]
fn migrate_creates_the_database_and_can_run_again() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("d");
    for _ in 0..2 {
        let out = run(keyward(cwd.path())
            .arg("migrate")
            .arg("--data-dir")
            .arg(&data));
        assert!(out.status.success(), "migrate failed: {}", stderr_of(&out));
        assert!(
            stdout_of(&out).contains("migrations applied"),
            "{}",
            stdout_of(&out)
        );
    }
    assert!(
        data.join("keyward.db").is_file(),
        "migrate creates the embedded database"
    );
    assert!(
        !data.join("root-key").exists(),
        "migrate must not bootstrap an org"
    );
}

#[tokio::test]
async fn an_agent_created_before_a_restart_still_authenticates_after_it() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("d");
    let server = serve_on(cwd.path(), &data);
    let root = server.printed_root_key().expect("root key");
    let org = server.printed_org_id().expect("org id");

    let body = create_agent(&server, &org, &root, "a1", json!({"slack": ["chat:write"]})).await;
    let agent_key = body["api_key"].as_str().expect("api_key").to_string();
    assert!(agent_key.starts_with("kw_ak_"), "{agent_key}");
    let agent_id = body["agent"]["id"].as_str().expect("agent id").to_string();
    server.stop();

    let again = serve_on(cwd.path(), &data);
    let (status, body) = get(&again, "/v1/me", Some(&agent_key)).await;
    assert_eq!(status, 200, "the agent key must survive a restart: {body}");
    assert_eq!(body["id"], agent_id.as_str());
    assert_eq!(body["name"], "a1");
    again.stop();
}

// ---- configuration: flags > env > file > defaults ----

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("keyward.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A TOML string literal for a path.
fn toml_path(p: &Path) -> String {
    toml_string(&p.display().to_string())
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[tokio::test]
async fn a_config_file_sets_listen_and_data_dir() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("from-file");
    let cfg = write_config(
        cwd.path(),
        &format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {}\n",
            toml_path(&data)
        ),
    );
    // No --listen: had the file been ignored, the server would try the default 127.0.0.1:8470.
    let server = Server::start(keyward(cwd.path()).arg("--config").arg(&cfg).arg("serve"));
    assert!(
        !server.addr.ends_with(":8470"),
        "listen from the file must be used: {}",
        server.addr
    );
    let key = server.printed_root_key().expect("root key");
    assert_eq!(
        read_trimmed(&data.join("root-key")),
        key,
        "data_dir from the file must be used"
    );
    assert!(
        !cwd.path().join("keyward-data").exists(),
        "the default data dir must not be used"
    );
    let (status, _) = get(&server, "/healthz", None).await;
    assert_eq!(status, 200);
    server.stop();
}

#[tokio::test]
async fn keyward_config_env_names_the_config_file() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("from-file");
    let cfg = write_config(
        cwd.path(),
        &format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {}\n",
            toml_path(&data)
        ),
    );
    let server = Server::start(keyward(cwd.path()).env("KEYWARD_CONFIG", &cfg).arg("serve"));
    let key = server.printed_root_key().expect("root key");
    assert_eq!(
        read_trimmed(&data.join("root-key")),
        key,
        "the file named by KEYWARD_CONFIG must be read"
    );
    server.stop();
}

#[test]
fn keyward_data_dir_env_beats_the_config_files_data_dir() {
    let cwd = tempfile::tempdir().unwrap();
    let file_dir = cwd.path().join("from-file");
    let env_dir = cwd.path().join("from-env");
    let cfg = write_config(
        cwd.path(),
        &format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {}\n",
            toml_path(&file_dir)
        ),
    );
    let server = Server::start(
        keyward(cwd.path())
            .arg("--config")
            .arg(&cfg)
            .env("KEYWARD_DATA_DIR", &env_dir)
            .arg("serve"),
    );
    let key = server.printed_root_key().expect("root key");
    assert_eq!(
        read_trimmed(&env_dir.join("root-key")),
        key,
        "KEYWARD_DATA_DIR must win over the file"
    );
    assert!(
        !file_dir.exists(),
        "the file's data_dir must not be touched"
    );
    server.stop();
}

#[test]
fn the_data_dir_flag_beats_keyward_data_dir_env() {
    let cwd = tempfile::tempdir().unwrap();
    let env_dir = cwd.path().join("from-env");
    let flag_dir = cwd.path().join("from-flag");
    let server = Server::start(
        keyward(cwd.path())
            .env("KEYWARD_DATA_DIR", &env_dir)
            .arg("--data-dir")
            .arg(&flag_dir)
            .args(["serve", "--listen", "127.0.0.1:0"]),
    );
    let key = server.printed_root_key().expect("root key");
    assert_eq!(
        read_trimmed(&flag_dir.join("root-key")),
        key,
        "--data-dir must win over KEYWARD_DATA_DIR"
    );
    assert!(!env_dir.exists(), "the env data dir must not be touched");
    server.stop();
}

#[test]
fn keyward_listen_env_beats_the_file_and_the_listen_flag_beats_the_env() {
    let cwd = tempfile::tempdir().unwrap();
    // The file's listen is unusable: if it were used, serve would exit 2.
    let cfg = write_config(cwd.path(), "listen = \"not an address\"\n");
    let server = Server::start(
        keyward(cwd.path())
            .arg("--config")
            .arg(&cfg)
            .env("KEYWARD_LISTEN", "127.0.0.1:0")
            .arg("serve"),
    );
    server.stop();

    // Now the env is unusable and the flag must win over it.
    let server = Server::start(
        keyward(cwd.path())
            .arg("--config")
            .arg(&cfg)
            .env("KEYWARD_LISTEN", "also not an address")
            .args(["serve", "--listen", "127.0.0.1:0"]),
    );
    server.stop();
}

#[test]
fn a_config_path_that_does_not_exist_exits_2_naming_the_file() {
    let cwd = tempfile::tempdir().unwrap();
    let missing = cwd.path().join("nope.toml");
    let out = run(keyward(cwd.path()).arg("--config").arg(&missing).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]));
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains(&missing.display().to_string()),
        "stderr must name the file: {}",
        stderr_of(&out)
    );
    assert!(
        !cwd.path().join("keyward-data").exists(),
        "nothing may be created on a config error"
    );
}

#[test]
fn an_unknown_key_in_the_config_file_exits_non_zero_naming_it() {
    let cwd = tempfile::tempdir().unwrap();
    let cfg = write_config(
        cwd.path(),
        "listen = \"127.0.0.1:0\"\nlisten_adress = \"127.0.0.1:1\"\n",
    );
    let out = run(keyward(cwd.path()).arg("--config").arg(&cfg).arg("serve"));
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("listen_adress"),
        "stderr must name the key: {}",
        stderr_of(&out)
    );

    let bad = write_config(cwd.path(), "listen = [this is not toml\n");
    let out = run(keyward(cwd.path()).arg("--config").arg(&bad).arg("serve"));
    assert_eq!(
        out.status.code(),
        Some(2),
        "malformed TOML; stderr: {}",
        stderr_of(&out)
    );
    assert!(
        !cwd.path().join("keyward-data").exists(),
        "nothing may be created on a config error"
    );
}

#[test]
fn an_invalid_listen_address_exits_2() {
    let cwd = tempfile::tempdir().unwrap();
    let out = run(keyward(cwd.path()).args(["serve", "--listen", "localhost-ish"]));
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("localhost-ish"),
        "stderr must quote the address: {}",
        stderr_of(&out)
    );
    assert!(
        !cwd.path().join("keyward-data").exists(),
        "nothing may be created on a config error"
    );
}

#[test]
fn a_listen_address_already_in_use_exits_1_naming_it() {
    let cwd = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(keyward(cwd.path()).args(["serve", "--listen", &addr]));
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains(&addr),
        "stderr must name the address: {}",
        stderr_of(&out)
    );
    // Nothing was bootstrapped: no org, no root key printed or written.
    assert!(
        !stdout_of(&out).contains("kw_rk_"),
        "stdout: {}",
        stdout_of(&out)
    );
    assert!(!cwd.path().join("keyward-data").join("root-key").exists());
}

#[tokio::test]
async fn after_a_graceful_stop_the_database_file_alone_holds_every_write() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("data");
    let server = serve_on(cwd.path(), &data);
    let (status, _) = get(&server, "/healthz", None).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    server.stop();
    // The WAL was checkpointed into the main file and removed on close.
    let wal = data.join("keyward.db-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "WAL left with {} bytes",
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0)
    );
}

#[test]
fn a_postgres_database_url_that_cannot_be_reached_exits_1_without_printing_the_password() {
    let cwd = tempfile::tempdir().unwrap();
    // A port nobody listens on: bind one, note it, and let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://keyward:hunter2@127.0.0.1:{port}/keyward");
    let started = Instant::now();
    let out =
        run(keyward(cwd.path()).args(["--database-url", &url, "serve", "--listen", "127.0.0.1:0"]));
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr_of(&out));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a refused connection must fail fast, took {:?}",
        started.elapsed()
    );
    let err = stderr_of(&out);
    assert!(
        err.contains("PostgreSQL"),
        "stderr must say PostgreSQL could not be opened: {err}"
    );
    assert!(
        !err.contains("hunter2"),
        "the password must never be printed: {err}"
    );
    assert!(
        !cwd.path().join("keyward-data").exists(),
        "the embedded store must not be created"
    );

    let out = run(keyward(cwd.path())
        .env("KEYWARD_DATABASE_URL", &url)
        .args(["init", "--json"]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "KEYWARD_DATABASE_URL selects it too: {}",
        stderr_of(&out)
    );
    let err = stderr_of(&out);
    assert!(err.contains("PostgreSQL"), "{err}");
    assert!(
        !err.contains("hunter2"),
        "the password must never be printed: {err}"
    );
}

/// The test database's URL, or `None` (after saying so) when PostgreSQL tests should not run.
fn test_database_url() -> Option<String> {
    match std::env::var("KEYWARD_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("KEYWARD_TEST_DATABASE_URL not set; skipping");
            None
        }
    }
}

#[tokio::test]
async fn serve_on_postgres_bootstraps_and_serves() {
    use sqlx::Connection;
    let Some(base) = test_database_url() else {
        return;
    };
    // A fresh, empty schema, so serve runs the migrations and the bootstrap itself.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!("kwt_cli_{}_{nanos}", std::process::id());
    let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-csearch_path%3D{schema}");

    let cwd = tempfile::tempdir().unwrap();
    let server = Server::start(keyward(cwd.path()).args([
        "--database-url",
        &url,
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]));
    let key = server
        .printed_root_key()
        .unwrap_or_else(|| panic!("no kw_rk_ key on stdout: {:?}", server.banner));
    assert_root_key_shape(&key);
    let org_id = server
        .printed_org_id()
        .unwrap_or_else(|| panic!("no `Created org` line: {:?}", server.banner));
    let (status, org) = get(&server, &format!("/v1/orgs/{org_id}"), Some(&key)).await;
    assert_eq!(status, 200, "{org}");
    assert_eq!(org["name"], "default", "{org}");
    let (status, _) = get(&server, &format!("/v1/orgs/{org_id}"), None).await;
    assert_eq!(status, 401, "no key, no org");
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = $1 \
         AND table_name = 'keys'",
    )
    .bind(&schema)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(tables, 1, "the migrations must run in the URL's schema");
    drop(server);

    // Best effort: a leftover schema costs space, not correctness.
    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&mut admin)
        .await;
    let _ = admin.close().await;
}

#[test]
fn a_keyward_master_key_that_is_not_32_bytes_of_base64_exits_1() {
    let cwd = tempfile::tempdir().unwrap();
    let short = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
    for bad in ["not base64 at all!", short.as_str()] {
        let out = run(keyward(cwd.path()).env("KEYWARD_MASTER_KEY", bad).args([
            "serve",
            "--listen",
            "127.0.0.1:0",
        ]));
        assert_eq!(
            out.status.code(),
            Some(1),
            "KEYWARD_MASTER_KEY={bad:?}; stderr: {}",
            stderr_of(&out)
        );
        let err = stderr_of(&out);
        assert!(
            err.contains("KEYWARD_MASTER_KEY"),
            "stderr must name the variable: {err}"
        );
        assert!(!err.contains(bad), "stderr must not echo the secret: {err}");
        assert!(
            stdout_of(&out).is_empty(),
            "no root key may be printed: {}",
            stdout_of(&out)
        );
    }
    assert!(
        !cwd.path().join("keyward-data").join("root-key").exists(),
        "a bad master key must stop serve before it bootstraps an org"
    );
}

#[tokio::test]
async fn a_valid_keyward_master_key_is_used_instead_of_a_master_key_file() {
    let cwd = tempfile::tempdir().unwrap();
    let mk = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
    let server = Server::start(keyward(cwd.path()).env("KEYWARD_MASTER_KEY", &mk).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]));
    assert!(server.printed_root_key().is_some());
    assert!(
        !cwd.path().join("keyward-data").join("master.key").exists(),
        "with KEYWARD_MASTER_KEY set no master.key file is written"
    );
    let (status, _) = get(&server, "/healthz", None).await;
    assert_eq!(status, 200);
    server.stop();
}

// ---- shutdown ----

#[tokio::test]
async fn sigterm_shuts_down_gracefully_with_exit_code_0() {
    let cwd = tempfile::tempdir().unwrap();
    let server = serve_on(cwd.path(), &cwd.path().join("d"));
    let addr = server.addr.clone();
    // A client holding a keep-alive connection open must not keep the server from exiting.
    let client = reqwest::Client::new();
    let resp = client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);

    let started = Instant::now();
    let status = server.stop_with("-TERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert_eq!(status.code(), Some(0));
    eprintln!("SIGTERM to exit: {:?}", started.elapsed());
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the port must be closed after exit"
    );
    drop(client);
}

#[tokio::test]
async fn sigint_shuts_down_gracefully_with_exit_code_0() {
    let cwd = tempfile::tempdir().unwrap();
    let server = serve_on(cwd.path(), &cwd.path().join("d"));
    let (status, _) = get(&server, "/healthz", None).await;
    assert_eq!(status, 200);
    let status = server.stop_with("-INT");
    assert_eq!(status.code(), Some(0), "exit status after SIGINT: {status}");
}

/// What a server holds in memory when it is told to stop (uses not yet flushed, denials not yet
/// audited) is written before it exits: with the flush interval at an hour, nothing reaches the
/// store but through the shutdown's final flush, and a second server on the same data dir finds
/// it all.
#[tokio::test]
async fn sigterm_writes_the_uses_and_denials_still_held_in_memory() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("d");
    let hourly = |cwd: &Path| {
        let mut cmd = keyward(cwd);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--usage-flush-ms", "3600000"])
            .arg("--data-dir")
            .arg(&data);
        cmd
    };
    let server = Server::start(&mut hourly(cwd.path()));
    let root = server.printed_root_key().expect("root key printed");
    let org = server.printed_org_id().expect("org id printed");
    let created = create_agent(&server, &org, &root, "worker", json!({"agents": ["read"]})).await;
    let (agent_id, key_id) = (
        created["agent"]["id"].as_str().unwrap().to_string(),
        created["key"]["id"].as_str().unwrap().to_string(),
    );
    let api_key = created["api_key"].as_str().unwrap().to_string();
    for _ in 0..3 {
        let (status, v) = post(&server, "/v1/keys/verify", &root, json!({"key": api_key})).await;
        assert_eq!((status.as_u16(), &v["valid"]), (200, &json!(true)), "{v}");
    }
    let (status, v) = post(
        &server,
        &format!("/v1/orgs/{org}/agents/{agent_id}/pause"),
        &root,
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // A denial of a known key (audited as `auth.denied`) and a failed verification (`key.verify`).
    let (status, v) = get(&server, &format!("/v1/orgs/{org}/agents"), Some(&api_key)).await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = post(&server, "/v1/keys/verify", &root, json!({"key": api_key})).await;
    assert_eq!(
        (status.as_u16(), &v["code"]),
        (200, &json!("AGENT_PAUSED")),
        "{v}"
    );
    let (status, v) = get(&server, &format!("/v1/keys/{key_id}/usage"), Some(&root)).await;
    assert_eq!(status, 200, "{v}");
    let held = v["total"].clone();

    assert_eq!(server.stop_with("-TERM").code(), Some(0));

    let server = Server::start(&mut hourly(cwd.path()));
    let (status, v) = get(&server, &format!("/v1/keys/{key_id}/usage"), Some(&root)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["total"], held, "the uses counted before the stop: {v}");
    assert_eq!(v["total"]["allowed"], 3, "{v}");
    for (action, outcome) in [("auth.denied", "denied"), ("key.verify", "denied")] {
        let (status, v) = get(
            &server,
            &format!("/v1/orgs/{org}/audit?action={action}&outcome={outcome}"),
            Some(&root),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let events = v["events"].as_array().unwrap();
        assert_eq!(
            events.len(),
            1,
            "one {action} event written at the stop: {v}"
        );
        assert_eq!(events[0]["error_code"], "AGENT_PAUSED", "{v}");
    }
    server.stop();
}

#[test]
fn sigterm_sent_the_moment_the_listening_line_appears_still_exits_0() {
    // Readiness is announced on stdout; a supervisor may signal right after it. The handler must
    // already be installed by then, or the process dies of the signal instead of shutting down.
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("d");
    for round in 0..5 {
        let server = serve_on(cwd.path(), &data);
        let status = server.stop_with("-TERM");
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: exit status after an early SIGTERM: {status}"
        );
    }
}

#[test]
fn zero_cache_and_flush_settings_are_refused_with_exit_2_naming_the_setting() {
    let cwd = tempfile::tempdir().unwrap();
    for (flag, name) in [
        ("--cache-ttl-s", "cache_ttl_s"),
        ("--cache-capacity", "cache_capacity"),
        ("--usage-flush-ms", "usage_flush_ms"),
    ] {
        let out = run(keyward(cwd.path()).args(["serve", flag, "0"]));
        assert_eq!(out.status.code(), Some(2), "{flag}: {}", stderr_of(&out));
        assert!(
            stderr_of(&out).contains(name),
            "{flag}: {}",
            stderr_of(&out)
        );
    }
    let out = run(keyward(cwd.path())
        .env("KEYWARD_FAILED_AUTH_BURST", "0")
        .args(["serve"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
}

#[tokio::test]
async fn cache_and_throttle_settings_from_the_config_file_are_accepted() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("data");
    let cfg = write_config(
        cwd.path(),
        &format!(
            "data_dir = {}\nlisten = \"127.0.0.1:0\"\ncache_capacity = 1000\ncache_ttl_s = 5\n\
             negative_cache_capacity = 100\nnegative_cache_ttl_s = 2\nusage_flush_ms = 250\n\
             failed_auth_per_minute = 0\n",
            toml_path(&data)
        ),
    );
    let server =
        Server::start(keyward(cwd.path()).args(["--config", cfg.to_str().unwrap(), "serve"]));
    let (status, _) = get(&server, "/healthz", None).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    // With the throttle off, many failures in a row are all plain 401s.
    for _ in 0..150 {
        let (status, body) = get(
            &server,
            "/v1/me",
            Some("kw_ak_000000000000000000000000000000000000"),
        )
        .await;
        assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED, "{body}");
    }
}
