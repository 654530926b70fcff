//! The operator's command line beyond `serve`: restoring a backup into an
//! empty data dir (offline), and the commands that drive a running server
//! through its admin API. Long operations report their progress as a bar
//! on a terminal and as periodic lines otherwise ([`progress`]).

pub mod progress;
pub mod restore;
