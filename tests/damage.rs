//! A damaged store is never served silently (the contract's "A damaged
//! store"): real files of a real data dir are damaged, and the real binary
//! refuses to start (exit 2, one line naming the data dir and the damage)
//! without touching them, unless `serve --salvage`; a torn last write, which
//! a crash leaves, is not damage.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

fn write_config(dir: &Path, storage: &str) -> PathBuf {
    let path = dir.join("edge-sessions.toml");
    std::fs::write(
        &path,
        config_toml_with_storage(
            &dir.join("data"),
            1000,
            storage,
            // 300 creates in a row must not meet the create rate limit.
            "[rate_limits]\ncreate_per_second = 0\nread_per_second = 0\n",
        ),
    )
    .unwrap();
    path
}

/// Runs `serve` with `args`: its exit status if it stops by itself within
/// 20 s, `None` if it keeps running (it started and recovered; it is then
/// killed); and everything it logged.
fn run_serve(config: &Path, args: &[&str]) -> (Option<std::process::ExitStatus>, String) {
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(Stdio::null())
        .stderr(err.reopen().unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if let Some(status) = child.try_wait().unwrap() {
            return (Some(status), std::fs::read_to_string(err.path()).unwrap());
        }
        let log = std::fs::read_to_string(err.path()).unwrap();
        if log.contains("listening") && log.contains("recovery finished") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    (None, std::fs::read_to_string(err.path()).unwrap())
}

/// Path and SHA-256 of every file under `dir`.
fn digests(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(digests(&path));
        } else {
            out.push((
                path.clone(),
                Sha256::digest(std::fs::read(&path).unwrap()).to_vec(),
            ));
        }
    }
    out.sort();
    out
}

/// Flips one byte in seven over `len` bytes from `at`, as bit rot or a bad
/// copy would.
fn damage(path: &Path, at: u64, len: usize) {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut bytes = vec![0u8; len];
    file.seek(SeekFrom::Start(at)).unwrap();
    file.read_exact(&mut bytes).unwrap();
    for byte in bytes.iter_mut().step_by(7) {
        *byte ^= 0x5a;
    }
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&bytes).unwrap();
    file.sync_all().unwrap();
}

async fn create(client: &reqwest::Client, base: &str, count: usize) {
    for i in 0..count {
        let body = json!({"session_id": format!("d-{i}"), "edge_mcp_id": "edge", "metadata": {"pad": "x".repeat(200)}});
        let (status, body) = create_with(client, base, body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

async fn create_one(client: &reqwest::Client, base: &str, id: &str) {
    let (status, body) = create_id(client, base, id).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

async fn count(client: &reqwest::Client, base: &str, upto: usize) -> usize {
    let mut found = 0;
    for i in 0..upto {
        let (status, _) = call(
            client,
            base,
            Method::GET,
            &format!("/api/v1/sessions/d-{i}"),
            KEY_A,
            None,
        )
        .await;
        if status == StatusCode::OK {
            found += 1;
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sled_file_refuses_to_start_or_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let server = ChildServer::start(&config).await;
    let client = client();
    create(&client, &server.base, 300).await;
    assert_eq!(server.terminate().code(), Some(0));

    let db = dir.path().join("data/sled/db");
    let len = std::fs::metadata(&db).unwrap().len();
    damage(&db, len / 2 - 2048, 4096);
    let before = digests(&dir.path().join("data"));
    match run_serve(&config, &[]) {
        (Some(status), stderr) => {
            assert_eq!(status.code(), Some(2), "{stderr}");
            let line = stderr.lines().last().unwrap();
            assert!(
                line.contains("damaged")
                    && line.contains(&dir.path().join("data").display().to_string()),
                "{stderr}"
            );
            // Our own files are untouched; sled's recovery may have rewritten
            // its own before the damage showed (sled has no read-only open).
            let sled = dir.path().join("data/sled");
            let ours = |all: Vec<(PathBuf, Vec<u8>)>| -> Vec<_> {
                all.into_iter()
                    .filter(|(path, _)| !path.starts_with(&sled))
                    .collect()
            };
            assert_eq!(ours(digests(&dir.path().join("data"))), ours(before));
            // The operator accepts the loss.
            assert!(
                run_serve(&config, &["--salvage"]).0.is_none(),
                "salvage starts"
            );
        }
        (None, _) => {
            // sled did not need the damaged bytes: then nothing may be missing.
            let server = ChildServer::start(&config).await;
            assert_eq!(count(&client, &server.base, 300).await, 300);
        }
    }
}

/// Where a log segment's records end: the writer keeps zeros written ahead
/// of its last record, so the file is longer than what it holds.
fn written_len(segment: &std::path::Path) -> u64 {
    let bytes = std::fs::read(segment).unwrap();
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    assert!(end > 0, "the segment holds records");
    end as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_refuses_to_start_until_salvaged() {
    let dir = tempfile::tempdir().unwrap();
    // No checkpoint during the test: every change stays in the log.
    let config = write_config(dir.path(), "checkpoint_interval_ms = 60000");
    let server = ChildServer::start(&config).await;
    let client = client();
    create(&client, &server.base, 60).await;
    server.kill();

    let segment = dir.path().join("data/wal/00000000000000000001.log");
    let len = written_len(&segment);
    damage(&segment, len / 3, 4096);
    let before = digests(&dir.path().join("data"));
    let (status, stderr) = run_serve(&config, &[]);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    let line = stderr.lines().last().unwrap();
    assert!(
        line.contains("damaged record") && line.contains("--salvage"),
        "{stderr}"
    );
    assert_eq!(
        digests(&dir.path().join("data")),
        before,
        "the files are left as they were"
    );

    // Salvage keeps what precedes the damage and says what was lost...
    let (status, stderr) = run_serve(&config, &["--salvage"]);
    assert!(status.is_none(), "salvage starts: {stderr}");
    assert!(
        stderr.contains("salvage") && stderr.contains("lost_changes"),
        "{stderr}"
    );
    // ...and leaves a store that starts normally.
    let server = ChildServer::start(&config).await;
    let found = count(&client, &server.base, 60).await;
    assert!(found > 0 && found < 60, "kept {found} of 60");
    create_one(&client, &server.base, "after-salvage").await;
    assert_eq!(server.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_write_is_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "checkpoint_interval_ms = 60000");
    let server = ChildServer::start(&config).await;
    let client = client();
    create(&client, &server.base, 20).await;
    server.kill();
    // The last record's end never reached the disk.
    let segment = dir.path().join("data/wal/00000000000000000001.log");
    let len = written_len(&segment);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let server = ChildServer::start(&config).await;
    assert_eq!(
        count(&client, &server.base, 20).await,
        19,
        "all but the torn record"
    );
    // The log goes on where the valid records end.
    create_one(&client, &server.base, "d-19").await;
    assert_eq!(server.terminate().code(), Some(0));
    let server = ChildServer::start(&config).await;
    assert_eq!(count(&client, &server.base, 20).await, 20);
    assert_eq!(server.terminate().code(), Some(0));
}
