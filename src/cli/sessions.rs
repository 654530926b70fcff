//! `edge-sessions sessions list|show|terminate`: find, inspect and end
//! sessions across tenants through the admin API.

use reqwest::Method;
use serde_json::{json, Value};

use super::output::{self, cell};
use super::remote::{encode, CliError, Client, Remote};

/// `edge-sessions sessions …`
#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    #[command(subcommand)]
    action: Action,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Search sessions across tenants, newest first.
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this user.
        #[arg(long)]
        user: Option<String>,
        /// Only this edge-mcp id.
        #[arg(long)]
        edge: Option<String>,
        /// Only this status (active, idle, expired, terminated).
        #[arg(long)]
        status: Option<String>,
        /// Only this client type (claude-code, ide, agent, cli).
        #[arg(long)]
        client_type: Option<String>,
        /// Sessions per page (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this cursor (printed under a page that has more).
        #[arg(long)]
        cursor: Option<String>,
        /// Follow the cursors to the end instead of printing one page.
        #[arg(long)]
        all: bool,
    },
    /// Print one session.
    Show {
        /// The session's tenant id.
        tenant: String,
        /// The session id.
        session_id: String,
    },
    /// End one session (TENANT SESSION_ID), or every live session of a
    /// user or an edge-mcp (--user / --edge, optionally --tenant).
    Terminate {
        /// The session's tenant id (one session), or with --user/--edge
        /// use --tenant to narrow.
        tenant: Option<String>,
        /// The session id (one session).
        session_id: Option<String>,
        /// Every live session of this user.
        #[arg(long, conflicts_with = "session_id")]
        user: Option<String>,
        /// Every live session of this edge-mcp.
        #[arg(long, conflicts_with = "session_id")]
        edge: Option<String>,
        /// Only sessions of this tenant (with --user/--edge).
        #[arg(long = "tenant", conflicts_with = "session_id")]
        only_tenant: Option<String>,
        /// Why (default admin_request).
        #[arg(long)]
        reason: Option<String>,
    },
}

impl SessionsArgs {
    /// Runs the command.
    pub async fn run(self) -> Result<(), CliError> {
        let client = Client::new(&self.remote)?;
        let as_json = self.remote.json;
        match self.action {
            Action::List {
                tenant,
                user,
                edge,
                status,
                client_type,
                limit,
                mut cursor,
                all,
            } => {
                let mut filters = Vec::new();
                for (name, value) in [
                    ("tenant_id", tenant),
                    ("user_id", user),
                    ("edge_mcp_id", edge),
                    ("status", status),
                    ("client_type", client_type),
                ] {
                    if let Some(value) = value {
                        filters.push(format!("{name}={}", encode(&value)));
                    }
                }
                filters.push(format!("limit={limit}"));
                let mut sessions = Vec::new();
                let next = loop {
                    let mut query = filters.clone();
                    if let Some(cursor) = &cursor {
                        query.push(format!("cursor={}", encode(cursor)));
                    }
                    let path = format!("/admin/sessions?{}", query.join("&"));
                    let page = client.json(Method::GET, &path, None).await?;
                    sessions.extend(page["sessions"].as_array().cloned().unwrap_or_default());
                    let next = page["next_cursor"].as_str().map(str::to_owned);
                    match next {
                        Some(next) if all => cursor = Some(next),
                        other => break other,
                    }
                };
                if as_json {
                    output::json(&json!({
                        "sessions": sessions,
                        "count": sessions.len(),
                        "next_cursor": next,
                    }));
                } else {
                    print_list(&sessions);
                    if let Some(next) = next {
                        println!("more: --cursor {next}");
                    }
                }
            }
            Action::Show { tenant, session_id } => {
                let path = format!(
                    "/admin/tenants/{}/sessions/{}",
                    encode(&tenant),
                    encode(&session_id)
                );
                let session = client.json(Method::GET, &path, None).await?;
                if as_json {
                    output::json(&session);
                } else {
                    print_one(&session);
                }
            }
            Action::Terminate {
                tenant,
                session_id,
                user,
                edge,
                only_tenant,
                reason,
            } => {
                let answer = if user.is_some() || edge.is_some() {
                    if tenant.is_some() {
                        return Err(CliError::Usage(
                            "with --user or --edge, narrow by --tenant, not a positional tenant"
                                .to_owned(),
                        ));
                    }
                    let mut body = json!({});
                    for (name, value) in [
                        ("user_id", user),
                        ("edge_mcp_id", edge),
                        ("tenant_id", only_tenant),
                        ("reason", reason),
                    ] {
                        if let Some(value) = value {
                            body[name] = Value::String(value);
                        }
                    }
                    client
                        .json(Method::POST, "/admin/sessions/terminate", Some(&body))
                        .await?
                } else {
                    let (Some(tenant), Some(session_id)) = (tenant, session_id) else {
                        return Err(CliError::Usage(
                            "give TENANT SESSION_ID, or --user / --edge for every session of a user or an edge".to_owned(),
                        ));
                    };
                    let path = format!(
                        "/admin/tenants/{}/sessions/{}",
                        encode(&tenant),
                        encode(&session_id)
                    );
                    let body = reason.map(|reason| json!({ "reason": reason }));
                    client.send(Method::DELETE, &path, body.as_ref()).await?;
                    json!({ "terminated": session_id })
                };
                if as_json {
                    output::json(&answer);
                } else {
                    match &answer["terminated"] {
                        Value::Number(n) => println!("terminated {n} live session(s)"),
                        other => println!("terminated {} (or it had ended already)", cell(other)),
                    }
                }
            }
        }
        Ok(())
    }
}

fn print_list(sessions: &[Value]) {
    output::table(
        &[
            "tenant", "session", "status", "user", "edge", "client", "created", "tools",
        ],
        sessions.iter().map(|s| {
            vec![
                cell(&s["tenant_id"]),
                cell(&s["session_id"]),
                cell(&s["status"]),
                cell(&s["user_id"]),
                cell(&s["edge_mcp_id"]),
                cell(&s["client_type"]),
                cell(&s["created_at"]),
                cell(&s["tool_execution_count"]),
            ]
        }),
    );
}

fn print_one(session: &Value) {
    let rows = session
        .as_object()
        .map(|fields| {
            fields
                .iter()
                .map(|(name, value)| vec![name.clone(), cell(value)])
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    output::table(&["field", "value"], rows);
}
