//! The OpenAPI 3.1 document, generated from the handlers' annotations and the proto types, and a
//! self-contained HTML reference rendered from it (no CDN scripts: it works offline).

use std::sync::OnceLock;

use serde_json::Value;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{agents, audit, keys, me, ops, orgs, usage_api, verify};
use keyward_proto as proto;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A Keyward token (`kw_rk_...`, `kw_ak_...`, `kw_dk_...`). Also accepted as \
                         `X-API-Key` or `Api-Key` header.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "x_api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Keyward",
        description = "Identity, API keys and access for AI agents. Every error answers \
            `{\"error\": {code, message, status, request_id, details}}`; every response carries \
            `X-Request-Id`; creating POSTs accept `Idempotency-Key`.",
        version = "1.0.0"
    ),
    paths(
        ops::healthz, ops::readyz, ops::metrics,
        orgs::get_org, orgs::patch_org,
        agents::create, agents::list, agents::get, agents::get_by_name, agents::update,
        agents::pause, agents::resume, agents::delete,
        keys::mint_agent_key, keys::list_agent_keys, keys::deprecate, keys::undeprecate,
        keys::revoke_agent_key, keys::create_root_key, keys::list_org_keys, keys::get_key,
        keys::patch_key, keys::derive, keys::rotate, keys::revoke_key,
        me::me, verify::verify, audit::list, usage_api::usage,
    ),
    components(schemas(
        proto::ErrorBody, proto::ErrorDetail, proto::ErrorCode, proto::Org, proto::UpdateOrgRequest,
        proto::Agent, proto::Key, proto::RateLimit, proto::Quota, proto::CreateKeyRequest,
        proto::CreateAgentRequest, proto::CreateAgentResponse, proto::CreateKeyResponse,
        proto::UpdateAgentRequest, proto::UpdateKeyRequest, proto::DeriveKeyRequest,
        proto::RotateKeyRequest, proto::AgentList, proto::KeyList, proto::MeResponse,
        proto::VerifyRequest, proto::VerifyRequestFacts, proto::VerifySignature,
        proto::VerifyResponse, proto::RateLimitState, proto::QuotaState, proto::VerifyAgent,
        proto::AuditEvent, proto::AuditList, proto::Health, proto::UsageResponse,
        proto::UsageTotals, proto::UsageBucket,
    )),
    modifiers(&Security),
    tags(
        (name = "orgs", description = "Organizations and their policy"),
        (name = "agents", description = "Agents: identities that hold keys"),
        (name = "keys", description = "Keys: mint, derive, rotate, deprecate, revoke"),
        (name = "me", description = "The calling agent"),
        (name = "verify", description = "Verify a key on behalf of your own service"),
        (name = "audit", description = "The audit log"),
        (name = "ops", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

/// The document as JSON, built once.
pub fn json() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn schema_name(v: &Value) -> String {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(name));
    }
    if let Some(t) = v.get("type") {
        let t = match t {
            Value::String(s) => s.clone(),
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" | "),
            _ => String::new(),
        };
        if t.contains("array") {
            if let Some(items) = v.get("items") {
                return format!("array of {}", schema_name(items));
            }
        }
        return esc(&t);
    }
    for k in ["oneOf", "anyOf", "allOf"] {
        if let Some(list) = v.get(k).and_then(Value::as_array) {
            return list.iter().map(schema_name).collect::<Vec<_>>().join(" | ");
        }
    }
    "object".to_string()
}

/// The browsable reference, rendered once from the document.
pub fn html() -> &'static str {
    static HTML: OnceLock<String> = OnceLock::new();
    HTML.get_or_init(|| render(json()))
}

fn render(doc: &Value) -> String {
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Keyward API reference</title>\
         <style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}\
         code,.path{font-family:ui-monospace,monospace}.op{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em}\
         .m{display:inline-block;min-width:4.5em;font-weight:bold}.get{color:#1565c0}.post{color:#2e7d32}\
         .patch{color:#ef6c00}.delete{color:#c62828}table{border-collapse:collapse}td,th{border:1px solid #eee;padding:.2em .5em;text-align:left}</style>\
         </head><body><h1>Keyward API reference</h1>\
         <p>Generated from <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI 3.1).</p>",
    );
    if let Some(d) = doc.pointer("/info/description").and_then(Value::as_str) {
        out.push_str(&format!("<p>{}</p>", esc(d)));
    }
    out.push_str("<h2>Endpoints</h2>");
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        for (path, item) in paths {
            let Some(ops) = item.as_object() else {
                continue;
            };
            for (method, op) in ops {
                let summary = op
                    .get("summary")
                    .or_else(|| op.get("description"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                out.push_str(&format!(
                    "<div class=\"op\"><span class=\"m {m}\">{M}</span> <span class=\"path\">{p}</span><p>{s}</p>",
                    m = esc(method),
                    M = esc(&method.to_uppercase()),
                    p = esc(path),
                    s = esc(summary)
                ));
                if let Some(params) = op.get("parameters").and_then(Value::as_array) {
                    out.push_str("<table><tr><th>parameter</th><th>in</th><th>type</th><th>required</th></tr>");
                    for p in params {
                        out.push_str(&format!(
                            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                            esc(p.get("name").and_then(Value::as_str).unwrap_or("")),
                            esc(p.get("in").and_then(Value::as_str).unwrap_or("")),
                            p.get("schema").map(schema_name).unwrap_or_default(),
                            p.get("required").and_then(Value::as_bool).unwrap_or(false)
                        ));
                    }
                    out.push_str("</table>");
                }
                if let Some(body) = op.pointer("/requestBody/content/application~1json/schema") {
                    out.push_str(&format!("<p>Body: {}</p>", schema_name(body)));
                }
                if let Some(resps) = op.get("responses").and_then(Value::as_object) {
                    out.push_str("<p>Responses: ");
                    let parts: Vec<String> = resps
                        .iter()
                        .map(|(code, r)| {
                            let schema = r
                                .pointer("/content/application~1json/schema")
                                .map(schema_name)
                                .unwrap_or_default();
                            format!("<code>{}</code> {}", esc(code), schema)
                        })
                        .collect();
                    out.push_str(&parts.join(" · "));
                    out.push_str("</p>");
                }
                out.push_str("</div>");
            }
        }
    }
    out.push_str("<h2>Schemas</h2>");
    if let Some(schemas) = doc
        .pointer("/components/schemas")
        .and_then(Value::as_object)
    {
        for (name, schema) in schemas {
            out.push_str(&format!("<h3 id=\"schema-{0}\">{0}</h3>", esc(name)));
            if let Some(d) = schema.get("description").and_then(Value::as_str) {
                out.push_str(&format!("<p>{}</p>", esc(d)));
            }
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                out.push_str("<table><tr><th>field</th><th>type</th><th>description</th></tr>");
                for (field, p) in props {
                    out.push_str(&format!(
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                        esc(field),
                        schema_name(p),
                        esc(p.get("description").and_then(Value::as_str).unwrap_or(""))
                    ));
                }
                out.push_str("</table>");
            } else if let Some(values) = schema.get("enum").and_then(Value::as_array) {
                let vals: Vec<String> = values
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|v| format!("<code>{}</code>", esc(v)))
                    .collect();
                out.push_str(&format!("<p>One of: {}</p>", vals.join(", ")));
            }
        }
    }
    out.push_str("</body></html>");
    out
}
