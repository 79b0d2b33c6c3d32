//! The Rust SDK for Keyward.
//!
//! [`App`] is the operator client (a root key, or any key with the scopes its calls need) with
//! namespaces for [agents](App::agents), [keys](App::keys) and the [audit log](App::audit).
//! [`AgentClient`] is the workload client (an agent key): [`me()`](AgentClient::me), deriving
//! narrower keys, [`trace`](AgentClient::trace) scopes, [`with_constraints`](AgentClient::with_constraints)
//! and [`request`](AgentClient::request) for authenticated calls to your own services. Both are
//! typed wrappers over the HTTP API of `shared/API.md` (wire types in [`proto`]), and every
//! failure is one [`Error`] whose variants name the API's error codes
//! ([`Error::AgentNameExists`], [`Error::LastActiveKey`], [`Error::RateLimited`] ...).
//!
//! What the SDK does for you:
//! - every creating call carries an `Idempotency-Key`, the same on each retry;
//! - calls that are safe to repeat are retried on `429` (after the server's `retry_after`),
//!   `503` and connection failures, with exponential backoff ([`RetryPolicy`]);
//! - with a signing secret, every request is signed (`X-Timestamp`, `X-Signature`);
//! - a deprecated key is logged as a `tracing` warning and flagged on [`Response`];
//! - configuration from arguments or from `KEYWARD_BASE_URL`, `KEYWARD_API_KEY`,
//!   `KEYWARD_ORG_ID`, `KEYWARD_AGENT_ID` ([`ClientConfig`]).
//!
//! # End to end
//!
//! The example below is `examples/seed_flow.rs`: it compiles as this doc test, and the crate's
//! tests run it against a real server (`tests/seed_flow.rs`).
//!
//! ```no_run
#![doc = include_str!("../examples/seed_flow.rs")]
//! ```
#![deny(missing_docs)]

mod agent;
mod app;
mod config;
mod constraints;
mod error;
mod pages;
mod trace;
mod transport;

pub use agent::{AgentClient, AgentRequest};

/// The workload client under the name the SDK's guide uses (`keyward_client::Agent`); the agent
/// *record* stays `proto::Agent`.
pub type Agent = AgentClient;
pub use app::{
    Agents, App, Audit, AuditQuery, Granularity, Keys, ListAgents, ListKeys, UsageQuery,
};
pub use config::{ClientConfig, DEFAULT_BASE_URL, DEFAULT_TIMEOUT};
pub use constraints::Constraints;
pub use error::{ApiError, Error};
pub use pages::{Pages, MAX_PAGE};
pub use trace::TraceContext;
pub use transport::{Response, RetryPolicy};

/// The wire types of the API (request and response bodies, the error-code table).
pub use keyward_proto as proto;
/// The HTTP method type taken by [`AgentClient::request`].
pub use reqwest::Method;

/// The result of every SDK call.
pub type Result<T> = std::result::Result<T, Error>;
