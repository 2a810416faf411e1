//! The forwarding and input policy, one row per rule (docs/policy.md).
//!
//! Both datapaths name their rules from [`PolicyRule`]: each nftables rule
//! of the table carries its row's [`name`](PolicyRule::name) as its comment,
//! and the fast path decides a new flow with [`new_flow`] and counts it
//! under the row's [`outcome`](PolicyRule::outcome). The decision
//! functions here are pure, so every row is a host test.

use crate::{Device, Outcome};

/// One row of the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyRule {
    /// Input: anything on the loopback device.
    InputLoopback,
    /// Input: replies to the host's own connections (and related ICMP).
    InputReplies,
    /// Input: ICMP errors (unreachable, time exceeded, parameter problem),
    /// which path-MTU discovery needs.
    InputIcmpErrors,
    /// Input: ICMPv6 but echo requests and redirects (neighbour discovery,
    /// path MTU).
    InputIcmpv6,
    /// Input: WireGuard's UDP port.
    InputWireGuard,
    /// Input: Tailscale's UDP port (when it is not 0).
    InputTailscale,
    /// Input: the status page's TCP port, from either side.
    InputStatusPage,
    /// Input: everything from either side (`TG_EXPOSE_HOST=1`).
    InputExposeHost,
    /// Input: the rest is dropped (the chain's policy).
    InputRefused,
    /// Forward: the MSS of a TCP SYN is clamped to the route MTU.
    ForwardMssClamp,
    /// Forward: IPv6 UDP with checksum 0, which IPv6 forbids, is dropped.
    ForwardUdp6ZeroChecksum,
    /// Forward: replies and related ICMP errors of a forwarded connection.
    ForwardReplies,
    /// Forward: from the WireGuard side to the tailnet.
    ForwardWgToTs,
    /// Forward: from the tailnet to the WireGuard side.
    ForwardTsToWg,
    /// Forward: between WireGuard peers (`WG_ISOLATE_PEERS=0`).
    ForwardWgToWg,
    /// Forward: between WireGuard peers with `WG_ISOLATE_PEERS=1`: no rule
    /// accepts it, so the chain's policy drops it.
    ForwardIsolatedPeers,
    /// Forward: the rest (ts -> ts, either side -> the uplink or the
    /// internet) is dropped (the chain's policy).
    ForwardRefused,
    /// Dstnat: a new connection from the tailnet to the fast path's
    /// translation ports is not sent on to `TS_DEST_IP`.
    DstnatFastPathPorts,
    /// Dstnat: the node's tailnet IPv4 address is sent on to `TS_DEST_IP`.
    DstnatTsDestIpV4,
    /// Dstnat: the node's tailnet IPv6 address is sent on to `TS_DEST_IP`.
    DstnatTsDestIpV6,
    /// Srcnat: wg -> ts leaves with the node's tailnet address.
    SrcnatWgToTs,
    /// Srcnat: ts -> wg leaves with the node's WireGuard address
    /// (`--snat-subnet-routes`, on unless turned off).
    SrcnatTsToWg,
}

/// The nftables chain a row lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Chain {
    Input,
    Mss,
    Forward,
    Dstnat,
    Srcnat,
}

impl Chain {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Mss => "mss",
            Self::Forward => "forward",
            Self::Dstnat => "dstnat",
            Self::Srcnat => "srcnat",
        }
    }
}

/// What a row does with the packets it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Accept,
    Drop,
    /// The source becomes the node's address on the way out.
    Masquerade,
    /// The destination becomes `TS_DEST_IP`.
    Dnat,
    /// The TCP MSS option is rewritten.
    ClampMss,
}

/// The families a row applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Families {
    Both,
    V4,
    V6,
}

/// How the nftables table holds a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// Rules of their own, commented with the row's name.
    Rule,
    /// The chain's policy: packets no rule took.
    ChainPolicy,
}

/// The facts of one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    /// The nftables comment, and the name docs/policy.md uses.
    pub name: &'static str,
    pub chain: Chain,
    pub action: Action,
    pub families: Families,
    pub form: Form,
    /// What the fast path counts a packet under when this row decides it
    /// (`kernel:*`: it hands the packet to the kernel, whose rule applies).
    pub outcome: Outcome,
}

impl PolicyRule {
    pub const ALL: [Self; 22] = [
        Self::InputLoopback,
        Self::InputReplies,
        Self::InputIcmpErrors,
        Self::InputIcmpv6,
        Self::InputWireGuard,
        Self::InputTailscale,
        Self::InputStatusPage,
        Self::InputExposeHost,
        Self::InputRefused,
        Self::ForwardMssClamp,
        Self::ForwardUdp6ZeroChecksum,
        Self::ForwardReplies,
        Self::ForwardWgToTs,
        Self::ForwardTsToWg,
        Self::ForwardWgToWg,
        Self::ForwardIsolatedPeers,
        Self::ForwardRefused,
        Self::DstnatFastPathPorts,
        Self::DstnatTsDestIpV4,
        Self::DstnatTsDestIpV6,
        Self::SrcnatWgToTs,
        Self::SrcnatTsToWg,
    ];

    /// The table: every row's facts.
    pub const fn row(self) -> Row {
        use {Action::*, Chain::*, Families::*, Form::*, Outcome::*};
        let (name, chain, action, families, form, outcome) = match self {
            Self::InputLoopback => ("input:loopback", Input, Accept, Both, Rule, KernelLocal),
            Self::InputReplies => ("input:replies", Input, Accept, Both, Rule, KernelLocal),
            Self::InputIcmpErrors => ("input:icmp-errors", Input, Accept, V4, Rule, KernelLocal),
            Self::InputIcmpv6 => ("input:icmpv6", Input, Accept, V6, Rule, KernelLocal),
            Self::InputWireGuard => ("input:wireguard", Input, Accept, Both, Rule, KernelLocal),
            Self::InputTailscale => ("input:tailscale", Input, Accept, Both, Rule, KernelLocal),
            Self::InputStatusPage => ("input:status-page", Input, Accept, Both, Rule, KernelLocal),
            Self::InputExposeHost => ("input:expose-host", Input, Accept, Both, Rule, KernelLocal),
            Self::InputRefused => ("input:refused", Input, Drop, Both, ChainPolicy, KernelLocal),
            Self::ForwardMssClamp => ("mss:clamp", Mss, ClampMss, Both, Rule, Redirected),
            Self::ForwardUdp6ZeroChecksum => (
                "forward:udp6-zero-checksum",
                Forward,
                Drop,
                V6,
                Rule,
                DropUdpZeroChecksum,
            ),
            Self::ForwardReplies => (
                "forward:replies",
                Forward,
                Accept,
                Both,
                Rule,
                KernelNotOurFlow,
            ),
            Self::ForwardWgToTs => ("forward:wg-to-ts", Forward, Accept, Both, Rule, Redirected),
            Self::ForwardTsToWg => ("forward:ts-to-wg", Forward, Accept, Both, Rule, Redirected),
            Self::ForwardWgToWg => ("forward:wg-to-wg", Forward, Accept, Both, Rule, Redirected),
            Self::ForwardIsolatedPeers => (
                "forward:isolated-peers",
                Forward,
                Drop,
                Both,
                ChainPolicy,
                DropIsolated,
            ),
            Self::ForwardRefused => (
                "forward:refused",
                Forward,
                Drop,
                Both,
                ChainPolicy,
                DropNoRoute,
            ),
            Self::DstnatFastPathPorts => (
                "dstnat:fast-path-ports",
                Dstnat,
                Accept,
                Both,
                Rule,
                KernelNotOurFlow,
            ),
            Self::DstnatTsDestIpV4 => ("dstnat:ts-dest-ip-v4", Dstnat, Dnat, V4, Rule, Redirected),
            Self::DstnatTsDestIpV6 => ("dstnat:ts-dest-ip-v6", Dstnat, Dnat, V6, Rule, Redirected),
            Self::SrcnatWgToTs => (
                "srcnat:wg-to-ts",
                Srcnat,
                Masquerade,
                Both,
                Rule,
                Redirected,
            ),
            Self::SrcnatTsToWg => (
                "srcnat:ts-to-wg",
                Srcnat,
                Masquerade,
                Both,
                Rule,
                Redirected,
            ),
        };
        Row {
            name,
            chain,
            action,
            families,
            form,
            outcome,
        }
    }

    /// The row's name: the comment of its nftables rules.
    pub const fn name(self) -> &'static str {
        self.row().name
    }

    /// What the fast path counts a packet under when this row decides it.
    pub const fn outcome(self) -> Outcome {
        self.row().outcome
    }
}

/// Where a packet arriving on a device is bound, as the nftables table
/// sees it (the fast path works it out from its configuration and routes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// The host itself (its addresses on either side): chain input.
    Host,
    /// From the tailnet, to the node's tailnet address with `TS_DEST_IP`
    /// set for the family: dstnat sends it on to that host.
    DestIp,
    /// The tailnet (by its routes).
    Tailnet,
    /// The WireGuard side (by its routes).
    WireGuard,
    /// Outside our routes.
    Elsewhere,
}

/// The settings the forwarding rows depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Switches {
    /// `WG_ISOLATE_PEERS=1`.
    pub isolate_peers: bool,
    /// ts -> wg is source-NATed to the node's WireGuard address.
    pub snat_to_wg: bool,
}

/// What the policy does with the first packet of a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewFlow {
    /// To the host: the input rows decide (see [`input`]).
    ToHost,
    /// Forwarded by the `forward` row, its destination translated by the
    /// `dnat` row and its source by the `snat` row, if any.
    Forwarded {
        dnat: Option<PolicyRule>,
        forward: PolicyRule,
        snat: Option<PolicyRule>,
    },
    /// Dropped by this row.
    Refused(PolicyRule),
}

/// The policy's decision for the first packet of a flow arriving on `from`,
/// bound for `bound`, of the family `ipv6` says.
#[inline(always)]
pub const fn new_flow(from: Device, bound: Bound, ipv6: bool, switches: Switches) -> NewFlow {
    let ts_to_wg_snat = if switches.snat_to_wg {
        Some(PolicyRule::SrcnatTsToWg)
    } else {
        None
    };
    match (from, bound) {
        (_, Bound::Host) => NewFlow::ToHost,
        (Device::WireGuard, Bound::Tailnet) => NewFlow::Forwarded {
            dnat: None,
            forward: PolicyRule::ForwardWgToTs,
            snat: Some(PolicyRule::SrcnatWgToTs),
        },
        (Device::WireGuard, Bound::WireGuard) if switches.isolate_peers => {
            NewFlow::Refused(PolicyRule::ForwardIsolatedPeers)
        }
        (Device::WireGuard, Bound::WireGuard) => NewFlow::Forwarded {
            dnat: None,
            forward: PolicyRule::ForwardWgToWg,
            snat: None,
        },
        (Device::Tailscale, Bound::DestIp) => NewFlow::Forwarded {
            dnat: Some(if ipv6 {
                PolicyRule::DstnatTsDestIpV6
            } else {
                PolicyRule::DstnatTsDestIpV4
            }),
            forward: PolicyRule::ForwardTsToWg,
            snat: ts_to_wg_snat,
        },
        (Device::Tailscale, Bound::WireGuard) => NewFlow::Forwarded {
            dnat: None,
            forward: PolicyRule::ForwardTsToWg,
            snat: ts_to_wg_snat,
        },
        // `DestIp` is only ever bound from the tailnet; from WireGuard the
        // node's tailnet address is the host's.
        (Device::WireGuard, Bound::DestIp | Bound::Elsewhere)
        | (Device::Tailscale, Bound::Tailnet | Bound::Elsewhere) => {
            NewFlow::Refused(PolicyRule::ForwardRefused)
        }
    }
}

/// A packet arriving on one side, by what the kernel's table looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub from: Device,
    pub bound: Bound,
    pub ipv6: bool,
    /// Of a connection conntrack knows (a reply, or related ICMP).
    pub established: bool,
    /// IPv6 UDP with checksum 0.
    pub udp_zero_checksum: bool,
    /// A TCP SYN.
    pub tcp_syn: bool,
    /// The destination port of TCP or UDP.
    pub dport: Option<u16>,
}

/// The rows of the kernel's table a packet passes, in the order of the
/// hooks: dstnat (prerouting), mss and forward (or input), srcnat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPath {
    /// A dstnat row that took the packet without translating it.
    pub dstnat_accepted: Option<PolicyRule>,
    pub mss: Option<PolicyRule>,
    /// The forward chain's decision (with the translations, as for a new
    /// flow), or `ToHost`.
    pub verdict: NewFlow,
}

/// The kernel table's decision for `p`; `fast_path_ports`: the eBPF
/// datapath runs, and its translation ports are kept from `TS_DEST_IP`.
pub const fn kernel_table(p: Arrival, switches: Switches, fast_path_ports: bool) -> KernelPath {
    let mut bound = p.bound;
    let mut dstnat_accepted = None;
    // The nat chains see a connection's first packet only.
    if !p.established
        && fast_path_ports
        && matches!(bound, Bound::DestIp)
        && matches!(p.dport, Some(port) if port >= crate::nat::NAT_PORT_FIRST)
    {
        dstnat_accepted = Some(PolicyRule::DstnatFastPathPorts);
        bound = Bound::Host;
    }
    let verdict = if matches!(bound, Bound::Host) {
        NewFlow::ToHost
    } else if p.ipv6 && p.udp_zero_checksum {
        NewFlow::Refused(PolicyRule::ForwardUdp6ZeroChecksum)
    } else if p.established {
        NewFlow::Forwarded {
            dnat: None,
            forward: PolicyRule::ForwardReplies,
            snat: None,
        }
    } else {
        new_flow(p.from, bound, p.ipv6, switches)
    };
    // Chain mss comes before chain forward, whatever that decides.
    let mss = if p.tcp_syn && !matches!(verdict, NewFlow::ToHost) {
        Some(PolicyRule::ForwardMssClamp)
    } else {
        None
    };
    KernelPath {
        dstnat_accepted,
        mss,
        verdict,
    }
}

/// Where a packet to the host came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Loopback,
    Device(Device),
    /// Any other device (the uplink).
    Other,
}

/// A packet to the host, by what the input rules look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostTraffic {
    /// A reply to one of the host's own connections.
    Reply,
    /// An ICMP error (IPv4).
    IcmpError,
    /// ICMPv6 of this type.
    Icmpv6 {
        echo_request_or_redirect: bool,
    },
    Udp(u16),
    Tcp(u16),
    /// Anything else (ICMP echo, other protocols).
    Other,
}

/// The ports and switches the input rows depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Openings {
    pub wg_port: Option<u16>,
    /// 0: no rule (tailscaled opens its port itself).
    pub ts_port: u16,
    pub status_port: Option<u16>,
    pub expose_host: bool,
}

/// The input row that decides a packet to the host (the rows in the order
/// of the chain).
pub const fn input(from: Source, what: HostTraffic, open: Openings) -> PolicyRule {
    if matches!(from, Source::Loopback) {
        return PolicyRule::InputLoopback;
    }
    match what {
        HostTraffic::Reply => return PolicyRule::InputReplies,
        HostTraffic::IcmpError => return PolicyRule::InputIcmpErrors,
        HostTraffic::Icmpv6 {
            echo_request_or_redirect: false,
        } => return PolicyRule::InputIcmpv6,
        _ => {}
    }
    if let (HostTraffic::Udp(port), Some(wg)) = (what, open.wg_port)
        && port == wg
    {
        return PolicyRule::InputWireGuard;
    }
    if let HostTraffic::Udp(port) = what
        && open.ts_port != 0
        && port == open.ts_port
    {
        return PolicyRule::InputTailscale;
    }
    let from_either_side = matches!(from, Source::Device(_));
    if let (HostTraffic::Tcp(port), Some(status)) = (what, open.status_port)
        && port == status
        && from_either_side
    {
        return PolicyRule::InputStatusPage;
    }
    if open.expose_host && from_either_side {
        return PolicyRule::InputExposeHost;
    }
    PolicyRule::InputRefused
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_has_its_own_name_and_is_listed_once() {
        for (i, a) in PolicyRule::ALL.into_iter().enumerate() {
            let row = a.row();
            assert!(
                row.name.starts_with(row.chain.name())
                    && row.name[row.chain.name().len()..].starts_with(':'),
                "{row:?}: a row is named after its chain"
            );
            for b in &PolicyRule::ALL[i + 1..] {
                assert_ne!(a, *b);
                assert_ne!(row.name, b.name());
            }
        }
    }

    /// docs/policy.md, the page users read, lists every row once, with the
    /// family and the fast path's count the table gives it.
    #[test]
    fn the_policy_page_lists_every_row_as_the_table_has_it() {
        extern crate std;
        use std::{format, vec::Vec};
        let page = include_str!("../../docs/policy.md");
        for rule in PolicyRule::ALL {
            let row = rule.row();
            let start = format!("| `{}` |", row.name);
            let lines: Vec<&str> = page.lines().filter(|l| l.starts_with(&start)).collect();
            let [line] = lines[..] else {
                panic!("docs/policy.md lists {} {} times", row.name, lines.len());
            };
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let family = match row.families {
                Families::Both => "both",
                Families::V4 => "IPv4",
                Families::V6 => "IPv6",
            };
            assert_eq!(cells[2], family, "{line}");
            // The input rows are the kernel's alone: no count column.
            if row.chain != Chain::Input {
                let counted = cells[cells.len() - 2];
                assert!(
                    counted.starts_with(&format!("`{}`", row.outcome.name())),
                    "{line}: counted as {}",
                    row.outcome.name()
                );
            }
        }
        // And no row on the page that the table lacks.
        for line in page.lines().filter(|l| l.starts_with("| `")) {
            let name = line.split('`').nth(1).unwrap_or_default();
            assert!(
                PolicyRule::ALL.iter().any(|r| r.name() == name),
                "docs/policy.md lists {name}, which the table does not have"
            );
        }
    }

    #[test]
    fn the_fast_path_drops_what_a_row_drops_and_nothing_else() {
        for rule in PolicyRule::ALL {
            let row = rule.row();
            let dropped = rule.outcome().name().starts_with("drop:");
            // The input chain is the kernel's: the fast path hands every
            // packet to the host over.
            let expected = row.action == Action::Drop && row.chain != Chain::Input;
            assert_eq!(dropped, expected, "{row:?}");
        }
    }
}
