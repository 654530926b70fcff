//! Process-wide counters the dashboard's history is sampled from: answers
//! by status class, tool executions (in total and per tool name), open
//! session WebSockets. Each is one relaxed atomic add where it happens (a
//! tool's own counter is found in a sharded map; names past
//! [`MAX_TOOL_NAMES`] count under `(other)`, so clients cannot grow it
//! without bound).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;

use dashmap::DashMap;

/// Distinct tool names counted on their own.
pub const MAX_TOOL_NAMES: usize = 256;
/// Where tool names past [`MAX_TOOL_NAMES`] are counted.
pub const OTHER_TOOLS: &str = "(other)";

/// Answers by status class: index 0 for 1xx … 4 for 5xx.
static ANSWERS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static TOOL_EXECUTIONS: AtomicU64 = AtomicU64::new(0);
static WEBSOCKETS_OPEN: AtomicI64 = AtomicI64::new(0);

fn tools() -> &'static DashMap<Box<str>, AtomicU64> {
    static TOOLS: OnceLock<DashMap<Box<str>, AtomicU64>> = OnceLock::new();
    TOOLS.get_or_init(DashMap::new)
}

/// Counts an answer with HTTP status `status`.
pub fn answered(status: u16) {
    if let Some(class) = ANSWERS.get(usize::from(status / 100).wrapping_sub(1)) {
        class.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts a tool execution of `tool`.
pub fn tool_executed(tool: &str) {
    TOOL_EXECUTIONS.fetch_add(1, Ordering::Relaxed);
    let tools = tools();
    if let Some(count) = tools.get(tool) {
        count.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let name = if tools.len() < MAX_TOOL_NAMES {
        tool
    } else {
        OTHER_TOOLS
    };
    tools
        .entry(name.into())
        .or_insert_with(|| AtomicU64::new(0))
        .fetch_add(1, Ordering::Relaxed);
}

/// A session WebSocket opened (`1`) or closed (`-1`).
pub fn websockets(change: i64) {
    WEBSOCKETS_OPEN.fetch_add(change, Ordering::Relaxed);
}

/// The counters now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Answers by status class (1xx … 5xx).
    pub answers: [u64; 5],
    /// Tool executions recorded.
    pub tool_executions: u64,
    /// Open session WebSockets.
    pub websockets_open: i64,
}

/// Reads the counters.
pub fn counters() -> Counters {
    Counters {
        answers: std::array::from_fn(|i| ANSWERS[i].load(Ordering::Relaxed)),
        tool_executions: TOOL_EXECUTIONS.load(Ordering::Relaxed),
        websockets_open: WEBSOCKETS_OPEN.load(Ordering::Relaxed),
    }
}

/// The `n` tools with the most executions since the start, most first.
pub fn top_tools(n: usize) -> Vec<(String, u64)> {
    let mut all: Vec<(String, u64)> = tools()
        .iter()
        .map(|e| (e.key().to_string(), e.value().load(Ordering::Relaxed)))
        .collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_class_and_by_tool() {
        let before = counters();
        answered(204);
        answered(503);
        answered(999);
        tool_executed("live-test-grep");
        tool_executed("live-test-grep");
        let after = counters();
        assert_eq!(after.answers[1] - before.answers[1], 1);
        assert_eq!(after.answers[4] - before.answers[4], 1);
        assert!(after.tool_executions - before.tool_executions >= 2);
        assert!(top_tools(MAX_TOOL_NAMES + 1)
            .iter()
            .any(|(name, count)| name == "live-test-grep" && *count == 2));
    }
}
