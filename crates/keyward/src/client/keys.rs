//! `keyward keys ...`: create, list, get, revoke, rotate, derive, deprecate, update, usage,
//! alert thresholds and verify.

use clap::{Subcommand, ValueEnum};
use keyward_client::{proto, Granularity, ListKeys, UsageQuery};
use uuid::Uuid;

use super::agents::agent_id;
use super::output::{or_dash, print_listing, sparkline, when, when_opt, Out};
use super::{parse_duration, parse_object, parse_time, read_line, CliError, CliResult, Ctx};

/// `keyward keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Mint a key for an agent (--agent), or another root key for the org (without --agent).
    Create {
        /// The agent (id or name); without it, a root key is created (needs org:admin).
        #[arg(long)]
        agent: Option<String>,
        #[command(flatten)]
        settings: KeySettings,
    },
    /// List the org's keys (one page, or every page with --all).
    List {
        /// Only this agent's keys (id or name).
        #[arg(long)]
        agent: Option<String>,
        /// Only keys of this kind.
        #[arg(long, value_parser = ["root", "agent", "derived"])]
        kind: Option<String>,
        /// Include revoked keys.
        #[arg(long)]
        include_revoked: bool,
        /// Page size (1..=1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Keys to skip.
        #[arg(long)]
        offset: Option<u64>,
        /// Walk every page.
        #[arg(long, conflicts_with = "limit")]
        all: bool,
    },
    /// Show one key.
    Get {
        /// The key's id.
        id: Uuid,
    },
    /// Revoke a key and every key derived from it.
    Revoke {
        /// The key's id.
        id: Uuid,
        /// Revoke even the agent's last active key.
        #[arg(long)]
        force: bool,
    },
    /// Rotate a key: mint its successor; the old key works (deprecated) for the overlap.
    Rotate {
        /// The key's id.
        id: Uuid,
        /// Days the old key keeps working (0..=30, default 7).
        #[arg(long)]
        overlap_days: Option<u32>,
    },
    /// Derive a short-lived, narrower key from the key in use (an agent key with keys:derive).
    Derive {
        /// A scope of the new key (repeatable), within the calling key's.
        #[arg(long = "scope", required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Lifetime, e.g. 10m or 1h.
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        expires_in: u64,
        /// A name for the new key.
        #[arg(long)]
        name: Option<String>,
        /// An address or CIDR the key may be used from (repeatable), within the caller's.
        #[arg(long = "ip", value_name = "CIDR")]
        cidr_allowlist: Vec<String>,
    },
    /// Mark an agent key deprecated (it still works; answers say it is time to rotate).
    Deprecate {
        /// The key's id.
        id: Uuid,
    },
    /// Clear a key's deprecation.
    Undeprecate {
        /// The key's id.
        id: Uuid,
    },
    /// Change a key's name, IP allowlist, rate limit, quota or metadata.
    Update {
        /// The key's id.
        id: Uuid,
        /// A new name.
        #[arg(long)]
        name: Option<String>,
        /// Add an address or CIDR to the allowlist (repeatable).
        #[arg(long = "add-ip", value_name = "CIDR")]
        add_ips: Vec<String>,
        /// Remove an address or CIDR from the allowlist (repeatable).
        #[arg(long = "remove-ip", value_name = "CIDR")]
        remove_ips: Vec<String>,
        /// A tier name (`pro`), `N/DURATION` (e.g. 100/1h), or `none` for the org default.
        #[arg(long, value_name = "LIMIT")]
        rate_limit: Option<String>,
        /// The burst of an `N/DURATION` rate limit (default N).
        #[arg(long, requires = "rate_limit")]
        burst: Option<u64>,
        /// `N/hour`, `N/day`, `N/month`, or `none`.
        #[arg(long, value_name = "QUOTA")]
        quota: Option<String>,
        /// Replace the metadata, a JSON object.
        #[arg(long, value_parser = parse_object)]
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
    },
    /// Show a key's usage: totals, a sparkline and a table of the hourly (or daily) buckets.
    Usage {
        /// The key's id.
        id: Uuid,
        /// Bucket size.
        #[arg(long, value_enum, default_value_t = Bucket::Hour)]
        granularity: Bucket,
        /// Start (RFC 3339); default 24 hours (hourly) or 30 days (daily) before --until.
        #[arg(long, value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// End (RFC 3339); default the end of the current hour or day.
        #[arg(long, value_parser = parse_time)]
        until: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Set the quota percentages at which a `key.usage_threshold` event is written.
    Alert {
        /// The key's id.
        id: Uuid,
        /// A percentage of the quota, 1..=100 (repeatable).
        #[arg(
            long = "threshold",
            value_name = "PERCENT",
            required_unless_present = "clear"
        )]
        thresholds: Vec<u8>,
        /// Remove every threshold.
        #[arg(long, conflicts_with = "thresholds")]
        clear: bool,
    },
    /// Check a key the way your services do (the key in use needs keys:verify). Exits 1 when
    /// the checked key is not valid.
    Verify {
        /// The key to check; `-` or nothing reads it from stdin (keeps it out of shell history).
        token: Option<String>,
        /// A scope the key must have (repeatable).
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
    },
}

/// The settings of a new key.
#[derive(Debug, clap::Args)]
pub struct KeySettings {
    /// A scope of the key (repeatable); default: the agent's whole allowlist (root keys: `*`).
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// A name, to tell keys apart.
    #[arg(long)]
    name: Option<String>,
    /// Lifetime, e.g. 30d; default: no expiry.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    expires_in: Option<u64>,
    /// An address or CIDR the key may be used from (repeatable); default: anywhere.
    #[arg(long = "ip", value_name = "CIDR")]
    cidr_allowlist: Vec<String>,
    /// A tier name (`pro`) or `N/DURATION` (e.g. 100/1h).
    #[arg(long, value_name = "LIMIT")]
    rate_limit: Option<String>,
    /// The burst of an `N/DURATION` rate limit (default N).
    #[arg(long, requires = "rate_limit")]
    burst: Option<u64>,
    /// `N/hour`, `N/day` or `N/month`.
    #[arg(long, value_name = "QUOTA")]
    quota: Option<String>,
    /// A quota percentage that writes an alert event (repeatable).
    #[arg(long = "alert", value_name = "PERCENT")]
    alert_thresholds: Vec<u8>,
    /// Every request of the key must be signed (a signing secret is printed once).
    #[arg(long)]
    requires_signature: bool,
    /// A test-environment key (`kwt_` prefix).
    #[arg(long)]
    test: bool,
    /// Metadata, a JSON object.
    #[arg(long, value_parser = parse_object)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `--granularity`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Bucket {
    /// Hourly buckets.
    Hour,
    /// Daily buckets.
    Day,
}

fn parse_rate_limit(s: &str, burst: Option<u64>) -> CliResult<proto::RateLimit> {
    match s.split_once('/') {
        Some((n, period)) => {
            let limit: u64 = n
                .parse()
                .map_err(|_| CliError::Usage(format!("rate limit `{s}`: `{n}` is not a number")))?;
            let period_s = parse_duration(period).map_err(CliError::Usage)?;
            Ok(proto::RateLimit::Custom {
                limit,
                period_s,
                burst: burst.unwrap_or(limit),
            })
        }
        None => Ok(proto::RateLimit::Tier {
            tier: s.to_string(),
        }),
    }
}

fn parse_quota(s: &str) -> CliResult<proto::Quota> {
    let bad = || CliError::Usage(format!("quota `{s}` must be N/hour, N/day or N/month"));
    let (n, period) = s.split_once('/').ok_or_else(bad)?;
    let limit = n.parse().map_err(|_| bad())?;
    if !matches!(period, "hour" | "day" | "month") {
        return Err(bad());
    }
    Ok(proto::Quota {
        limit,
        period: period.to_string(),
    })
}

impl KeySettings {
    fn request(self) -> CliResult<proto::CreateKeyRequest> {
        let non_empty = |v: Vec<String>| (!v.is_empty()).then_some(v);
        Ok(proto::CreateKeyRequest {
            name: self.name,
            scopes: non_empty(self.scopes),
            expires_in: self.expires_in,
            cidr_allowlist: non_empty(self.cidr_allowlist),
            environment: self.test.then(|| "test".to_string()),
            rate_limit: self
                .rate_limit
                .as_deref()
                .map(|r| parse_rate_limit(r, self.burst))
                .transpose()?,
            quota: self.quota.as_deref().map(parse_quota).transpose()?,
            alert_thresholds: (!self.alert_thresholds.is_empty()).then_some(self.alert_thresholds),
            requires_signature: self.requires_signature.then_some(true),
            metadata: self.metadata,
        })
    }
}

/// The one-word state of a key.
fn state(k: &proto::Key) -> &'static str {
    if k.revoked_at.is_some() {
        "revoked"
    } else if k.expires_at.is_some_and(|e| e <= chrono::Utc::now()) {
        "expired"
    } else if k.deprecated_at.is_some() {
        "deprecated"
    } else {
        "active"
    }
}

fn print_keys(out: &Out, keys: &[proto::Key]) {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.id.to_string(),
                k.start.clone(),
                k.kind.clone(),
                or_dash(k.name.clone()),
                out.status(state(k)),
                k.scopes.join(" "),
                when_opt(&k.expires_at),
                when_opt(&k.last_used_at),
            ]
        })
        .collect();
    out.table(
        &[
            "id",
            "start",
            "kind",
            "name",
            "state",
            "scopes",
            "expires",
            "last used",
        ],
        &rows,
    );
}

fn print_key(out: &Out, k: &proto::Key) {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(" ")
        }
    };
    out.fields(&[
        ("id", k.id.to_string()),
        ("start", k.start.clone()),
        ("kind", format!("{} ({})", k.kind, k.environment)),
        ("name", or_dash(k.name.clone())),
        ("state", out.status(state(k))),
        ("agent", or_dash(k.agent_id)),
        ("parent key", or_dash(k.parent_key_id)),
        ("scopes", list(&k.scopes)),
        ("ip allowlist", list(&k.cidr_allowlist)),
        (
            "rate limit",
            k.rate_limit
                .as_ref()
                .map(|r| match r {
                    proto::RateLimit::Tier { tier } => format!("tier {tier}"),
                    proto::RateLimit::Custom {
                        limit,
                        period_s,
                        burst,
                    } => format!("{limit} per {period_s}s, burst {burst}"),
                })
                .unwrap_or_else(|| "org default".into()),
        ),
        (
            "quota",
            k.quota
                .as_ref()
                .map(|q| format!("{} per {}", q.limit, q.period))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "alerts at",
            if k.alert_thresholds.is_empty() {
                "-".into()
            } else {
                k.alert_thresholds
                    .iter()
                    .map(|t| format!("{t}%"))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
        ),
        ("signed requests", k.requires_signature.to_string()),
        ("expires", when_opt(&k.expires_at)),
        ("deprecated", when_opt(&k.deprecated_at)),
        ("revoked", when_opt(&k.revoked_at)),
        ("successor", or_dash(k.successor_key_id)),
        ("last used", when_opt(&k.last_used_at)),
        ("created", when(&k.created_at)),
    ]);
}

fn show(out: &Out, key: &proto::Key) {
    if out.json() {
        out.print_json(key);
    } else {
        print_key(out, key);
    }
}

/// The warning printed on stderr when JSON output carries a secret shown only once.
pub fn warn_secret_json() {
    eprintln!(
        "warning: this answer holds a secret that is shown once and never again: store it now"
    );
}

/// Prints the secrets of a creating answer, once, with the warning.
pub fn print_secrets(out: &Out, api_key: &Option<String>, signing_secret: &Option<String>) {
    match api_key {
        Some(k) => out.secret("API key", k),
        None => println!("(the key's plaintext was shown when it was first created)"),
    }
    if let Some(s) = signing_secret {
        out.secret("Signing secret", s);
    }
}

fn created(out: &Out, what: &str, c: &proto::CreateKeyResponse) {
    if out.json() {
        warn_secret_json();
        out.print_json(c);
    } else {
        println!(
            "{what} key {} ({}, {}).",
            out.bold(&c.key.start),
            c.key.id,
            c.key.kind
        );
        print_secrets(out, &c.api_key, &c.signing_secret);
    }
}

/// Runs `keyward keys ...`.
pub async fn run(ctx: &Ctx, command: KeysCommand) -> CliResult {
    let out = &ctx.out;
    match command {
        KeysCommand::Create { agent, settings } => {
            let app = ctx.app()?;
            let req = settings.request()?;
            let c = match agent {
                Some(a) => {
                    let id = agent_id(&app, &a).await?;
                    app.agents().mint_key(id, &req).await?
                }
                None => app.keys().create_root(&req).await?,
            };
            created(out, "Created", &c);
        }
        KeysCommand::List {
            agent,
            kind,
            include_revoked,
            limit,
            offset,
            all,
        } => {
            let app = ctx.app()?;
            let agent_id = match agent {
                Some(a) => Some(agent_id(&app, &a).await?),
                None => None,
            };
            let opts = ListKeys {
                agent_id,
                kind,
                include_revoked,
                limit,
                offset,
            };
            print_listing(
                out,
                "keys",
                all.then(|| app.keys().pages(opts.clone())),
                async {
                    let page = app.keys().list(&opts).await?;
                    let (items, has_more, offset) = (page.keys.clone(), page.has_more, page.offset);
                    Ok((page, items, has_more, offset))
                },
                print_keys,
            )
            .await?;
        }
        KeysCommand::Get { id } => show(out, &ctx.app()?.keys().get(id).await?),
        KeysCommand::Revoke { id, force } => {
            let key = ctx.app()?.keys().revoke(id, force).await?;
            if !out.json() {
                println!(
                    "Revoked {} ({}) and every key derived from it.",
                    key.start, key.id
                );
            }
            show(out, &key);
        }
        KeysCommand::Rotate { id, overlap_days } => {
            let c = ctx.app()?.keys().rotate(id, overlap_days).await?;
            created(out, "Rotated; successor", &c);
            if !out.json() {
                println!(
                    "The old key keeps working, deprecated, for {} day(s).",
                    overlap_days.unwrap_or(7)
                );
            }
        }
        KeysCommand::Derive {
            scopes,
            expires_in,
            name,
            cidr_allowlist,
        } => {
            let c = ctx
                .agent()?
                .keys()
                .derive(&proto::DeriveKeyRequest {
                    scopes,
                    expires_in,
                    name,
                    cidr_allowlist: (!cidr_allowlist.is_empty()).then_some(cidr_allowlist),
                    metadata: None,
                })
                .await?;
            created(out, "Derived", &c);
        }
        KeysCommand::Deprecate { id } | KeysCommand::Undeprecate { id } => {
            let deprecate = matches!(command, KeysCommand::Deprecate { .. });
            let app = ctx.app()?;
            let key = app.keys().get(id).await?;
            let agent = key.agent_id.ok_or_else(|| {
                CliError::Usage("only agent and derived keys can be deprecated".into())
            })?;
            let key = if deprecate {
                app.agents().deprecate_key(agent, id).await?
            } else {
                app.agents().undeprecate_key(agent, id).await?
            };
            show(out, &key);
        }
        KeysCommand::Update {
            id,
            name,
            add_ips,
            remove_ips,
            rate_limit,
            burst,
            quota,
            metadata,
        } => {
            let app = ctx.app()?;
            let cidr_allowlist = if add_ips.is_empty() && remove_ips.is_empty() {
                None
            } else {
                let mut list = app.keys().get(id).await?.cidr_allowlist;
                // The server stores a bare address as its /32 or /128: compare both forms.
                let same = |a: &str, b: &str| {
                    a == b
                        || a.strip_suffix("/32").or(a.strip_suffix("/128")) == Some(b)
                        || b.strip_suffix("/32").or(b.strip_suffix("/128")) == Some(a)
                };
                for ip in &remove_ips {
                    if !list.iter().any(|c| same(c, ip)) {
                        return Err(CliError::Usage(format!(
                            "{ip} is not in the key's allowlist ({})",
                            list.join(", ")
                        )));
                    }
                    list.retain(|c| !same(c, ip));
                }
                for ip in add_ips {
                    if !list.iter().any(|c| same(c, &ip)) {
                        list.push(ip);
                    }
                }
                Some(list)
            };
            let rate_limit = match rate_limit.as_deref() {
                None => None,
                Some("none") => Some(None),
                Some(r) => Some(Some(parse_rate_limit(r, burst)?)),
            };
            let quota = match quota.as_deref() {
                None => None,
                Some("none") => Some(None),
                Some(q) => Some(Some(parse_quota(q)?)),
            };
            let key = app
                .keys()
                .update(
                    id,
                    &proto::UpdateKeyRequest {
                        name: name.map(Some),
                        cidr_allowlist,
                        rate_limit,
                        quota,
                        alert_thresholds: None,
                        metadata,
                    },
                )
                .await?;
            show(out, &key);
        }
        KeysCommand::Usage {
            id,
            granularity,
            since,
            until,
        } => {
            let usage = ctx
                .app()?
                .keys()
                .usage(
                    id,
                    &UsageQuery {
                        granularity: Some(match granularity {
                            Bucket::Hour => Granularity::Hour,
                            Bucket::Day => Granularity::Day,
                        }),
                        since,
                        until,
                    },
                )
                .await?;
            if out.json() {
                out.print_json(&usage);
            } else {
                print_usage(out, &usage, granularity);
            }
        }
        KeysCommand::Alert {
            id,
            thresholds,
            clear,
        } => {
            let thresholds = if clear { Vec::new() } else { thresholds };
            let key = ctx
                .app()?
                .keys()
                .update(
                    id,
                    &proto::UpdateKeyRequest {
                        alert_thresholds: Some(thresholds),
                        ..Default::default()
                    },
                )
                .await?;
            show(out, &key);
        }
        KeysCommand::Verify { token, scopes } => {
            let token = match token.as_deref() {
                None | Some("-") => read_line("key to verify")?,
                Some(t) => t.to_string(),
            };
            if token.is_empty() {
                return Err(CliError::Usage("no key to verify".into()));
            }
            let v = ctx
                .agent()?
                .keys()
                .verify(&proto::VerifyRequest {
                    key: token,
                    required_scopes: (!scopes.is_empty()).then_some(scopes),
                    ..Default::default()
                })
                .await?;
            if out.json() {
                out.print_json(&v);
            } else {
                out.fields(&[
                    (
                        "valid",
                        out.status(if v.valid { "valid" } else { "invalid" }),
                    ),
                    ("code", v.code.clone()),
                    ("key", or_dash(v.key_id)),
                    (
                        "agent",
                        or_dash(
                            v.agent
                                .as_ref()
                                .map(|a| format!("{} ({})", a.name, a.status)),
                        ),
                    ),
                    ("kind", or_dash(v.kind.clone())),
                    ("scopes", or_dash(v.scopes.as_ref().map(|s| s.join(" ")))),
                    ("expires", when_opt(&v.expires_at)),
                    ("deprecated", or_dash(v.deprecated)),
                ]);
            }
            if !v.valid {
                return Err(CliError::Failed(format!(
                    "the key is not valid: {}",
                    v.code
                )));
            }
        }
    }
    Ok(())
}

fn print_usage(out: &Out, u: &proto::UsageResponse, granularity: Bucket) {
    let total = |b: &proto::UsageBucket| b.allowed + b.denied + b.rate_limited;
    out.fields(&[
        ("key", u.key_id.to_string()),
        ("allowed", u.total.allowed.to_string()),
        ("denied", u.total.denied.to_string()),
        ("rate limited", u.total.rate_limited.to_string()),
        (
            "quota",
            u.quota
                .as_ref()
                .map(|q| {
                    format!(
                        "{} of {} used, {} left, resets {}",
                        q.used,
                        q.limit,
                        q.remaining,
                        when(&q.resets_at)
                    )
                })
                .unwrap_or_else(|| "-".into()),
        ),
    ]);
    let values: Vec<u64> = u.buckets.iter().map(total).collect();
    if let (Some(first), Some(last)) = (u.buckets.first(), u.buckets.last()) {
        println!(
            "\n{}  {}  {}\n",
            out.dim(&when(&first.start)),
            sparkline(&values),
            out.dim(&when(&last.start))
        );
    }
    let rows: Vec<Vec<String>> = u
        .buckets
        .iter()
        .filter(|b| total(b) > 0)
        .map(|b| {
            vec![
                match granularity {
                    Bucket::Hour => b.start.format("%Y-%m-%d %H:00Z").to_string(),
                    Bucket::Day => b.start.format("%Y-%m-%d").to_string(),
                },
                b.allowed.to_string(),
                b.denied.to_string(),
                b.rate_limited.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no use in this range");
    } else {
        out.table(&["bucket", "allowed", "denied", "rate limited"], &rows);
    }
}
