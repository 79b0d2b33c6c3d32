//! Trace scopes: `AgentClient::trace(ctx, future)` makes every call made inside the future carry
//! the agent trace headers of API.md §7 (`Keyward-Run-Id`, `Keyward-Thread-Id`,
//! `Keyward-Parent-Agent`, `Keyward-Meta-<name>`). The context lives in a tokio task-local, so
//! concurrent traces on different tasks stay apart; a trace opened inside another inherits its
//! run and thread and records the outer agent as its parent.

use std::collections::BTreeMap;
use std::future::Future;

use crate::Error;

/// What a trace scope says about the calls made inside it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// The run the calls belong to; inherited from an enclosing trace when `None`.
    pub run_id: Option<String>,
    /// The thread within the run; inherited from an enclosing trace when `None`.
    pub thread_id: Option<String>,
    /// The agent that delegated this work; defaults to the enclosing trace's agent.
    pub parent: Option<String>,
    /// Extra facts, sent as `Keyward-Meta-<name>` headers; merged over the enclosing trace's.
    pub metadata: BTreeMap<String, String>,
}

/// Metadata names that would be mistaken for the structured trace fields.
const RESERVED: [&str; 6] = [
    "run-id",
    "thread-id",
    "parent-agent",
    "agent-id",
    "key-id",
    "request-id",
];

#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub(crate) ctx: TraceContext,
    /// The agent that opened this scope, when the client knows its own id.
    pub(crate) agent: Option<String>,
}

tokio::task_local! {
    static TRACE: Frame;
}

fn header_value_ok(v: &str) -> bool {
    !v.is_empty() && v.len() <= 256 && v.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Checks a context before it is used, so a bad name or value fails at the call site rather
/// than as a 400 from the server later.
fn validate(ctx: &TraceContext) -> Result<(), Error> {
    for (name, v) in [
        ("run_id", &ctx.run_id),
        ("thread_id", &ctx.thread_id),
        ("parent", &ctx.parent),
    ] {
        if let Some(v) = v {
            if !header_value_ok(v) {
                return Err(Error::Config(format!(
                    "trace {name} must be 1..=256 printable ASCII characters"
                )));
            }
        }
    }
    for (k, v) in &ctx.metadata {
        let lower = k.to_ascii_lowercase().replace('_', "-");
        if RESERVED.contains(&lower.as_str()) {
            return Err(Error::Config(format!(
                "trace metadata name `{k}` is reserved"
            )));
        }
        if k.is_empty()
            || k.len() > 64
            || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(Error::Config(format!(
                "trace metadata name `{k}` must be 1..=64 letters, digits or dashes"
            )));
        }
        if !header_value_ok(v) {
            return Err(Error::Config(format!(
                "trace metadata `{k}` must be 1..=256 printable ASCII characters"
            )));
        }
    }
    Ok(())
}

/// Runs `f` inside a trace scope opened by `agent`.
pub(crate) async fn scope<F: Future>(
    ctx: TraceContext,
    agent: Option<String>,
    f: F,
) -> Result<F::Output, Error> {
    validate(&ctx)?;
    let outer = TRACE.try_with(Clone::clone).ok();
    let merged = match outer {
        None => ctx,
        Some(o) => {
            let mut metadata = o.ctx.metadata.clone();
            metadata.extend(ctx.metadata);
            TraceContext {
                run_id: ctx.run_id.or(o.ctx.run_id),
                thread_id: ctx.thread_id.or(o.ctx.thread_id),
                parent: ctx.parent.or(o.agent).or(o.ctx.parent),
                metadata,
            }
        }
    };
    Ok(TRACE.scope(Frame { ctx: merged, agent }, f).await)
}

/// The trace headers of the current scope, if any.
pub(crate) fn headers() -> Vec<(String, String)> {
    TRACE
        .try_with(|f| {
            let mut h = Vec::new();
            if let Some(v) = &f.ctx.run_id {
                h.push(("Keyward-Run-Id".to_string(), v.clone()));
            }
            if let Some(v) = &f.ctx.thread_id {
                h.push(("Keyward-Thread-Id".to_string(), v.clone()));
            }
            if let Some(v) = &f.ctx.parent {
                h.push(("Keyward-Parent-Agent".to_string(), v.clone()));
            }
            for (k, v) in &f.ctx.metadata {
                h.push((format!("Keyward-Meta-{k}"), v.clone()));
            }
            h
        })
        .unwrap_or_default()
}
