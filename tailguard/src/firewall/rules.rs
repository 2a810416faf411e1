//! The nftables rule set: the input policy and the whole forwarding policy
//! with NAT (docs/policy.md), as one table. With `TG_DATAPATH=netfilter` it
//! is the policy; with the eBPF datapath it is what applies to every packet
//! the fast path hands to the kernel, so both paths give the same result.
//!
//! Each rule is one row of [`PolicyRule`] and carries the row's name as its
//! comment; the commands are built with the `nftables` crate's typed schema.

use std::{
    borrow::Cow,
    net::{Ipv4Addr, Ipv6Addr},
};

use nftables::{
    expr::{
        Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, RT, RTKey, Range,
        SetItem, TcpOption,
    },
    schema::{Chain as NftChain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table},
    stmt::{Counter, Mangle, Match, NAT, NATFamily, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use tailguard_common::policy::{Chain, PolicyRule};

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

/// The comment of the rule that keeps `TS_DEST_IP` off the fast path's
/// translation ports.
pub const FAST_PATH_PORTS: &str = PolicyRule::DstnatFastPathPorts.name();

type Commands = Vec<NfObject<'static>>;

fn table() -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    })
}

/// How each chain hooks into netfilter, at netfilter's standard priorities.
fn chain(chain: Chain) -> NfObject<'static> {
    let (kind, hook, prio, policy) = match chain {
        Chain::Input => (NfChainType::Filter, NfHook::Input, 0, NfChainPolicy::Drop),
        Chain::Mss => (
            NfChainType::Filter,
            NfHook::Forward,
            -150,
            NfChainPolicy::Accept,
        ),
        Chain::Forward => (NfChainType::Filter, NfHook::Forward, 0, NfChainPolicy::Drop),
        Chain::Dstnat => (
            NfChainType::NAT,
            NfHook::Prerouting,
            -100,
            NfChainPolicy::Accept,
        ),
        Chain::Srcnat => (
            NfChainType::NAT,
            NfHook::Postrouting,
            100,
            NfChainPolicy::Accept,
        ),
    };
    NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(NftChain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: chain.name().into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(policy),
        ..NftChain::default()
    })))
}

/// A rule of `row`, in the row's chain, with the row's name as its comment.
fn rule(row: PolicyRule, expr: Vec<Statement<'static>>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: TABLE.into(),
        chain: row.row().chain.name().into(),
        expr: expr.into(),
        comment: Some(row.name().into()),
        ..Rule::default()
    })))
}

fn compare(
    op: Operator,
    left: Expression<'static>,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    compare(Operator::EQ, left, right)
}

fn text(s: impl Into<Cow<'static, str>>) -> Expression<'static> {
    Expression::String(s.into())
}

fn number(n: u16) -> Expression<'static> {
    Expression::Number(n.into())
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn iif(name: &str) -> Statement<'static> {
    is(meta(MetaKey::Iifname), text(name.to_owned()))
}

fn oif(name: &str) -> Statement<'static> {
    is(meta(MetaKey::Oifname), text(name.to_owned()))
}

fn set(items: &[&str]) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items
            .iter()
            .map(|item| SetItem::Element(text((*item).to_owned())))
            .collect(),
    ))
}

fn range(first: u16, last: u16) -> Expression<'static> {
    Expression::Range(Box::new(Range {
        range: [number(first), number(last)],
    }))
}

fn established() -> Statement<'static> {
    compare(
        Operator::IN,
        Expression::Named(NamedExpression::CT(nftables::expr::CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        Expression::List(vec![text("established"), text("related")]),
    )
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn udp_dport(port: u16) -> Statement<'static> {
    is(payload("udp", "dport"), number(port))
}

/// Masquerade rules of `row` for traffic matching `matches`. For protocols
/// with ports (and ICMP identifiers) the kernel keeps to the ports below
/// the fast path's range (`tailguard_common::nat::NAT_PORT_FIRST`), so the
/// two never hand out the same port on the same address; nftables takes a
/// port range only after a protocol match, hence two rules.
fn masquerade(row: PolicyRule, matches: [Statement<'static>; 2]) -> [NfObject<'static>; 2] {
    let last = tailguard_common::nat::NAT_PORT_FIRST - 1;
    let ported = is(
        meta(MetaKey::L4proto),
        set(&["tcp", "udp", "icmp", "ipv6-icmp"]),
    );
    let [a, b] = matches;
    let to_ports = NAT {
        addr: None,
        family: None,
        port: Some(range(1024, last)),
        flags: None,
    };
    [
        rule(
            row,
            vec![
                a.clone(),
                b.clone(),
                ported,
                Statement::Masquerade(Some(to_ports)),
            ],
        ),
        rule(row, vec![a, b, Statement::Masquerade(None)]),
    ]
}

/// The commands that replace the table in one transaction: adding it first
/// makes the delete succeed when it is not there yet.
pub fn replace(plan: &FirewallPlan) -> Nftables<'static> {
    let mut commands = vec![
        NfObject::CmdObject(NfCmd::Add(table())),
        NfObject::CmdObject(NfCmd::Delete(table())),
        NfObject::CmdObject(NfCmd::Add(table())),
    ];
    commands.extend(input(plan));
    commands.extend(forward(plan));
    commands.extend(nat(plan));
    Nftables {
        objects: commands.into(),
    }
}

/// The commands that remove the table, whether or not it is there.
pub fn remove() -> Nftables<'static> {
    Nftables {
        objects: vec![
            NfObject::CmdObject(NfCmd::Add(table())),
            NfObject::CmdObject(NfCmd::Delete(table())),
        ]
        .into(),
    }
}

/// Input to the host: default deny (`input:refused`), with the openings
/// docs/policy.md lists.
fn input(p: &FirewallPlan) -> Commands {
    let (wg, ts) = (p.wg_device.as_str(), p.ts_device.as_str());
    let mut rules = vec![
        chain(Chain::Input),
        rule(PolicyRule::InputLoopback, vec![iif("lo"), accept()]),
        rule(PolicyRule::InputReplies, vec![established(), accept()]),
        rule(
            PolicyRule::InputIcmpErrors,
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
            PolicyRule::InputIcmpv6,
            vec![
                compare(
                    Operator::NEQ,
                    payload("icmpv6", "type"),
                    set(&["echo-request", "nd-redirect"]),
                ),
                accept(),
            ],
        ),
    ];
    if let Some(port) = p.wg_port {
        rules.push(rule(
            PolicyRule::InputWireGuard,
            vec![udp_dport(port), accept()],
        ));
    }
    if p.ts_port != 0 {
        rules.push(rule(
            PolicyRule::InputTailscale,
            vec![udp_dport(p.ts_port), accept()],
        ));
    }
    if let Some(port) = p.status_port {
        rules.push(rule(
            PolicyRule::InputStatusPage,
            vec![
                is(meta(MetaKey::Iifname), set(&[wg, ts])),
                is(payload("tcp", "dport"), number(port)),
                accept(),
            ],
        ));
    }
    if p.expose_host {
        rules.push(rule(
            PolicyRule::InputExposeHost,
            vec![is(meta(MetaKey::Iifname), set(&[wg, ts])), accept()],
        ));
    }
    rules
}

/// Forwarding: default drop (`forward:refused`, `forward:isolated-peers`);
/// wg -> wg unless isolated; wg <-> ts; MSS clamped on the way.
fn forward(p: &FirewallPlan) -> Commands {
    let (wg, ts) = (p.wg_device.as_str(), p.ts_device.as_str());
    let mut rules = vec![
        chain(Chain::Mss),
        // The smaller route MTU of both ways (`rt mtu`).
        rule(
            PolicyRule::ForwardMssClamp,
            vec![
                compare(Operator::IN, payload("tcp", "flags"), text("syn")),
                Statement::Mangle(Mangle {
                    key: Expression::Named(NamedExpression::TcpOption(TcpOption {
                        name: "maxseg".into(),
                        field: Some("size".into()),
                    })),
                    value: Expression::Named(NamedExpression::RT(RT {
                        key: RTKey::MTU,
                        family: None,
                    })),
                }),
            ],
        ),
        chain(Chain::Forward),
        // The fast path drops these too; the kernel forwards without
        // looking at a checksum.
        rule(
            PolicyRule::ForwardUdp6ZeroChecksum,
            vec![
                is(meta(MetaKey::Nfproto), text("ipv6")),
                is(meta(MetaKey::L4proto), text("udp")),
                is(payload("udp", "checksum"), number(0)),
                Statement::Counter(Counter::Anonymous(None)),
                Statement::Drop(None),
            ],
        ),
        rule(PolicyRule::ForwardReplies, vec![established(), accept()]),
        rule(PolicyRule::ForwardWgToTs, vec![iif(wg), oif(ts), accept()]),
        rule(PolicyRule::ForwardTsToWg, vec![iif(ts), oif(wg), accept()]),
    ];
    if !p.isolate_peers {
        rules.push(rule(
            PolicyRule::ForwardWgToWg,
            vec![iif(wg), oif(wg), accept()],
        ));
    }
    rules
}

/// Both source NATs, and the translation to `TS_DEST_IP`.
fn nat(p: &FirewallPlan) -> Commands {
    let (wg, ts) = (p.wg_device.as_str(), p.ts_device.as_str());
    let mut rules = vec![chain(Chain::Dstnat), chain(Chain::Srcnat)];
    if p.fast_path_ports && (p.dest.v4.is_some() || p.dest.v6.is_some()) {
        let first = tailguard_common::nat::NAT_PORT_FIRST;
        rules.push(rule(
            PolicyRule::DstnatFastPathPorts,
            vec![
                iif(ts),
                is(meta(MetaKey::L4proto), set(&["tcp", "udp"])),
                is(payload("th", "dport"), range(first, u16::MAX)),
                accept(),
            ],
        ));
    }
    if let (Some(own), Some(dest)) = (p.ts_v4, p.dest.v4) {
        rules.push(rule(
            PolicyRule::DstnatTsDestIpV4,
            vec![
                iif(ts),
                is(payload("ip", "daddr"), text(own.to_string())),
                dnat(NATFamily::IP, dest.to_string()),
            ],
        ));
    }
    if let (Some(own), Some(dest)) = (p.ts_v6, p.dest.v6) {
        rules.push(rule(
            PolicyRule::DstnatTsDestIpV6,
            vec![
                iif(ts),
                is(payload("ip6", "daddr"), text(own.to_string())),
                dnat(NATFamily::IP6, dest.to_string()),
            ],
        ));
    }
    rules.extend(masquerade(PolicyRule::SrcnatWgToTs, [iif(wg), oif(ts)]));
    if p.snat_to_wg {
        rules.extend(masquerade(PolicyRule::SrcnatTsToWg, [iif(ts), oif(wg)]));
    }
    rules
}

fn dnat(family: NATFamily, addr: String) -> Statement<'static> {
    Statement::DNAT(Some(NAT {
        addr: Some(text(addr)),
        family: Some(family),
        port: None,
        flags: None,
    }))
}

#[cfg(test)]
mod tests {
    use tailguard_common::{
        Device,
        policy::{
            self, Action, Arrival, Bound, Form, HostTraffic, KernelPath, NewFlow, Openings, Source,
            Switches,
        },
    };

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

    /// A plan with every rule in it that a plan can switch on.
    fn everything() -> FirewallPlan {
        let mut p = plan();
        p.status_port = Some(8080);
        p.expose_host = true;
        p.dest = DestIps {
            v4: Some(Ipv4Addr::new(10, 0, 0, 2)),
            v6: Some("fd00::2".parse().unwrap()),
        };
        p.ts_v4 = Some(Ipv4Addr::new(100, 64, 0, 1));
        p.ts_v6 = Some("fd7a:115c:a1e0::1".parse().unwrap());
        p.fast_path_ports = true;
        p
    }

    fn rules(commands: &Nftables<'static>) -> Vec<Rule<'static>> {
        commands
            .objects
            .iter()
            .filter_map(|c| match c {
                NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(r))) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn chains(commands: &Nftables<'static>) -> Vec<NftChain<'static>> {
        commands
            .objects
            .iter()
            .filter_map(|c| match c {
                NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(c))) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    /// The rules' comments, per chain: what each plan produces, readably.
    fn comments(p: &FirewallPlan, chain: Chain) -> Vec<String> {
        rules(&replace(p))
            .into_iter()
            .filter(|r| r.chain == chain.name())
            .map(|r| r.comment.unwrap().into_owned())
            .collect()
    }

    /// What a rule does, by its last statement.
    fn action(rule: &Rule<'_>) -> Action {
        match rule.expr.last() {
            Some(Statement::Accept(_)) => Action::Accept,
            Some(Statement::Drop(_)) => Action::Drop,
            Some(Statement::Masquerade(_)) => Action::Masquerade,
            Some(Statement::DNAT(_)) => Action::Dnat,
            Some(Statement::Mangle(_)) => Action::ClampMss,
            other => panic!("{:?}: no verdict the policy knows: {other:?}", rule.comment),
        }
    }

    const WG: Source = Source::Device(Device::WireGuard);
    const TS: Source = Source::Device(Device::Tailscale);

    /// A new flow's first packet (UDP to port 53 unless said otherwise),
    /// as the kernel's table sees it.
    fn arrival(from: Device, bound: Bound, ipv6: bool) -> Arrival {
        Arrival {
            from,
            bound,
            ipv6,
            established: false,
            udp_zero_checksum: false,
            tcp_syn: false,
            dport: Some(53),
        }
    }

    fn through(p: Arrival, isolate_peers: bool) -> KernelPath {
        policy::kernel_table(
            p,
            Switches {
                isolate_peers,
                snat_to_wg: true,
            },
            true,
        )
    }

    fn new_flow(from: Device, bound: Bound, ipv6: bool, isolate_peers: bool) -> NewFlow {
        through(arrival(from, bound, ipv6), isolate_peers).verdict
    }

    /// The rows a packet passes, by the decision functions: the one that
    /// decides it, then the translations.
    fn rows_of(flow: NewFlow) -> Vec<PolicyRule> {
        match flow {
            NewFlow::ToHost => panic!("to the host: the input rows decide"),
            NewFlow::Refused(rule) => vec![rule],
            NewFlow::Forwarded {
                dnat,
                forward,
                snat,
            } => dnat.into_iter().chain([forward]).chain(snat).collect(),
        }
    }

    /// A packet each row decides (or translates), through the pure decision
    /// functions, and whether the plan must isolate the peers for it.
    fn decided(row: PolicyRule) -> (Vec<PolicyRule>, bool) {
        let p = everything();
        let open = Openings {
            wg_port: p.wg_port,
            ts_port: p.ts_port,
            status_port: p.status_port,
            expose_host: p.expose_host,
        };
        let closed = Openings {
            expose_host: false,
            ..open
        };
        let input = |from, what, open| (vec![policy::input(from, what, open)], false);
        match row {
            PolicyRule::InputLoopback => input(Source::Loopback, HostTraffic::Tcp(22), closed),
            PolicyRule::InputReplies => input(Source::Other, HostTraffic::Reply, closed),
            PolicyRule::InputIcmpErrors => input(TS, HostTraffic::IcmpError, closed),
            PolicyRule::InputIcmpv6 => input(
                WG,
                HostTraffic::Icmpv6 {
                    echo_request_or_redirect: false,
                },
                closed,
            ),
            PolicyRule::InputWireGuard => input(Source::Other, HostTraffic::Udp(51820), closed),
            PolicyRule::InputTailscale => input(Source::Other, HostTraffic::Udp(41641), closed),
            PolicyRule::InputStatusPage => input(TS, HostTraffic::Tcp(8080), closed),
            PolicyRule::InputExposeHost => input(WG, HostTraffic::Tcp(22), open),
            PolicyRule::InputRefused => input(
                TS,
                HostTraffic::Icmpv6 {
                    echo_request_or_redirect: true,
                },
                closed,
            ),
            PolicyRule::ForwardMssClamp => {
                let syn = Arrival {
                    tcp_syn: true,
                    dport: Some(443),
                    ..arrival(Device::WireGuard, Bound::Tailnet, false)
                };
                (through(syn, false).mss.into_iter().collect(), false)
            }
            PolicyRule::ForwardUdp6ZeroChecksum => {
                let zero = Arrival {
                    established: true,
                    udp_zero_checksum: true,
                    ..arrival(Device::WireGuard, Bound::Tailnet, true)
                };
                (rows_of(through(zero, false).verdict), false)
            }
            PolicyRule::ForwardReplies => {
                // IPv4 has no checksum-0 rule.
                let reply = Arrival {
                    established: true,
                    udp_zero_checksum: true,
                    ..arrival(Device::Tailscale, Bound::WireGuard, false)
                };
                (rows_of(through(reply, false).verdict), false)
            }
            PolicyRule::ForwardWgToTs | PolicyRule::SrcnatWgToTs => (
                rows_of(new_flow(Device::WireGuard, Bound::Tailnet, false, false)),
                false,
            ),
            PolicyRule::ForwardTsToWg | PolicyRule::SrcnatTsToWg => (
                rows_of(new_flow(Device::Tailscale, Bound::WireGuard, true, false)),
                false,
            ),
            PolicyRule::ForwardWgToWg => (
                rows_of(new_flow(Device::WireGuard, Bound::WireGuard, true, false)),
                false,
            ),
            PolicyRule::ForwardIsolatedPeers => (
                rows_of(new_flow(Device::WireGuard, Bound::WireGuard, false, true)),
                true,
            ),
            PolicyRule::ForwardRefused => (
                rows_of(new_flow(Device::Tailscale, Bound::Tailnet, false, false)),
                false,
            ),
            PolicyRule::DstnatFastPathPorts => {
                let to_fast_path_port = Arrival {
                    dport: Some(tailguard_common::nat::NAT_PORT_FIRST),
                    ..arrival(Device::Tailscale, Bound::DestIp, false)
                };
                let path = through(to_fast_path_port, false);
                // Untranslated, the packet is the host's: the input rows decide.
                assert_eq!(path.verdict, NewFlow::ToHost);
                (path.dstnat_accepted.into_iter().collect(), false)
            }
            PolicyRule::DstnatTsDestIpV4 => (
                rows_of(new_flow(Device::Tailscale, Bound::DestIp, false, false)),
                false,
            ),
            PolicyRule::DstnatTsDestIpV6 => (
                rows_of(new_flow(Device::Tailscale, Bound::DestIp, true, false)),
                false,
            ),
        }
    }

    #[test]
    fn every_row_is_decided_by_the_policy_and_held_by_the_table() {
        for row in PolicyRule::ALL {
            let facts = row.row();
            let (rows, isolated) = decided(row);
            assert!(rows.contains(&row), "{facts:?}: decided as {rows:?}");
            let mut p = everything();
            p.isolate_peers = isolated;
            let commands = replace(&p);
            let all = rules(&commands);
            let own: Vec<_> = all
                .iter()
                .filter(|r| r.comment.as_deref() == Some(facts.name))
                .collect();
            match facts.form {
                Form::Rule => {
                    // Masquerading takes two rules (see `masquerade`).
                    let expected = if facts.action == Action::Masquerade {
                        2
                    } else {
                        1
                    };
                    assert_eq!(own.len(), expected, "{facts:?}: {all:#?}");
                    for rule in own {
                        assert_eq!(rule.chain, facts.chain.name(), "{facts:?}");
                        assert_eq!(action(rule), facts.action, "{facts:?}");
                    }
                }
                Form::ChainPolicy => {
                    assert!(own.is_empty(), "{facts:?}: a chain's policy has no rule");
                    assert_eq!(facts.action, Action::Drop);
                    let chain = chains(&commands)
                        .into_iter()
                        .find(|c| c.name == facts.chain.name())
                        .unwrap_or_else(|| panic!("{facts:?}: no chain"));
                    assert_eq!(chain.policy, Some(NfChainPolicy::Drop), "{facts:?}");
                }
            }
            // Every rule is a row.
            for rule in &all {
                let name = rule.comment.as_deref();
                assert!(
                    PolicyRule::ALL.iter().any(|r| Some(r.name()) == name),
                    "{name:?} is no row"
                );
            }
        }
    }

    #[test]
    fn isolation_leaves_wg_to_wg_to_the_forward_chains_policy() {
        let mut p = everything();
        p.isolate_peers = true;
        let forward = comments(&p, Chain::Forward);
        assert!(!forward.contains(&PolicyRule::ForwardWgToWg.name().to_string()));
        assert_eq!(
            new_flow(Device::WireGuard, Bound::WireGuard, false, true),
            NewFlow::Refused(PolicyRule::ForwardIsolatedPeers)
        );
    }

    #[test]
    fn input_is_default_deny_with_the_documented_openings() {
        let c = comments(&plan(), Chain::Input);
        for row in [PolicyRule::InputWireGuard, PolicyRule::InputTailscale] {
            assert!(c.contains(&row.name().to_string()), "{c:?}");
        }
        for row in [PolicyRule::InputExposeHost, PolicyRule::InputStatusPage] {
            assert!(!c.contains(&row.name().to_string()), "{c:?}");
        }
        let mut p = plan();
        p.expose_host = true;
        p.status_port = Some(8080);
        p.ts_port = 0;
        let c = comments(&p, Chain::Input);
        for row in [PolicyRule::InputExposeHost, PolicyRule::InputStatusPage] {
            assert!(c.contains(&row.name().to_string()), "{c:?}");
        }
        assert!(
            !c.contains(&PolicyRule::InputTailscale.name().to_string()),
            "port 0 opens nothing: {c:?}"
        );
        let open = Openings {
            ts_port: 0,
            ..Openings::default()
        };
        assert_eq!(
            policy::input(TS, HostTraffic::Udp(0), open),
            PolicyRule::InputRefused
        );
        let chain = &chains(&replace(&p))[0];
        assert_eq!(
            (chain.name.as_ref(), chain.policy),
            ("input", Some(NfChainPolicy::Drop))
        );
    }

    #[test]
    fn isolation_and_snat_switch_their_rules() {
        let wg_to_wg = PolicyRule::ForwardWgToWg.name().to_string();
        assert!(comments(&plan(), Chain::Forward).contains(&wg_to_wg));
        assert_eq!(
            comments(&plan(), Chain::Srcnat).len(),
            4,
            "two rules per direction"
        );
        let mut p = plan();
        p.isolate_peers = true;
        p.snat_to_wg = false;
        assert!(!comments(&p, Chain::Forward).contains(&wg_to_wg));
        assert_eq!(
            comments(&p, Chain::Srcnat),
            [PolicyRule::SrcnatWgToTs.name(); 2]
        );
        let NewFlow::Forwarded { snat, .. } = policy::new_flow(
            Device::Tailscale,
            Bound::WireGuard,
            false,
            Switches::default(),
        ) else {
            panic!("ts -> wg is forwarded")
        };
        assert_eq!(snat, None, "no SNAT to wg without --snat-subnet-routes");
    }

    #[test]
    fn dest_ip_needs_both_the_setting_and_the_own_address() {
        let mut p = plan();
        p.dest.v4 = Some(Ipv4Addr::new(10, 0, 0, 2));
        assert!(
            comments(&p, Chain::Dstnat).is_empty(),
            "no tailnet address yet"
        );
        p.ts_v4 = Some(Ipv4Addr::new(100, 64, 0, 1));
        p.ts_v6 = Some("fd7a:115c:a1e0::1".parse().unwrap());
        assert_eq!(
            comments(&p, Chain::Dstnat),
            [PolicyRule::DstnatTsDestIpV4.name()]
        );
    }

    #[test]
    fn with_the_fast_path_dest_ip_leaves_its_ports_alone() {
        let mut p = plan();
        p.dest.v4 = Some(Ipv4Addr::new(10, 0, 0, 2));
        p.ts_v4 = Some(Ipv4Addr::new(100, 64, 0, 1));
        p.fast_path_ports = true;
        assert_eq!(
            comments(&p, Chain::Dstnat),
            [FAST_PATH_PORTS, PolicyRule::DstnatTsDestIpV4.name()],
            "the exception comes first"
        );
        let exception = rules(&replace(&p))
            .into_iter()
            .find(|r| r.comment.as_deref() == Some(FAST_PATH_PORTS))
            .unwrap();
        let json = serde_json::to_value(&exception.expr).unwrap();
        assert_eq!(
            json[2]["match"]["right"]["range"],
            serde_json::json!([61000, 65535])
        );
        assert_eq!(json[3], serde_json::json!({"accept": null}));
        p.dest.v4 = None;
        assert!(
            comments(&p, Chain::Dstnat).is_empty(),
            "no TS_DEST_IP, no exception"
        );
    }
}
