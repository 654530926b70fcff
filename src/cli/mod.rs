//! The operator's command line beyond `serve`: restoring a backup into an
//! empty data dir (offline, [`restore`]), and the commands that drive a
//! running server through its admin API ([`remote`]): [`sessions`] to find,
//! inspect and end sessions, [`stats`] for a live view, and backup and
//! export to files ([`transfer`]). The server and admin key come from
//! `--url` / `--admin-key` or `EDGE_SESSIONS_URL` / `EDGE_SESSIONS_ADMIN_KEY`;
//! output is a table ([`output`]), or JSON with `--json`. Long operations
//! report their progress as a bar on a terminal and as periodic lines
//! otherwise ([`progress`]).

pub mod output;
pub mod progress;
pub mod remote;
pub mod restore;
pub mod sessions;
pub mod stats;
pub mod transfer;
