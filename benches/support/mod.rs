//! What the load drivers (`compare`, `scale`) share: the child processes
//! they start and clean up, finding tools and ports, and a raw HTTP/1.1
//! call. Included by each with `#[path]`; each uses part of it.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

/// The full path of `tool` on `PATH`, if there.
pub fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// A free TCP port on 127.0.0.1 (bound, read, released; the child binds it
/// a moment later, which is race-free enough on a bench machine).
pub fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// A Lua string literal (long brackets: no escaping needed for JSON).
pub fn lua_str(text: &str) -> String {
    assert!(!text.contains("]==]"), "not representable as a long string");
    format!("[==[{text}]==]")
}

/// A one-shot HTTP/1.1 request with the API key (Connection: close):
/// answers the status and the body. Only for control calls, not for load.
pub fn http_call(
    api_key: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let request = http_request(api_key, addr, method, path, body.unwrap_or(""), false);
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send {method} {path}: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read {method} {path} (limit {timeout:?}): {e}"))?;
    let status = status_of(&answer).ok_or_else(|| format!("not an HTTP answer: {answer:?}"))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// An HTTP/1.1 request with a JSON `body` and the API key; the connection
/// stays open after it when `keep_alive`.
pub fn http_request(
    api_key: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    keep_alive: bool,
) -> String {
    let close = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {api_key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{close}\r\n{body}",
        body.len()
    )
}

/// The status code of an HTTP answer (its status line's second word).
pub fn status_of(answer: &str) -> Option<u16> {
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// What a SIGINT / SIGTERM handler must clean up (it cannot reach the
/// guards): the ids of the live children and the temp dir.
pub static CLEANUP: Mutex<(Vec<u32>, Option<PathBuf>)> = Mutex::new((Vec::new(), None));

/// On SIGINT or SIGTERM (the guards do not run then): kills every live
/// child, removes the temp dir and exits 130.
pub fn clean_up_on_signal(runtime: &tokio::runtime::Runtime, bench: &'static str) {
    runtime.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let (pids, dir) = std::mem::take(&mut *CLEANUP.lock().unwrap_or_else(|e| e.into_inner()));
        for pid in pids {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        if let Some(dir) = dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!("{bench}: interrupted; children killed");
        std::process::exit(130);
    });
}

/// Owns a child process and kills it when dropped: on normal exit, on an
/// early return and on a panic (unwinding runs this).
pub struct ChildGuard {
    pub name: String,
    pub child: Child,
}

impl ChildGuard {
    pub fn spawn(name: &str, command: &mut Command) -> Result<Self, String> {
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        if let Ok(mut cleanup) = CLEANUP.lock() {
            cleanup.0.push(child.id());
        }
        Ok(ChildGuard {
            name: name.to_owned(),
            child,
        })
    }

    /// Fails when the child has already exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{} exited unexpectedly: {status}", self.name)),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }

    /// Sends `signal` to the child (when it still runs).
    pub fn signal(&mut self, signal: libc::c_int) -> Result<(), String> {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return Err(format!("{} is not running", self.name));
        }
        let pid = libc::pid_t::try_from(self.child.id()).map_err(|e| e.to_string())?;
        // SAFETY: kill(2) on our own, not yet reaped child.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(format!(
                "kill {}: {}",
                self.name,
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Ok(mut cleanup) = CLEANUP.lock() {
            let id = self.child.id();
            cleanup.0.retain(|pid| *pid != id);
        }
    }
}
