//! The engine's unit tests.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::{session, Engine, EngineConfig, NewSession, SessionDefaults, TenantLimits};
use crate::crypto::Vault;
use crate::model::time::Clock;
use crate::model::{SessionError, ToolExecution};
use crate::settings::{Durability, Placement};

fn config(dir: &std::path::Path) -> EngineConfig {
    EngineConfig {
        data_dir: dir.to_owned(),
        durability: Durability::Sync,
        flush_interval: Duration::from_millis(5),
        max_batch: 1024,
        cache_capacity_bytes: 16 << 20,
        checkpoint_interval: Duration::from_secs(1),
        idle_after: Duration::from_secs(300),
        expiring_notice: Duration::from_secs(60),
        retention: Duration::from_secs(3600),
        sweep_interval: Duration::from_secs(3600),
        defaults: SessionDefaults {
            idle_timeout_seconds: 1800,
            ttl_seconds: 86_400,
        },
        tenants: vec![TenantLimits {
            id: Uuid::nil(),
            name: "t".into(),
            max_active_sessions: 10,
            max_ttl_seconds: 86_400,
            max_idle_timeout_seconds: 86_400,
        }],
        shards: 2,
        placement: Placement::Session,
        clock: Clock::system(),
        postgres: None,
        vault: Arc::new(Vault::ephemeral()),
        salvage: false,
        cluster: None,
        cluster_quota: None,
    }
}

fn execution() -> ToolExecution {
    ToolExecution {
        tool_name: "t".into(),
        tool_id: None,
        arguments: "null".into(),
        result: "null".into(),
        error: None,
        duration_ms: 1,
        tokens_used: 1,
        executed_at: 0,
        recorded_at: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_never_removes_a_session_recreated_under_the_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::system();
    let engine = Engine::start(EngineConfig {
        clock: clock.clone(),
        ..config(dir.path())
    })
    .unwrap();
    engine.recover().await.unwrap();
    let tenant = Uuid::nil();
    let request = |id: &str| NewSession {
        session_id: Some(id.into()),
        edge_mcp_id: "e".into(),
        ..NewSession::default()
    };
    for round in 0..20 {
        let id = format!("reused-{round}");
        engine.create(tenant, request(&id)).await.unwrap();
        engine.record_tool(tenant, &id, execution()).await.unwrap();
        engine
            .terminate(tenant, &id, None, crate::model::Requester::Client)
            .await
            .unwrap();
        clock.advance(Duration::from_secs(3601));
        assert_eq!(
            engine.get(tenant, &id).await.unwrap_err(),
            SessionError::NotFound,
            "past retention it is gone before the sweep runs"
        );
        // Race the retention purge against a create of the same id.
        let (purged, created) = tokio::join!(engine.purge(), engine.create(tenant, request(&id)));
        purged.unwrap();
        created.unwrap();
        engine.record_tool(tenant, &id, execution()).await.unwrap();
        engine.flush().await.unwrap();
        // The previous round's session may still be stopping (its actor
        // leaves the directory just after its final write), which makes
        // a purge skip it once; it goes on a later pass.
        let mut again = engine.purge().await.unwrap();
        for _ in 0..100 {
            if again == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            again = engine.purge().await.unwrap();
        }
        assert_eq!(again, 0, "nothing final is left to purge");
        let view = engine.get(tenant, &id).await.unwrap();
        assert_eq!((view.status, view.tool_execution_count), ("active", 1));
        let stored = engine.shared.store.session(tenant, &id).unwrap().unwrap();
        assert_eq!(
            stored.tool_execution_count, 1,
            "the new session's records survived"
        );
        assert_eq!(engine.executions(tenant, &id, 10).await.unwrap().len(), 1);
        // Free the slot for the next round (the test tenant allows 10).
        engine
            .terminate(tenant, &id, None, crate::model::Requester::Client)
            .await
            .unwrap();
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_served_before_recovery_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(config(dir.path())).unwrap();
    assert!(!engine.is_ready());
    let request = NewSession {
        edge_mcp_id: "e".into(),
        ..NewSession::default()
    };
    assert_eq!(
        engine
            .create(Uuid::nil(), request.clone())
            .await
            .unwrap_err(),
        SessionError::Unavailable
    );
    assert_eq!(
        engine.get(Uuid::nil(), "x").await.unwrap_err(),
        SessionError::Unavailable
    );
    engine.recover().await.unwrap();
    assert!(engine.is_ready());
    assert!(engine.create(Uuid::nil(), request).await.is_ok());
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_actor_is_restarted_from_its_last_durable_state() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(config(dir.path())).unwrap();
    engine.recover().await.unwrap();
    let tenant = Uuid::nil();
    for id in ["victim", "bystander"] {
        let request = NewSession {
            session_id: Some(id.into()),
            edge_mcp_id: "e".into(),
            ..NewSession::default()
        };
        engine.create(tenant, request).await.unwrap();
        engine.record_tool(tenant, id, execution()).await.unwrap();
    }
    let victim = engine
        .shared
        .directory(tenant)
        .get("victim")
        .unwrap()
        .clone();
    assert!(
        victim.send(session::Crash).await.is_err(),
        "the panic drops the reply"
    );
    // The supervisor restarts it asynchronously; wait for the new actor.
    for _ in 0..500 {
        let entry = engine
            .shared
            .directory(tenant)
            .get("victim")
            .map(|a| a.clone());
        if entry.is_some_and(|a| a.connected() && a != victim) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    // The other session on the same engine is untouched.
    assert_eq!(
        engine
            .record_tool(tenant, "bystander", execution())
            .await
            .unwrap(),
        2
    );
    // The victim comes back with its durable state and keeps working.
    let view = engine.get(tenant, "victim").await.unwrap();
    assert_eq!(view.tool_execution_count, 1);
    assert_eq!(view.status, "active");
    assert_eq!(engine.restarts(), 1);
    assert_eq!(
        engine
            .record_tool(tenant, "victim", execution())
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        engine.tenant_live_count(tenant).await.unwrap(),
        2,
        "no slot leaked or double-counted"
    );
    engine.shutdown().await;
}
