//! A throwaway PostgreSQL server for the tests: `initdb` + `pg_ctl` in a
//! temp dir on a free port, run as the unprivileged `postgres` user when the
//! tests run as root (PostgreSQL refuses to run as root).
//!
//! With `DATABASE_URL` set, [`TempPostgres::start`] creates a fresh database
//! on that server instead; tests that stop and start the server use
//! [`TempPostgres::start_own`], which always runs its own.
//!
//! When neither is available the tests fail with a message saying what to
//! install: they never pass without having run.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MISSING: &str = "PostgreSQL server binaries (initdb, pg_ctl) not found: install the \
     distribution's `postgresql` package (Debian: apt-get install postgresql), put its bin \
     directory on PATH, or set DATABASE_URL to a server the tests may create databases on";

/// A PostgreSQL server (or database) that lives as long as this value.
pub struct TempPostgres {
    /// Connection URL of the test database.
    pub url: String,
    own: Option<OwnServer>,
}

struct OwnServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    run_as: Option<String>,
}

impl TempPostgres {
    /// A fresh database: on `DATABASE_URL`'s server when set, else on a
    /// server of its own.
    pub fn start() -> Self {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Self::on_shared_server(&url),
            _ => Self::start_own(),
        }
    }

    /// A server of its own (the tests may stop and start it).
    pub fn start_own() -> Self {
        Self::start_own_with(&["-c", "fsync=off", "-c", "synchronous_commit=off"])
    }

    /// A server of its own with durable commits (fsync and synchronous
    /// commit on), as in production; for benchmarks.
    pub fn start_own_durable() -> Self {
        Self::start_own_with(&[])
    }

    fn start_own_with(settings: &[&str]) -> Self {
        let bin = find_bin_dir().unwrap_or_else(|| panic!("{MISSING}"));
        let dir = tempfile::Builder::new()
            .prefix("edge-pg-")
            .tempdir()
            .unwrap();
        let run_as = running_as_root().then(|| "postgres".to_owned());
        if let Some(user) = &run_as {
            chown_to(dir.path(), user);
        }
        let port = free_port();
        let server = OwnServer {
            bin,
            dir,
            port,
            run_as,
        };
        let data = server.data_dir();
        let out = server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=50",
            server.dir.path().display()
        );
        for pair in settings.chunks(2) {
            options.push_str(&format!(" {} {}", pair[0], pair[1]));
        }
        std::fs::write(server.dir.path().join("options"), &options).unwrap();
        server.start();
        TempPostgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            own: Some(server),
        }
    }

    fn on_shared_server(url: &str) -> Self {
        let name = format!("edge_test_{}", uuid::Uuid::new_v4().simple());
        let admin = url.to_owned();
        let create = name.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("DATABASE_URL: cannot connect: {e}"));
                sqlx::query(&format!("CREATE DATABASE {create}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            });
        })
        .join()
        .unwrap();
        let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
        TempPostgres {
            url: format!("{base}/{name}"),
            own: None,
        }
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&self) {
        let server = self.own.as_ref().expect("only an own server is stopped");
        let out = server.run(
            "pg_ctl",
            &[
                "-D",
                server.data_dir().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert!(out.status.success(), "pg_ctl stop failed: {out:?}");
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&self) {
        self.own
            .as_ref()
            .expect("only an own server is restarted")
            .start();
    }

    /// The processes of an own server (the postmaster and its children, the
    /// backends among them), for a benchmark that counts the CPU they use;
    /// empty for a database on a shared server.
    pub fn pids(&self) -> Vec<u32> {
        let Some(server) = &self.own else {
            return Vec::new();
        };
        let Some(postmaster) = std::fs::read_to_string(server.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
        else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Field 4 of /proc/<pid>/stat, after the parenthesised name.
            let parent = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if parent == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Runs `psql -c sql` against the test database; answers its stdout.
    pub fn psql(&self, sql: &str) -> String {
        let psql = self
            .own
            .as_ref()
            .map(|s| s.bin.join("psql"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let out = Command::new(psql)
            .args([
                &self.url,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs (package postgresql-client)");
        assert!(
            out.status.success(),
            "psql -c {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The first column of the first row of `sql`, as an integer.
    pub fn scalar(&self, sql: &str) -> i64 {
        let out = self.psql(sql);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{sql:?} gave {out:?}"))
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if let Some(server) = &self.own {
            // Immediate: nothing to keep; ignore a server already stopped.
            let _ = server.run(
                "pg_ctl",
                &[
                    "-D",
                    server.data_dir().to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
        }
    }
}

impl OwnServer {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start(&self) {
        let options = std::fs::read_to_string(self.dir.path().join("options")).unwrap();
        let log = self.dir.path().join("server.log");
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let program = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
    }
}

/// The directory holding `initdb` and `pg_ctl`: PATH first, then the
/// Debian layout (`/usr/lib/postgresql/<version>/bin`, newest first).
pub fn find_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    });
    if let Some(dir) = on_path {
        // A symlink on PATH (e.g. /usr/local/bin/initdb): use its real
        // directory, where the server binary lives too.
        return std::fs::canonicalize(dir.join("initdb"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .or(Some(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_to(path: &Path, user: &str) {
    let out = Command::new("chown")
        .args([user, path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chown {user} {}: {} (PostgreSQL refuses to run as root and needs the `{user}` user the package creates)",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
