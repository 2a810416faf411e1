//! Connection state of the fast path: one LRU hash map (`NAT`) holds both
//! directions of every flow the programs own, keyed by the packet as it
//! arrives and telling what it must look like when it leaves.
//!
//! A flow is owned by the fast path from its first packet (TCP SYN, UDP, ICMP
//! echo request) to the end; everything else goes to the kernel, whose
//! conntrack owns it. So no flow is ever translated by both. UDP has no
//! first packet to tell, so the map also holds entries marked
//! [`state::KERNEL`] for UDP flows the kernel tracks.

use bytemuck::{Pod, Zeroable};

use crate::wire::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, ipv4, ipv6, tcp};

/// A flow as seen arriving on one device. IPv4 addresses use the first four
/// bytes of each address field; for ICMP echo, `sport` is the identifier and
/// `dport` is 0. Ports are kept in network byte order, as in the packet.
#[repr(C)]
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
        let echo = self.proto == IPPROTO_ICMP || self.proto == IPPROTO_ICMPV6;
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
}

/// What a packet of the flow becomes, and where it goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatEntry {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// The [`crate::Device`] to send it out of, by role: its index and MTU
    /// come from the configuration, so entries stay right when tailscaled
    /// makes its device anew (and across a restart of the daemon).
    pub egress: u32,
    /// `bpf_ktime_get_boot_ns` of the last packet.
    pub last_seen: u64,
    /// [`state`] bits.
    pub state: u32,
    pub _pad: u32,
}

/// The bits of [`NatEntry::state`].
pub mod state {
    /// A TCP FIN or RST was seen: the flow ends soon.
    pub const CLOSING: u32 = 1 << 0;
    /// Not ours: a UDP flow the kernel's conntrack tracks (started before
    /// the programs were attached, left to the kernel, or the host's own).
    /// Its packets go to the kernel, so the fast path never takes it over
    /// with a port of its own; the entry only says so and lives as long as
    /// packets keep coming.
    pub const KERNEL: u32 = 1 << 1;
}

#[cfg(feature = "user")]
// SAFETY: `Pod` per bytemuck's derive (no padding, any bit pattern valid).
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for NatEntry {}

/// Source ports (and ICMP identifiers) the fast path translates to: above
/// Linux's ephemeral range (32768-60999), which the daemon also reserves, so
/// they never collide with the host's own connections from the same
/// address; the nftables masquerade uses the ports below.
pub const NAT_PORT_FIRST: u16 = 61000;
pub const NAT_PORT_COUNT: u16 = 65535 - NAT_PORT_FIRST + 1;
/// How many free ports to try before leaving the flow to the kernel.
pub const NAT_PORT_TRIES: u32 = 16;

/// Entries of the map as compiled; the daemon sizes it at load time from
/// `TG_NAT_FLOWS` (two entries per flow, see [`nat_entries`]).
pub const NAT_MAX_ENTRIES: u32 = nat_entries(NAT_DEFAULT_FLOWS);
/// Flows the fast path tracks at once unless `TG_NAT_FLOWS` says otherwise:
/// about 19 MiB of kernel memory (the LRU map is allocated whole up front).
pub const NAT_DEFAULT_FLOWS: u32 = 65_536;

/// Map entries for `flows` flows: one per direction.
pub const fn nat_entries(flows: u32) -> u32 {
    flows.saturating_mul(2)
}

/// Entries of the connection-state map for `flows` flows (0: the compiled
/// size) on a machine with `cpus` possible CPUs: two per flow, and room
/// for what the kernel's LRU keeps aside. Each CPU holds up to 128 free
/// entries of its own (`LOCAL_FREE_TARGET`), which the others cannot use:
/// a map sized exactly starts evicting live flows early (seen: 1,000 flows
/// in 2,000 entries on 2 CPUs kept 976).
pub const fn nat_map_entries(flows: u32, cpus: u32) -> u32 {
    let entries = if flows == 0 {
        NAT_MAX_ENTRIES
    } else {
        nat_entries(flows)
    };
    entries.saturating_add(128u32.saturating_mul(cpus))
}

/// [`nat_map_entries`] on the machine this runs on.
#[cfg(feature = "user")]
pub fn nat_map_entries_here(flows: u32) -> u32 {
    let cpus = aya::util::nr_cpus().map_or(1, core::num::NonZeroU32::get);
    nat_map_entries(flows, cpus)
}

/// About what the kernel allocates for a connection table of `entries`
/// entries: each its key, its value and the hash table's own element header
/// and bucket (the benchmarks measured 322 bytes per flow at a million
/// flows, two entries each).
pub const fn nat_table_bytes(entries: u32) -> u64 {
    const PER_ENTRY_OVERHEAD: u64 = 64;
    let entry = (core::mem::size_of::<FlowKey>() + core::mem::size_of::<NatEntry>()) as u64
        + PER_ENTRY_OVERHEAD;
    entries as u64 * entry
}

const SECOND: u64 = 1_000_000_000;

/// How long a flow lives without packets, by protocol and state (in the
/// spirit of conntrack's defaults, shorter where those are generous).
pub const fn timeout_ns(proto: u8, state_bits: u32) -> u64 {
    match proto {
        IPPROTO_TCP if state_bits & state::CLOSING != 0 => 10 * SECOND,
        IPPROTO_TCP => 7200 * SECOND,
        IPPROTO_UDP => 120 * SECOND,
        _ => 30 * SECOND,
    }
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

    #[test]
    fn ports_stay_in_the_range_and_wrap() {
        assert_eq!(nat_port(0, 0), 61000);
        assert_eq!(nat_port(u32::from(NAT_PORT_COUNT) - 1, 0), 65535);
        assert_eq!(nat_port(u32::from(NAT_PORT_COUNT) - 1, 1), 61000);
        assert!(nat_port(u32::MAX, 3) >= NAT_PORT_FIRST);
    }

    #[test]
    fn closing_tcp_flows_expire_sooner() {
        assert!(timeout_ns(IPPROTO_TCP, state::CLOSING) < timeout_ns(IPPROTO_TCP, 0));
        assert!(timeout_ns(IPPROTO_ICMP, 0) < timeout_ns(IPPROTO_UDP, 0));
    }

    fn key(proto: u8, sport: u16, dport: u16) -> FlowKey {
        FlowKey {
            src: [10; 16],
            dst: [20; 16],
            sport,
            dport,
            proto,
            ingress: 0,
            family: 4,
            _pad: 0,
        }
    }

    #[test]
    fn a_reply_swaps_addresses_and_ports_but_an_echo_keeps_its_identifier() {
        let udp = key(IPPROTO_UDP, 1111, 53).reply(1);
        assert_eq!((udp.src, udp.dst), ([20; 16], [10; 16]));
        assert_eq!((udp.sport, udp.dport, udp.ingress), (53, 1111, 1));
        assert_eq!(udp.reply(0), key(IPPROTO_UDP, 1111, 53));
        for proto in [IPPROTO_ICMP, IPPROTO_ICMPV6] {
            let echo = key(proto, 7, 0).reply(1);
            assert_eq!((echo.src, echo.sport, echo.dport), ([20; 16], 7, 0));
            assert_eq!(echo.reply(0), key(proto, 7, 0));
        }
    }

    #[test]
    fn mss_leaves_room_for_the_headers() {
        assert_eq!(mss_for(1280, true), 1220);
        assert_eq!(mss_for(1420, false), 1380);
        assert_eq!(mss_for(30, false), 0);
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<NatEntry>(), 56);
    }
}
