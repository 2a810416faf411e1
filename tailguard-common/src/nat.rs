//! The fast path's connection table: every flow the programs own is a pair
//! of entries, one keyed by the packets of each direction as they arrive,
//! in one hash map per family (`NAT4`, `NAT6`). The pair is the unit: it is
//! made whole (reply half first, which is what makes a port ours) or not at
//! all, it expires whole (the daemon's sweeper removes both halves, see
//! `tailguard/src/datapath/sweeper.rs`), and a port is free only while
//! neither half of a pair holds it. The maps are plain hash maps, not LRU:
//! nothing is ever evicted behind the pair's back, and a full table refuses
//! new flows (to the kernel's path) instead of dropping live ones.
//!
//! A flow is owned by the fast path from its first packet (TCP SYN, UDP, ICMP
//! echo request) to the end; everything else goes to the kernel, whose
//! conntrack owns it. So no flow is ever translated by both.
//!
//! Each half stores only what the other side of the flow needs restored:
//! the address and port of the flow's client side (the source a forward
//! packet leaves with, the destination a reply goes back to). The far
//! side's address is the packet's own, or, for `TS_DEST_IP`, one of the
//! node's addresses from the configuration ([`kind::SERVICE_FROM_CONFIG`]).
//! So either half, translated and turned around, is the other half's key.

use bytemuck::{Pod, Zeroable};

use crate::{
    Config, Device,
    config::NodeAddress,
    wire::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, ipv4, ipv6, tcp},
};

/// A flow as seen arriving on one device, in the form the programs and the
/// daemon work with (both families alike). IPv4 addresses use the first
/// four bytes of each address field; for ICMP echo, `sport` is the
/// identifier and `dport` is 0. Ports are kept in network byte order, as in
/// the packet. The table itself holds the compact [`Key4`] / [`Key6`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// IP protocol number (6, 17, 1 or 58).
    pub proto: u8,
    /// The [`crate::Device`] it arrives on.
    pub ingress: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}

impl FlowKey {
    /// The key of the packet that answers this one, arriving on `ingress`
    /// (a [`crate::Device`]): addresses and ports swapped, except that an
    /// ICMP echo's answer carries the identifier where the request had it
    /// (`sport`, with `dport` 0).
    pub const fn reply(&self, ingress: u8) -> FlowKey {
        let echo = self.is_echo();
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: if echo { self.sport } else { self.dport },
            dport: if echo { 0 } else { self.sport },
            proto: self.proto,
            ingress,
            family: self.family,
            _pad: 0,
        }
    }

    pub const fn is_echo(&self) -> bool {
        self.proto == IPPROTO_ICMP || self.proto == IPPROTO_ICMPV6
    }

    pub const fn is_ipv6(&self) -> bool {
        self.family == ipv6::VERSION
    }

    /// The port (or echo identifier) of the flow's client side in a packet
    /// with this key: the source of a packet from the client (`origin`),
    /// the destination of one to it (an echo's identifier sits in `sport`
    /// both ways).
    pub const fn client_port(&self, origin: bool) -> u16 {
        if origin || self.is_echo() {
            self.sport
        } else {
            self.dport
        }
    }

    /// Sets the port [`Self::client_port`] reads.
    pub const fn set_client_port(&mut self, origin: bool, port: u16) {
        if origin || self.is_echo() {
            self.sport = port;
        } else {
            self.dport = port;
        }
    }

    pub const fn to_v4(&self) -> Key4 {
        Key4 {
            src: [self.src[0], self.src[1], self.src[2], self.src[3]],
            dst: [self.dst[0], self.dst[1], self.dst[2], self.dst[3]],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            ingress: self.ingress,
            _pad: [0; 2],
        }
    }

    pub const fn to_v6(&self) -> Key6 {
        Key6 {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            ingress: self.ingress,
            _pad: [0; 2],
        }
    }

    pub const fn from_v4(k: &Key4) -> FlowKey {
        let mut key = FlowKey {
            src: [0; 16],
            dst: [0; 16],
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
            ingress: k.ingress,
            family: ipv4::VERSION,
            _pad: 0,
        };
        let mut i = 0;
        while i < 4 {
            key.src[i] = k.src[i];
            key.dst[i] = k.dst[i];
            i += 1;
        }
        key
    }

    pub const fn from_v6(k: &Key6) -> FlowKey {
        FlowKey {
            src: k.src,
            dst: k.dst,
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
            ingress: k.ingress,
            family: ipv6::VERSION,
            _pad: 0,
        }
    }
}

/// The `NAT4` map's key: [`FlowKey`] with IPv4's addresses (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Key4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ingress: u8,
    pub _pad: [u8; 2],
}

/// The `NAT6` map's key (40 bytes).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Key6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ingress: u8,
    pub _pad: [u8; 2],
}

/// The part of a half that changes under concurrent packets: its state,
/// next to two bytes that never change once the half exists. Updated with
/// `last_seen` as one aligned 64-bit word by compare-and-exchange, so two
/// CPUs never lose each other's transition.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Meta {
    /// The client side's port (or echo identifier) the packet gets: its
    /// source port leaving as a forward packet, its destination port as a
    /// reply. Network byte order.
    pub port: u16,
    /// [`kind`] bits (set when the half is made, never changed).
    pub kind: u8,
    /// The flow's [`FlowState`] and [`CHARGED`] in the origin half; in the
    /// reply half, [`REPLY_SEEN`] once a reply went through.
    pub state: u8,
}

impl Meta {
    pub fn word(self) -> u32 {
        bytemuck::cast(self)
    }

    pub fn from_word(word: u32) -> Self {
        bytemuck::cast(word)
    }

    pub const fn is_origin(&self) -> bool {
        self.kind & kind::ORIGIN != 0
    }

    pub const fn flow_state(&self) -> FlowState {
        FlowState::from_bits(self.state)
    }
}

/// The origin half's flow holds one of its source's unreplied budget
/// (see [`FlowState::holds_budget`]); cleared, with the budget given back,
/// by whoever makes the transition out of those states.
pub const CHARGED: u8 = 1 << 7;
/// The reply half's mark that a reply went through (and made the origin's
/// state say so): later replies need not look at the origin half.
pub const REPLY_SEEN: u8 = 1 << 6;
/// The bits of [`Meta::state`] holding the [`FlowState`].
pub const STATE_MASK: u8 = 0x0f;

/// The bits of [`Meta::kind`].
pub mod kind {
    /// The half keyed by the packets of the side that started the flow.
    pub const ORIGIN: u8 = 1 << 0;
    /// The far side's address comes from the configuration: `TS_DEST_IP`
    /// as a forward packet's destination, the node's tailnet address as a
    /// reply's source.
    pub const SERVICE_FROM_CONFIG: u8 = 1 << 1;
}

/// One half of a pair in the form the programs and the daemon work with;
/// the table holds the compact [`Half4`] / [`Half6`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Half {
    /// The client side's address the packet gets: a forward packet's new
    /// source, a reply's new destination (4 or 16 bytes used).
    pub addr: [u8; 16],
    pub meta: Meta,
    /// When the last packet of this direction went through, in whole
    /// seconds of `CLOCK_MONOTONIC` (see [`crate::config::Clock`]).
    pub last_seen: u32,
}

/// The `NAT4` map's value (12 bytes). `meta` and `last_seen` come first:
/// together they are the 64-bit word the programs update atomically (map
/// values are 8-byte aligned; BPF's compare-and-exchange is 64-bit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Half4 {
    pub meta: Meta,
    pub last_seen: u32,
    pub addr: [u8; 4],
}

/// The `NAT6` map's value (24 bytes), laid out as [`Half4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Half6 {
    pub meta: Meta,
    pub last_seen: u32,
    pub addr: [u8; 16],
}

impl Half {
    pub const fn to_v4(&self) -> Half4 {
        Half4 {
            addr: [self.addr[0], self.addr[1], self.addr[2], self.addr[3]],
            meta: self.meta,
            last_seen: self.last_seen,
        }
    }

    pub const fn to_v6(&self) -> Half6 {
        Half6 {
            addr: self.addr,
            meta: self.meta,
            last_seen: self.last_seen,
        }
    }

    pub const fn from_v4(h: &Half4) -> Half {
        let mut addr = [0; 16];
        let mut i = 0;
        while i < 4 {
            addr[i] = h.addr[i];
            i += 1;
        }
        Half {
            addr,
            meta: h.meta,
            last_seen: h.last_seen,
        }
    }

    pub const fn from_v6(h: &Half6) -> Half {
        Half {
            addr: h.addr,
            meta: h.meta,
            last_seen: h.last_seen,
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): `Pod` per bytemuck's derive (no padding, any bit
    // pattern valid), which is what `aya::Pod` requires.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Key4 {}
    unsafe impl aya::Pod for super::Key6 {}
    unsafe impl aya::Pod for super::Half4 {}
    unsafe impl aya::Pod for super::Half6 {}
    unsafe impl aya::Pod for super::SourceKey {}
}

/// What a packet of a flow becomes, and where it goes: a half resolved
/// against the packet's key and the configuration ([`resolve`]).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// The [`Device`] to send it out of, by role: its index and MTU come
    /// from the configuration, so flows stay right when tailscaled makes
    /// its device anew (and across a restart of the daemon).
    pub egress: u32,
}

/// Resolves `half` (keyed `key`) into `out`: the client side's address and
/// port from the half, the far side's from the packet or (for
/// `TS_DEST_IP`) the configuration. False when the configuration no longer
/// has the node's address the half takes from it.
#[inline(always)]
pub fn resolve(cfg: &Config, key: &FlowKey, half: &Half, out: &mut Translation) -> bool {
    let service = half.meta.kind & kind::SERVICE_FROM_CONFIG != 0;
    let ipv6 = key.is_ipv6();
    out.egress = Device::from_role(key.ingress as u32).other() as u32;
    if half.meta.is_origin() {
        out.src = half.addr;
        out.sport = half.meta.port;
        out.dport = key.dport;
        if service {
            return cfg.copy_node_address(ipv6, NodeAddress::DestIp, &mut out.dst);
        }
        out.dst = key.dst;
    } else {
        out.dst = half.addr;
        if key.is_echo() {
            out.sport = half.meta.port;
            out.dport = 0;
        } else {
            out.sport = key.sport;
            out.dport = half.meta.port;
        }
        if service {
            return cfg.copy_node_address(ipv6, NodeAddress::Tailnet, &mut out.src);
        }
        out.src = key.src;
    }
    true
}

/// The key of the half that pairs with one whose packets (keyed `key`)
/// are translated as `t`: the packets that answer them, arriving where
/// they leave.
#[inline(always)]
pub fn paired_key(t: &Translation, key: &FlowKey) -> FlowKey {
    let egress = t.egress as u8;
    FlowKey {
        src: t.src,
        dst: t.dst,
        sport: t.sport,
        dport: t.dport,
        proto: key.proto,
        ingress: egress,
        family: key.family,
        _pad: 0,
    }
    .reply(egress)
}

/// The half that pairs with `half` (keyed `key`), made anew at `now`: what
/// the other direction's packets must become to look as they did. An
/// origin half made from its reply half has a reply behind it: it starts
/// answered and open.
#[inline(always)]
pub fn paired_half(key: &FlowKey, half: &Half, now: u32) -> Half {
    let service = half.meta.kind & kind::SERVICE_FROM_CONFIG;
    let (addr, port, kind, state) = if half.meta.is_origin() {
        (key.src, key.client_port(true), service, 0)
    } else {
        let state = if key.proto == IPPROTO_TCP {
            FlowState::Established
        } else {
            FlowState::Replied
        };
        (
            key.dst,
            key.client_port(false),
            kind::ORIGIN | service,
            state as u8,
        )
    };
    Half {
        addr,
        meta: Meta { port, kind, state },
        last_seen: now,
    }
}

/// Whether `found`, the half at the key a half pairs with, is the one it
/// pairs with (`expected`, from [`paired_half`]): the same client address
/// and port, the same side and way of translating. Anything else there
/// belongs to another flow.
#[inline(always)]
pub fn pairs_with(expected: &Half, found: &Half) -> bool {
    found.addr == expected.addr
        && found.meta.port == expected.meta.port
        && found.meta.kind == expected.meta.kind
}

/// Where a flow stands, after conntrack's states (`nf_conntrack_proto_tcp`,
/// `_udp`, `_icmp`), with the kernel's default timeouts. Without sequence
/// numbers to check, the TCP states follow the flags alone.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowState {
    /// UDP or ICMP echo, nothing back yet.
    Unreplied = 0,
    /// UDP or ICMP echo, answered (a DNS query's one exchange).
    Replied = 1,
    /// TCP: the client's SYN.
    SynSent = 2,
    /// TCP: the server's SYN-ACK.
    SynRecv = 3,
    /// TCP: the handshake's last ACK, and the connection's life.
    Established = 4,
    /// TCP: a FIN from the client only (the server may still send).
    FinFromOrigin = 5,
    /// TCP: a FIN from the server only (the client may still send).
    FinFromReply = 6,
    /// TCP: a FIN both ways; the last ACK outstanding.
    LastAck = 7,
    /// TCP: closed both ways and acknowledged.
    TimeWait = 8,
    /// TCP: reset.
    Close = 9,
    /// UDP or ICMP echo, answered and then sent to again: a stream
    /// (conntrack's ASSURED).
    Assured = 10,
}

impl FlowState {
    pub const ALL: [Self; 11] = [
        Self::Unreplied,
        Self::Replied,
        Self::SynSent,
        Self::SynRecv,
        Self::Established,
        Self::FinFromOrigin,
        Self::FinFromReply,
        Self::LastAck,
        Self::TimeWait,
        Self::Close,
        Self::Assured,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// The state in [`Meta::state`] (unknown numbers read as closed: the
    /// shortest timeout).
    pub const fn from_bits(state: u8) -> Self {
        match state & STATE_MASK {
            0 => Self::Unreplied,
            1 => Self::Replied,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::Established,
            5 => Self::FinFromOrigin,
            6 => Self::FinFromReply,
            7 => Self::LastAck,
            8 => Self::TimeWait,
            10 => Self::Assured,
            _ => Self::Close,
        }
    }

    /// The state a new flow of `proto` starts in.
    pub const fn first(proto: u8) -> Self {
        if proto == IPPROTO_TCP {
            Self::SynSent
        } else {
            Self::Unreplied
        }
    }

    /// How long a flow in this state lives without packets, in seconds:
    /// the kernel's `nf_conntrack_*_timeout_*` defaults.
    pub const fn timeout(self, proto: u8) -> u32 {
        match self {
            Self::Unreplied | Self::Replied => 30,
            Self::Assured if proto == IPPROTO_UDP => 120,
            Self::Assured => 30,
            Self::SynSent => 120,
            Self::SynRecv => 60,
            Self::Established => 5 * 24 * 3600,
            Self::FinFromOrigin | Self::FinFromReply => 120,
            Self::LastAck => 30,
            Self::TimeWait => 120,
            Self::Close => 10,
        }
    }

    /// Whether the flow still counts against its source's budget of
    /// unreplied flows: nothing back yet (for TCP: the handshake not done),
    /// which is what a scan or a flood leaves behind.
    pub const fn holds_budget(self) -> bool {
        matches!(self, Self::Unreplied | Self::SynSent | Self::SynRecv)
    }

    /// Whether reaching this state gives the budget back: an answer, a
    /// handshake done. A reset is not one: a scan of closed ports is
    /// answered with resets, and its flows keep counting until they go.
    pub const fn answered(self) -> bool {
        !self.holds_budget() && !matches!(self, Self::Close)
    }

    /// The state after a packet with `tcp_flags` (0 for UDP and ICMP) from
    /// the client (`from_origin`) or the server.
    #[inline(always)]
    pub const fn after(self, proto: u8, from_origin: bool, tcp_flags: u8) -> Self {
        if proto != IPPROTO_TCP {
            return match self {
                Self::Unreplied if !from_origin => Self::Replied,
                Self::Replied if from_origin => Self::Assured,
                other => other,
            };
        }
        let syn = tcp_flags & tcp::SYN != 0;
        let ack = tcp_flags & tcp::ACK != 0;
        let fin = tcp_flags & tcp::FIN != 0;
        if tcp_flags & tcp::RST != 0 {
            return Self::Close;
        }
        match self {
            // The client starts over on the same ports: a fresh flow.
            Self::TimeWait | Self::Close if syn && !ack && from_origin => Self::SynSent,
            Self::SynSent if syn && ack && !from_origin => Self::SynRecv,
            Self::SynRecv if fin => {
                if from_origin {
                    Self::FinFromOrigin
                } else {
                    Self::FinFromReply
                }
            }
            Self::SynRecv if ack && !syn && from_origin => Self::Established,
            Self::Established if fin && from_origin => Self::FinFromOrigin,
            Self::Established if fin => Self::FinFromReply,
            Self::FinFromOrigin if fin && !from_origin => Self::LastAck,
            Self::FinFromReply if fin && from_origin => Self::LastAck,
            Self::LastAck if ack && !fin && !syn => Self::TimeWait,
            other => other,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Unreplied => "unreplied",
            Self::Replied => "replied",
            Self::Assured => "assured",
            Self::SynSent => "syn-sent",
            Self::SynRecv => "syn-recv",
            Self::Established => "established",
            Self::FinFromOrigin => "fin-from-client",
            Self::FinFromReply => "fin-from-server",
            Self::LastAck => "last-ack",
            Self::TimeWait => "time-wait",
            Self::Close => "close",
        }
    }
}

/// The state byte after a packet: the new state, the budget mark kept
/// while the state still holds the budget. `None` when nothing changes.
/// The second value says the budget is to be given back (whoever installs
/// the new byte does it, once).
#[inline(always)]
pub const fn next_state_bits(
    state: u8,
    proto: u8,
    from_origin: bool,
    tcp_flags: u8,
) -> Option<(u8, bool)> {
    let now = FlowState::from_bits(state);
    let next = now.after(proto, from_origin, tcp_flags);
    let charged = state & CHARGED != 0;
    let release = charged && next.answered();
    if next as u8 == now as u8 {
        return None;
    }
    let kept = if charged && !release { CHARGED } else { 0 };
    Some((next as u8 | kept, release))
}

/// A pair is expired when neither direction has had a packet for its
/// state's timeout (`last_seen` is the later of the two halves').
pub const fn expired(proto: u8, state: u8, last_seen: u32, now: u32) -> bool {
    now.saturating_sub(last_seen) > FlowState::from_bits(state).timeout(proto)
}

/// Who a flow counts against in the unreplied budget: its client's
/// address (an IPv4 one as `::ffff:a.b.c.d`). Per address, not per IPv6
/// /64: WireGuard peers and tailnet nodes get single addresses out of one
/// shared prefix, and WireGuard's AllowedIPs already keeps a peer to its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct SourceKey {
    pub addr: [u8; 16],
}

impl SourceKey {
    pub const fn of(key: &FlowKey) -> Self {
        if key.is_ipv6() {
            return SourceKey { addr: key.src };
        }
        let mut addr = [0; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        let mut i = 0;
        while i < 4 {
            addr[12 + i] = key.src[i];
            i += 1;
        }
        SourceKey { addr }
    }
}

/// What happened to the table, counted per CPU in `TABLE_EVENTS` (the
/// sweeper counts expiry itself). Numbers are stable: they index the map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TableEvent {
    /// A pair made whole for a new flow.
    Created = 0,
    /// Another CPU made the same flow's pair first; its pair was used.
    RaceLost = 1,
    /// A new flow refused: its source holds its whole unreplied budget (or
    /// the budget map is full).
    OverBudget = 2,
    /// A new flow refused: the family's table is full.
    TableFull = 3,
    /// A new flow refused: every port tried was held.
    PortsTaken = 4,
    /// A half found missing was made again from the other.
    Repaired = 5,
    /// A half found missing could not be made again (its key was taken):
    /// the flow was ended (the half removed; the key it paired with is
    /// another flow's).
    Ended = 6,
    /// A TCP flow closed or reset was opened again on the same ports.
    Reopened = 7,
}

impl TableEvent {
    pub const ALL: [Self; 8] = [
        Self::Created,
        Self::RaceLost,
        Self::OverBudget,
        Self::TableFull,
        Self::PortsTaken,
        Self::Repaired,
        Self::Ended,
        Self::Reopened,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::RaceLost => "races-lost",
            Self::OverBudget => "over-budget",
            Self::TableFull => "table-full",
            Self::PortsTaken => "ports-taken",
            Self::Repaired => "halves-repaired",
            Self::Ended => "flows-ended-broken",
            Self::Reopened => "reopened",
        }
    }
}

/// Source ports (and ICMP identifiers) the fast path translates to: above
/// Linux's ephemeral range (32768-60999), which the daemon also reserves, so
/// they never collide with the host's own connections from the same
/// address; the nftables masquerade uses the ports below.
pub const NAT_PORT_FIRST: u16 = 61000;
pub const NAT_PORT_COUNT: u16 = 65535 - NAT_PORT_FIRST + 1;
/// How many free ports to try before leaving the flow to the kernel.
pub const NAT_PORT_TRIES: u32 = 16;

/// Flows the fast path tracks at once unless `TG_NAT_FLOWS` says otherwise.
pub const NAT_DEFAULT_FLOWS: u32 = 65_536;
/// Marks of UDP flows the kernel tracks (`tailguard-ebpf`'s
/// `kernel_flows`) as compiled; the daemon sizes the map with
/// [`TableSize::kernel_flows`].
pub const KERNEL_FLOWS_COMPILED: u32 = TableSize::COMPILED.kernel_flows();

/// The share of `TG_NAT_FLOWS` the IPv6 table gets unless
/// `TG_NAT_V6_SHARE` says otherwise, in percent.
pub const NAT_DEFAULT_V6_SHARE: u32 = 25;
/// The fewest flows a family's table is made for.
pub const NAT_MIN_FLOWS: u32 = 1024;

/// How many flows each family's table holds, and each source's budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSize {
    pub v4_flows: u32,
    pub v6_flows: u32,
    /// Unreplied flows one source may hold at once.
    pub unreplied_per_source: u32,
}

impl TableSize {
    /// `flows` in all, `v6_share` percent of them IPv6 (each family at
    /// least [`NAT_MIN_FLOWS`]); `unreplied_per_source` 0 means the
    /// default: a sixteenth of the table, at least 256.
    pub const fn new(flows: u32, v6_share: u32, unreplied_per_source: u32) -> Self {
        let share = if v6_share > 100 { 100 } else { v6_share };
        let v6 = (flows as u64 * share as u64 / 100) as u32;
        let v6 = if v6 < NAT_MIN_FLOWS {
            NAT_MIN_FLOWS
        } else {
            v6
        };
        let v4 = flows.saturating_sub(v6);
        let v4 = if v4 < NAT_MIN_FLOWS {
            NAT_MIN_FLOWS
        } else {
            v4
        };
        let budget = if unreplied_per_source != 0 {
            unreplied_per_source
        } else if flows / 16 < 256 {
            256
        } else {
            flows / 16
        };
        TableSize {
            v4_flows: v4,
            v6_flows: v6,
            unreplied_per_source: budget,
        }
    }

    /// The size this build's programs are compiled with.
    pub const COMPILED: Self = Self::new(NAT_DEFAULT_FLOWS, NAT_DEFAULT_V6_SHARE, 0);

    /// Map entries of the family's table: two per flow, exactly (a plain
    /// hash map keeps nothing aside, unlike the LRU's per-CPU lists).
    pub const fn entries(&self, ipv6: bool) -> u32 {
        let flows = if ipv6 { self.v6_flows } else { self.v4_flows };
        flows.saturating_mul(2)
    }

    /// Entries of the map of the kernel's UDP flows: a quarter of the
    /// flows, at least [`NAT_MIN_FLOWS`].
    pub const fn kernel_flows(&self) -> u32 {
        let quarter = self.v4_flows.saturating_add(self.v6_flows) / 4;
        if quarter < NAT_MIN_FLOWS {
            NAT_MIN_FLOWS
        } else {
            quarter
        }
    }

    /// Entries of the budget map: one per source holding unreplied flows;
    /// far fewer sources than flows in any real use.
    pub const fn sources(&self) -> u32 {
        let flows = self.v4_flows.saturating_add(self.v6_flows);
        if flows / 8 < NAT_MIN_FLOWS {
            NAT_MIN_FLOWS
        } else {
            flows / 8
        }
    }

    /// About what the kernel allocates for the family's table: each
    /// entry's key and value (each rounded up to 8 bytes) and the hash
    /// table's 48-byte element header, and one 16-byte bucket per entry
    /// rounded up to a power of two (`htab_map_mem_usage`).
    pub const fn table_bytes(&self, ipv6: bool) -> u64 {
        if ipv6 {
            hash_map_bytes(self.entries(true), size_of::<Key6>(), size_of::<Half6>())
        } else {
            hash_map_bytes(self.entries(false), size_of::<Key4>(), size_of::<Half4>())
        }
    }

    /// About what the kernel allocates for both tables and the budget map.
    pub const fn kernel_bytes(&self) -> u64 {
        self.table_bytes(false)
            + self.table_bytes(true)
            + hash_map_bytes(self.sources(), size_of::<SourceKey>(), size_of::<i64>())
    }
}

/// See [`TableSize::table_bytes`].
const fn hash_map_bytes(entries: u32, key: usize, value: usize) -> u64 {
    const ELEMENT_HEADER: u64 = 48;
    const BUCKET: u64 = 16;
    let rounded = (key.div_ceil(8) + value.div_ceil(8)) as u64 * 8;
    entries as u64 * (ELEMENT_HEADER + rounded) + BUCKET * (entries as u64).next_power_of_two()
}

/// The `attempt`th candidate port from a random start.
pub const fn nat_port(random: u32, attempt: u32) -> u16 {
    NAT_PORT_FIRST + ((random.wrapping_add(attempt) % NAT_PORT_COUNT as u32) as u16)
}

/// The largest TCP MSS that fits `mtu` for the family.
pub const fn mss_for(mtu: u32, ipv6: bool) -> u16 {
    let headers = if ipv6 {
        (ipv6::HEADER + tcp::HEADER) as u32
    } else {
        (ipv4::HEADER + tcp::HEADER) as u32
    };
    if mtu <= headers {
        0
    } else {
        (mtu - headers) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tcp::{ACK, FIN, RST, SYN};

    #[test]
    fn ports_stay_in_the_range_and_wrap() {
        assert_eq!(nat_port(0, 0), 61000);
        assert_eq!(nat_port(u32::from(NAT_PORT_COUNT) - 1, 0), 65535);
        assert_eq!(nat_port(u32::from(NAT_PORT_COUNT) - 1, 1), 61000);
        assert!(nat_port(u32::MAX, 3) >= NAT_PORT_FIRST);
    }

    fn key(proto: u8, sport: u16, dport: u16) -> FlowKey {
        FlowKey {
            src: [10; 16],
            dst: [20; 16],
            sport,
            dport,
            proto,
            ingress: 0,
            family: 6,
            _pad: 0,
        }
    }

    #[test]
    fn a_reply_swaps_addresses_and_ports_but_an_echo_keeps_its_identifier() {
        let udp = key(IPPROTO_UDP, 1111, 53).reply(1);
        assert_eq!((udp.src, udp.dst), ([20; 16], [10; 16]));
        assert_eq!((udp.sport, udp.dport, udp.ingress), (53, 1111, 1));
        assert_eq!(udp.reply(0), key(IPPROTO_UDP, 1111, 53));
        assert_eq!((udp.client_port(false), udp.client_port(true)), (1111, 53));
        for proto in [IPPROTO_ICMP, IPPROTO_ICMPV6] {
            let echo = key(proto, 7, 0).reply(1);
            assert_eq!((echo.src, echo.sport, echo.dport), ([20; 16], 7, 0));
            assert_eq!(echo.reply(0), key(proto, 7, 0));
            assert_eq!(echo.client_port(false), 7);
        }
    }

    #[test]
    fn compact_keys_and_halves_keep_what_the_family_uses() {
        let mut k = key(IPPROTO_TCP, 1, 2);
        assert_eq!(FlowKey::from_v6(&k.to_v6()), k);
        k.family = 4;
        k.src = [0; 16];
        k.src[..4].copy_from_slice(&[100, 64, 0, 1]);
        k.dst = [0; 16];
        k.dst[..4].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(FlowKey::from_v4(&k.to_v4()), k);
        let h = Half {
            addr: [1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            meta: Meta {
                port: 9,
                kind: kind::ORIGIN,
                state: CHARGED,
            },
            last_seen: 77,
        };
        assert_eq!(Half::from_v4(&h.to_v4()), h);
        assert_eq!(Half::from_v6(&h.to_v6()), h);
        assert_eq!(Meta::from_word(h.meta.word()), h.meta);
    }

    /// The sizes the memory budget is made of (200 / 260 bytes a flow).
    #[test]
    fn table_entries_are_compact() {
        assert_eq!(size_of::<Key4>(), 16);
        assert_eq!(size_of::<Half4>(), 12);
        assert_eq!(size_of::<Key6>(), 40);
        assert_eq!(size_of::<Half6>(), 24);
        let size = TableSize::new(2_000_000, 50, 0);
        let per_flow = |ipv6| size.table_bytes(ipv6) as f64 / 1_000_000.0;
        assert!(
            per_flow(false) <= 200.0,
            "IPv4: {} bytes a flow",
            per_flow(false)
        );
        assert!(
            per_flow(true) <= 260.0,
            "IPv6: {} bytes a flow",
            per_flow(true)
        );
    }

    #[test]
    fn the_table_size_splits_the_flows_and_keeps_a_floor() {
        let s = TableSize::new(65_536, 25, 0);
        assert_eq!((s.v4_flows, s.v6_flows), (49_152, 16_384));
        assert_eq!(s.unreplied_per_source, 4096);
        assert_eq!(s.entries(false), 98_304);
        let tiny = TableSize::new(1024, 0, 10);
        assert_eq!((tiny.v4_flows, tiny.v6_flows), (1024, 1024));
        assert_eq!(tiny.unreplied_per_source, 10);
        assert_eq!(TableSize::new(1024, 0, 0).unreplied_per_source, 256);
    }

    fn walk(proto: u8, steps: &[(bool, u8)]) -> FlowState {
        let mut s = FlowState::first(proto);
        for &(from_origin, flags) in steps {
            s = s.after(proto, from_origin, flags);
        }
        s
    }

    #[test]
    fn tcp_follows_the_handshake_and_the_close() {
        let handshake = [(true, SYN), (false, SYN | ACK), (true, ACK)];
        assert_eq!(walk(IPPROTO_TCP, &handshake[..1]), FlowState::SynSent);
        assert_eq!(walk(IPPROTO_TCP, &handshake[..2]), FlowState::SynRecv);
        assert_eq!(walk(IPPROTO_TCP, &handshake), FlowState::Established);
        let mut half_closed = handshake.to_vec();
        half_closed.push((true, FIN | ACK));
        assert_eq!(walk(IPPROTO_TCP, &half_closed), FlowState::FinFromOrigin);
        // The other side keeps sending: still half-closed.
        half_closed.push((false, ACK));
        half_closed.push((true, ACK));
        assert_eq!(walk(IPPROTO_TCP, &half_closed), FlowState::FinFromOrigin);
        half_closed.push((false, FIN | ACK));
        assert_eq!(walk(IPPROTO_TCP, &half_closed), FlowState::LastAck);
        half_closed.push((true, ACK));
        assert_eq!(walk(IPPROTO_TCP, &half_closed), FlowState::TimeWait);
        // Closing from the server's side first.
        let mut from_server = handshake.to_vec();
        from_server.push((false, FIN | ACK));
        assert_eq!(walk(IPPROTO_TCP, &from_server), FlowState::FinFromReply);
        assert!(FlowState::FinFromReply.timeout(IPPROTO_TCP) >= 120);
    }

    #[test]
    fn a_reset_closes_and_a_new_syn_reopens() {
        let reset = [(true, SYN), (false, SYN | ACK), (true, ACK), (false, RST)];
        assert_eq!(walk(IPPROTO_TCP, &reset), FlowState::Close);
        let mut again = reset.to_vec();
        again.push((true, SYN));
        assert_eq!(walk(IPPROTO_TCP, &again), FlowState::SynSent);
        // A SYN in an open connection changes nothing.
        assert_eq!(
            FlowState::Established.after(IPPROTO_TCP, true, SYN),
            FlowState::Established
        );
        assert!(FlowState::Close.timeout(IPPROTO_TCP) < FlowState::SynSent.timeout(IPPROTO_TCP));
    }

    #[test]
    fn udp_and_echo_are_replied_by_the_first_answer() {
        assert_eq!(
            walk(IPPROTO_UDP, &[(true, 0), (true, 0)]),
            FlowState::Unreplied
        );
        assert_eq!(
            walk(IPPROTO_UDP, &[(true, 0), (false, 0)]),
            FlowState::Replied
        );
        assert_eq!(
            walk(IPPROTO_UDP, &[(true, 0), (false, 0), (true, 0)]),
            FlowState::Assured
        );
        assert_eq!(FlowState::Unreplied.timeout(IPPROTO_UDP), 30);
        assert_eq!(FlowState::Replied.timeout(IPPROTO_UDP), 30);
        assert_eq!(FlowState::Assured.timeout(IPPROTO_UDP), 120);
        assert_eq!(FlowState::Assured.timeout(IPPROTO_ICMP), 30);
    }

    #[test]
    fn the_budget_is_given_back_once_by_the_transition_out_of_it() {
        let start = FlowState::SynSent as u8 | CHARGED;
        // The SYN-ACK: still unfinished, still charged.
        let (recv, release) = next_state_bits(start, IPPROTO_TCP, false, SYN | ACK).unwrap();
        assert_eq!(
            (FlowState::from_bits(recv), recv & CHARGED, release),
            (FlowState::SynRecv, CHARGED, false)
        );
        let (est, release) = next_state_bits(recv, IPPROTO_TCP, true, ACK).unwrap();
        assert_eq!(
            (FlowState::from_bits(est), est & CHARGED, release),
            (FlowState::Established, 0, true)
        );
        // Nothing changes: nothing to do.
        assert_eq!(next_state_bits(est, IPPROTO_TCP, true, ACK), None);
        // A reopened flow was never charged: nothing to give back.
        let (reopened, _) =
            next_state_bits(FlowState::Close as u8, IPPROTO_TCP, true, SYN).unwrap();
        assert_eq!(reopened, FlowState::SynSent as u8);
        let (_, release) = next_state_bits(reopened, IPPROTO_TCP, false, RST).unwrap();
        assert!(!release);
        // A SYN answered by a reset (a scan of a closed port) keeps
        // counting against its source.
        let (closed, release) = next_state_bits(
            FlowState::SynSent as u8 | CHARGED,
            IPPROTO_TCP,
            false,
            RST | ACK,
        )
        .unwrap();
        assert_eq!((closed, release), (FlowState::Close as u8 | CHARGED, false));
    }

    #[test]
    fn a_pair_expires_after_its_states_timeout() {
        let tcp = FlowState::Established as u8;
        assert!(!expired(IPPROTO_TCP, tcp, 100, 100 + 432_000));
        assert!(expired(IPPROTO_TCP, tcp, 100, 100 + 432_001));
        assert!(expired(IPPROTO_UDP, FlowState::Unreplied as u8, 0, 31));
        // A clock read before the entry was stamped is not "expired".
        assert!(!expired(IPPROTO_UDP, 0, 50, 10));
    }

    #[test]
    fn sources_are_addresses() {
        let mut k = key(IPPROTO_UDP, 1, 2);
        k.src = [0xfd, 0x66, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        let mut neighbour = k;
        neighbour.src[15] = 4;
        assert_ne!(
            SourceKey::of(&k),
            SourceKey::of(&neighbour),
            "one /64, two peers"
        );
        k.family = 4;
        k.src = [0; 16];
        k.src[..4].copy_from_slice(&[100, 64, 0, 7]);
        assert_eq!(
            SourceKey::of(&k).addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 100, 64, 0, 7]
        );
    }

    #[test]
    fn mss_leaves_room_for_the_headers() {
        assert_eq!(mss_for(1280, true), 1220);
        assert_eq!(mss_for(1420, false), 1380);
        assert_eq!(mss_for(30, false), 0);
    }
}
