//! `[access]`: who may relay (the organization's ranges and the shared platforms'),
//! and for which sender domains.

use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::{normalize_domain, parse_range, Dur};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    #[serde(default)]
    allowed_ranges: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    internal_domains: Option<Vec<String>>,
    #[serde(default)]
    shared_ranges: Vec<RawSharedRange>,
    #[serde(default)]
    dkim_replay: DkimReplayConfig,
}

/// `[access.dkim_replay]`: a DKIM signature proves a shared-platform tenant once, fresh.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimReplayConfig {
    pub enabled: bool,
    /// After its first use, how long a signature may prove more transactions for any
    /// recipients (one message split over transactions, or retried).
    pub window: Dur,
    /// How old a signature may be (its `t=`, or its signed `Date:`), and how long the
    /// memory keeps it; longer than the platforms' retry period.
    pub max_age: Dur,
}

impl Default for DkimReplayConfig {
    fn default() -> Self {
        DkimReplayConfig {
            enabled: true,
            window: Dur(Duration::from_secs(3600)),
            max_age: Dur(Duration::from_secs(3 * 86_400)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSharedRange {
    platform: SharedPlatform,
    #[serde(default)]
    ranges: Vec<String>,
    ranges_from_spf: Option<String>,
    tenant_id: Option<String>,
    #[serde(default)]
    dkim_domains: Vec<String>,
    header: Option<RawRouteHeader>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteHeader {
    name: String,
    secret_env: String,
}

/// A platform that sends for many organizations from the same addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SharedPlatform {
    O365,
    Gsuite,
    Other,
}

impl SharedPlatform {
    pub fn label(self) -> &'static str {
        match self {
            SharedPlatform::O365 => "o365",
            SharedPlatform::Gsuite => "gsuite",
            SharedPlatform::Other => "other",
        }
    }
}

/// A header a routing rule adds with a secret value; the value is read from the
/// environment at load time and never printed.
#[derive(Clone)]
pub struct RouteHeader {
    pub name: String,
    pub secret_env: String,
    pub secret: Vec<u8>,
}

impl fmt::Debug for RouteHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteHeader")
            .field("name", &self.name)
            .field("secret_env", &self.secret_env)
            .finish_non_exhaustive()
    }
}

/// `[[access.shared_ranges]]`: sources many organizations send from. Mail from them is
/// accepted only with proof that it is this organization's.
#[derive(Debug, Clone)]
pub struct SharedRange {
    /// Stable label for metrics, logs and onboarding: the platform, numbered from the
    /// second range of the same platform on (`o365`, `o365-2`).
    pub name: String,
    pub platform: SharedPlatform,
    pub ranges: Vec<IpNet>,
    /// Lower-case, without trailing dot.
    pub ranges_from_spf: Option<String>,
    /// Lower-case GUID.
    pub tenant_id: Option<String>,
    /// Lower-case, without trailing dot.
    pub dkim_domains: Vec<String>,
    pub header: Option<RouteHeader>,
}

/// Who may relay, and for which sender domains.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    pub allowed_ranges: Vec<IpNet>,
    /// Lower-case, without trailing dot.
    pub domains: Vec<String>,
    pub internal_domains: Vec<String>,
    pub shared_ranges: Vec<SharedRange>,
    pub dkim_replay: DkimReplayConfig,
}

pub(super) fn resolve_access(raw: RawAccess) -> Result<AccessConfig, (String, String)> {
    let mut ranges = Vec::new();
    for text in &raw.allowed_ranges {
        let net = parse_range(text).map_err(|m| ("access.allowed_ranges".to_string(), m))?;
        ranges.push(net);
    }
    if ranges.is_empty() && raw.shared_ranges.is_empty() {
        return Err((
            "access.allowed_ranges".into(),
            "list at least one range: without it the relay accepts nobody".into(),
        ));
    }
    let check_domains = |key: &str, list: &[String]| -> Result<Vec<String>, (String, String)> {
        list.iter()
            .map(|d| {
                let n = normalize_domain(d);
                if crate::envelope::is_valid_domain(&n) {
                    Ok(n)
                } else {
                    Err((key.to_string(), format!("`{d}` is not a domain name")))
                }
            })
            .collect()
    };
    let domains = check_domains("access.domains", &raw.domains)?;
    if domains.is_empty() {
        return Err((
            "access.domains".into(),
            "list the organization's validated domains".into(),
        ));
    }
    let internal_domains = match raw.internal_domains {
        Some(list) => check_domains("access.internal_domains", &list)?,
        None => domains.clone(),
    };
    let mut shared_ranges: Vec<SharedRange> = Vec::new();
    for (i, r) in raw.shared_ranges.into_iter().enumerate() {
        let key = format!("access.shared_ranges[{i}]");
        let same = shared_ranges
            .iter()
            .filter(|s| s.platform == r.platform)
            .count();
        let name = match same {
            0 => r.platform.label().to_string(),
            n => format!("{}-{}", r.platform.label(), n + 1),
        };
        shared_ranges.push(resolve_shared_range(&key, name, r)?);
    }
    let r = raw.dkim_replay;
    if r.window.0.is_zero() {
        return Err((
            "access.dkim_replay.window".into(),
            "must be longer than zero".into(),
        ));
    }
    if r.max_age.0 < r.window.0 {
        return Err((
            "access.dkim_replay.max_age".into(),
            format!("must be at least access.dkim_replay.window ({})", r.window),
        ));
    }
    Ok(AccessConfig {
        allowed_ranges: ranges,
        domains,
        internal_domains,
        shared_ranges,
        dkim_replay: r,
    })
}

fn resolve_shared_range(
    key: &str,
    name: String,
    raw: RawSharedRange,
) -> Result<SharedRange, (String, String)> {
    let mut ranges = Vec::new();
    for text in &raw.ranges {
        ranges.push(parse_range(text).map_err(|m| (format!("{key}.ranges"), m))?);
    }
    let ranges_from_spf = match raw.ranges_from_spf {
        Some(d) => {
            let n = normalize_domain(&d);
            if !crate::envelope::is_valid_domain(&n) {
                return Err((
                    format!("{key}.ranges_from_spf"),
                    format!("`{d}` is not a domain name"),
                ));
            }
            Some(n)
        }
        None => None,
    };
    if ranges.is_empty() && ranges_from_spf.is_none() {
        return Err((
            format!("{key}.ranges"),
            "list the platform's ranges, or name the SPF record that publishes them in ranges_from_spf".into(),
        ));
    }
    let tenant_id = match raw.tenant_id {
        Some(t) if is_guid(t.trim()) => Some(t.trim().to_ascii_lowercase()),
        Some(t) => {
            return Err((
                format!("{key}.tenant_id"),
                format!("`{t}` is not a tenant GUID such as 3f2a9c1e-7b4d-4e8a-9c61-2d5e8f0a1b7c"),
            ))
        }
        None => None,
    };
    if tenant_id.is_some() && raw.platform != SharedPlatform::O365 {
        return Err((
            format!("{key}.tenant_id"),
            "only Microsoft 365 (platform = \"o365\") stamps a tenant id".into(),
        ));
    }
    let mut dkim_domains = Vec::new();
    for d in &raw.dkim_domains {
        let n = normalize_domain(d);
        if !crate::envelope::is_valid_domain(&n) {
            return Err((
                format!("{key}.dkim_domains"),
                format!("`{d}` is not a domain name"),
            ));
        }
        dkim_domains.push(n);
    }
    let header = match raw.header {
        Some(h) => {
            let valid_name =
                !h.name.is_empty() && h.name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
            if !valid_name {
                return Err((
                    format!("{key}.header.name"),
                    format!("`{}` is not a header field name", h.name),
                ));
            }
            let secret = std::env::var_os(&h.secret_env).unwrap_or_default();
            if secret.is_empty() {
                return Err((
                    format!("{key}.header.secret_env"),
                    format!("environment variable {} is not set or empty", h.secret_env),
                ));
            }
            Some(RouteHeader {
                name: h.name,
                secret_env: h.secret_env,
                secret: secret.into_encoded_bytes(),
            })
        }
        None => None,
    };
    Ok(SharedRange {
        name,
        platform: raw.platform,
        ranges,
        ranges_from_spf,
        tenant_id,
        dkim_domains,
        header,
    })
}

impl SharedRange {
    /// The proofs this range accepts, in words: the organization's own DKIM always.
    pub fn proofs(&self, org_domains: &[String]) -> Vec<String> {
        let mut out = vec![format!("DKIM of {}", org_domains.join(", "))];
        out.extend(self.dkim_domains.iter().map(|d| format!("DKIM of {d}")));
        if self.tenant_id.is_some() {
            out.push("tenant id".into());
        }
        if let Some(h) = &self.header {
            out.push(format!("header {}", h.name));
        }
        out
    }
}

/// 8-4-4-4-12 hexadecimal digits.
fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}
