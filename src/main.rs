//! The `edge-sessions` binary: parse the command line, load config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_sessions::persist::postgres::Postgres;
use edge_sessions::persist::StoreError;
use edge_sessions::settings::Settings;
use edge_sessions::{auth, service, telemetry};

// mimalloc, not the system allocator: actors, sled and the flusher free on
// other threads than they allocate, where glibc malloc spent a fifth of the
// CPU in profiles; the engine bench measured 1.7x the throughput with it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Actor-based session engine for MCP edge clients.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve {
        /// A TOML file layered over the built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start from what can be read of a damaged store, logging what
        /// was lost (without it, a damaged store refuses to start).
        #[arg(long)]
        salvage: bool,
    },
    /// Print the sha256 hex of KEY, for a config file.
    HashKey {
        /// The key to hash; read from stdin when absent (keeps it out of
        /// shell history and `ps`).
        key: Option<String>,
    },
    /// Put a fresh master key in front of the keyring file (the configured
    /// `security.master_key_file`, or the development one in `data_dir`).
    /// Credentials sealed under the older keys stay readable; new ones use
    /// the new key once the server restarts.
    RotateKey {
        /// A TOML file layered over the built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Load a backup (from `GET /admin/backup` or `edge-sessions backup`)
    /// into an empty data dir, with no server running on it.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// A TOML file layered over the built-in defaults (its
        /// `storage.data_dir` is where the backup goes).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Find, inspect and end sessions across tenants (admin API).
    Sessions(edge_sessions::cli::sessions::SessionsArgs),
    /// A live view of the engine's figures, refreshed every second.
    Stats(edge_sessions::cli::stats::StatsArgs),
    /// Save a backup of every session to FILE (admin API).
    Backup(edge_sessions::cli::transfer::BackupArgs),
    /// Export sessions as CSV or NDJSON (admin API).
    Export(edge_sessions::cli::transfer::ExportArgs),
    /// Apply, revert or list the PostgreSQL migrations (schema `mcp`).
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
        /// A TOML file layered over the built-in defaults.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the last N applied migrations (one without N).
    Down {
        /// How many to revert.
        #[arg(default_value_t = 1)]
        steps: usize,
    },
    /// List the migrations and whether each is applied.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve {
        config: None,
        salvage: false,
    }) {
        Command::HashKey { key } => hash_key(key),
        Command::Serve { config, salvage } => serve(config, salvage),
        Command::Migrate { action, config } => migrate(action, config),
        Command::RotateKey { config } => rotate_key(config),
        Command::Restore { file, config } => restore(&file, config),
        Command::Sessions(args) => remote(args.run()),
        Command::Stats(args) => remote(args.run()),
        Command::Backup(args) => remote(args.run()),
        Command::Export(args) => remote(args.run()),
    }
}

/// Runs a command that drives a server through its admin API.
fn remote(
    command: impl std::future::Future<Output = Result<(), edge_sessions::cli::remote::CliError>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("edge-sessions: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-sessions: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn restore(file: &std::path::Path, config: Option<PathBuf>) -> ExitCode {
    let settings = match load(config.as_deref()) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    match edge_sessions::cli::restore::run(&settings, file) {
        Ok(counts) => {
            println!(
                "restored {} sessions and {} executions into {}",
                counts.sessions,
                counts.executions,
                settings.storage.data_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-sessions: restore: {e}");
            if e.is_refusal() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn hash_key(key: Option<String>) -> ExitCode {
    let key = match key {
        Some(key) => key,
        None => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("edge-sessions: hash-key: reading the key from stdin: {e}");
                return ExitCode::FAILURE;
            }
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if key.is_empty() {
        eprintln!("edge-sessions: hash-key: the key is empty (give it as an argument or on stdin)");
        return ExitCode::from(2);
    }
    println!("{}", auth::hash_key_hex(&key));
    ExitCode::SUCCESS
}

fn rotate_key(config: Option<PathBuf>) -> ExitCode {
    let settings = match load(config.as_deref()) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    if std::env::var(auth::master_key::MASTER_KEY_ENV).is_ok_and(|v| !v.trim().is_empty()) {
        eprintln!(
            "edge-sessions: the keyring comes from {}: put a new key (openssl rand -base64 32) in front of its list instead",
            auth::master_key::MASTER_KEY_ENV
        );
        return ExitCode::from(2);
    }
    let path = auth::master_key::keyring_path(&settings);
    match auth::master_key::rotate(&path) {
        Ok(keyring) => {
            println!(
                "{}: new master key {:08x} in front of {} older key(s); restart the server to use it",
                path.display(),
                keyring.current().id(),
                keyring.len() - 1
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-sessions: rotate-key: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(config: Option<&std::path::Path>) -> Result<Settings, ExitCode> {
    Settings::load(config).map_err(|e| {
        eprintln!("edge-sessions: {e}");
        ExitCode::from(2)
    })
}

fn migrate(action: MigrateAction, config: Option<PathBuf>) -> ExitCode {
    let settings = match load(config.as_deref()) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    if !settings.postgres.enabled() {
        eprintln!(
            "edge-sessions: postgres.url: not set; give it in the config file or as EDGE_SESSIONS__POSTGRES__URL"
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("edge-sessions: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let postgres = Postgres::new(&service::postgres_config(&settings))?;
        match action {
            MigrateAction::Up => {
                postgres.migrate_up().await?;
                println!("migrations applied");
            }
            MigrateAction::Down { steps } => {
                postgres.migrate_down(steps).await?;
                println!("reverted up to {steps} migration(s)");
            }
            MigrateAction::Status => {
                for (version, description, applied) in postgres.migrate_status().await? {
                    let state = if applied { "applied" } else { "pending" };
                    println!("{version:04} {description}: {state}");
                }
            }
        }
        postgres.pool().close().await;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-sessions: migrate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Option<PathBuf>, salvage: bool) -> ExitCode {
    let mut settings = match load(config.as_deref()) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    settings.storage.salvage = salvage;
    let data_dir = settings.storage.data_dir.clone();
    // Everything the server creates (the data dir, the log, sled's own
    // files, development keys) is its owner's only: 0700 dirs, 0600 files.
    // SAFETY: umask only sets the process's file mode mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    let log_writer = telemetry::init(&settings.log);
    // Requests are served on the engine's arbiters (one per core); this
    // runtime only accepts connections and runs background tasks, so one
    // worker is enough and no idle worker competes for the cores.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("edge-sessions: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(settings.server.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!("server.listen: cannot bind {}: {e}", settings.server.listen)
            })?;
        service::run(settings, listener, service::shutdown_signal()).await
    });
    if let Err(e) = &result {
        tracing::error!(
            error = format!("{e:#}"),
            "edge-sessions stopped with an error"
        );
    }
    // Every log line is out before the one-line summary below.
    drop(log_writer);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let damage = e.chain().find_map(|cause| match cause.downcast_ref() {
                Some(StoreError::Damaged(damage)) => Some(damage.clone()),
                _ => None,
            });
            if let Some(in_use) = e.chain().find_map(|cause| match cause.downcast_ref() {
                Some(in_use @ StoreError::InUse(_)) => Some(in_use.to_string()),
                _ => None,
            }) {
                eprintln!("edge-sessions: {in_use}");
                return ExitCode::FAILURE;
            }
            if let Some(refused) = e
                .chain()
                .find_map(|cause| cause.downcast_ref::<edge_sessions::settings::ConfigError>())
            {
                eprintln!("edge-sessions: {refused}");
                return ExitCode::from(2);
            }
            if let Some(damage) = damage {
                eprintln!(
                    "edge-sessions: the store in {} is damaged ({damage}); nothing was changed; `edge-sessions serve --salvage` starts from what can be read",
                    data_dir.display()
                );
                return ExitCode::from(2);
            }
            eprintln!("edge-sessions: {e:#}");
            ExitCode::FAILURE
        }
    }
}
