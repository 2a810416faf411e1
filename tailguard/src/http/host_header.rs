//! Whether a request's `Host` names this node, against DNS rebinding: a
//! page on `evil.example`, whose DNS then answers with this node's address,
//! runs in a peer's browser with the page's origin, and its requests carry
//! `Host: evil.example`. Only what names this node passes.

use std::net::{IpAddr, Ipv6Addr};

/// Whether `host` (a `Host` header, or the authority of an absolute
/// request target) is the address the client connected to (`local`), with
/// or without a port, IPv6 in brackets; `localhost`; or one of `names`
/// (compared without case and without a final dot).
pub fn is_ours(host: &str, local: IpAddr, names: &[String]) -> bool {
    let Some(host) = without_port(host.trim()) else {
        return false;
    };
    match host {
        Host::Ip(ip) => ip.to_canonical() == local.to_canonical(),
        Host::Name(name) => {
            let name = name.strip_suffix('.').unwrap_or(name);
            !name.is_empty()
                && (name.eq_ignore_ascii_case("localhost")
                    || names.iter().any(|ours| {
                        let ours = ours.strip_suffix('.').unwrap_or(ours);
                        ours.eq_ignore_ascii_case(name)
                    }))
        }
    }
}

enum Host<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

/// The host part of `host[:port]`, `[v6][:port]` or a bare IPv6 address;
/// `None` if it is none of these.
fn without_port(host: &str) -> Option<Host<'_>> {
    let is_port = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(is_port);
        return port_ok
            .then(|| inside.parse::<Ipv6Addr>().ok())
            .flatten()
            .map(|ip| Host::Ip(IpAddr::V6(ip)));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(Host::Ip(ip));
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) => is_port(port).then_some(name)?,
        None => host,
    };
    match name.parse::<IpAddr>() {
        // A bare IPv6 address with a port is ambiguous: refused above.
        Ok(ip) if ip.is_ipv4() => Some(Host::Ip(ip)),
        Ok(_) => None,
        Err(_) => Some(Host::Name(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec![
            "tailguard.standin.ts.net.".into(),
            "tailguard".into(),
            "bridge-host".into(),
        ]
    }

    #[test]
    fn the_address_connected_to_passes_with_or_without_port() {
        let v4: IpAddr = "10.66.0.2".parse().unwrap();
        let v6: IpAddr = "fd66::2".parse().unwrap();
        for host in ["10.66.0.2", "10.66.0.2:8088", " 10.66.0.2:80 "] {
            assert!(is_ours(host, v4, &[]), "{host}");
        }
        for host in ["[fd66::2]", "[fd66::2]:8088", "fd66::2", "[FD66::2]:1"] {
            assert!(is_ours(host, v6, &[]), "{host}");
        }
        // Reached through a dual-stack listener.
        assert!(is_ours(
            "10.66.0.2:8088",
            "::ffff:10.66.0.2".parse().unwrap(),
            &[]
        ));
    }

    #[test]
    fn names_of_the_node_and_localhost_pass() {
        let local: IpAddr = "100.64.0.1".parse().unwrap();
        for host in [
            "localhost",
            "LocalHost:9002",
            "tailguard.standin.ts.net",
            "tailguard.standin.ts.net.:8088",
            "TAILGUARD",
            "bridge-host:8088",
        ] {
            assert!(is_ours(host, local, &names()), "{host}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        let local: IpAddr = "10.66.0.2".parse().unwrap();
        for host in [
            "evil.example",
            "evil.example:8088",
            "tailguard.evil.example",
            "tailguard.standin.ts.net.evil.example",
            "10.66.0.3",
            "10.66.0.3:8088",
            "[fd66::2]:8088",
            "[10.66.0.2]",
            "[evil.example]",
            "10.66.0.2:port",
            "10.66.0.2:123456",
            "[fd66::2]x",
            "",
            ".",
            ":8088",
            "localhost.evil.example",
        ] {
            assert!(!is_ours(host, local, &names()), "{host:?} must be refused");
        }
    }
}
