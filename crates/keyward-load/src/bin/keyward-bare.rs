//! `keyward-bare`: the reference server `keyward-load` measures beside Keyward. On bare hyper
//! (no axum, no middleware), with the allocator and runtime `keyward serve` uses, it answers
//! `GET /healthz` and a verify-shaped `POST /v1/keys/verify` that does only what any handler of
//! that shape must: read the body (with Keyward's own `extract::read_body`), parse it as JSON, SHA-256 the key, look it up in a hash map and
//! serialize an answer of verify's shape with serde. The ratio of the two is the ceiling of
//! verify/static on this machine and HTTP stack.
//!
//! Run by `keyward-load`: `keyward-bare <file of tokens, one per line>` prints
//! `bare listening on <address>` and serves until killed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use keyward_proto as proto;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// As `keyward serve`: the handler allocates on every request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// The keys the reference answers as valid.
struct Keys {
    /// Each key's digest, to its id.
    digests: HashMap<[u8; 32], Uuid>,
    org_id: Uuid,
    agent_id: Uuid,
}

/// Serves until killed: one task per connection, HTTP/1.1 keep-alive, on the default
/// multi-threaded runtime (as `keyward serve`).
#[tokio::main]
async fn main() -> Result<(), Failure> {
    let list: PathBuf = std::env::args_os()
        .nth(1)
        .ok_or("usage: keyward-bare <file of tokens, one per line>")?
        .into();
    let text = std::fs::read_to_string(&list)?;
    let keys = Arc::new(Keys {
        digests: text
            .lines()
            .map(|t| (Sha256::digest(t.as_bytes()).into(), Uuid::now_v7()))
            .collect(),
        org_id: Uuid::now_v7(),
        agent_id: Uuid::now_v7(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("bare listening on {}", listener.local_addr()?);
    loop {
        // A failed accept (a connection reset before it was taken, out of descriptors) ends
        // that connection, not the server.
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let keys = keys.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, keys.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn answer(
    req: Request<Incoming>,
    keys: Arc<Keys>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec()),
        // Read as Keyward reads a body (the same function, over the same boxed body).
        (&Method::POST, "/v1/keys/verify") => {
            match keyward_server::extract::read_body(axum::body::Body::new(req.into_body())).await {
                Ok(body) => verify(&body, &keys),
                Err(_) => json(StatusCode::BAD_REQUEST, b"{}".to_vec()),
            }
        }
        _ => json(StatusCode::NOT_FOUND, b"{}".to_vec()),
    })
}

/// Parse, hash, look up, answer: what any verify-shaped handler does.
fn verify(body: &[u8], keys: &Keys) -> Response<Full<Bytes>> {
    let Ok(req) = serde_json::from_slice::<proto::VerifyRequest>(body) else {
        return json(StatusCode::BAD_REQUEST, b"{}".to_vec());
    };
    let digest: [u8; 32] = Sha256::digest(req.key.as_bytes()).into();
    let found = keys.digests.get(&digest).copied();
    let answer = proto::VerifyResponse {
        valid: found.is_some(),
        code: if found.is_some() {
            "VALID"
        } else {
            "INVALID_API_KEY"
        }
        .to_string(),
        key_id: found,
        agent_id: Some(keys.agent_id),
        org_id: Some(keys.org_id),
        kind: Some("agent".into()),
        environment: Some("live".into()),
        scopes: Some(vec!["slack:chat:write".into()]),
        expires_at: None,
        deprecated: Some(false),
        ratelimit: None,
        quota: None,
        agent: Some(proto::VerifyAgent {
            id: keys.agent_id,
            name: "load-agent".into(),
            status: "active".into(),
        }),
    };
    match serde_json::to_vec(&answer) {
        Ok(b) => json(StatusCode::OK, b),
        Err(_) => json(StatusCode::INTERNAL_SERVER_ERROR, b"{}".to_vec()),
    }
}
