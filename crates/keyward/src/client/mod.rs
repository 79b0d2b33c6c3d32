//! The client side of the `keyward` binary: `setup`, `config show`, `agents`, `keys`, `audit`
//! and `completions`, built only on keyward-client (they talk to a running server over HTTP and
//! never open the database).
//!
//! Exit codes scripts can rely on: 0 success; 1 the API answered an error (its code is printed)
//! or the server could not be reached; 2 a usage error (bad flags, missing settings).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use keyward_client::{AgentClient, App, ClientConfig};
use uuid::Uuid;

mod agents;
mod audit;
mod keys;
mod output;
mod profile;

use output::{Format, Out};

/// Where the server is and who is calling: flags beat `KEYWARD_*` environment variables, which
/// beat the settings file written by `keyward setup`.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Keyward's URL [default: from `keyward setup`, else http://127.0.0.1:8470].
    #[arg(long, global = true, env = "KEYWARD_BASE_URL", value_name = "URL")]
    pub base_url: Option<String>,
    /// The API key to call with [default: from `keyward setup`].
    #[arg(
        long,
        global = true,
        env = "KEYWARD_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// The org to act on [default: from `keyward setup`].
    #[arg(
        long = "org",
        global = true,
        env = "KEYWARD_ORG_ID",
        value_name = "ORG_ID"
    )]
    pub org_id: Option<String>,
    /// The client settings file [default: $XDG_CONFIG_HOME/keyward/config.toml].
    #[arg(
        long,
        global = true,
        env = "KEYWARD_CLIENT_CONFIG",
        value_name = "PATH"
    )]
    pub client_config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// The client commands, flattened into the binary's command list.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store the base URL, API key and org id for the client commands (file mode 0600).
    Setup {
        #[command(flatten)]
        conn: ClientArgs,
        /// Store the settings without checking them against the server.
        #[arg(long)]
        no_verify: bool,
    },
    /// Show the client settings in effect.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Create, list and change agents.
    Agents {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
    /// Create, rotate, revoke, narrow and inspect keys.
    Keys {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Read the org's audit log.
    Audit {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Print a shell completion script, e.g. `keyward completions bash > /etc/bash_completion.d/keyward`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

/// `keyward config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Show each setting, where it comes from, and the settings file's path (secrets masked).
    Show {
        #[command(flatten)]
        conn: ClientArgs,
        /// Print only this setting, unmasked: base_url, api_key, org_id or path.
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
    },
}

/// Why a client command failed, which decides its exit code.
#[derive(Debug)]
pub enum CliError {
    /// Bad flags or missing settings: exit 2.
    Usage(String),
    /// The server answered an error, or could not be reached: exit 1.
    Api(keyward_client::Error),
    /// Anything else that went wrong while doing what was asked (a file, stdin): exit 1.
    Failed(String),
}

impl From<keyward_client::Error> for CliError {
    fn from(e: keyward_client::Error) -> CliError {
        match e {
            keyward_client::Error::Config(m) => CliError::Usage(m),
            other => CliError::Api(other),
        }
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;

/// A setting and where its value came from.
#[derive(Debug, Clone)]
struct Setting {
    value: Option<String>,
    source: &'static str,
}

/// The settings in effect for one command, and how to print.
pub struct Ctx {
    base_url: Setting,
    api_key: Setting,
    org_id: Setting,
    path: PathBuf,
    pub out: Out,
}

fn pick(flag_or_env: Option<String>, env: &str, file: Option<String>) -> Setting {
    let flag_or_env = flag_or_env.filter(|v| !v.trim().is_empty());
    match flag_or_env {
        Some(v) => {
            let from_env = std::env::var(env).is_ok_and(|e| e == v);
            Setting {
                value: Some(v.trim().to_string()),
                source: if from_env { env_name(env) } else { "flag" },
            }
        }
        None => match file.filter(|v| !v.trim().is_empty()) {
            Some(v) => Setting {
                value: Some(v),
                source: "file",
            },
            None => Setting {
                value: None,
                source: "unset",
            },
        },
    }
}

fn env_name(env: &str) -> &'static str {
    match env {
        "KEYWARD_BASE_URL" => "env KEYWARD_BASE_URL",
        "KEYWARD_API_KEY" => "env KEYWARD_API_KEY",
        _ => "env KEYWARD_ORG_ID",
    }
}

impl Ctx {
    fn resolve(conn: &ClientArgs) -> CliResult<Ctx> {
        let path = profile::path(conn.client_config.as_deref()).map_err(CliError::Usage)?;
        let file = profile::load(&path).map_err(CliError::Usage)?;
        let mut base_url = pick(conn.base_url.clone(), "KEYWARD_BASE_URL", file.base_url);
        if base_url.value.is_none() {
            base_url = Setting {
                value: Some(keyward_client::DEFAULT_BASE_URL.to_string()),
                source: "default",
            };
        }
        Ok(Ctx {
            base_url,
            api_key: pick(conn.api_key.clone(), "KEYWARD_API_KEY", file.api_key),
            org_id: pick(conn.org_id.clone(), "KEYWARD_ORG_ID", file.org_id),
            path,
            out: Out::new(conn.output),
        })
    }

    fn base_url(&self) -> &str {
        self.base_url
            .value
            .as_deref()
            .unwrap_or(keyward_client::DEFAULT_BASE_URL)
    }

    fn api_key(&self) -> CliResult<&str> {
        self.api_key.value.as_deref().ok_or_else(|| {
            CliError::Usage(
                "no API key: run `keyward setup`, or pass --api-key / set KEYWARD_API_KEY".into(),
            )
        })
    }

    fn org_id(&self) -> CliResult<Uuid> {
        let org = self.org_id.value.as_deref().ok_or_else(|| {
            CliError::Usage(
                "no org id: run `keyward setup`, or pass --org / set KEYWARD_ORG_ID".into(),
            )
        })?;
        org.parse()
            .map_err(|_| CliError::Usage(format!("org id `{org}` is not a UUID")))
    }

    /// The operator client (needs the org id).
    pub fn app(&self) -> CliResult<App> {
        let config =
            ClientConfig::new(self.base_url(), self.api_key()?).with_org_id(self.org_id()?);
        Ok(App::from_config(&config)?)
    }

    /// The workload client (the org id is not needed).
    pub fn agent(&self) -> CliResult<AgentClient> {
        Ok(AgentClient::new(self.base_url(), self.api_key()?)?)
    }
}

/// Runs a client command and maps its outcome to the exit code. `cli` builds the binary's
/// whole command tree, for completions.
pub fn main(command: Command, log: Option<String>, cli: fn() -> clap::Command) -> ExitCode {
    // The SDK reports a deprecated key as a tracing warning: show warnings (only) by default.
    let filter = tracing_subscriber::EnvFilter::try_new(log.as_deref().unwrap_or("warn"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
    quiet_on_broken_pipe();
    if let Command::Completions { shell } = command {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cli(), "keyward", &mut script);
        use std::io::Write;
        let _ = std::io::stdout().lock().write_all(&script);
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut json = false;
    let result = runtime.block_on(async {
        let conn = match &command {
            Command::Setup { conn, .. }
            | Command::Agents { conn, .. }
            | Command::Keys { conn, .. }
            | Command::Audit { conn, .. }
            | Command::Config {
                command: ConfigCommand::Show { conn, .. },
            } => conn.clone(),
            Command::Completions { .. } => return Ok(()),
        };
        json = conn.output == Format::Json;
        let ctx = Ctx::resolve(&conn)?;
        match command {
            Command::Setup { no_verify, .. } => setup(&ctx, no_verify).await,
            Command::Config {
                command: ConfigCommand::Show { key, .. },
            } => config_show(&ctx, key.as_deref()),
            Command::Agents { command, .. } => agents::run(&ctx, command).await,
            Command::Keys { command, .. } => keys::run(&ctx, command).await,
            Command::Audit { command, .. } => audit::run(&ctx, command).await,
            Command::Completions { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(CliError::Failed(m)) => {
            eprintln!("error: {m}");
            ExitCode::FAILURE
        }
        Err(CliError::Api(e)) => {
            report(&e, json);
            ExitCode::FAILURE
        }
    }
}

/// `keyward keys list | head` closes stdout early; `println!` then panics. A command whose
/// reader went away has nothing left to say, so it exits quietly with the status a shell gives
/// a process killed by SIGPIPE (128 + 13) instead of printing a panic.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// Prints an API failure: one line on stderr with the code first, and in JSON mode the error
/// body on stdout as well, so a script reading stdout sees it too.
fn report(e: &keyward_client::Error, json: bool) {
    match (e.code_str(), e.api()) {
        (Some(code), Some(api)) => {
            let mut line = format!("error: {code}: {}", api.message);
            if !api.request_id.is_empty() {
                line.push_str(&format!(" (request {})", api.request_id));
            }
            eprintln!("{line}");
            if let Some(details) = api.details.as_object().filter(|d| !d.is_empty()) {
                eprintln!("details: {}", serde_json::Value::Object(details.clone()));
            }
            if json {
                let body = serde_json::json!({"error": {
                    "code": code, "message": api.message, "status": api.status,
                    "request_id": api.request_id, "details": api.details,
                    "retry_after": e.retry_after().map(|d| d.as_secs()),
                }});
                println!("{body}");
            }
        }
        _ => eprintln!("error: {e}"),
    }
}

/// Reads one line from stdin (for a value that should not be a command-line argument).
fn read_line(prompt: &str) -> CliResult<String> {
    use std::io::{BufRead, IsTerminal, Write};
    if std::io::stdin().is_terminal() {
        eprint!("{prompt}: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::Failed(format!("cannot read stdin: {e}")))?;
    Ok(line.trim().to_string())
}

/// `keyward setup`: fills what flags and env did not give from stdin (prompting on a terminal),
/// finds the org of the key when no org is given, checks the settings against the server, and
/// writes them (mode 0600).
async fn setup(ctx: &Ctx, no_verify: bool) -> CliResult {
    let file = profile::load(&ctx.path).map_err(CliError::Usage)?;
    let from_args = |s: &Setting| {
        (s.source != "file" && s.source != "default")
            .then(|| s.value.clone())
            .flatten()
    };
    let base_url = from_args(&ctx.base_url)
        .or(file.base_url.clone())
        .unwrap_or_else(|| keyward_client::DEFAULT_BASE_URL.to_string());
    let api_key = match from_args(&ctx.api_key) {
        Some(k) => k,
        None => read_line("API key")?,
    };
    if api_key.is_empty() {
        return Err(CliError::Usage(
            "no API key given (pass --api-key, set KEYWARD_API_KEY, or type it on stdin)".into(),
        ));
    }
    let mut org_id = from_args(&ctx.org_id);
    if !no_verify {
        let agent = AgentClient::new(&base_url, &api_key)?;
        // The key's own org: an agent key learns it from `me()`; a root key (which has no
        // `me()`) from verifying itself.
        let found = match agent.me().await {
            Ok(me) => me.body.agent.org_id,
            Err(keyward_client::Error::MeRequiresAgentKey(_)) => {
                let v = agent
                    .keys()
                    .verify(&keyward_client::proto::VerifyRequest {
                        key: api_key.clone(),
                        ..Default::default()
                    })
                    .await?;
                v.org_id.ok_or_else(|| {
                    CliError::Failed(format!("the key did not verify: {}", v.code))
                })?
            }
            Err(e) => return Err(e.into()),
        };
        match &org_id {
            Some(given) if given.parse::<Uuid>().ok() != Some(found) => {
                return Err(CliError::Usage(format!(
                    "the key belongs to org {found}, not {given}"
                )))
            }
            _ => org_id = Some(found.to_string()),
        }
    }
    let org_id =
        match org_id {
            Some(o) => o,
            None => return Err(CliError::Usage(
                "no org id given (pass --org, or leave --no-verify off to find it from the key)"
                    .into(),
            )),
        };
    org_id
        .parse::<Uuid>()
        .map_err(|_| CliError::Usage(format!("org id `{org_id}` is not a UUID")))?;
    let saved = profile::Profile {
        base_url: Some(base_url.clone()),
        api_key: Some(api_key.clone()),
        org_id: Some(org_id.clone()),
    };
    profile::save(&ctx.path, &saved).map_err(CliError::Failed)?;
    if ctx.out.json() {
        ctx.out.print_json(&serde_json::json!({
            "path": ctx.path, "base_url": base_url, "org_id": org_id,
            "api_key": profile::mask(&api_key), "verified": !no_verify,
        }));
    } else {
        println!(
            "Saved {} (mode 0600): {} as {} in org {}{}.",
            ctx.path.display(),
            base_url,
            profile::mask(&api_key),
            org_id,
            if no_verify {
                ""
            } else {
                " (checked with the server)"
            }
        );
    }
    Ok(())
}

/// `keyward config show`.
fn config_show(ctx: &Ctx, key: Option<&str>) -> CliResult {
    let path = ctx.path.display().to_string();
    if let Some(name) = key {
        let value = match name {
            "base_url" => ctx.base_url.value.clone(),
            "api_key" => ctx.api_key.value.clone(),
            "org_id" => ctx.org_id.value.clone(),
            "path" => Some(path),
            other => {
                return Err(CliError::Usage(format!(
                    "unknown setting `{other}` (one of base_url, api_key, org_id, path)"
                )))
            }
        };
        let value = value.ok_or_else(|| CliError::Usage(format!("`{name}` is not set")))?;
        if ctx.out.json() {
            ctx.out.print_json(&serde_json::json!({ name: value }));
        } else {
            println!("{value}");
        }
        return Ok(());
    }
    let masked = ctx.api_key.value.as_deref().map(profile::mask);
    if ctx.out.json() {
        let entry =
            |s: &Setting, v: Option<String>| serde_json::json!({"value": v, "source": s.source});
        ctx.out.print_json(&serde_json::json!({
            "path": path,
            "base_url": entry(&ctx.base_url, ctx.base_url.value.clone()),
            "api_key": entry(&ctx.api_key, masked),
            "org_id": entry(&ctx.org_id, ctx.org_id.value.clone()),
        }));
    } else {
        let row = |name: &str, s: &Setting, v: Option<String>| {
            vec![name.to_string(), output::or_dash(v), ctx.out.dim(s.source)]
        };
        ctx.out.table(
            &["setting", "value", "from"],
            &[
                row("base_url", &ctx.base_url, ctx.base_url.value.clone()),
                row("api_key", &ctx.api_key, masked),
                row("org_id", &ctx.org_id, ctx.org_id.value.clone()),
            ],
        );
        println!("\nsettings file: {path}");
    }
    Ok(())
}

/// Parses a duration like `30d`, `12h`, `10m`, `45s`, `2w` or plain seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 30d, 12h, 10m, 45s)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (s, m, h, d or w)")),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("`{s}` must be a positive duration"))
}

/// Parses an RFC 3339 instant (`2026-11-23T10:00:00Z`).
pub fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| format!("`{s}` is not an RFC 3339 time (e.g. 2026-11-23T10:00:00Z)"))
}

/// Parses a JSON object given on the command line.
pub fn parse_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(format!("`{s}` is not a JSON object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("12h"), Ok(12 * 3600));
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("45"), Ok(45));
        assert_eq!(parse_duration("2w"), Ok(14 * 86_400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3y").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
