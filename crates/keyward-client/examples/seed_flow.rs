//! The seed flow, end to end: an operator creates an agent with scopes; the agent derives a
//! short-lived key for a sub-task, calls `me()` with it under a trace, narrows it further with
//! constraints; the operator rotates the agent's key and revokes the old one.
//!
//! Run it against a server with a root key:
//! `KEYWARD_BASE_URL=http://127.0.0.1:8470 KEYWARD_API_KEY=kw_rk_... KEYWARD_ORG_ID=...
//! cargo run -p keyward-client --example seed_flow`

use std::collections::BTreeMap;

use keyward_client::{proto, AgentClient, App, ClientConfig, Constraints, Error, TraceContext};
use uuid::Uuid;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = ClientConfig::from_env()?;
    let app = App::from_config(&config)?;
    let done = seed_flow(&app, &config.base_url).await?;
    println!("done: {done:?}");
    Ok(())
}

/// What the flow created, for a caller that wants to look further.
#[derive(Debug)]
pub struct SeedFlow {
    pub agent_id: Uuid,
    pub old_key_id: Uuid,
    pub new_key_id: Uuid,
    pub derived_key_id: Uuid,
}

pub async fn seed_flow(app: &App, base_url: &str) -> Result<SeedFlow, Error> {
    // Start clean: a previous run's agent is deleted (its name becomes free again).
    if let Some(old) = app.agents().get_by_name("seed-support-bot").await? {
        app.agents().delete(old.id).await?;
    }

    // 1. An agent with a per-provider scope allowlist. Its first key comes back once.
    let created = app
        .agents()
        .create(&proto::CreateAgentRequest {
            name: "seed-support-bot".into(),
            display_name: Some("Support bot".into()),
            scopes: Some(BTreeMap::from([
                (
                    "slack".into(),
                    vec!["chat:write".into(), "files:read".into()],
                ),
                ("keys".into(), vec!["derive".into()]),
            ])),
            ..Default::default()
        })
        .await?;
    let agent_key = created.api_key.clone().unwrap_or_default();
    let agent = AgentClient::new(base_url, &agent_key)?.with_agent_id(created.agent.id.to_string());

    // 2. Under a trace (run and thread recorded in the audit log of every call inside it), the
    //    agent derives a ten-minute key for a sub-task and the sub-task calls me() with it.
    let trace = TraceContext {
        run_id: Some("seed-run-1".into()),
        thread_id: Some("ticket-1001".into()),
        ..Default::default()
    };
    let (derived, worker) = agent
        .trace(trace, async {
            let derived = agent
                .keys()
                .derive(&proto::DeriveKeyRequest {
                    scopes: vec!["slack:chat:write".into(), "slack:files:read".into()],
                    expires_in: 600,
                    name: Some("ticket-1001".into()),
                    ..Default::default()
                })
                .await?;
            let worker =
                AgentClient::new(base_url, derived.api_key.as_deref().unwrap_or_default())?;
            let me = worker.me().await?;
            println!(
                "{} is calling with a {} key that expires at {:?}",
                me.body.agent.name, me.body.key.kind, me.body.key.expires_at
            );
            Ok::<_, Error>((derived, worker))
        })
        .await??;

    // 3. Narrower still, per request: this client's calls may only read files.
    let read_only = worker.with_constraints(Constraints {
        scopes: Some(vec!["slack:files:read".into()]),
        rule: None,
    })?;
    read_only.me().await?;
    // Constraints can only narrow: asking for a scope the key lacks is refused.
    let wider = worker.with_constraints(Constraints {
        scopes: Some(vec!["github:repo".into()]),
        rule: None,
    })?;
    match wider.me().await {
        Err(Error::ConstraintNotNarrowing(e)) => {
            println!("wider constraints refused: {}", e.message)
        }
        other => {
            return Err(Error::Config(format!(
                "expected CONSTRAINT_NOT_NARROWING, got {other:?}"
            )))
        }
    }

    // 4. Rotate the agent's key: the successor is live at once, the old key keeps working
    //    (deprecated) for the overlap.
    let rotated = app.keys().rotate(created.key.id, Some(7)).await?;
    let successor = AgentClient::new(base_url, rotated.api_key.as_deref().unwrap_or_default())?;
    successor.me().await?;
    let old = agent.me().await?;
    println!(
        "old key still works during the overlap (deprecated: {})",
        old.key_deprecated
    );

    // 5. Revoke the old key without waiting for the overlap: it fails at once, and so does the
    //    key derived from it. The successor survives.
    app.keys().revoke(created.key.id, false).await?;
    match agent.me().await {
        Err(Error::RevokedApiKey(e)) => println!("old key refused: {}", e.message),
        other => {
            return Err(Error::Config(format!(
                "expected REVOKED_API_KEY, got {other:?}"
            )))
        }
    }
    successor.me().await?;

    Ok(SeedFlow {
        agent_id: created.agent.id,
        old_key_id: created.key.id,
        new_key_id: rotated.key.id,
        derived_key_id: derived.key.id,
    })
}
