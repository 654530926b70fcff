//! Expiry through the real HTTP port: idle timeout, absolute ttl, the idle
//! status and the cleanup endpoint. Time is jumped with the engine's clock
//! where possible; the few real timers use one-second timeouts.

mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn create(server: &TestServer, id: &str, idle_timeout: u64, ttl: u64) {
    let body =
        json!({"session_id": id, "edge_mcp_id": "e", "idle_timeout": idle_timeout, "ttl": ttl});
    let (status, body) = server
        .call(Method::POST, "/api/v1/sessions", KEY_A, Some(body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

async fn get(server: &TestServer, id: &str) -> serde_json::Value {
    let (status, body) = server
        .call(Method::GET, &format!("/api/v1/sessions/{id}"), KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Polls until the session has `status` (timers fire on their own).
async fn wait_for_status(server: &TestServer, id: &str, status: &str) -> serde_json::Value {
    for _ in 0..300 {
        let body = get(server, id).await;
        if body["status"] == status {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{id} never became {status}: {}", get(server, id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_expires_a_quiet_session_by_its_own_timer() {
    let server = TestServer::start_with(1, "").await;
    create(&server, "quiet", 1, 3600).await;
    let ended = wait_for_status(&server, "quiet", "expired").await;
    assert_eq!(ended["termination_reason"], "idle_timeout");
    assert_eq!(ended["is_expired"], true);
    assert_eq!(ended["version"], 2);
    assert_eq!(
        ended["terminated_at"], ended["expires_at"],
        "ended at the instant it was due"
    );
    let (status, body) = server
        .call(Method::POST, "/api/v1/sessions/quiet/activity", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::GONE);
    assert_eq!(body["code"], "session_expired");
    // The expired session freed the tenant's only slot.
    create(&server, "next", 3600, 3600).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_hold_off_the_idle_timeout_but_not_the_ttl() {
    let server = TestServer::start().await;
    create(&server, "beating", 2, 3).await;
    // Ten beats 250 ms apart outlive the 2 s idle timeout with margin to spare.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (status, _) = server
            .call(
                Method::POST,
                "/api/v1/sessions/beating/activity",
                KEY_A,
                None,
            )
            .await;
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "kept alive past its 2 s idle timeout"
        );
    }
    assert_eq!(get(&server, "beating").await["status"], "active");
    let ended = wait_for_status(&server, "beating", "expired").await;
    assert_eq!(ended["termination_reason"], "ttl_expired");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_restarts_the_lifetime() {
    let server = TestServer::start().await;
    create(&server, "fresh", 3600, 100).await;
    let before = get(&server, "fresh").await;
    server.clock.advance(Duration::from_secs(90));
    assert_eq!(
        get(&server, "fresh").await["should_refresh"],
        true,
        "80 % of the lifetime has passed"
    );
    let (status, refreshed) = server
        .call(Method::POST, "/api/v1/sessions/fresh/refresh", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(refreshed["should_refresh"], false);
    assert_ne!(refreshed["expires_at"], before["expires_at"]);
    server.clock.advance(Duration::from_secs(50));
    let (_, cleaned) = server
        .call(Method::POST, "/admin/sessions/cleanup", ADMIN_KEY, None)
        .await;
    assert_eq!(
        cleaned["expired"], 0,
        "140 s after creation, 50 s after the refresh"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_turn_idle_and_back_to_active() {
    let server = TestServer::start_with(1000, "[sessions]\nidle_after_seconds = 1").await;
    create(&server, "dozy", 3600, 3600).await;
    let idle = wait_for_status(&server, "dozy", "idle").await;
    assert_eq!(idle["version"], 2, "a status change is a version");
    let (_, metrics) = server
        .call(Method::GET, "/api/v1/sessions/metrics", KEY_A, None)
        .await;
    assert_eq!(
        (
            metrics["active_sessions"].as_u64(),
            metrics["idle_sessions"].as_u64()
        ),
        (Some(0), Some(1))
    );
    let (status, _) = server
        .call(Method::POST, "/api/v1/sessions/dozy/activity", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let active = get(&server, "dozy").await;
    assert_eq!(active["status"], "active");
    assert_eq!(active["version"], 3);
    // And it goes idle again: the timer was re-armed for the earlier deadline.
    wait_for_status(&server, "dozy", "idle").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_expires_every_overdue_session_now() {
    let server = TestServer::start().await;
    for i in 0..5 {
        create(&server, &format!("old-{i}"), 60, 3600).await;
    }
    create(&server, "long-lived", 7200, 7200).await;
    let (status, _) = server
        .call(Method::POST, "/admin/sessions/cleanup", ADMIN_KEY, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    // Jump past the 60 s idle timeout; the real timers are still far away.
    server.clock.advance(Duration::from_secs(120));
    let (status, cleaned) = server
        .call(Method::POST, "/admin/sessions/cleanup", ADMIN_KEY, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cleaned["expired"], 5);
    for i in 0..5 {
        let ended = get(&server, &format!("old-{i}")).await;
        assert_eq!(ended["status"], "expired");
        assert_eq!(ended["termination_reason"], "idle_timeout");
    }
    assert_eq!(get(&server, "long-lived").await["status"], "active");
    let (_, again) = server
        .call(Method::POST, "/admin/sessions/cleanup", ADMIN_KEY, None)
        .await;
    assert_eq!(again["expired"], 0);
    let (_, active) = server
        .call(Method::GET, "/api/v1/sessions/active", KEY_A, None)
        .await;
    assert_eq!(active["count"], 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_acts_on_an_overdue_session_before_its_timer_fires() {
    let server = TestServer::start().await;
    for id in [
        "late-beat",
        "late-tool",
        "late-patch",
        "late-delete",
        "late-read",
    ] {
        create(&server, id, 60, 3600).await;
    }
    // Past the idle timeout on the engine's clock; the real timers are a
    // minute away, so every answer below comes from the overdue check.
    server.clock.advance(Duration::from_secs(61));
    let calls = [
        (Method::POST, "/api/v1/sessions/late-beat/activity", None),
        (
            Method::POST,
            "/api/v1/sessions/late-tool/tools/execute",
            Some(json!({"tool_name": "t"})),
        ),
        (
            Method::PATCH,
            "/api/v1/sessions/late-patch",
            Some(json!({"initialized": true})),
        ),
    ];
    for (method, path, body) in calls {
        let (status, body) = server.call(method, path, KEY_A, body).await;
        assert_eq!(status, StatusCode::GONE, "{path}");
        assert_eq!(body["code"], "session_expired", "{path}");
    }
    let (status, _) = server
        .call(Method::DELETE, "/api/v1/sessions/late-delete", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let deleted = get(&server, "late-delete").await;
    assert_eq!(
        deleted["status"], "expired",
        "it had already expired when DELETE came"
    );
    let read = get(&server, "late-read").await;
    assert_eq!(read["status"], "expired");
    assert_eq!(read["termination_reason"], "idle_timeout");
    assert_eq!(get(&server, "late-tool").await["tool_execution_count"], 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_sessions_are_purged_after_retention() {
    let server = TestServer::start_with(
        1000,
        "[sessions]\nretention_seconds = 60\nsweep_interval_seconds = 1",
    )
    .await;
    create(&server, "gone-soon", 3600, 3600).await;
    let (status, _) = server
        .call(Method::DELETE, "/api/v1/sessions/gone-soon", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(get(&server, "gone-soon").await["status"], "terminated");
    server.clock.advance(Duration::from_secs(61));
    for _ in 0..300 {
        let (status, _) = server
            .call(Method::GET, "/api/v1/sessions/gone-soon", KEY_A, None)
            .await;
        if status == StatusCode::NOT_FOUND {
            // The id is free again once the old session is purged.
            create(&server, "gone-soon", 3600, 3600).await;
            server.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the final session was never purged");
}

/// Live sessions of tenant A as `/admin/stats` counts them: the actors in
/// its directory, asking none of them anything (a session's own reads and
/// its tenant's metrics check it for being overdue). Not the
/// `sessions_active` gauge: the metrics recorder is global to the process,
/// and the other tests' servers set the same tenant's gauge.
async fn live_count(server: &TestServer) -> u64 {
    let (status, stats) = server
        .call(Method::GET, "/admin/stats", ADMIN_KEY, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    stats["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant_id"] == TENANT_A)
        .unwrap_or_else(|| panic!("tenant A is not in {stats}"))["live_sessions"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_wall_clock_jumps_the_sweep_expires_and_rearms_with_no_call() {
    let server = TestServer::start_with(1000, "[sessions]\nsweep_interval_seconds = 1").await;
    create(&server, "overdue", 60, 3600).await;
    create(&server, "nearly", 120, 3600).await;
    assert_eq!(live_count(&server).await, 2);
    // "overdue" is past its idle timeout, "nearly" 2 s short of its own; both
    // timers still count a minute or more of real time.
    server.clock.advance(Duration::from_secs(118));
    // Neither is called: the sweep notices the jump, expires "overdue" and
    // re-arms the timer of "nearly", which then fires 2 s later.
    let live = poll(async || live_count(&server).await, |n| *n == 0).await;
    assert_eq!(live, 0, "both ended with no call");
    let overdue = get(&server, "overdue").await;
    assert_eq!(overdue["termination_reason"], "idle_timeout");
    let nearly = get(&server, "nearly").await;
    assert_eq!(nearly["termination_reason"], "idle_timeout");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_jump_a_session_that_turns_idle_rearms_for_its_idle_timeout() {
    let server = TestServer::start_with(
        1000,
        "[sessions]\nsweep_interval_seconds = 1\nidle_after_seconds = 60",
    )
    .await;
    create(&server, "dozing", 78, 3600).await;
    // Past idle_after (its timer is armed for it, a minute of real time
    // away), 2 s short of the idle timeout: the sweep turns it idle and must
    // re-arm for the timeout, not keep the timer from before the jump.
    server.clock.advance(Duration::from_secs(76));
    let live = poll(async || live_count(&server).await, |n| *n == 0).await;
    assert_eq!(live, 0, "it idled out with no call");
    let ended = get(&server, "dozing").await;
    assert_eq!(ended["termination_reason"], "idle_timeout");
    server.stop().await;
}
