//! `[routing]`: the regions' smart hosts (presets from the vendor's table, overridable),
//! SPF-aware routing and the internal and fallback routes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::regions::{self, Platform, RouteTarget, TlsMode, UpstreamAuth};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnauthorized {
    Default,
    Fallback,
    Defer,
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    username: String,
    password_env: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    hosts: Option<Vec<String>>,
    tls: Option<TlsMode>,
    ca_file: Option<PathBuf>,
    /// Name the upstream certificate must carry when hosts are given as addresses.
    tls_name: Option<String>,
    auth: Option<RawAuth>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    #[serde(default = "default_region")]
    region: String,
    #[serde(default)]
    platform: Platform,
    #[serde(default = "yes")]
    spf_aware: bool,
    #[serde(default = "default_on_unauthorized")]
    on_unauthorized: OnUnauthorized,
    #[serde(default)]
    regions: BTreeMap<String, RawRoute>,
    internal: Option<RawRoute>,
    fallback: Option<RawRoute>,
}

impl Default for RawRouting {
    fn default() -> Self {
        RawRouting {
            region: default_region(),
            platform: Platform::default(),
            spf_aware: true,
            on_unauthorized: OnUnauthorized::Default,
            regions: BTreeMap::new(),
            internal: None,
            fallback: None,
        }
    }
}

fn default_region() -> String {
    "eu".into()
}
fn default_on_unauthorized() -> OnUnauthorized {
    OnUnauthorized::Default
}
fn yes() -> bool {
    true
}

/// Routes resolved from presets and overrides.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub region: String,
    pub platform: Platform,
    pub spf_aware: bool,
    pub on_unauthorized: OnUnauthorized,
    /// Every known region (presets, overridden where configured), keyed by region name.
    pub regions: BTreeMap<String, RouteTarget>,
    pub internal: Option<RouteTarget>,
    pub fallback: Option<RouteTarget>,
}

impl RoutingConfig {
    pub fn default_route(&self) -> &RouteTarget {
        // Validated at load: the default region is one of `regions`.
        &self.regions[&self.region]
    }
}

fn resolve_route(
    key: &str,
    name: &str,
    base: Option<RouteTarget>,
    raw: RawRoute,
) -> Result<RouteTarget, (String, String)> {
    let hosts = match raw.hosts {
        Some(hosts) => {
            let mut parsed = Vec::new();
            for h in hosts {
                let host = regions::HostPort::parse(&h).map_err(|m| (format!("{key}.hosts"), m))?;
                parsed.push(host);
            }
            parsed
        }
        None => match &base {
            Some(b) => b.hosts.clone(),
            None => return Err((format!("{key}.hosts"), "missing".into())),
        },
    };
    if hosts.is_empty() {
        return Err((format!("{key}.hosts"), "list at least one host".into()));
    }
    let tls = raw
        .tls
        .or(base.as_ref().map(|b| b.tls))
        .unwrap_or(TlsMode::Opportunistic);
    if let Some(ca) = &raw.ca_file {
        if !ca.exists() {
            return Err((
                format!("{key}.ca_file"),
                format!("{} does not exist", ca.display()),
            ));
        }
    }
    let auth = match raw.auth {
        Some(a) => {
            if std::env::var_os(&a.password_env).is_none() {
                return Err((
                    format!("{key}.auth.password_env"),
                    format!("environment variable {} is not set", a.password_env),
                ));
            }
            Some(UpstreamAuth {
                username: a.username,
                password_env: a.password_env,
            })
        }
        None => base.as_ref().and_then(|b| b.auth.clone()),
    };
    Ok(RouteTarget {
        name: name.to_string(),
        hosts,
        tls,
        ca_file: raw
            .ca_file
            .or(base.as_ref().and_then(|b| b.ca_file.clone())),
        tls_name: raw
            .tls_name
            .or(base.as_ref().and_then(|b| b.tls_name.clone())),
        auth,
    })
}

pub(super) fn resolve_routing(raw: RawRouting) -> Result<RoutingConfig, (String, String)> {
    let mut regions_map = BTreeMap::new();
    for preset in regions::PRESETS {
        regions_map.insert(preset.key.to_string(), preset.route(raw.platform));
    }
    for (name, route) in raw.regions {
        let key = format!("routing.regions.{name}");
        let base = regions_map.get(&name).cloned();
        let resolved = resolve_route(&key, &name, base, route)?;
        regions_map.insert(name, resolved);
    }
    if !regions_map.contains_key(&raw.region) {
        return Err((
            "routing.region".into(),
            format!(
                "unknown region `{}` (known: {})",
                raw.region,
                regions_map.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let internal = raw
        .internal
        .map(|r| resolve_route("routing.internal", "internal", None, r))
        .transpose()?;
    let fallback = raw
        .fallback
        .map(|r| resolve_route("routing.fallback", "fallback", None, r))
        .transpose()?;
    if raw.on_unauthorized == OnUnauthorized::Fallback && fallback.is_none() {
        return Err((
            "routing.on_unauthorized".into(),
            "\"fallback\" needs a [routing.fallback] table".into(),
        ));
    }
    Ok(RoutingConfig {
        region: raw.region,
        platform: raw.platform,
        spf_aware: raw.spf_aware,
        on_unauthorized: raw.on_unauthorized,
        regions: regions_map,
        internal,
        fallback,
    })
}
