//! The command line's grammar (clap): the verbs, their flags and arguments.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use smartrelay::config::{Config, Dur, LogFormat};

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
        #[command(flatten)]
        search: TraceSearch,
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
    pub config: PathBuf,
    /// Admin API base URL; defaults to http://<admin.listen>.
    #[arg(long, global = true)]
    pub admin: Option<String>,
    /// Bearer token; defaults to admin.token or $SMARTRELAY_TOKEN.
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
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

/// What `trace` searches by.
#[derive(Args)]
pub struct TraceSearch {
    #[arg(long)]
    pub message_id: Option<String>,
    #[arg(long)]
    pub queue_id: Option<String>,
    #[arg(long)]
    pub sender: Option<String>,
    #[arg(long)]
    pub recipient: Option<String>,
    /// queued, deferred, delivered, bounced, held, expired, removed, refused, partial.
    #[arg(long)]
    pub status: Option<String>,
    /// 2h (ago), 2026-12-01 or RFC 3339.
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}
