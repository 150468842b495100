//! Where a fetch may go: the scheme and host allowlists, the address rules (no loopback,
//! private, link-local… unless `fetch.allowed_networks` says so), a DNS resolver that applies
//! them to the addresses actually connected to, the redirect policy that applies them to every
//! hop, and URIs as error messages show them (without credentials or query strings).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

use super::FetchSettings;

/// What fetch.allowed_networks is for, appended to an address refusal.
const NETWORKS_HINT: &str = "list its network in fetch.allowed_networks to allow it";

/// A request refused by policy inside reqwest (the resolver or the redirect policy): found
/// again in the error's source chain and answered as FORBIDDEN, not as a failed fetch.
#[derive(Debug)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// The refusal somewhere in `e`'s causes, if it is one.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(r) = c.downcast_ref::<Refused>() {
                return Some(r);
            }
            cause = c.source();
        }
        None
    }
}

/// The scheme, host and address rules of one worker.
pub struct Policy {
    schemes: Vec<String>,
    hosts: Vec<String>,
    networks: Vec<IpNet>,
}

impl Policy {
    pub fn new(settings: &FetchSettings) -> Self {
        Self {
            schemes: settings.allowed_schemes.clone(),
            hosts: settings.allowed_hosts.clone(),
            networks: settings.allowed_networks.clone(),
        }
    }

    pub fn scheme_allowed(&self, scheme: &str) -> bool {
        self.schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme))
    }

    /// Whether `host` (a host name, IP literal or bucket) is allowed; `None` when it is,
    /// the reason (naming the setting to change) when not.
    pub fn host_refusal(&self, host: &str) -> Option<String> {
        if host_allowed(&self.hosts, host) {
            return None;
        }
        Some(if self.hosts.is_empty() {
            format!(
                "host {host:?} is not in fetch.allowed_hosts, which is empty: no remote host is \
                 allowed (list the image hosts and buckets, or \"*\" for any host)"
            )
        } else {
            format!("host {host:?} is not in fetch.allowed_hosts")
        })
    }

    /// `None` when `ip` may be connected to; the reason when not.
    pub fn address_refusal(&self, ip: IpAddr) -> Option<String> {
        let (class, embedded) = classify(ip)?;
        let listed = |a: IpAddr| self.networks.iter().any(|n| n.contains(&a));
        if listed(ip) || embedded.is_some_and(|v4| listed(IpAddr::V4(v4))) {
            return None;
        }
        Some(match embedded {
            Some(v4) => format!("address {ip} is {class} (IPv4 {v4})"),
            None => format!("address {ip} is {class}"),
        })
    }

    /// The checks of an http(s) URL before it is requested, the first one or a redirect's
    /// target: scheme, host, and the address when the host is an IP literal (names are
    /// checked by [`GuardedResolver`], on the addresses they resolve to). The url crate has
    /// already turned decimal, octal and hex IPv4 forms (`http://2130706433/`) into
    /// [`url::Host::Ipv4`].
    pub fn http_refusal(&self, url: &Url) -> Option<String> {
        let scheme = url.scheme();
        if !matches!(scheme, "http" | "https") {
            return Some(format!("scheme {scheme:?} is not fetched over http(s)"));
        }
        if !self.scheme_allowed(scheme) {
            return Some(format!("scheme {scheme:?} is not in fetch.allowed_schemes"));
        }
        let Some(host) = url.host() else {
            return Some("no host".into());
        };
        if let Some(reason) = self.host_refusal(&host.to_string()) {
            return Some(reason);
        }
        let ip = match host {
            url::Host::Ipv4(v4) => IpAddr::V4(v4),
            url::Host::Ipv6(v6) => IpAddr::V6(v6),
            url::Host::Domain(_) => return None,
        };
        self.address_refusal(ip)
            .map(|reason| format!("{reason}: {NETWORKS_HINT}"))
    }

    /// reqwest's redirect policy: at most `max` hops, each one checked as the first request.
    pub fn redirects(self: &Arc<Self>, max: u32) -> reqwest::redirect::Policy {
        if max == 0 {
            return reqwest::redirect::Policy::none();
        }
        let policy = self.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max as usize {
                let error = Refused(format!("more than {max} redirects (fetch.max_redirects)"));
                return attempt.error(error);
            }
            match policy.http_refusal(attempt.url()) {
                None => attempt.follow(),
                Some(reason) => {
                    let error = Refused(format!(
                        "redirect to {}: {reason}",
                        redact(attempt.url().as_str())
                    ));
                    attempt.error(error)
                }
            }
        })
    }
}

/// Exact host names (case-insensitive), `*.suffix` for a domain and its subdomains, `*` for
/// any host; an empty list allows none.
pub fn host_allowed(allowed: &[String], host: &str) -> bool {
    let unbracket = |h: &str| -> String {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase()
    };
    let host = unbracket(host);
    allowed.iter().any(|a| {
        if a == "*" {
            return true;
        }
        match a.strip_prefix("*.") {
            Some(suffix) => {
                let suffix = suffix.to_ascii_lowercase();
                host == suffix || host.ends_with(&format!(".{suffix}"))
            }
            None => unbracket(a) == host,
        }
    })
}

/// Why an address is denied by default (`None`: it is not), and the IPv4 address an IPv6
/// one embeds when that is what decided.
pub fn classify(ip: IpAddr) -> Option<(&'static str, Option<Ipv4Addr>)> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4).map(|c| (c, None)),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(if a == 0 {
        "unspecified (0.0.0.0/8)"
    } else if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() {
        "private"
    } else if ip.is_link_local() {
        "link-local"
    } else if a == 100 && (b & 0xc0) == 64 {
        "shared address space (CGNAT, 100.64.0.0/10)"
    } else if a == 192 && b == 0 && c == 0 {
        "IETF protocol assignments (192.0.0.0/24)"
    } else if ip.is_broadcast() {
        "broadcast"
    } else if ip.is_multicast() {
        "multicast"
    } else if a >= 240 {
        "reserved (240.0.0.0/4)"
    } else {
        return None;
    })
}

fn v6_class(ip: Ipv6Addr) -> Option<(&'static str, Option<Ipv4Addr>)> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some(("unspecified", None));
    }
    if ip.is_loopback() {
        return Some(("loopback", None));
    }
    if let Some(v4) = embedded_v4(ip) {
        return v4_class(v4).map(|c| (c, Some(v4)));
    }
    Some(if (s[0] & 0xfe00) == 0xfc00 {
        ("unique local (fc00::/7)", None)
    } else if (s[0] & 0xffc0) == 0xfe80 {
        ("link-local (fe80::/10)", None)
    } else if (s[0] & 0xffc0) == 0xfec0 {
        ("site-local (fec0::/10)", None)
    } else if (s[0] & 0xff00) == 0xff00 {
        ("multicast", None)
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        // Local-use NAT64: the IPv4 address may sit anywhere in it.
        ("local-use NAT64 (64:ff9b:1::/48)", None)
    } else {
        return None;
    })
}

/// The IPv4 address inside IPv4-mapped (`::ffff:a.b.c.d`), IPv4-translated
/// (`::ffff:0:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`), 6to4
/// (`2002:aabb:ccdd::`) and Teredo (`2001:0::`, the client address inverted) forms.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo]
        | [0, 0, 0, 0, 0xffff, 0, hi, lo]
        | [0, 0, 0, 0, 0, 0, hi, lo]
        | [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        [0x2001, 0, _, _, _, _, hi, lo] => Some(low(!hi, !lo)),
        _ => None,
    }
}

/// A DNS resolver that drops the addresses [`Policy::address_refusal`] refuses, and fails
/// (with a [`Refused`]) when none is left: the check applies to the address connected to,
/// so a name cannot resolve to an allowed address when checked and a denied one when used.
pub struct GuardedResolver {
    pub policy: Arc<Policy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?
                .collect();
            let mut refused: Vec<String> = Vec::new();
            let mut allowed: Vec<SocketAddr> = Vec::new();
            for addr in found {
                match policy.address_refusal(addr.ip()) {
                    None => allowed.push(addr),
                    Some(reason) if !refused.contains(&reason) => refused.push(reason),
                    Some(_) => {}
                }
            }
            if allowed.is_empty() {
                let reason = if refused.is_empty() {
                    format!("host {host:?} resolves to no address")
                } else {
                    format!(
                        "host {host:?} resolves only to denied addresses ({}): {NETWORKS_HINT}",
                        refused.join("; ")
                    )
                };
                return Err(Box::new(Refused(reason)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// `uri` as error messages show it: a password replaced by `***` (a user name alone too: it
/// may be a token), and the query string (presigned URLs' signatures) by `?…`.
pub fn redact(uri: &str) -> String {
    let mut out = String::with_capacity(uri.len());
    let rest = match uri.find("://") {
        Some(i) => {
            out.push_str(&uri[..i + 3]);
            let after = &uri[i + 3..];
            let end = after.find(['/', '\\', '?', '#']).unwrap_or(after.len());
            let authority = &after[..end];
            match authority.rfind('@') {
                Some(at) => {
                    match authority[..at].split_once(':') {
                        Some((user, _)) => {
                            out.push_str(user);
                            out.push_str(":***");
                        }
                        None => out.push_str("***"),
                    }
                    out.push_str(&authority[at..]);
                }
                None => out.push_str(authority),
            }
            &after[end..]
        }
        None => uri,
    };
    match rest.find('?') {
        Some(q) => {
            out.push_str(&rest[..q]);
            out.push_str("?…");
        }
        None => out.push_str(rest),
    }
    out
}
