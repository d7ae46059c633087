//! The command line: `run`, `check-config`, and the operator verbs (queue, spf,
//! onboarding, trusted). Binary-side code, so errors are `anyhow` here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use smartrelay::config::{Config, Dur, LogFormat};
use smartrelay::envelope::now_ms;
use smartrelay::envelope::rfc3339;
use smartrelay::spf::hickory::HickoryDns;
use smartrelay::spf::{Severity, SpfService};
use smartrelay::trusted::export::{csv_row, parse_since, read_addresses, CSV_HEADER};
use smartrelay::trusted::{Filter, Store};

const DEFAULT_CONFIG: &str = "config/smartrelay.toml";

#[derive(Parser)]
#[command(
    name = "smartrelay",
    version,
    about = "SMTP outbound relay to the gateway's regional smart hosts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the relay.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Overrides log.format.
        #[arg(long, value_enum)]
        log_format: Option<Format>,
    },
    /// Check the configuration and exit (non-zero when it is not valid).
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Inspect and steer the running instance's queue.
    Queue {
        #[command(subcommand)]
        action: QueueCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// What happened to a message (tracking), from the running instance: one match
    /// prints its timeline, several one line each.
    Trace {
        #[arg(long)]
        message_id: Option<String>,
        #[arg(long)]
        queue_id: Option<String>,
        #[arg(long)]
        sender: Option<String>,
        #[arg(long)]
        recipient: Option<String>,
        /// queued, deferred, delivered, bounced, held, expired, removed, refused, partial.
        #[arg(long)]
        status: Option<String>,
        /// 2h (ago), 2026-12-01 or RFC 3339.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        remote: Remote,
    },
    /// Key values a limit restricted, and the levers on their held mail.
    Restricted {
        #[command(subcommand)]
        action: RestrictedCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// Re-read the configuration in the running instance (as SIGHUP does) and say
    /// what took effect and what needs a restart.
    Reload {
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `smartrelay man > smartrelay.1`.
    Man,
    /// SPF checks that need no running relay.
    Spf {
        #[command(subcommand)]
        action: SpfCmd,
    },
    /// The gateway onboarding steps, from the running instance.
    Onboarding {
        #[command(subcommand)]
        action: OnboardingCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// The trusted-sender list (works on the database directly).
    Trusted {
        #[command(subcommand)]
        action: TrustedCmd,
        #[arg(long, default_value = DEFAULT_CONFIG, global = true)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Csv,
    Json,
}

/// How to reach the running instance's admin API.
#[derive(Args)]
pub struct Remote {
    #[arg(long, default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
    /// Admin API base URL; defaults to http://<admin.listen>.
    #[arg(long, global = true)]
    admin: Option<String>,
    /// Bearer token; defaults to admin.token or $SMARTRELAY_TOKEN.
    #[arg(long, global = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
pub enum QueueCmd {
    List,
    Show {
        id: String,
    },
    /// Retry every message now.
    Flush,
    Hold {
        id: String,
    },
    Release {
        id: String,
    },
    /// Delete a message without delivering it and without a DSN.
    Remove {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum RestrictedCmd {
    /// The restricted key values, with the rule that fired and the mail held here.
    List,
    /// Lift the restriction, start its counts again and deliver its held mail.
    Release {
        /// `sender=alice@contoso.test`, `sender_domain=contoso.test` or `client=192.0.2.7`.
        key_value: String,
    },
    /// Lift the restriction and delete its held mail, without a DSN (after securing the
    /// account).
    Discard {
        /// `sender=alice@contoso.test`, `sender_domain=contoso.test` or `client=192.0.2.7`.
        key_value: String,
    },
}

#[derive(Subcommand)]
pub enum SpfCmd {
    /// Validate a domain's SPF record against the gateway's rules.
    Check {
        domain: String,
        #[arg(long, default_value = "eu")]
        region: String,
        /// DNS server (ip:port); repeatable. Defaults to [dns] of --config, else the system's.
        #[arg(long)]
        nameserver: Vec<std::net::SocketAddr>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run RFC 7208 check_host() for one client address and sender, as a receiver would.
    /// Exits 0 whenever the evaluation completed, whatever the result.
    Eval {
        /// The SMTP client's address.
        #[arg(long)]
        ip: std::net::IpAddr,
        /// The MAIL FROM address; '' for the null sender (then the HELO name is checked).
        #[arg(long, allow_hyphen_values = true)]
        sender: String,
        /// The HELO/EHLO name.
        #[arg(long)]
        helo: Option<String>,
        /// DNS server (ip:port); repeatable. Defaults to [dns] of --config, else the system's.
        #[arg(long, value_parser = nameserver)]
        nameserver: Vec<std::net::SocketAddr>,
        /// Bound on each DNS query (default: [dns].timeout of --config, else 5s).
        #[arg(long, value_parser = Dur::parse)]
        timeout: Option<Dur>,
        #[arg(long)]
        json: bool,
        /// Takes [dns] from this file: name servers, timeout and spf_timeout.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `IP:PORT`, or a bare IP on port 53.
fn nameserver(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse::<std::net::SocketAddr>()
        .or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| std::net::SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("`{text}` is not IP:PORT"))
}

#[derive(Subcommand)]
pub enum OnboardingCmd {
    Status,
    /// Mail the SPF instructions (current record, problems, the record to publish, how
    /// to verify) to whoever runs DNS, through the relay's own queue.
    Share {
        /// The recipient.
        #[arg(long)]
        to: String,
        /// A domain to include (repeat for more); default: every configured domain.
        #[arg(long = "domain")]
        domains: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum TrustedCmd {
    /// Write the list to stdout.
    Export {
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
        /// Only entries seen since (2026-11-01, RFC 3339, or 7d).
        #[arg(long)]
        since: Option<String>,
        /// Also the entries a restricted sender taught (origin `suspect`).
        #[arg(long)]
        include_suspect: bool,
    },
    /// Add addresses from a CSV file (first column), gathered elsewhere.
    Import { file: PathBuf },
    /// Drop entries nothing was delivered to within the retention.
    Prune {
        /// Overrides trusted.retention.
        #[arg(long)]
        retention: Option<String>,
    },
}

pub fn load_config(path: &Path) -> Result<Config> {
    Ok(Config::load(path)?)
}

pub fn log_format(cfg: &Config, flag: Option<Format>) -> LogFormat {
    match flag {
        Some(Format::Json) => LogFormat::Json,
        Some(Format::Text) => LogFormat::Text,
        None => cfg.log.format,
    }
}

// ---- remote API ----

struct Api {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    fn new(remote: &Remote) -> Result<Api> {
        let cfg = load_config(&remote.config).ok();
        let base = match (&remote.admin, &cfg) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(c)) => {
                let mut addr = c
                    .admin
                    .listen
                    .context("admin.listen is not set in the configuration")?;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{addr}")
            }
            (None, None) => bail!("cannot read {}; pass --admin URL", remote.config.display()),
        };
        let token = remote
            .token
            .clone()
            .or_else(|| std::env::var("SMARTRELAY_TOKEN").ok())
            .or_else(|| cfg.and_then(|c| c.admin.token));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .build()
            .into();
        Ok(Api { base, token, agent })
    }

    fn call(&self, method: &str, path: &str) -> Result<(u16, Value)> {
        self.request(method, path, None)
    }

    fn post_json(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.request("POST", path, Some(body))
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let with_auth = |r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match &auth {
            Some(a) => r.header("Authorization", a),
            None => r,
        };
        let resp = match method {
            "GET" => with_auth(self.agent.get(&url)).call(),
            "DELETE" => with_auth(self.agent.delete(&url)).call(),
            // ureq types a request with a body apart, so the token goes on by hand.
            _ if body.is_some() => {
                let r = self
                    .agent
                    .post(&url)
                    .header("Content-Type", "application/json");
                let r = match &auth {
                    Some(a) => r.header("Authorization", a),
                    None => r,
                };
                r.send(body.map(Value::to_string).unwrap_or_default())
            }
            _ => match &auth {
                Some(a) => self
                    .agent
                    .post(&url)
                    .header("Authorization", a)
                    .send_empty(),
                None => self.agent.post(&url).send_empty(),
            },
        };
        let mut resp = resp.with_context(|| format!("cannot reach the relay at {url}"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status >= 400 {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{status}: {msg}");
        }
        Ok((status, value))
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn when(v: &Value) -> String {
    v.as_u64().map(rfc3339).unwrap_or_else(|| "-".into())
}

pub fn queue(action: QueueCmd, remote: Remote) -> Result<()> {
    let api = Api::new(&remote)?;
    let (_, v) = match &action {
        QueueCmd::List => api.call("GET", "/api/v1/queue")?,
        QueueCmd::Show { id } => api.call("GET", &format!("/api/v1/queue/{id}"))?,
        QueueCmd::Flush => api.call("POST", "/api/v1/queue/flush")?,
        QueueCmd::Hold { id } => api.call("POST", &format!("/api/v1/queue/{id}/hold"))?,
        QueueCmd::Release { id } => api.call("POST", &format!("/api/v1/queue/{id}/release"))?,
        QueueCmd::Remove { id } => api.call("DELETE", &format!("/api/v1/queue/{id}"))?,
    };
    if remote.json {
        print_json(&v);
        return Ok(());
    }
    match action {
        QueueCmd::List => {
            let msgs = v["messages"].as_array().cloned().unwrap_or_default();
            println!("queue of {}", v["node"].as_str().unwrap_or("this node"));
            println!(
                "{:<20}  {:<32}  {:>5}  {:>8}  {:<20}  last reply",
                "ID", "SENDER", "RCPTS", "ATTEMPTS", "NEXT ATTEMPT"
            );
            for m in &msgs {
                let sender = m["sender"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .unwrap_or("<>");
                let next = if m["held"].as_bool() == Some(true) {
                    "held".into()
                } else {
                    when(&m["next_attempt"])
                };
                let last = m["last_reply"]
                    .as_object()
                    .map(|r| format!("{} {}", r["code"], r["text"].as_str().unwrap_or("")))
                    .unwrap_or_default();
                println!(
                    "{:<20}  {:<32}  {:>5}  {:>8}  {:<20}  {last}",
                    m["id"].as_str().unwrap_or(""),
                    sender,
                    m["recipients"].as_array().map_or(0, Vec::len),
                    m["attempts"],
                    next
                );
            }
            println!("{} message(s) on this node", msgs.len());
        }
        QueueCmd::Flush => println!("{} message(s) scheduled for delivery now", v["rescheduled"]),
        QueueCmd::Remove { id } => println!("{id} removed"),
        _ => print_json(&v),
    }
    Ok(())
}

/// What `trace` searches by.
pub struct TraceSearch {
    pub message_id: Option<String>,
    pub queue_id: Option<String>,
    pub sender: Option<String>,
    pub recipient: Option<String>,
    pub status: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: usize,
}

pub fn trace(search: TraceSearch, remote: Remote) -> Result<()> {
    let api = Api::new(&remote)?;
    let mut q: Vec<(&str, String)> = [
        ("message_id", &search.message_id),
        ("queue_id", &search.queue_id),
        ("sender", &search.sender),
        ("recipient", &search.recipient),
        ("status", &search.status),
        ("since", &search.since),
        ("until", &search.until),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
    .collect();
    q.push(("limit", search.limit.to_string()));
    let query = serde_urlencoded::to_string(&q).context("the search")?;
    let (_, found) = api.call("GET", &format!("/api/v1/messages?{query}"))?;
    let messages = found["messages"].as_array().cloned().unwrap_or_default();
    if messages.len() == 1 {
        let id = messages[0]["queue_id"].as_str().unwrap_or("");
        let (_, record) = api.call("GET", &format!("/api/v1/messages/{id}"))?;
        if remote.json {
            print_json(&record);
        } else {
            print_timeline(&record);
        }
        return Ok(());
    }
    if remote.json {
        print_json(&found);
        return Ok(());
    }
    for m in &messages {
        let rcpts: Vec<String> = m["recipients"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        format!(
                            "{} {}",
                            r["address"].as_str().unwrap_or(""),
                            r["status"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{}  {}  {:<20}  {:<10}  from=<{}>  to={}  message-id={}",
            when(&m["received_at"]),
            m["queue_id"].as_str().unwrap_or(""),
            m["node"].as_str().unwrap_or(""),
            m["status"].as_str().unwrap_or(""),
            m["sender"].as_str().unwrap_or(""),
            rcpts.join(", "),
            m["message_id"].as_str().unwrap_or("-"),
        );
    }
    println!("{} message(s)", messages.len());
    Ok(())
}

fn print_timeline(r: &Value) {
    let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
    println!("{} on {}: {}", s("queue_id"), s("node"), s("status"));
    println!(
        "  received {} from {} (HELO {}, TLS {}), proof {}",
        when(&r["received_at"]),
        s("client"),
        s("helo"),
        r["tls"].as_str().unwrap_or("none"),
        s("proof")
    );
    println!(
        "  from=<{}> message-id={} size={}",
        s("sender"),
        r["message_id"].as_str().unwrap_or("-"),
        r["size"]
    );
    if let Some(subject) = r["subject"].as_str() {
        println!("  subject: {subject}");
    }
    for e in r["events"].as_array().into_iter().flatten() {
        let mut line = format!(
            "  {}  {:<9}",
            when(&e["at"]),
            e["type"].as_str().unwrap_or("")
        );
        if let Some(rcpt) = e["recipient"].as_str() {
            line.push_str(&format!("  {rcpt}"));
        }
        for k in ["route", "host", "reply", "dsn_id", "action", "spf"] {
            if let Some(v) = e[k].as_str() {
                line.push_str(&format!("  {k}={v}"));
            }
        }
        println!("{line}");
    }
}

pub fn restricted(action: RestrictedCmd, remote: Remote) -> Result<()> {
    let api = Api::new(&remote)?;
    let lift = |path: &str, kv: &str| -> Result<Value> {
        let (key, value) = smartrelay::limits::rules::parse_key_value(kv).with_context(|| {
            format!("`{kv}`: want key=value with key sender, sender_domain or client")
        })?;
        let body = serde_json::json!({ "key": key.label(), "value": value });
        Ok(api.post_json(path, &body)?.1)
    };
    let v = match &action {
        RestrictedCmd::List => api.call("GET", "/api/v1/restricted")?.1,
        RestrictedCmd::Release { key_value } => lift("/api/v1/restricted/release", key_value)?,
        RestrictedCmd::Discard { key_value } => lift("/api/v1/restricted/discard", key_value)?,
    };
    if remote.json {
        print_json(&v);
        return Ok(());
    }
    match action {
        RestrictedCmd::List => {
            let rows = v.as_array().cloned().unwrap_or_default();
            println!(
                "{:<14}  {:<36}  {:<16}  {:<20}  {:>5}",
                "KEY", "VALUE", "LIMIT", "SINCE", "HELD"
            );
            for r in &rows {
                println!(
                    "{:<14}  {:<36}  {:<16}  {:<20}  {:>5}",
                    r["key"].as_str().unwrap_or(""),
                    r["value"].as_str().unwrap_or(""),
                    r["limit"].as_str().unwrap_or(""),
                    r["since"].as_str().unwrap_or(""),
                    r["held"]
                );
            }
            println!("{} restricted key value(s)", rows.len());
        }
        RestrictedCmd::Release { .. } | RestrictedCmd::Discard { .. } => {
            let was = if v["restricted"].as_bool() == Some(true) {
                "restriction lifted"
            } else {
                "was not restricted"
            };
            println!(
                "{}={}: {was}; {} held message(s) {} on this node",
                v["key"].as_str().unwrap_or(""),
                v["value"].as_str().unwrap_or(""),
                v["messages"],
                v["action"].as_str().map_or("", |a| if a == "release" {
                    "released"
                } else {
                    "discarded"
                })
            );
        }
    }
    Ok(())
}

pub fn reload(remote: Remote) -> Result<()> {
    let api = Api::new(&remote)?;
    let (_, v) = api.call("POST", "/api/v1/reload")?;
    if remote.json {
        print_json(&v);
        return Ok(());
    }
    let list = |k: &str| {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    println!(
        "configuration reloaded (sha256 {})",
        v["hash"].as_str().unwrap_or("")
    );
    let applied = list("applied");
    println!(
        "applied: {}",
        if applied.is_empty() {
            "nothing changed"
        } else {
            &applied
        }
    );
    let restart = list("restart_required");
    if !restart.is_empty() {
        println!("restart required for: {restart}");
    }
    Ok(())
}

pub fn onboarding(action: OnboardingCmd, remote: Remote) -> Result<()> {
    let api = Api::new(&remote)?;
    match action {
        OnboardingCmd::Status => {
            let (_, v) = api.call("GET", "/api/v1/onboarding")?;
            if remote.json {
                print_json(&v);
                return Ok(());
            }
            for s in v["steps"].as_array().cloned().unwrap_or_default() {
                let mark = match s["state"].as_str() {
                    Some("done") => "✔",
                    Some("failing") => "✘",
                    _ => "○",
                };
                println!(
                    "{mark} {:<40} {}",
                    s["title"].as_str().unwrap_or(""),
                    s["reason"].as_str().unwrap_or("")
                );
            }
            println!(
                "{}",
                if v["complete"].as_bool() == Some(true) {
                    "onboarding complete"
                } else {
                    "onboarding not complete"
                }
            );
        }
        OnboardingCmd::Share { to, domains } => {
            let body = serde_json::json!({ "to": to, "domains": domains });
            let (_, v) = api.post_json("/api/v1/onboarding/share", &body)?;
            if remote.json {
                print_json(&v);
                return Ok(());
            }
            let listed = v["domains"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            println!(
                "SPF instructions for {listed} queued for {} as {}",
                v["to"].as_str().unwrap_or(""),
                v["queue_id"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// `check-config`: the shared ranges published in SPF, resolved through `[dns]` now,
/// against `access.allowed_ranges`. A name that does not resolve is said, not fatal.
pub async fn shared_range_overlaps(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let spf_names: Vec<(usize, &str)> = cfg
        .access
        .shared_ranges
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.ranges_from_spf.as_deref().map(|d| (i, d)))
        .collect();
    if spf_names.is_empty() || cfg.access.allowed_ranges.is_empty() {
        return out;
    }
    let dns = match HickoryDns::new(&cfg.dns.nameservers, cfg.dns.timeout.0) {
        Ok(d) => d,
        Err(e) => {
            return vec![format!(
                "shared ranges not checked against allowed_ranges: {e}"
            )]
        }
    };
    let spf = SpfService::new(dns, cfg.dns.spf_timeout.0);
    for (i, domain) in spf_names {
        let walk = spf.walk(domain).await;
        let nets = smartrelay::spf::authorized_networks(&walk);
        if nets.is_empty() {
            out.push(format!(
                "access.shared_ranges[{i}].ranges_from_spf: {domain} did not resolve now, so \
                 access.allowed_ranges was not checked against it; until the relay has resolved \
                 it once, every client gets 421 4.3.0"
            ));
            continue;
        }
        out.extend(cfg.allowed_overlap(
            &format!("access.shared_ranges[{i}].ranges_from_spf ({domain})"),
            &nets,
        ));
    }
    out
}

/// `spf check` exits 1 when the record is not valid; `spf eval` exits 0 whenever the
/// evaluation completed and 2 on a usage error.
pub async fn spf(action: SpfCmd) -> Result<ExitCode> {
    match action {
        SpfCmd::Check {
            domain,
            region,
            nameserver,
            json,
            config,
        } => {
            let valid = spf_check(domain, region, nameserver, json, config).await?;
            Ok(if valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        SpfCmd::Eval {
            ip,
            sender,
            helo,
            nameserver,
            timeout,
            json,
            config,
        } => spf_eval(ip, sender, helo, nameserver, timeout, json, config).await,
    }
}

/// `[dns]` of `--config` (or its defaults), with `--nameserver` winning when given.
fn dns_settings(
    config: Option<&Path>,
    nameserver: Vec<std::net::SocketAddr>,
) -> Result<(Vec<std::net::SocketAddr>, Duration, Duration)> {
    let dns = match config {
        Some(p) => load_config(p)?.dns,
        None => smartrelay::config::DnsConfig::default(),
    };
    let servers = if nameserver.is_empty() {
        dns.nameservers
    } else {
        nameserver
    };
    Ok((servers, dns.timeout.0, dns.spf_timeout.0))
}

#[allow(clippy::too_many_arguments)]
async fn spf_eval(
    ip: std::net::IpAddr,
    sender: String,
    helo: Option<String>,
    nameserver: Vec<std::net::SocketAddr>,
    timeout: Option<Dur>,
    json: bool,
    config: Option<PathBuf>,
) -> Result<ExitCode> {
    if sender.is_empty() && helo.as_deref().is_none_or(str::is_empty) {
        eprintln!("smartrelay: an empty --sender checks the HELO identity: give --helo");
        return Ok(ExitCode::from(2));
    }
    let (servers, query_timeout, whole) = dns_settings(config.as_deref(), nameserver)?;
    let dns = HickoryDns::new(&servers, timeout.map_or(query_timeout, |t| t.0))?;
    let query = smartrelay::spf::eval::Query {
        ip,
        sender,
        helo: helo.unwrap_or_else(|| "unknown".into()),
        receiver: "unknown".into(),
        timestamp: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let evaluation = SpfService::new(dns, whole).evaluate(&query).await;
    if json {
        println!("{}", serde_json::to_string(&evaluation)?);
    } else {
        println!("{}", evaluation.result);
        if evaluation.result == smartrelay::spf::eval::SpfResult::Fail {
            println!("explanation: {}", evaluation.explanation);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn spf_check(
    domain: String,
    region: String,
    nameserver: Vec<std::net::SocketAddr>,
    json: bool,
    config: Option<PathBuf>,
) -> Result<bool> {
    if smartrelay::regions::preset(&region).is_none() {
        bail!("unknown region `{region}`");
    }
    let (servers, timeout, spf_timeout) = dns_settings(config.as_deref(), nameserver)?;
    let dns = HickoryDns::new(&servers, timeout)?;
    let report = SpfService::new(dns, spf_timeout)
        .check(&domain, &region)
        .await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(report.valid);
    }
    let mark = if report.valid { "✔" } else { "✘" };
    println!(
        "{mark} {}: SPF record {} for region {} (include:{})",
        report.domain,
        if report.valid { "valid" } else { "NOT valid" },
        report.region,
        report.include
    );
    for r in &report.records {
        println!("  record:      {r}");
    }
    println!(
        "  lookups:     {}/10, void lookups {}/2",
        report.lookups, report.void_lookups
    );
    let pass = &report.gateway_pass;
    let passing = pass
        .ranges
        .iter()
        .filter(|r| r.result == smartrelay::spf::eval::SpfResult::Pass)
        .count();
    println!(
        "  receivers:   {} ({passing} of {} gateway ranges pass)",
        match pass.verdict {
            smartrelay::spf::gateway::Verdict::All => "all pass",
            smartrelay::spf::gateway::Verdict::Some => "some pass",
            smartrelay::spf::gateway::Verdict::None => "none pass",
            smartrelay::spf::gateway::Verdict::Unknown => "unknown",
        },
        pass.ranges.len()
    );
    for r in &pass.ranges {
        println!(
            "    {} {:<20} {:<16} {}{}",
            if r.result == smartrelay::spf::eval::SpfResult::Pass {
                "✔"
            } else {
                "✘"
            },
            r.range.to_string(),
            r.address.to_string(),
            r.result,
            r.mechanism
                .as_ref()
                .map(|t| format!(" [{t}]"))
                .unwrap_or_default()
        );
    }
    for f in &report.findings {
        let sev = match f.severity {
            Severity::Error => "error  ",
            Severity::Warning => "warning",
            Severity::Info => "info   ",
        };
        let term = f
            .term
            .as_ref()
            .map(|t| format!(" [{t}]"))
            .unwrap_or_default();
        println!("  {sev} {}: {}{term}", f.code, f.message);
    }
    println!("  recommended: {}", report.recommended);
    Ok(report.valid)
}

/// On the store the configuration names: the SQLite file, or the cluster's PostgreSQL.
pub async fn trusted(action: TrustedCmd, config: &Path) -> Result<()> {
    let cfg = load_config(config)?;
    let store = match cfg.store.kind {
        smartrelay::config::StoreKind::Sqlite => Store::open(&cfg.trusted.database)?,
        smartrelay::config::StoreKind::Postgres => {
            let pg = smartrelay::store::Postgres::new(&cfg.store)?;
            pg.migrate(smartrelay::store::schema::ALL).await?;
            Store::shared(pg)
        }
    };
    match action {
        TrustedCmd::Export {
            format,
            since,
            include_suspect,
        } => {
            let since = since
                .as_deref()
                .map(|s| parse_since(s, now_ms()))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            use std::io::Write;
            let mut cursor = None;
            let mut first = true;
            match format {
                ExportFormat::Csv => write!(out, "{CSV_HEADER}\r\n")?,
                ExportFormat::Json => write!(out, "[")?,
            }
            loop {
                let page = store
                    .list(Filter {
                        since,
                        limit: 10_000,
                        cursor: cursor.take(),
                        include_suspect,
                        ..Filter::default()
                    })
                    .await?;
                for e in &page.entries {
                    match format {
                        ExportFormat::Csv => out.write_all(csv_row(e).as_bytes())?,
                        ExportFormat::Json => {
                            if !first {
                                out.write_all(b",")?;
                            }
                            out.write_all(b"\n  ")?;
                            serde_json::to_writer(&mut out, e)?;
                        }
                    }
                    first = false;
                }
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            if let ExportFormat::Json = format {
                writeln!(out, "\n]")?;
            }
            out.flush()?;
        }
        TrustedCmd::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let addresses = read_addresses(&text);
            let read = addresses.len();
            let added = store.import(addresses, now_ms()).await?;
            println!("{added} address(es) added ({read} read)");
        }
        TrustedCmd::Prune { retention } => {
            let keep = match retention {
                Some(r) => Dur::parse(&r).map_err(anyhow::Error::msg)?.0,
                None => cfg.trusted.retention.0,
            };
            let removed = store.prune(keep, now_ms()).await?;
            println!(
                "{removed} entr{} removed",
                if removed == 1 { "y" } else { "ies" }
            );
        }
    }
    Ok(())
}
