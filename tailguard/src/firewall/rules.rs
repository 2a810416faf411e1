//! The nftables rule set: the reference's input policy and the whole
//! forwarding policy with NAT, as one table. With `TG_DATAPATH=netfilter` it
//! is the policy; with the eBPF datapath it is what applies to every packet
//! the fast path hands to the kernel, so both paths give the same result.
//!
//! Built as nftables' JSON commands and checked against the `nftables`
//! crate's schema before anything is sent to the kernel.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use crate::config::settings::DestIps;

/// The table TailGuard owns (family `inet`: one rule set for both families).
pub const TABLE: &str = "tailguard";

/// Everything the rule set depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FirewallPlan {
    pub wg_device: String,
    pub ts_device: String,
    /// WireGuard's listen port (the actual one when the config names none).
    pub wg_port: Option<u16>,
    /// Tailscale's UDP port; 0: tailscaled picks one and opens it itself.
    pub ts_port: u16,
    /// The status page, reachable from both sides.
    pub status_port: Option<u16>,
    pub expose_host: bool,
    pub isolate_peers: bool,
    pub snat_to_wg: bool,
    pub dest: DestIps,
    /// The node's tailnet addresses, once Tailscale has given them: the
    /// `TS_DEST_IP` translation needs them.
    pub ts_v4: Option<Ipv4Addr>,
    pub ts_v6: Option<Ipv6Addr>,
    /// The eBPF datapath translates to the ports from
    /// `tailguard_common::nat::NAT_PORT_FIRST` on: a packet to one of them
    /// that the fast path left to the kernel belongs to a flow of the fast
    /// path's (or to none), never to a new `TS_DEST_IP` connection.
    pub fast_path_ports: bool,
}

fn table() -> Value {
    json!({"table": {"family": "inet", "name": TABLE}})
}

fn chain(name: &str, kind: &str, hook: &str, prio: i32, policy: &str) -> Value {
    json!({"add": {"chain": {
        "family": "inet", "table": TABLE, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": policy,
    }}})
}

fn rule(chain: &str, comment: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {
        "family": "inet", "table": TABLE, "chain": chain, "expr": expr, "comment": comment,
    }}})
}

fn is(left: Value, right: impl Into<Value>) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right.into()}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn iif(name: &str) -> Value {
    is(meta("iifname"), name)
}

fn oif(name: &str) -> Value {
    is(meta("oifname"), name)
}

fn set(items: &[&str]) -> Value {
    json!({"set": items})
}

fn established() -> Value {
    json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}})
}

/// Masquerade rules for traffic matching `matches`. For protocols with ports
/// (and ICMP identifiers) the kernel keeps to the ports below the fast
/// path's range (`tailguard_common::nat::NAT_PORT_FIRST`), so the two never
/// hand out the same port on the same address.
fn masquerade(comment: &str, matches: [Value; 2]) -> [Value; 2] {
    let last = tailguard_common::nat::NAT_PORT_FIRST - 1;
    let ported = is(meta("l4proto"), set(&["tcp", "udp", "icmp", "ipv6-icmp"]));
    let [a, b] = matches;
    [
        rule(
            "srcnat",
            comment,
            vec![
                a.clone(),
                b.clone(),
                ported,
                json!({"masquerade": {"port": {"range": [1024, last]}}}),
            ],
        ),
        rule("srcnat", comment, vec![a, b, json!({"masquerade": null})]),
    ]
}

fn accept() -> Value {
    json!({"accept": null})
}

fn udp_dport(port: u16) -> Value {
    is(payload("udp", "dport"), port)
}

/// The comment of the rule that keeps `TS_DEST_IP` off the fast path's
/// translation ports.
pub const FAST_PATH_PORTS: &str = "the fast path's translation ports are not TS_DEST_IP's";

/// Netfilter's standard priorities.
const FILTER: i32 = 0;
const MANGLE: i32 = -150;
const DSTNAT: i32 = -100;
const SRCNAT: i32 = 100;

/// The commands that replace the table in one transaction: adding it first
/// makes the delete succeed when it is not there yet.
pub fn replace(plan: &FirewallPlan) -> Value {
    let mut commands = vec![
        json!({"add": table()}),
        json!({"delete": table()}),
        json!({"add": table()}),
    ];
    commands.extend(input(plan));
    commands.extend(forward(plan));
    commands.extend(nat(plan));
    json!({"nftables": commands})
}

/// The commands that remove the table, whether or not it is there.
pub fn remove() -> Value {
    json!({"nftables": [{"add": table()}, {"delete": table()}]})
}

/// Input to the host (reference §3): default deny.
fn input(p: &FirewallPlan) -> Vec<Value> {
    let (wg, ts) = (p.wg_device.as_str(), p.ts_device.as_str());
    let mut rules = vec![
        chain("input", "filter", "input", FILTER, "drop"),
        rule("input", "loopback", vec![iif("lo"), accept()]),
        rule(
            "input",
            "replies to the host's own connections",
            vec![established(), accept()],
        ),
        rule(
            "input",
            "ICMP errors, for path-MTU discovery",
            vec![
                is(
                    payload("icmp", "type"),
                    set(&[
                        "destination-unreachable",
                        "time-exceeded",
                        "parameter-problem",
                    ]),
                ),
                accept(),
            ],
        ),
        rule(
            "input",
            "ICMPv6 but echo requests and redirects (neighbour discovery, path MTU)",
            vec![
                json!({"match": {"op": "!=", "left": payload("icmpv6", "type"), "right": set(&["echo-request", "nd-redirect"])}}),
                accept(),
            ],
        ),
    ];
    if let Some(port) = p.wg_port {
        rules.push(rule("input", "WireGuard", vec![udp_dport(port), accept()]));
    }
    if p.ts_port != 0 {
        rules.push(rule(
            "input",
            "Tailscale",
            vec![udp_dport(p.ts_port), accept()],
        ));
    }
    if let Some(port) = p.status_port {
        rules.push(rule(
            "input",
            "status page, from both sides",
            vec![
                is(meta("iifname"), set(&[wg, ts])),
                is(payload("tcp", "dport"), port),
                accept(),
            ],
        ));
    }
    if p.expose_host {
        rules.push(rule(
            "input",
            "TG_EXPOSE_HOST=1: the host is open to both sides",
            vec![is(meta("iifname"), set(&[wg, ts])), accept()],
        ));
    }
    rules
}

/// Forwarding (reference §3): default drop; wg -> wg unless isolated;
/// wg <-> ts; MSS clamped on the way.
fn forward(p: &FirewallPlan) -> Vec<Value> {
    let (wg, ts) = (p.wg_device.as_str(), p.ts_device.as_str());
    let mut rules = vec![
        chain("mss", "filter", "forward", MANGLE, "accept"),
        rule(
            "mss",
            "clamp the MSS of SYNs to the smaller route MTU of both ways (rt mtu)",
            vec![
                json!({"match": {"op": "in", "left": payload("tcp", "flags"), "right": "syn"}}),
                json!({"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}}, "value": {"rt": {"key": "mtu"}}}}),
            ],
        ),
        chain("forward", "filter", "forward", FILTER, "drop"),
        // The fast path drops these too (`drop:udp6-zero-checksum`); the
        // kernel forwards without looking at a checksum.
        rule(
            "forward",
            "IPv6 UDP with checksum 0, which IPv6 forbids",
            vec![
                is(meta("nfproto"), "ipv6"),
                is(meta("l4proto"), "udp"),
                is(payload("udp", "checksum"), 0),
                json!({"counter": null}),
                json!({"drop": null}),
            ],
        ),
        rule(
            "forward",
            "replies and related ICMP errors",
            vec![established(), accept()],
        ),
        rule("forward", "wg -> ts", vec![iif(wg), oif(ts), accept()]),
        rule(
            "forward",
            "ts -> wg (and TS_DEST_IP)",
            vec![iif(ts), oif(wg), accept()],
        ),
    ];
    if !p.isolate_peers {
        rules.push(rule(
            "forward",
            "wg -> wg (WG_ISOLATE_PEERS=0)",
            vec![iif(wg), oif(wg), accept()],
        ));
    }
    rules
}

/// Both source NATs, and the translation to `TS_DEST_IP`.
fn nat(p: &FirewallPlan) -> Vec<Value> {
    let (wg, ts) = (p.wg_device.as_str(), p.ts_device.as_str());
    let mut rules = vec![
        chain("dstnat", "nat", "prerouting", DSTNAT, "accept"),
        chain("srcnat", "nat", "postrouting", SRCNAT, "accept"),
    ];
    if p.fast_path_ports && (p.dest.v4.is_some() || p.dest.v6.is_some()) {
        let first = tailguard_common::nat::NAT_PORT_FIRST;
        rules.push(rule(
            "dstnat",
            FAST_PATH_PORTS,
            vec![
                iif(ts),
                is(meta("l4proto"), set(&["tcp", "udp"])),
                is(payload("th", "dport"), json!({"range": [first, u16::MAX]})),
                accept(),
            ],
        ));
    }
    if let (Some(own), Some(dest)) = (p.ts_v4, p.dest.v4) {
        rules.push(rule(
            "dstnat",
            "TS_DEST_IP (IPv4)",
            vec![
                iif(ts),
                is(payload("ip", "daddr"), own.to_string()),
                json!({"dnat": {"family": "ip", "addr": dest.to_string()}}),
            ],
        ));
    }
    if let (Some(own), Some(dest)) = (p.ts_v6, p.dest.v6) {
        rules.push(rule(
            "dstnat",
            "TS_DEST_IP (IPv6)",
            vec![
                iif(ts),
                is(payload("ip6", "daddr"), own.to_string()),
                json!({"dnat": {"family": "ip6", "addr": dest.to_string()}}),
            ],
        ));
    }
    rules.extend(masquerade(
        "wg -> ts leaves with the node's tailnet address",
        [iif(wg), oif(ts)],
    ));
    if p.snat_to_wg {
        rules.extend(masquerade(
            "ts -> wg leaves with the node's WireGuard address (--snat-subnet-routes)",
            [iif(ts), oif(wg)],
        ));
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> FirewallPlan {
        FirewallPlan {
            wg_device: "wg0".into(),
            ts_device: "tailscale0".into(),
            wg_port: Some(51820),
            ts_port: 41641,
            snat_to_wg: true,
            ..FirewallPlan::default()
        }
    }

    /// The rules' comments, per chain: what each plan produces, readably.
    fn comments(p: &FirewallPlan, chain: &str) -> Vec<String> {
        replace(p)["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"]["rule"].as_object())
            .filter(|r| r["chain"] == chain)
            .map(|r| r["comment"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn the_commands_fit_the_nftables_schema() {
        let mut p = plan();
        p.status_port = Some(8080);
        p.expose_host = true;
        p.dest = DestIps {
            v4: Some(Ipv4Addr::new(10, 0, 0, 2)),
            v6: Some("fd00::2".parse().unwrap()),
        };
        p.ts_v4 = Some(Ipv4Addr::new(100, 64, 0, 1));
        p.ts_v6 = Some("fd7a:115c:a1e0::1".parse().unwrap());
        for commands in [replace(&p), remove()] {
            let parsed: Result<nftables::schema::Nftables, _> =
                serde_json::from_value(commands.clone());
            assert!(parsed.is_ok(), "{parsed:?}\n{commands:#}");
        }
    }

    #[test]
    fn input_is_default_deny_with_the_reference_openings() {
        let c = comments(&plan(), "input");
        assert!(
            c.contains(&"WireGuard".to_string()) && c.contains(&"Tailscale".to_string()),
            "{c:?}"
        );
        assert!(
            !c.iter()
                .any(|c| c.contains("TG_EXPOSE_HOST") || c.contains("status")),
            "{c:?}"
        );
        let mut p = plan();
        p.expose_host = true;
        p.status_port = Some(8080);
        p.ts_port = 0;
        let c = comments(&p, "input");
        assert!(
            c.iter().any(|c| c.contains("TG_EXPOSE_HOST"))
                && c.iter().any(|c| c.contains("status")),
            "{c:?}"
        );
        assert!(
            !c.contains(&"Tailscale".to_string()),
            "port 0 opens nothing: {c:?}"
        );
        let chain = &replace(&p)["nftables"][3]["add"]["chain"];
        assert_eq!(
            (&chain["name"], &chain["policy"]),
            (&json!("input"), &json!("drop"))
        );
    }

    #[test]
    fn isolation_and_snat_switch_their_rules() {
        assert!(
            comments(&plan(), "forward")
                .iter()
                .any(|c| c.starts_with("wg -> wg"))
        );
        assert_eq!(
            comments(&plan(), "srcnat").len(),
            4,
            "two rules per direction"
        );
        let mut p = plan();
        p.isolate_peers = true;
        p.snat_to_wg = false;
        assert!(
            !comments(&p, "forward")
                .iter()
                .any(|c| c.starts_with("wg -> wg"))
        );
        assert_eq!(
            comments(&p, "srcnat"),
            ["wg -> ts leaves with the node's tailnet address"; 2]
        );
    }

    #[test]
    fn dest_ip_needs_both_the_setting_and_the_own_address() {
        let mut p = plan();
        p.dest.v4 = Some(Ipv4Addr::new(10, 0, 0, 2));
        assert!(comments(&p, "dstnat").is_empty(), "no tailnet address yet");
        p.ts_v4 = Some(Ipv4Addr::new(100, 64, 0, 1));
        p.ts_v6 = Some("fd7a:115c:a1e0::1".parse().unwrap());
        assert_eq!(comments(&p, "dstnat"), ["TS_DEST_IP (IPv4)"]);
    }

    #[test]
    fn with_the_fast_path_dest_ip_leaves_its_ports_alone() {
        let mut p = plan();
        p.dest.v4 = Some(Ipv4Addr::new(10, 0, 0, 2));
        p.ts_v4 = Some(Ipv4Addr::new(100, 64, 0, 1));
        p.fast_path_ports = true;
        assert_eq!(
            comments(&p, "dstnat"),
            [FAST_PATH_PORTS, "TS_DEST_IP (IPv4)"],
            "the exception comes first"
        );
        let commands = replace(&p);
        let exception = commands["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["add"]["rule"]["comment"] == FAST_PATH_PORTS)
            .unwrap();
        let expr = &exception["add"]["rule"]["expr"];
        assert_eq!(expr[2]["match"]["right"]["range"], json!([61000, 65535]));
        assert_eq!(expr[3], json!({"accept": null}));
        let parsed: Result<nftables::schema::Nftables, _> = serde_json::from_value(commands);
        assert!(parsed.is_ok(), "{parsed:?}");
        p.dest.v4 = None;
        assert!(
            comments(&p, "dstnat").is_empty(),
            "no TS_DEST_IP, no exception"
        );
    }
}
