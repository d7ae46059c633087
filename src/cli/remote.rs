//! The verbs that ask a running relay, through its admin API: queue, trace,
//! restricted, reload, onboarding.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use smartrelay::envelope::rfc3339;

use super::args::*;

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
