//! `edge-sessions backup FILE` and `edge-sessions export`: streams from the
//! admin API to a file (or stdout), with progress on stderr.
//!
//! A backup is written to `FILE.partial` and renamed only once it is whole
//! and checked (every frame, the trailer), so `FILE` is never a backup cut
//! short.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use reqwest::Method;

use super::progress::Progress;
use super::remote::{encode, CliError, Client, Remote};
use crate::persist::backup;

/// `edge-sessions backup FILE`
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Where the backup goes (written whole or not at all).
    file: PathBuf,
    #[command(flatten)]
    remote: Remote,
}

/// `edge-sessions export`
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Only sessions created at or after this instant (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Only this tenant's sessions.
    #[arg(long)]
    tenant: Option<String>,
    /// `csv` or `ndjson`.
    #[arg(long, default_value = "csv", value_parser = ["csv", "ndjson"])]
    format: String,
    /// Write here instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
    #[command(flatten)]
    remote: Remote,
}

impl BackupArgs {
    /// Runs the command.
    pub async fn run(self) -> Result<(), CliError> {
        let client = Client::new(&self.remote)?;
        let partial = partial_path(&self.file);
        let written = download(&client, "/admin/backup", Some(&partial), "backup").await;
        let checked = written.and_then(|_| {
            let file = std::fs::File::open(&partial).map_err(|e| io(&partial, e))?;
            backup::verify(std::io::BufReader::new(file), |_| {})
                .map_err(|e| CliError::Io(format!("the backup received is not whole: {e}")))
        });
        let counts = match checked {
            Ok(counts) => counts,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        std::fs::rename(&partial, &self.file).map_err(|e| io(&self.file, e))?;
        if self.remote.json {
            println!(
                "{}",
                serde_json::json!({
                    "file": self.file,
                    "sessions": counts.sessions,
                    "executions": counts.executions,
                })
            );
        } else {
            println!(
                "{}: {} sessions and {} executions",
                self.file.display(),
                counts.sessions,
                counts.executions
            );
        }
        Ok(())
    }
}

impl ExportArgs {
    /// Runs the command.
    pub async fn run(self) -> Result<(), CliError> {
        let client = Client::new(&self.remote)?;
        let mut query = vec![format!("format={}", self.format)];
        if let Some(since) = &self.since {
            query.push(format!("since={}", encode(since)));
        }
        if let Some(tenant) = &self.tenant {
            query.push(format!("tenant_id={}", encode(tenant)));
        }
        let path = format!("/admin/sessions/export?{}", query.join("&"));
        download(&client, &path, self.output.as_deref(), "export").await?;
        Ok(())
    }
}

/// Streams `path` into `file` (stdout when `None`), reporting the bytes.
async fn download(
    client: &Client,
    path: &str,
    file: Option<&Path>,
    what: &'static str,
) -> Result<u64, CliError> {
    let mut response = client.send(Method::GET, path, None).await?;
    let mut sink: Box<dyn std::io::Write> = match file {
        Some(file) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(file).map_err(|e| io(file, e))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let target = file.map_or_else(|| "stdout".to_owned(), |f| f.display().to_string());
    let mut progress = Progress::start(what, response.content_length());
    let mut written = 0u64;
    let result = async {
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| CliError::Io(format!("GET {path}: the stream broke off: {e}")))?
        {
            sink.write_all(&chunk)
                .map_err(|e| CliError::Io(format!("writing {target}: {e}")))?;
            written += chunk.len() as u64;
            progress.update(written, || format!("to {target}"));
        }
        sink.flush()
            .map_err(|e| CliError::Io(format!("writing {target}: {e}")))
    }
    .await;
    match result {
        Ok(()) => {
            progress.finish(&format!("{written} bytes to {target}"));
            Ok(written)
        }
        Err(e) => {
            progress.abandon();
            Err(e)
        }
    }
}

fn partial_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn io(path: &Path, e: std::io::Error) -> CliError {
    CliError::Io(format!("{}: {e}", path.display()))
}
