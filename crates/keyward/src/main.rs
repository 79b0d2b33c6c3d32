//! The `keyward` binary: `serve` runs the server (embedded SQLite by default, PostgreSQL with
//! `--database-url postgres://...`), `init` and `orgs create` bootstrap orgs and print their root
//! keys, `migrate` brings the schema up to date. The client commands (`setup`, `config`,
//! `agents`, `keys`, `audit`, `completions`) live in `client` and talk to a server over HTTP.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use base64::Engine;
use clap::{CommandFactory, Parser, Subcommand};
use keyward_core::clock::SystemClock;
use keyward_server::{MasterKey, ServerConfig};
use keyward_store::postgres::PostgresStore;
use keyward_store::sqlite::SqliteStore;
use keyward_store::Store;

mod client;
mod config;

/// mimalloc instead of the system allocator: the verify cache holds millions of small
/// allocations, and with glibc's malloc 1,000,000 cached keys measured 1099 MiB of RSS.
///
/// Built without transparent huge pages (the `no_thp` feature, in the workspace manifest). With
/// them, mimalloc asks the kernel for 2 MiB pages, and the first touch of each one zeroes all of
/// it inside one page fault: while the cache grows (a burst of misses after a restart) a worker
/// stalled for milliseconds at a time; in one traced run that zeroing was the largest share of
/// the server's `perf` samples in the stalls (179 of 787 in the longest). Misses at 5,000/s (`keyward-load`'s open-loop pass), 8 alternating
/// pairs of runs at 10,000 to 1,000,000 keys: in 6 the p99 was lower without them (1.65-3.43
/// ms, against 5.37-26.56 ms with them); one was even (1.88 against 1.76 ms) and one, at a
/// million keys, went the other way (47.9 against 8.8 ms; see the README's Performance).
/// The feature only stops mimalloc asking for huge pages; on a kernel whose huge-page mode is
/// `always` (not this machine's `madvise`), `MIMALLOC_ALLOW_THP=0` in the environment turns
/// them off for the process (the README's Performance section says so too).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use config::{Config, GlobalArgs, ServeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "keyward",
    version,
    about = "Identity, API keys and access for AI agents"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (creates org `default` and prints its root key on an empty data dir).
    Serve(ServeArgs),
    /// Bootstrap an empty store alone: create org `default` and print its root key.
    Init {
        /// Print `{"org_id", "root_key"}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage orgs directly in the store.
    Orgs {
        #[command(subcommand)]
        command: OrgsCommand,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    #[command(flatten)]
    Client(client::Command),
}

#[derive(Debug, Subcommand)]
enum OrgsCommand {
    /// Create an org and print its root key.
    Create {
        /// The org's name.
        name: String,
        /// Print `{"org_id", "root_key"}` as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A failure the operator should read, with the process exit code 1.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cli = match cli.command {
        Command::Client(command) => {
            // `--config`, `--data-dir` and `--database-url` are the server's; a client command
            // would silently ignore them, so a flag given by hand is refused instead.
            let by_hand = |given: bool, env: &str| given && std::env::var_os(env).is_none();
            if by_hand(cli.global.config.is_some(), "KEYWARD_CONFIG")
                || by_hand(cli.global.data_dir.is_some(), "KEYWARD_DATA_DIR")
                || by_hand(cli.global.database_url.is_some(), "KEYWARD_DATABASE_URL")
            {
                eprintln!(
                    "error: --config, --data-dir and --database-url are server settings; client \
                     commands talk to a server (--base-url) and read --client-config"
                );
                return ExitCode::from(2);
            }
            return client::main(command, cli.global.log, Cli::command);
        }
        command => Cli { command, ..cli },
    };
    let serve_args = match &cli.command {
        Command::Serve(s) => Some(s),
        _ => None,
    };
    let config = match Config::resolve(&cli.global, serve_args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(command: Command, config: Config) -> Result<(), Failure> {
    match command {
        Command::Serve(_) => serve(config).await,
        Command::Init { json } => {
            let store = open_store(&config).await?;
            if let Some(org) = store.first_org().await? {
                return Err(Failure(format!(
                    "already initialized (org `{}` {}); its root key was printed when it was created and is in {}",
                    org.name,
                    org.id,
                    config.data_dir.join("root-key").display()
                )));
            }
            let (org, key) =
                keyward_server::bootstrap::create_org(store.as_ref(), &SystemClock, "default")
                    .await?;
            write_private(
                &config.data_dir.join("root-key"),
                format!("{}\n", key.expose()).as_bytes(),
            )?;
            print_org(json, &org.id.to_string(), &org.name, key.expose());
            Ok(())
        }
        Command::Orgs {
            command: OrgsCommand::Create { name, json },
        } => {
            let store = open_store(&config).await?;
            let (org, key) =
                keyward_server::bootstrap::create_org(store.as_ref(), &SystemClock, &name).await?;
            print_org(json, &org.id.to_string(), &org.name, key.expose());
            Ok(())
        }
        Command::Migrate => {
            open_store(&config).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Client(_) => Err(Failure("client commands are run by client::main".into())),
    }
}

fn print_org(json: bool, org_id: &str, name: &str, root_key: &str) {
    if json {
        println!(
            "{}",
            serde_json::json!({ "org_id": org_id, "root_key": root_key })
        );
    } else {
        println!("Created org `{name}` ({org_id}).");
        println!("Root key (shown once, store it now):\n\n    {root_key}\n");
    }
}

/// Opens the configured store, creating the data dir (mode 0700) for the embedded one.
///
/// On PostgreSQL the data dir is still created (after the database answered, so a bad URL leaves
/// nothing behind): it holds the master key file and the bootstrap root key, which never go into
/// the database.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>, Failure> {
    if let Some(url) = &config.database_url {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let store = PostgresStore::connect(url).await.map_err(|e| {
                Failure(scrub_password(
                    url,
                    format!("cannot open PostgreSQL at {}: {e}", redact_url(url)),
                ))
            })?;
            create_private_dir(&config.data_dir)?;
            return Ok(Arc::new(store));
        }
        return Err(Failure(format!(
            "unsupported database URL `{}`: expected postgres://...",
            redact_url(url)
        )));
    }
    create_private_dir(&config.data_dir)?;
    let store = SqliteStore::open(&config.data_dir.join("keyward.db")).await?;
    Ok(Arc::new(store))
}

/// Removes the URL's password from a message, in case a driver error ever quotes it.
fn scrub_password(url: &str, msg: String) -> String {
    let password = url
        .find("://")
        .and_then(|s| {
            url.rfind('@')
                .filter(|at| *at > s)
                .map(|at| &url[s + 3..at])
        })
        .and_then(|userinfo| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => msg.replace(p, "***"),
        None => msg,
    }
}

/// Hides a password in a database URL before it is printed.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure(format!("cannot create data dir {}: {e}", dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// Writes a secret file readable by its owner only (0600), created before any byte is written.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| Failure(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The master key: `KEYWARD_MASTER_KEY` (32 bytes, standard base64) or `<data_dir>/master.key`,
/// created on first start.
fn master_key(data_dir: &Path) -> Result<MasterKey, Failure> {
    let decode = |text: &str, from: &str| -> Result<MasterKey, Failure> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| Failure(format!("{from} is not valid standard base64")))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| Failure(format!("{from} must decode to exactly 32 bytes")))?;
        Ok(MasterKey::from_bytes(arr))
    };
    if let Ok(v) = std::env::var("KEYWARD_MASTER_KEY") {
        return decode(&v, "KEYWARD_MASTER_KEY");
    }
    let path = data_dir.join("master.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => decode(&text, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            getrandom_fill(&mut bytes)?;
            let text = base64::engine::general_purpose::STANDARD.encode(bytes);
            write_private(&path, format!("{text}\n").as_bytes())?;
            tracing::info!(path = %path.display(), "created a new master key");
            Ok(MasterKey::from_bytes(bytes))
        }
        Err(e) => Err(Failure(format!("cannot read {}: {e}", path.display()))),
    }
}

fn getrandom_fill(buf: &mut [u8]) -> Result<(), Failure> {
    let s = keyward_core::token::random_base62(64).map_err(|e| Failure(e.to_string()))?;
    // Hash 64 unbiased base62 characters (~381 bits of OS randomness) down to the key bytes,
    // reusing the one CSPRNG path the token code already has.
    use sha2::Digest;
    let digest = sha2::Sha256::digest(s.as_bytes());
    buf.copy_from_slice(&digest[..buf.len()]);
    Ok(())
}

async fn serve(config: Config) -> Result<(), Failure> {
    // Handlers go in first: a SIGTERM that arrives once we have announced ourselves (or during
    // bootstrap) must trigger a graceful shutdown, never the default disposition (death by signal).
    let shutdown = shutdown_signal()?;
    // Bind before anything is created, so a taken port fails without bootstrapping an org whose
    // root key would be printed for nothing.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Failure(format!("cannot listen on {}: {e}", config.listen)))?;
    let store = open_store(&config).await?;
    let master_key = master_key(&config.data_dir)?;
    if store.first_org().await?.is_none() {
        let created =
            keyward_server::bootstrap::create_org(store.as_ref(), &SystemClock, "default").await;
        let (org, key) = match created {
            Ok(created) => created,
            // Several nodes started at once on an empty shared database: one created the org,
            // and its root key went to that node's data dir.
            Err(keyward_server::bootstrap::BootstrapError::NameTaken(_)) => {
                return serve_store(config, store, listener, shutdown, master_key).await;
            }
            Err(e) => return Err(e.into()),
        };
        let path = config.data_dir.join("root-key");
        write_private(&path, format!("{}\n", key.expose()).as_bytes())?;
        println!("Created org `default` ({}).", org.id);
        println!(
            "Root key (shown once; also written to {}):\n\n    {}\n",
            path.display(),
            key.expose()
        );
    }
    serve_store(config, store, listener, shutdown, master_key).await
}

/// Serves an opened, bootstrapped store until the shutdown signal.
async fn serve_store(
    config: Config,
    store: Arc<dyn Store>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    master_key: MasterKey,
) -> Result<(), Failure> {
    let rate_limit_backend = match &config.rate_limit_backend {
        config::RateLimitBackend::Local => keyward_server::RateLimitBackend::Local,
        config::RateLimitBackend::Redis(url) => {
            let limiter = keyward_server::redis_limiter::RedisLimiter::new(url)?;
            // Not fatal: the node decides locally until Redis answers (and says so).
            match limiter.connect().await {
                Ok(()) => tracing::info!("rate limits are shared through Redis"),
                Err(e) => tracing::warn!(
                    error = %e,
                    "Redis is unavailable at start; rate limits are local until it answers"
                ),
            }
            keyward_server::RateLimitBackend::Redis(Arc::new(limiter))
        }
    };
    let addr = listener.local_addr()?;
    println!("Keyward listening on http://{addr}");
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "keyward serving");
    let server_config = ServerConfig {
        trusted_proxies: config.trusted_proxies.clone(),
        master_key,
        clock: Arc::new(SystemClock),
        cache: config.cache,
        usage_flush_interval: config.usage_flush,
        failed_auth_limit: config.failed_auth_limit,
        rate_limit_backend,
    };
    let served = keyward_server::serve(server_config, store.clone(), listener, shutdown).await;
    // Checkpoint and close the database so the data file alone is complete after a stop.
    store.close().await;
    served?;
    tracing::info!("keyward stopped");
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers now and returns a future that resolves on either.
///
/// The handlers are registered before this returns (not on the future's first poll), so a signal
/// sent as soon as the listening line is printed is never lost to the default disposition.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Failure> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())
            .map_err(|e| Failure(format!("cannot install the SIGINT handler: {e}")))?;
        let mut terminate = signal(SignalKind::terminate())
            .map_err(|e| Failure(format!("cannot install the SIGTERM handler: {e}")))?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {},
                _ = terminate.recv() => {},
            }
            tracing::info!("shutdown signal received; draining requests");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutdown signal received; draining requests");
        })
    }
}
