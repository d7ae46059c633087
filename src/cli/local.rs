//! The verbs that work without a running relay: check-config's shared-range check,
//! spf (check, eval) and trusted (export, import, prune) on the store itself.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use smartrelay::config::{Config, Dur};
use smartrelay::envelope::now_ms;
use smartrelay::spf::hickory::HickoryDns;
use smartrelay::spf::{Severity, SpfService};
use smartrelay::trusted::export::{csv_row, parse_since, read_addresses, CSV_HEADER};
use smartrelay::trusted::{Filter, Store};

use super::args::*;

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
