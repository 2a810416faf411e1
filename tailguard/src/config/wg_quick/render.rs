//! Writes a [`WgConfig`] back as a wg-quick file, keys in base64, one key
//! per line, so that [`wg_quick::parse`](crate::config::wg_quick::parse) reads back the
//! same configuration. Only what differs from wg-quick's defaults is
//! written.

use std::fmt::Write as _;

use base64::Engine as _;

use crate::config::wg_quick::{Table, WgConfig};

/// The configuration as wg-quick text. The peers' `line`s have no place in
/// a file and are not written: reading the text back numbers each peer by
/// the line its `[Peer]` header lands on.
pub fn render(config: &WgConfig) -> String {
    let base64 = |key: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(key);
    let mut out = String::from("[Interface]\n");
    // Writing to a String cannot fail.
    let mut line = |key: &str, value: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{key} = {value}");
    };
    let i = &config.interface;
    line("PrivateKey", &base64(&i.private_key.0));
    if let Some(port) = i.listen_port {
        line("ListenPort", &port);
    }
    if let Some(mark) = i.fwmark {
        line("FwMark", &format_args!("{mark:#x}"));
    }
    if !i.addresses.is_empty() {
        line("Address", &comma_list(&i.addresses));
    }
    // The parser sorts DNS items into servers and search domains by
    // whether they read as addresses; the order within each is kept.
    let dns: Vec<String> = i
        .dns_servers
        .iter()
        .map(ToString::to_string)
        .chain(i.dns_search.iter().cloned())
        .collect();
    if !dns.is_empty() {
        line("DNS", &dns.join(", "));
    }
    if let Some(mtu) = i.mtu {
        line("MTU", &mtu);
    }
    match i.table {
        Table::Auto => {}
        Table::Off => line("Table", &"off"),
        Table::Id(id) => line("Table", &id),
    }
    for (key, hooks) in [
        ("PreUp", &i.pre_up),
        ("PostUp", &i.post_up),
        ("PreDown", &i.pre_down),
        ("PostDown", &i.post_down),
    ] {
        for hook in hooks {
            line(key, hook);
        }
    }
    if i.save_config {
        line("SaveConfig", &"true");
    }
    for peer in &config.peers {
        out.push_str("\n[Peer]\n");
        let mut line = |key: &str, value: &dyn std::fmt::Display| {
            let _ = writeln!(out, "{key} = {value}");
        };
        line("PublicKey", &peer.public_key);
        if let Some(key) = &peer.preshared_key {
            line("PresharedKey", &base64(&key.0));
        }
        if !peer.allowed_ips.is_empty() {
            line("AllowedIPs", &comma_list(&peer.allowed_ips));
        }
        if let Some(endpoint) = &peer.endpoint {
            line("Endpoint", endpoint);
        }
        if let Some(seconds) = peer.persistent_keepalive {
            line("PersistentKeepalive", &seconds);
        }
    }
    out
}

fn comma_list<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
        path::Path,
    };

    use ipnet::{IpNet, Ipv4Net, Ipv6Net};
    use proptest::{collection::vec, option, prelude::*};

    use super::*;
    use crate::config::wg_quick::{Endpoint, Interface, Peer, PublicKey, SecretKey, parse};

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<Ipv4Addr>().prop_map(IpAddr::V4),
            any::<Ipv6Addr>().prop_map(IpAddr::V6),
        ]
    }

    /// A prefix as written (host bits and all).
    fn prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<Ipv4Addr>(), 0..=32u8).prop_map(|(a, len)| Ipv4Net::new(a, len).unwrap().into()),
            (any::<Ipv6Addr>(), 0..=128u8)
                .prop_map(|(a, len)| Ipv6Net::new(a, len).unwrap().into()),
        ]
    }

    /// A name that no reader could take for an address.
    fn domain() -> impl Strategy<Value = String> {
        vec("[a-z]([a-z0-9-]{0,8}[a-z0-9])?", 1..4).prop_map(|labels| labels.join("."))
    }

    /// A shell command: anything but a comment sign, without white space at
    /// its ends (wg-quick trims it).
    fn hook() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9%/._=-]([a-zA-Z0-9 %/._=-]{0,30}[a-zA-Z0-9%/._=-])?"
    }

    fn table() -> impl Strategy<Value = Table> {
        prop_oneof![
            Just(Table::Auto),
            Just(Table::Off),
            // 52 is tailscaled's own.
            (1..=u32::MAX)
                .prop_filter("not tailscaled's table", |t| *t != 52)
                .prop_map(Table::Id),
        ]
    }

    fn interface() -> impl Strategy<Value = Interface> {
        (
            (
                any::<[u8; 32]>(),
                option::of(1..=u16::MAX),
                // Clear of tailscaled's mark bits (0xff0000) and table.
                option::of((1..=0xffffu32).prop_filter("not 52", |m| *m != 52)),
                vec(prefix(), 0..4),
                vec(ip(), 0..3),
                vec(domain(), 0..3),
                // IPv6 needs at least 1280.
                option::of(1280..=65535u32),
            ),
            (
                table(),
                vec(hook(), 0..3),
                vec(hook(), 0..3),
                vec(hook(), 0..2),
                vec(hook(), 0..2),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(
                    (key, listen_port, fwmark, addresses, dns_servers, dns_search, mtu),
                    (table, pre_up, post_up, pre_down, post_down, save_config),
                )| Interface {
                    private_key: SecretKey(key),
                    listen_port,
                    fwmark,
                    addresses,
                    dns_servers,
                    dns_search,
                    mtu,
                    table,
                    pre_up,
                    post_up,
                    pre_down,
                    post_down,
                    save_config,
                },
            )
    }

    fn endpoint() -> impl Strategy<Value = Endpoint> {
        prop_oneof![
            (ip(), 1..=u16::MAX)
                .prop_map(|(ip, port)| Endpoint::Address(SocketAddr::new(ip, port))),
            (domain(), 1..=u16::MAX).prop_map(|(host, port)| Endpoint::Host { host, port }),
        ]
    }

    fn peer() -> impl Strategy<Value = Peer> {
        (
            any::<[u8; 32]>(),
            option::of(any::<[u8; 32]>()),
            // Stored as the kernel stores them: network addresses.
            vec(prefix().prop_map(|p| p.trunc()), 0..4),
            option::of(endpoint()),
            option::of(1..=u16::MAX),
        )
            .prop_map(
                |(public, preshared, allowed_ips, endpoint, persistent_keepalive)| Peer {
                    public_key: PublicKey(public),
                    preshared_key: preshared.map(SecretKey),
                    allowed_ips,
                    endpoint,
                    persistent_keepalive,
                    line: 0,
                },
            )
    }

    fn config() -> impl Strategy<Value = WgConfig> {
        (interface(), vec(peer(), 0..4))
            .prop_filter("peers have distinct public keys", |(_, peers)| {
                peers
                    .iter()
                    .enumerate()
                    .all(|(i, p)| peers[..i].iter().all(|q| q.public_key != p.public_key))
            })
            .prop_map(|(interface, peers)| WgConfig { interface, peers })
    }

    /// How a person or another tool may write the same file: every choice
    /// is drawn from `noise`, a byte at a time.
    #[derive(Debug, Clone)]
    struct Mutation {
        crlf: bool,
        bom: bool,
        noise: Vec<u8>,
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        (any::<bool>(), any::<bool>(), vec(any::<u8>(), 1..64))
            .prop_map(|(crlf, bom, noise)| Mutation { crlf, bom, noise })
    }

    const HOOKS: [&str; 4] = ["PreUp", "PostUp", "PreDown", "PostDown"];

    impl Mutation {
        /// The rendered text rewritten, and the line of each `[Peer]` header
        /// in it.
        fn apply(&self, rendered: &str) -> (String, Vec<usize>) {
            let mut draw = self.noise.iter().copied().cycle();
            let mut next = move || draw.next().unwrap_or_default();
            let mut lines: Vec<String> = Vec::new();
            let mut peer_lines = Vec::new();
            for line in rendered.lines() {
                let choice = next();
                if choice.is_multiple_of(5) {
                    lines.push(comment_or_blank(next()));
                }
                let mutated = if line.starts_with('[') {
                    if line.eq_ignore_ascii_case("[peer]") {
                        peer_lines.push(lines.len() + 1);
                    }
                    let inner = random_case(&line[1..line.len() - 1], &mut next);
                    format!(
                        "{}[{}{inner}{}]{}",
                        ws(next()),
                        ws(next()),
                        ws(next()),
                        ws(next())
                    )
                } else if let Some((key, value)) = line.split_once(" = ") {
                    let value = if HOOKS.contains(&key) {
                        value.to_string()
                    } else {
                        value.replace(", ", &format!("{},{}", ws(next()), ws(next())))
                    };
                    let comment = if next().is_multiple_of(4) {
                        " # ünïcode, = [Peer]"
                    } else {
                        ""
                    };
                    format!(
                        "{}{}{}={}{value}{}{comment}",
                        ws(next()),
                        random_case(key, &mut next),
                        ws(next()),
                        ws(next()),
                        ws(next())
                    )
                } else {
                    line.to_string()
                };
                lines.push(mutated);
            }
            let newline = if self.crlf { "\r\n" } else { "\n" };
            let mut text = lines.join(newline) + newline;
            if self.bom {
                text.insert(0, '\u{feff}');
            }
            (text, peer_lines)
        }
    }

    /// Nothing, or some spaces and tabs.
    fn ws(choice: u8) -> &'static str {
        ["", "", " ", "  ", "\t", " \t "][usize::from(choice) % 6]
    }

    fn comment_or_blank(choice: u8) -> String {
        ["", "# a comment", "   ", "\t# PrivateKey = not this one"][usize::from(choice) % 4]
            .to_string()
    }

    fn random_case(word: &str, next: &mut impl FnMut() -> u8) -> String {
        word.chars()
            .map(|c| {
                if next().is_multiple_of(2) {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    }

    fn read_back(text: &str) -> WgConfig {
        parse(text, Path::new("wg0.conf")).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// The same configuration, with each peer's line where its header is.
    fn at_lines(config: &WgConfig, lines: &[usize]) -> WgConfig {
        let mut expected = config.clone();
        assert_eq!(expected.peers.len(), lines.len());
        for (peer, line) in expected.peers.iter_mut().zip(lines) {
            peer.line = *line;
        }
        expected
    }

    proptest! {
        #[test]
        fn parse_reads_back_what_render_wrote(config in config()) {
            let text = render(&config);
            let (_, lines) = Mutation { crlf: false, bom: false, noise: vec![1] }.apply(&text);
            prop_assert_eq!(read_back(&text), at_lines(&config, &lines), "{}", text);
        }

        #[test]
        fn parse_reads_back_any_spelling_of_it(config in config(), mutation in mutation()) {
            let (text, lines) = mutation.apply(&render(&config));
            prop_assert_eq!(read_back(&text), at_lines(&config, &lines), "{:?}", text);
        }
    }

    #[test]
    fn render_writes_wg_quick_lines() {
        let config = read_back(
            "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\
             Address = 10.1.0.2/24\nTable = off\n\n[Peer]\n\
             PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n\
             AllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = [2001:db8::1]:51820\n",
        );
        assert_eq!(
            render(&config),
            "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\
             Address = 10.1.0.2/24\nTable = off\n\n[Peer]\n\
             PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n\
             AllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = [2001:db8::1]:51820\n"
        );
    }
}
