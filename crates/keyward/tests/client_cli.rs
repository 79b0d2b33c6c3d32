//! The client commands of the built `keyward` binary (setup, config, agents, keys, audit,
//! completions) run as a user runs them, against a real `keyward serve` on a free port: every
//! command at least once, their JSON and table output, and their exit codes (0 ok, 1 API error
//! with its code printed, 2 usage error).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
const STARTUP: Duration = Duration::from_secs(30);

/// Every variable the binary reads, removed from each child so the tests' own environment can't
/// leak in.
const KEYWARD_ENV: &[&str] = &[
    "KEYWARD_CONFIG",
    "KEYWARD_DATA_DIR",
    "KEYWARD_DATABASE_URL",
    "KEYWARD_LOG",
    "KEYWARD_LISTEN",
    "KEYWARD_TRUSTED_PROXIES",
    "KEYWARD_MASTER_KEY",
    "KEYWARD_BASE_URL",
    "KEYWARD_API_KEY",
    "KEYWARD_ORG_ID",
    "KEYWARD_CLIENT_CONFIG",
    "NO_COLOR",
];

/// A `keyward serve` on a free port with its own data dir, and a home for the client settings.
struct Server {
    child: Child,
    base: String,
    root_key: String,
    org_id: String,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clean(cmd: &mut Command) -> &mut Command {
    for var in KEYWARD_ENV {
        cmd.env_remove(var);
    }
    cmd
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut child = clean(&mut Command::new(BIN))
            .current_dir(dir.path())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--usage-flush-ms",
                "100",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Drains stdout for the process's whole life so it never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let (mut base, mut root_key, mut org_id) = (None, None, None);
        let deadline = Instant::now() + STARTUP;
        while base.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("keyward serve printed its listening line");
            if let Some(rest) = line.strip_prefix("Created org `default` (") {
                org_id = Some(rest.trim_end_matches(").").to_string());
            }
            if let Some(k) = line.split_whitespace().find(|w| w.starts_with("kw_rk_")) {
                root_key = Some(k.to_string());
            }
            if let Some(addr) = line.strip_prefix("Keyward listening on ") {
                base = Some(addr.trim().to_string());
            }
        }
        Server {
            child,
            base: base.unwrap(),
            root_key: root_key.expect("root key printed"),
            org_id: org_id.expect("org id printed"),
            dir,
        }
    }

    fn settings_path(&self) -> PathBuf {
        self.dir
            .path()
            .join("home")
            .join("keyward")
            .join("config.toml")
    }

    /// A client command with only the settings file (not yet written) configured.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        clean(&mut cmd)
            .current_dir(self.dir.path())
            .env("XDG_CONFIG_HOME", self.dir.path().join("home"))
            .args(args);
        cmd
    }

    /// Runs a client command with `--base-url`, `--api-key` (root) and `--org` in the
    /// environment, as a script would.
    fn kw(&self, args: &[&str]) -> Out {
        self.kw_as(&self.root_key, args)
    }

    fn kw_as(&self, key: &str, args: &[&str]) -> Out {
        let mut cmd = self.cmd(args);
        cmd.env("KEYWARD_BASE_URL", &self.base)
            .env("KEYWARD_API_KEY", key)
            .env("KEYWARD_ORG_ID", &self.org_id);
        run(&mut cmd, None)
    }
}

/// A finished command: exit code, stdout, stderr.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        assert!(
            !self.stdout.contains('\x1b'),
            "no colour when stdout is not a terminal"
        );
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        self.ok();
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// Asserts exit code 1 with the API code on stderr.
    #[track_caller]
    fn api_error(&self, code: &str) -> &Self {
        assert_eq!(self.code, 1, "expected an API error: {self:#?}");
        assert!(
            self.stderr.contains(&format!("error: {code}")),
            "stderr names {code}: {self:#?}"
        );
        self
    }

    #[track_caller]
    fn usage_error(&self) -> &Self {
        assert_eq!(self.code, 2, "expected a usage error: {self:#?}");
        assert!(!self.stderr.is_empty());
        self
    }
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Out {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out: Output = match rx.recv_timeout(STARTUP) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not finish within {STARTUP:?}");
        }
    };
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn setup_writes_a_private_settings_file_that_every_command_then_uses() {
    let s = Server::start();
    // Nothing set up yet: a usage error that says what to do.
    let none = run(&mut s.cmd(&["agents", "list"]), None);
    none.usage_error();
    assert!(none.stderr.contains("keyward setup"), "{none:?}");

    // The org is found from the key itself.
    let setup = run(
        &mut s.cmd(&["setup", "--base-url", &s.base, "--api-key", &s.root_key]),
        None,
    );
    setup.ok();
    assert!(setup.stdout.contains(&s.org_id), "{setup:?}");
    assert!(!setup.stdout.contains(&s.root_key), "the key is not echoed");
    let path = s.settings_path();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&s.root_key) && text.contains(&s.org_id));
    #[cfg(unix)]
    assert_eq!(mode(&path), 0o600, "the settings file is private");

    // Every command now runs from the file alone.
    run(&mut s.cmd(&["agents", "list"]), None).ok();
    let shown = run(&mut s.cmd(&["config", "show"]), None);
    shown.ok();
    assert!(shown.stdout.contains(&s.root_key[..12]), "{shown:?}");
    assert!(!shown.stdout.contains(&s.root_key), "the key is masked");
    let shown = run(&mut s.cmd(&["config", "show", "-o", "json"]), None).json();
    assert_eq!(shown["org_id"]["value"], s.org_id.as_str());
    assert_eq!(shown["api_key"]["source"], "file");
    assert_eq!(shown["path"], path.display().to_string().as_str());
    let key = run(&mut s.cmd(&["config", "show", "--key", "api_key"]), None);
    assert_eq!(key.ok().stdout.trim(), s.root_key, "asked for, it is shown");
    run(&mut s.cmd(&["config", "show", "--key", "password"]), None).usage_error();

    // Environment beats the file; flags beat the environment.
    let mut cmd = s.cmd(&["config", "show", "-o", "json"]);
    cmd.env("KEYWARD_BASE_URL", "http://127.0.0.1:9");
    let shown = run(&mut cmd, None).json();
    assert_eq!(shown["base_url"]["value"], "http://127.0.0.1:9");
    assert_eq!(shown["base_url"]["source"], "env KEYWARD_BASE_URL");
    cmd.args(["--base-url", "http://127.0.0.1:10"]);
    let shown = run(&mut cmd, None).json();
    assert_eq!(shown["base_url"]["source"], "flag");
    // Nobody listens on port 9: a transport failure is exit 1 too.
    let mut cmd = s.cmd(&["agents", "list"]);
    cmd.env("KEYWARD_BASE_URL", "http://127.0.0.1:9");
    let down = run(&mut cmd, None);
    assert_eq!(down.code, 1, "{down:?}");

    // A key read from stdin, checked against the server; a wrong key or org is refused and
    // leaves the file as it was.
    let other = s.dir.path().join("other.toml");
    let mut cmd = s.cmd(&["setup", "--base-url", &s.base, "--org", &s.org_id]);
    cmd.env("KEYWARD_CLIENT_CONFIG", &other);
    run(&mut cmd, Some(&format!("{}\n", s.root_key))).ok();
    assert!(std::fs::read_to_string(&other)
        .unwrap()
        .contains(&s.root_key));
    let mut cmd = s.cmd(&[
        "setup",
        "--base-url",
        &s.base,
        "--api-key",
        "kw_rk_nonsense",
    ]);
    cmd.env("KEYWARD_CLIENT_CONFIG", &other);
    run(&mut cmd, None).api_error("INVALID_API_KEY");
    let mut cmd = s.cmd(&[
        "setup",
        "--base-url",
        &s.base,
        "--api-key",
        &s.root_key,
        "--org",
        "01a20909-dc6a-7405-a038-000000000000",
    ]);
    cmd.env("KEYWARD_CLIENT_CONFIG", &other);
    run(&mut cmd, None).usage_error();
    let mut cmd = s.cmd(&["setup", "--no-verify", "--api-key", &s.root_key]);
    cmd.env("KEYWARD_CLIENT_CONFIG", &other);
    run(&mut cmd, None).usage_error();
    assert!(std::fs::read_to_string(&other).unwrap().contains(&s.org_id));
}

#[test]
fn agents_commands_drive_an_agent_through_its_life() {
    let s = Server::start();
    // Table output: the key once, with its warning.
    let created = s.kw(&[
        "agents",
        "create",
        "--name",
        "support-bot",
        "--scope",
        "slack:chat:write",
        "--scope",
        "keys:derive",
        "--display-name",
        "Support",
        "--metadata",
        r#"{"team": "cx"}"#,
    ]);
    created.ok();
    assert_eq!(
        created.stdout.matches("kw_ak_").count(),
        2,
        "start + key: {created:?}"
    );
    assert!(created.stdout.contains("shown once"), "{created:?}");

    let dup = s.kw(&["agents", "create", "--name", "support-bot"]);
    dup.api_error("AGENT_NAME_EXISTS");
    assert!(dup.stdout.is_empty());
    let dup = s.kw(&["agents", "create", "--name", "support-bot", "-o", "json"]);
    dup.api_error("AGENT_NAME_EXISTS");
    let body: Value = serde_json::from_str(&dup.stdout).unwrap();
    assert_eq!(
        body["error"]["code"], "AGENT_NAME_EXISTS",
        "JSON errors on stdout"
    );
    assert_eq!(body["error"]["status"], 409);

    s.kw(&["agents", "create"]).usage_error();
    s.kw(&["agents", "create", "--name", "x", "--scope", "slack"])
        .usage_error();
    s.kw(&["agents", "create", "--name", "x", "--metadata", "[1]"])
        .usage_error();

    let created = s
        .kw(&[
            "agents",
            "create",
            "--name",
            "helper",
            "--type",
            "service",
            "--key-name",
            "first",
            "--expires-in",
            "30d",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(created["agent"]["type"], "service");
    assert_eq!(created["key"]["name"], "first");
    assert!(created["key"]["expires_at"].is_string());
    let helper_id = created["agent"]["id"].as_str().unwrap().to_string();

    let list = s.kw(&["agents", "list"]);
    list.ok();
    assert!(list.stdout.starts_with("ID"), "{list:?}");
    assert!(list.stdout.contains("support-bot") && list.stdout.contains("helper"));
    let page = s
        .kw(&["agents", "list", "--limit", "1", "-o", "json"])
        .json();
    assert_eq!(page["agents"].as_array().unwrap().len(), 1);
    assert_eq!(page["has_more"], true);
    let all = s.kw(&["agents", "list", "--all", "-o", "json"]).json();
    assert_eq!(all["agents"].as_array().unwrap().len(), 2);
    s.kw(&["agents", "list", "--limit", "5000"])
        .api_error("VALIDATION_ERROR");

    let got = s.kw(&["agents", "get", "support-bot", "-o", "json"]).json();
    assert_eq!(got["display_name"], "Support");
    assert_eq!(got["metadata"]["team"], "cx");
    let got = s.kw(&["agents", "get", &helper_id]);
    assert!(got.ok().stdout.contains("helper"));
    s.kw(&["agents", "get", "nobody"])
        .api_error("AGENT_NOT_FOUND");

    let updated = s
        .kw(&[
            "agents",
            "update",
            "support-bot",
            "--display-name",
            "Support bot",
            "--add-scope",
            "slack:files:read",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(updated["display_name"], "Support bot");
    assert_eq!(updated["version"], 2);
    assert_eq!(
        updated["scopes"]["slack"],
        serde_json::json!(["chat:write", "files:read"])
    );
    // Replacing the allowlist with less is a narrowing: refused, with its code.
    s.kw(&[
        "agents",
        "update",
        "support-bot",
        "--scope",
        "slack:chat:write",
    ])
    .api_error("SCOPE_NARROWING_NOT_SUPPORTED");
    let policy = s
        .kw(&[
            "agents",
            "update",
            "support-bot",
            "--policy",
            r#"{"note": "kept"}"#,
            "--metadata",
            r#"{"team": "support"}"#,
            "-o",
            "json",
        ])
        .json();
    assert_eq!(policy["policy"]["note"], "kept");

    let paused = s
        .kw(&["agents", "pause", "support-bot", "-o", "json"])
        .json();
    assert_eq!(paused["status"], "paused");
    let resumed = s.kw(&["agents", "resume", "support-bot"]);
    assert!(resumed.ok().stdout.contains("active"));
    let deleted = s.kw(&["agents", "delete", &helper_id, "-o", "json"]).json();
    assert_eq!(deleted["status"], "revoked");
    let with_revoked = s
        .kw(&["agents", "list", "--include-revoked", "-o", "json"])
        .json();
    assert_eq!(with_revoked["agents"].as_array().unwrap().len(), 2);
    let live = s.kw(&["agents", "list", "-o", "json"]).json();
    assert_eq!(live["agents"].as_array().unwrap().len(), 1);
    s.kw(&["agents", "update", &helper_id, "--display-name", "x"])
        .api_error("AGENT_REVOKED");
}

fn uuid_of(v: &Value, path: &[&str]) -> String {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_str()
        .unwrap_or_else(|| panic!("no {path:?}"))
        .to_string()
}

#[test]
fn keys_commands_mint_narrow_meter_rotate_and_revoke() {
    let s = Server::start();
    let agent = s
        .kw(&[
            "agents",
            "create",
            "--name",
            "worker",
            "--scope",
            "slack:chat:write",
            "--scope",
            "slack:files:read",
            "--scope",
            "keys:derive",
            "-o",
            "json",
        ])
        .json();
    let first_key_id = uuid_of(&agent, &["key", "id"]);
    let agent_key = uuid_of(&agent, &["api_key"]);

    // Create: the secret once in JSON, with the warning on stderr.
    let out = s.kw(&[
        "keys",
        "create",
        "--agent",
        "worker",
        "--scope",
        "slack:chat:write",
        "--name",
        "monitoring",
        "--expires-in",
        "30d",
        "--quota",
        "1000/day",
        "--rate-limit",
        "100/1h",
        "--burst",
        "10",
        "-o",
        "json",
    ]);
    let created = out.json();
    assert!(out.stderr.contains("shown once"), "{out:?}");
    let key_id = uuid_of(&created, &["key", "id"]);
    let key = uuid_of(&created, &["api_key"]);
    assert_eq!(created["key"]["name"], "monitoring");
    assert_eq!(created["key"]["quota"]["limit"], 1000);
    assert_eq!(created["key"]["rate_limit"]["burst"], 10);
    s.kw(&[
        "keys",
        "create",
        "--agent",
        "worker",
        "--scope",
        "github:repo",
    ])
    .api_error("SCOPE_NOT_SUBSET");
    s.kw(&[
        "keys",
        "create",
        "--agent",
        "worker",
        "--expires-in",
        "soon",
    ])
    .usage_error();
    s.kw(&["keys", "create", "--agent", "worker", "--quota", "5/year"])
        .usage_error();
    let root = s.kw(&["keys", "create", "--name", "ops", "--test"]);
    root.ok();
    assert!(root.stdout.contains("kwt_rk_"), "{root:?}");
    let signed = s
        .kw(&[
            "keys",
            "create",
            "--agent",
            "worker",
            "--requires-signature",
            "--alert",
            "80",
            "-o",
            "json",
        ])
        .json();
    assert!(signed["signing_secret"]
        .as_str()
        .unwrap()
        .starts_with("kwss_"));
    assert_eq!(signed["key"]["alert_thresholds"], serde_json::json!([80]));

    // List and get.
    let list = s
        .kw(&["keys", "list", "--agent", "worker", "-o", "json"])
        .json();
    assert_eq!(list["keys"].as_array().unwrap().len(), 3);
    let roots = s
        .kw(&["keys", "list", "--kind", "root", "-o", "json"])
        .json();
    assert_eq!(roots["keys"].as_array().unwrap().len(), 2);
    let all = s.kw(&["keys", "list", "--all"]);
    assert!(all.ok().stdout.contains("monitoring"));
    let got = s.kw(&["keys", "get", &key_id]);
    assert!(got.ok().stdout.contains("1000 per day"), "{got:?}");
    s.kw(&["keys", "get", "not-a-uuid"]).usage_error();

    // Update: allowlist add/remove, limits cleared.
    let upd = s
        .kw(&[
            "keys",
            "update",
            &key_id,
            "--add-ip",
            "192.168.1.1",
            "--add-ip",
            "10.0.0.0/8",
            "--name",
            "mon",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(upd["name"], "mon");
    assert_eq!(upd["cidr_allowlist"].as_array().unwrap().len(), 2);
    let upd = s
        .kw(&[
            "keys",
            "update",
            &key_id,
            "--remove-ip",
            "192.168.1.1",
            "--rate-limit",
            "none",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(upd["cidr_allowlist"], serde_json::json!(["10.0.0.0/8"]));
    assert!(upd["rate_limit"].is_null());
    s.kw(&["keys", "update", &key_id, "--remove-ip", "172.16.0.1"])
        .usage_error();
    let upd = s
        .kw(&[
            "keys",
            "update",
            &key_id,
            "--remove-ip",
            "10.0.0.0/8",
            "--quota",
            "none",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(upd["cidr_allowlist"], serde_json::json!([]));
    assert!(upd["quota"].is_null());

    // Alert thresholds.
    let alert = s
        .kw(&[
            "keys",
            "alert",
            &key_id,
            "--threshold",
            "80",
            "--threshold",
            "100",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(alert["alert_thresholds"], serde_json::json!([80, 100]));
    let cleared = s
        .kw(&["keys", "alert", &key_id, "--clear", "-o", "json"])
        .json();
    assert_eq!(cleared["alert_thresholds"], serde_json::json!([]));
    s.kw(&["keys", "alert", &key_id]).usage_error();

    // Verify (from an argument and from stdin), which also counts as the key's use.
    let v = s
        .kw(&[
            "keys",
            "verify",
            &key,
            "--scope",
            "slack:chat:write",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(v["valid"], true);
    let mut cmd = s.cmd(&["keys", "verify", "-"]);
    cmd.env("KEYWARD_BASE_URL", &s.base)
        .env("KEYWARD_API_KEY", &s.root_key);
    let v = run(&mut cmd, Some(&format!("{key}\n")));
    assert!(v.ok().stdout.contains("VALID"), "{v:?}");
    let insufficient = s.kw(&["keys", "verify", &key, "--scope", "slack:files:read"]);
    assert_eq!(
        insufficient.code, 1,
        "an invalid key exits 1: {insufficient:?}"
    );
    assert!(insufficient.stderr.contains("INSUFFICIENT_SCOPE"));

    // Usage: the two uses are visible within 2 s; the table has a sparkline.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let u = s.kw(&["keys", "usage", &key_id, "-o", "json"]).json();
        if u["total"]["allowed"].as_u64() >= Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "usage never showed: {u}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let table = s.kw(&["keys", "usage", &key_id]);
    table.ok();
    assert!(
        table.stdout.chars().any(|c| ('▁'..='█').contains(&c)),
        "{table:?}"
    );
    assert!(table.stdout.contains("ALLOWED"), "{table:?}");
    let daily = s
        .kw(&[
            "keys",
            "usage",
            &key_id,
            "--granularity",
            "day",
            "-o",
            "json",
        ])
        .json();
    assert!(daily["total"]["allowed"].as_u64() >= Some(2));

    // Derive with the agent's own key; a derived key cannot derive again.
    let derived = s
        .kw_as(
            &agent_key,
            &[
                "keys",
                "derive",
                "--scope",
                "slack:chat:write",
                "--expires-in",
                "10m",
                "--name",
                "task",
                "-o",
                "json",
            ],
        )
        .json();
    assert_eq!(derived["key"]["kind"], "derived");
    let derived_key = uuid_of(&derived, &["api_key"]);
    s.kw_as(
        &derived_key,
        &[
            "keys",
            "derive",
            "--scope",
            "slack:chat:write",
            "--expires-in",
            "1m",
        ],
    )
    .api_error("INSUFFICIENT_SCOPE");
    s.kw_as(
        &agent_key,
        &[
            "keys",
            "derive",
            "--scope",
            "github:repo",
            "--expires-in",
            "1m",
        ],
    )
    .api_error("SCOPE_NOT_SUBSET");
    s.kw_as(&agent_key, &["keys", "derive", "--expires-in", "1m"])
        .usage_error();

    // Deprecate / undeprecate (the agent is looked up from the key).
    let dep = s
        .kw(&["keys", "deprecate", &first_key_id, "-o", "json"])
        .json();
    assert!(dep["deprecated_at"].is_string());
    let undep = s.kw(&["keys", "undeprecate", &first_key_id]);
    assert!(undep.ok().stdout.contains("active"));

    // Rotate with a 14-day overlap: the old key is deprecated and names its successor.
    let rotated = s
        .kw(&[
            "keys",
            "rotate",
            &first_key_id,
            "--overlap-days",
            "14",
            "-o",
            "json",
        ])
        .json();
    let successor = uuid_of(&rotated, &["key", "id"]);
    let old = s.kw(&["keys", "get", &first_key_id, "-o", "json"]).json();
    assert_eq!(old["successor_key_id"], successor.as_str());
    assert!(old["deprecated_at"].is_string());
    s.kw(&["keys", "rotate", &uuid_of(&derived, &["key", "id"])])
        .api_error("DERIVED_KEY_NOT_ROTATABLE");

    // Revoke: the old key and its derived key stop working at once.
    let revoked = s.kw(&["keys", "revoke", &first_key_id]);
    assert!(revoked.ok().stdout.contains("Revoked"));
    s.kw(&["keys", "revoke", &first_key_id])
        .api_error("KEY_ALREADY_REVOKED");
    s.kw_as(
        &agent_key,
        &[
            "keys",
            "derive",
            "--scope",
            "slack:chat:write",
            "--expires-in",
            "1m",
        ],
    )
    .api_error("REVOKED_API_KEY");
    let v = s.kw(&["keys", "verify", &derived_key]);
    assert_eq!(v.code, 1);
    assert!(v.stdout.contains("REVOKED_API_KEY"), "{v:?}");

    // The last active key needs --force.
    for id in [&key_id, &uuid_of(&signed, &["key", "id"])] {
        s.kw(&["keys", "revoke", id]).ok();
    }
    s.kw(&["keys", "revoke", &successor])
        .api_error("LAST_ACTIVE_KEY");
    s.kw(&["keys", "revoke", &successor, "--force", "-o", "json"])
        .json();
    s.kw(&["keys", "get", "01a20909-dc6a-7405-a038-000000000000"])
        .api_error("KEY_NOT_FOUND");
}

#[test]
fn audit_list_filters_by_run_and_walks_every_page() {
    let s = Server::start();
    for name in ["a1", "a2", "a3"] {
        s.kw(&[
            "agents",
            "create",
            "--name",
            name,
            "--scope",
            "keys:derive",
            "--scope",
            "x:y",
        ])
        .ok();
    }
    // A traced call through the SDK, so there is a run to filter by.
    let created = s
        .kw(&[
            "agents",
            "create",
            "--name",
            "traced",
            "--scope",
            "keys:derive",
            "--scope",
            "x:y",
            "-o",
            "json",
        ])
        .json();
    let key = uuid_of(&created, &["api_key"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let agent = keyward_client::AgentClient::new(&s.base, &key).unwrap();
        let ctx = keyward_client::TraceContext {
            run_id: Some("cli-run".into()),
            thread_id: Some("t-1".into()),
            ..Default::default()
        };
        agent
            .trace(ctx, async {
                agent
                    .keys()
                    .derive(&keyward_client::proto::DeriveKeyRequest {
                        scopes: vec!["x:y".into()],
                        expires_in: 60,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
            })
            .await
            .unwrap();
    });
    let by_run = s
        .kw(&["audit", "list", "--run-id", "cli-run", "-o", "json"])
        .json();
    let events = by_run["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{by_run}");
    assert_eq!(events[0]["action"], "key.derive");
    assert_eq!(events[0]["thread_id"], "t-1");
    let table = s.kw(&["audit", "list", "--run-id", "cli-run"]);
    assert!(table.ok().stdout.contains("cli-run"));

    let page = s
        .kw(&[
            "audit",
            "list",
            "--action",
            "agent.create",
            "--limit",
            "2",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], true);
    let all = s
        .kw(&[
            "audit",
            "list",
            "--action",
            "agent.create",
            "--all",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(all["events"].as_array().unwrap().len(), 4);
    let by_agent = s
        .kw(&[
            "audit",
            "list",
            "--agent",
            "traced",
            "--outcome",
            "success",
            "--since",
            "2020-01-01T00:00:00Z",
            "-o",
            "json",
        ])
        .json();
    assert!(!by_agent["events"].as_array().unwrap().is_empty());
    s.kw(&["audit", "list", "--since", "yesterday"])
        .usage_error();
    s.kw(&["audit", "list", "--outcome", "maybe"]).usage_error();
    // An agent key without audit:read gets the API's answer, with its code.
    s.kw_as(&key, &["audit", "list"])
        .api_error("INSUFFICIENT_SCOPE");
}

#[test]
fn completions_are_printed_for_each_shell() {
    let s = Server::start();
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let out = s.kw(&["completions", shell]);
        out.ok();
        assert!(out.stdout.contains("keyward"), "{shell}: {out:?}");
        assert!(
            out.stdout.contains("agents"),
            "{shell} completes subcommands"
        );
    }
    s.kw(&["completions", "tcsh"]).usage_error();
    // The server's settings mean nothing to a client command: refused, not ignored.
    let out = s.kw(&["agents", "list", "--config", "server.toml"]);
    out.usage_error();
    assert!(out.stderr.contains("--client-config"), "{out:?}");
}
