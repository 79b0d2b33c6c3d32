//! `keyward agents ...`: create, list, get, update, pause, resume and delete agents.

use std::collections::BTreeMap;

use clap::Subcommand;
use keyward_client::{proto, App, ListAgents};
use uuid::Uuid;

use super::output::{or_dash, print_listing, when, when_opt, Out};
use super::{parse_duration, parse_object, CliError, CliResult, Ctx};

/// `keyward agents ...`.
#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Create an agent and its first key (the key is printed once).
    Create {
        /// Unique among the org's live agents: lowercase letters, digits, `_` and `-`.
        #[arg(long)]
        name: String,
        /// A human-friendly name.
        #[arg(long)]
        display_name: Option<String>,
        /// A scope of the agent's allowlist, `provider:scope` (repeatable), e.g. slack:chat:write.
        #[arg(long = "scope", value_name = "PROVIDER:SCOPE")]
        scopes: Vec<String>,
        /// `agent` (default) or `service`.
        #[arg(long = "type", value_name = "TYPE")]
        agent_type: Option<String>,
        /// Metadata, a JSON object.
        #[arg(long, value_parser = parse_object)]
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
        /// Policy, a JSON object (e.g. deny rules).
        #[arg(long, value_parser = parse_object)]
        policy: Option<serde_json::Map<String, serde_json::Value>>,
        /// The first key's name.
        #[arg(long)]
        key_name: Option<String>,
        /// The first key's lifetime (e.g. 30d); default: no expiry.
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        expires_in: Option<u64>,
    },
    /// List agents (one page, or every page with --all).
    List {
        /// Include revoked agents.
        #[arg(long)]
        include_revoked: bool,
        /// Page size (1..=1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Agents to skip.
        #[arg(long)]
        offset: Option<u64>,
        /// Walk every page.
        #[arg(long, conflicts_with = "limit")]
        all: bool,
    },
    /// Show one agent (by id or name).
    Get {
        /// The agent's id or name.
        agent: String,
    },
    /// Change an agent's display name, scopes, metadata or policy. Scopes may only broaden.
    Update {
        /// The agent's id or name.
        agent: String,
        /// A new display name.
        #[arg(long)]
        display_name: Option<String>,
        /// Add a scope to the allowlist, `provider:scope` (repeatable).
        #[arg(long = "add-scope", value_name = "PROVIDER:SCOPE")]
        add_scopes: Vec<String>,
        /// Replace the whole allowlist (repeatable); dropping a scope is refused by the server.
        #[arg(
            long = "scope",
            value_name = "PROVIDER:SCOPE",
            conflicts_with = "add_scopes"
        )]
        scopes: Vec<String>,
        /// Replace the metadata, a JSON object.
        #[arg(long, value_parser = parse_object)]
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
        /// Replace the policy, a JSON object.
        #[arg(long, value_parser = parse_object)]
        policy: Option<serde_json::Map<String, serde_json::Value>>,
    },
    /// Pause an agent: its keys are refused until it is resumed.
    Pause {
        /// The agent's id or name.
        agent: String,
    },
    /// Resume a paused agent.
    Resume {
        /// The agent's id or name.
        agent: String,
    },
    /// Delete an agent: a tombstone; every key of it stops working at once.
    Delete {
        /// The agent's id or name.
        agent: String,
    },
}

/// `provider:scope` flags into the per-provider allowlist.
pub fn provider_scopes(flags: &[String]) -> CliResult<BTreeMap<String, Vec<String>>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for flag in flags {
        let (provider, scope) = flag
            .split_once(':')
            .filter(|(p, s)| !p.is_empty() && !s.is_empty())
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "scope `{flag}` must be provider:scope, e.g. slack:chat:write"
                ))
            })?;
        let list = map.entry(provider.to_string()).or_default();
        if !list.iter().any(|s| s == scope) {
            list.push(scope.to_string());
        }
    }
    Ok(map)
}

/// An agent given by id or by name, as its id.
pub async fn agent_id(app: &App, agent: &str) -> CliResult<Uuid> {
    if let Ok(id) = agent.parse::<Uuid>() {
        return Ok(id);
    }
    match app.agents().get_by_name(agent).await? {
        Some(a) => Ok(a.id),
        None => Err(CliError::Api(keyward_client::Error::AgentNotFound(
            keyward_client::ApiError {
                status: 404,
                message: format!("no active or paused agent is named `{agent}`"),
                request_id: String::new(),
                details: serde_json::json!({}),
            },
        ))),
    }
}

fn flat_scopes(a: &proto::Agent) -> String {
    let flat: Vec<String> = a
        .scopes
        .iter()
        .flat_map(|(p, list)| list.iter().map(move |s| format!("{p}:{s}")))
        .collect();
    if flat.is_empty() {
        "-".into()
    } else {
        flat.join(" ")
    }
}

fn print_agents(out: &Out, agents: &[proto::Agent]) {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.id.to_string(),
                a.name.clone(),
                out.status(&a.status),
                flat_scopes(a),
                when(&a.created_at),
            ]
        })
        .collect();
    out.table(&["id", "name", "status", "scopes", "created"], &rows);
}

pub fn print_agent(out: &Out, a: &proto::Agent) {
    out.fields(&[
        ("id", a.id.to_string()),
        ("name", a.name.clone()),
        ("display name", or_dash(a.display_name.clone())),
        ("type", a.agent_type.clone()),
        ("status", out.status(&a.status)),
        ("scopes", flat_scopes(a)),
        ("version", a.version.to_string()),
        ("parent agent", or_dash(a.parent_agent_id)),
        ("created", when(&a.created_at)),
        ("updated", when(&a.updated_at)),
        ("revoked", when_opt(&a.revoked_at)),
    ]);
    if !a.metadata.is_empty() {
        println!(
            "{}  {}",
            out.bold("metadata    "),
            serde_json::Value::Object(a.metadata.clone())
        );
    }
    if !a.policy.is_empty() {
        println!(
            "{}  {}",
            out.bold("policy      "),
            serde_json::Value::Object(a.policy.clone())
        );
    }
}

/// Runs `keyward agents ...`.
pub async fn run(ctx: &Ctx, command: AgentsCommand) -> CliResult {
    let app = ctx.app()?;
    let out = &ctx.out;
    match command {
        AgentsCommand::Create {
            name,
            display_name,
            scopes,
            agent_type,
            metadata,
            policy,
            key_name,
            expires_in,
        } => {
            let key =
                (key_name.is_some() || expires_in.is_some()).then(|| proto::CreateKeyRequest {
                    name: key_name,
                    expires_in,
                    ..Default::default()
                });
            let created = app
                .agents()
                .create(&proto::CreateAgentRequest {
                    name,
                    display_name,
                    agent_type,
                    scopes: (!scopes.is_empty())
                        .then(|| provider_scopes(&scopes))
                        .transpose()?,
                    metadata,
                    policy,
                    key,
                    ..Default::default()
                })
                .await?;
            if out.json() {
                super::keys::warn_secret_json();
                out.print_json(&created);
            } else {
                println!(
                    "Created agent {} ({}) with key {} ({}).",
                    out.bold(&created.agent.name),
                    created.agent.id,
                    created.key.start,
                    created.key.id
                );
                super::keys::print_secrets(out, &created.api_key, &created.signing_secret);
            }
        }
        AgentsCommand::List {
            include_revoked,
            limit,
            offset,
            all,
        } => {
            let opts = ListAgents {
                include_revoked,
                limit,
                offset,
            };
            print_listing(
                out,
                "agents",
                all.then(|| app.agents().pages(opts.clone())),
                async {
                    let page = app.agents().list(&opts).await?;
                    let (items, has_more, offset) =
                        (page.agents.clone(), page.has_more, page.offset);
                    Ok((page, items, has_more, offset))
                },
                print_agents,
            )
            .await?;
        }
        AgentsCommand::Get { agent } => {
            let id = agent_id(&app, &agent).await?;
            show(out, app.agents().get(id).await?);
        }
        AgentsCommand::Update {
            agent,
            display_name,
            add_scopes,
            scopes,
            metadata,
            policy,
        } => {
            let id = agent_id(&app, &agent).await?;
            let scopes = if !add_scopes.is_empty() {
                let mut current = app.agents().get(id).await?.scopes;
                for (provider, list) in provider_scopes(&add_scopes)? {
                    let entry = current.entry(provider).or_default();
                    for s in list {
                        if !entry.contains(&s) {
                            entry.push(s);
                        }
                    }
                }
                Some(current)
            } else if !scopes.is_empty() {
                Some(provider_scopes(&scopes)?)
            } else {
                None
            };
            let updated = app
                .agents()
                .update(
                    id,
                    &proto::UpdateAgentRequest {
                        display_name: display_name.map(Some),
                        metadata,
                        scopes,
                        policy,
                    },
                )
                .await?;
            show(out, updated);
        }
        AgentsCommand::Pause { agent } => {
            let id = agent_id(&app, &agent).await?;
            show(out, app.agents().pause(id).await?);
        }
        AgentsCommand::Resume { agent } => {
            let id = agent_id(&app, &agent).await?;
            show(out, app.agents().resume(id).await?);
        }
        AgentsCommand::Delete { agent } => {
            let id = agent_id(&app, &agent).await?;
            show(out, app.agents().delete(id).await?);
        }
    }
    Ok(())
}

fn show(out: &Out, agent: proto::Agent) {
    if out.json() {
        out.print_json(&agent);
    } else {
        print_agent(out, &agent);
    }
}
