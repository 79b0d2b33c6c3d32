//! `keyward audit list`: the org's audit log, newest first, filtered like the API.

use clap::Subcommand;
use keyward_client::AuditQuery;
use uuid::Uuid;

use super::agents::agent_id;
use super::output::{or_dash, print_listing, when, Out};
use super::{parse_time, CliResult, Ctx};

/// `keyward audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit events, newest first (one page, or every page with --all).
    List {
        /// Only this action, e.g. agent.create, key.revoke, auth.denied.
        #[arg(long)]
        action: Option<String>,
        /// Only events of this agent (id or name).
        #[arg(long)]
        agent: Option<String>,
        /// Only events of this key.
        #[arg(long)]
        key: Option<Uuid>,
        /// Only events of this trace run.
        #[arg(long)]
        run_id: Option<String>,
        /// Only events of this trace thread.
        #[arg(long)]
        thread_id: Option<String>,
        /// Only this outcome.
        #[arg(long, value_parser = ["success", "denied", "failure"])]
        outcome: Option<String>,
        /// Events at or after this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Events before this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Page size (1..=1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Events to skip.
        #[arg(long)]
        offset: Option<u64>,
        /// Walk every page.
        #[arg(long, conflicts_with = "limit")]
        all: bool,
    },
}

fn print_events(out: &Out, events: &[keyward_client::proto::AuditEvent]) {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                when(&e.occurred_at),
                e.action.clone(),
                out.status(&e.outcome),
                or_dash(e.error_code.clone()),
                or_dash(e.actor_agent_id.or(e.actor_key_id)),
                or_dash(e.target_id),
                or_dash(e.run_id.clone()),
                or_dash(e.thread_id.clone()),
            ]
        })
        .collect();
    out.table(
        &[
            "time", "action", "outcome", "code", "actor", "target", "run", "thread",
        ],
        &rows,
    );
}

/// Runs `keyward audit ...`.
pub async fn run(ctx: &Ctx, command: AuditCommand) -> CliResult {
    let out = &ctx.out;
    let app = ctx.app()?;
    let AuditCommand::List {
        action,
        agent,
        key,
        run_id,
        thread_id,
        outcome,
        since,
        until,
        limit,
        offset,
        all,
    } = command;
    let agent_id = match agent {
        Some(a) => Some(agent_id(&app, &a).await?),
        None => None,
    };
    let q = AuditQuery {
        action,
        agent_id,
        key_id: key,
        run_id,
        thread_id,
        outcome,
        since,
        until,
        limit,
        offset,
    };
    print_listing(
        out,
        "events",
        all.then(|| app.audit().pages(q.clone())),
        async {
            let page = app.audit().list(&q).await?;
            let (items, has_more, offset) = (page.events.clone(), page.has_more, page.offset);
            Ok((page, items, has_more, offset))
        },
        print_events,
    )
    .await?;
    Ok(())
}
