//! What the daemon tells the programs: one [`Config`] entry (devices, own
//! addresses, `TS_DEST_IP`, policy flags) and the route tries' values.
//!
//! Addresses are kept as network-order bytes, the way they sit in packets,
//! so the programs compare them without conversion.

use core::net::{Ipv4Addr, Ipv6Addr};

use bytemuck::{Pod, Zeroable};

use crate::Device;

/// Prefixes each route trie holds at most. The daemon writes only the
/// prefixes that change an answer (a tailnet peer's /32 inside the
/// tailnet's /10 does not), and refuses more than this, clearly.
pub const MAX_ROUTES: u32 = 1 << 20;

/// The single entry of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// Interface indexes of the WireGuard and Tailscale devices (0: absent).
    pub wg_ifindex: u32,
    pub ts_ifindex: u32,
    /// [`flag`] bits: which addresses below are set, and the policy switches.
    pub flags: u32,
    /// MTUs of the two devices, for clamping the MSS of SYNs sent out of them.
    pub wg_mtu: u16,
    pub ts_mtu: u16,
    /// The node's own tailnet address (the masquerade source towards ts, and
    /// what tailnet peers address to reach `TS_DEST_IP`).
    pub ts_v4: [u8; 4],
    /// The node's WireGuard address (the source NAT towards wg).
    pub wg_v4: [u8; 4],
    /// `TS_DEST_IP`'s IPv4 address.
    pub dest_v4: [u8; 4],
    pub ts_v6: [u8; 16],
    pub wg_v6: [u8; 16],
    pub dest_v6: [u8; 16],
    /// Unreplied flows one source may hold in the connection table at
    /// once (`tailguard_common::nat::TableSize`); 0 until the daemon sets it.
    pub unreplied_per_source: u32,
    /// The table's clock (see [`Clock`]), as the daemon measured it.
    pub clock: Clock,
    /// On Ethernet devices: the frame addresses a redirected packet leaves
    /// each device with (see [`LinkAddresses`]).
    pub wg_link: LinkAddresses,
    pub ts_link: LinkAddresses,
}

/// The Ethernet addresses of a device's frames: the next hop's (the
/// destination) and the device's own (the source). The daemon reads them
/// from the kernel's neighbour table and writes them again when they
/// change, so a redirected frame needs no route and neighbour lookup of its
/// own (`bpf_redirect_neigh`). Unknown (`known == 0`) on L3 devices and
/// until the neighbour is resolved: then the kernel looks the next hop up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LinkAddresses {
    /// The Ethernet header's first 12 bytes as they go out: destination
    /// (the next hop), then source (the device).
    pub header: [u8; 12],
    pub known: u32,
}

impl LinkAddresses {
    pub const fn new(next_hop: [u8; 6], own: [u8; 6]) -> Self {
        let mut header = [0; 12];
        let mut i = 0;
        while i < 6 {
            header[i] = next_hop[i];
            header[i + 6] = own[i];
            i += 1;
        }
        Self { header, known: 1 }
    }

    pub const fn is_known(&self) -> bool {
        self.known != 0
    }
}

/// The connection table's clock: whole seconds of `CLOCK_MONOTONIC`, which
/// the programs count from the kernel's jiffies (`bpf_jiffies64`, which the
/// verifier inlines: no helper call per packet). Jiffies tick `hz` times a
/// second (the kernel's `CONFIG_HZ`, which no interface reports) and stood
/// at `zero` when the monotonic clock did; the daemon measures both when it
/// loads the programs (`tailguard::datapath::clock`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Clock {
    pub zero: u64,
    pub hz: u32,
    pub _pad: u32,
}

impl Clock {
    /// Whole seconds at `jiffies` (0 before the clock is set).
    pub const fn seconds(&self, jiffies: u64) -> u32 {
        if self.hz == 0 {
            return 0;
        }
        (jiffies.wrapping_sub(self.zero) / self.hz as u64) as u32
    }
}

/// The benchmarks' floor program's one entry (`HOP`): the device it
/// redirects every packet to (0: the loopback device, for
/// `BPF_PROG_TEST_RUN`) and the Ethernet addresses it writes first, as the
/// fast path does on an Ethernet device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FloorHop {
    pub link: LinkAddresses,
    pub ifindex: u32,
}

/// The bits of [`Config::flags`]: each one a program reads. (What only the
/// nftables table needs, such as `TG_EXPOSE_HOST`, is not here: the
/// programs leave the host's own traffic to the kernel.)
pub mod flag {
    pub const TS_V4: u32 = 1 << 0;
    pub const TS_V6: u32 = 1 << 1;
    pub const WG_V4: u32 = 1 << 2;
    pub const WG_V6: u32 = 1 << 3;
    pub const DEST_V4: u32 = 1 << 4;
    pub const DEST_V6: u32 = 1 << 5;
    /// `WG_ISOLATE_PEERS=1`: WireGuard-to-WireGuard traffic is dropped.
    pub const ISOLATE_PEERS: u32 = 1 << 6;
    /// Source-NAT tailnet traffic towards wg to the node's WireGuard address.
    pub const SNAT_TO_WG: u32 = 1 << 7;
    /// The kernel forwards IPv4 (`net.ipv4.ip_forward=1` when the daemon
    /// started): without it, IPv4 between the networks is not forwarded.
    pub const FORWARD_V4: u32 = 1 << 8;
    /// The kernel forwards IPv6 (`net.ipv6.conf.all.forwarding=1`).
    pub const FORWARD_V6: u32 = 1 << 9;
}

impl Config {
    /// The index of `device` (0 while it is absent).
    pub const fn ifindex(&self, device: Device) -> u32 {
        match device {
            Device::WireGuard => self.wg_ifindex,
            Device::Tailscale => self.ts_ifindex,
        }
    }

    /// The Ethernet addresses of frames sent out of `device`.
    #[inline(always)]
    pub const fn link(&self, device: Device) -> &LinkAddresses {
        match device {
            Device::WireGuard => &self.wg_link,
            Device::Tailscale => &self.ts_link,
        }
    }

    pub const fn set_link(&mut self, device: Device, addresses: LinkAddresses) {
        match device {
            Device::WireGuard => self.wg_link = addresses,
            Device::Tailscale => self.ts_link = addresses,
        }
    }

    /// The MTU of `device`.
    pub const fn mtu(&self, device: Device) -> u32 {
        match device {
            Device::WireGuard => self.wg_mtu as u32,
            Device::Tailscale => self.ts_mtu as u32,
        }
    }

    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Sets or clears `flag`.
    pub const fn set(&mut self, flag: u32, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    pub fn ts_v4(&self) -> Option<Ipv4Addr> {
        self.has(flag::TS_V4).then(|| self.ts_v4.into())
    }

    pub fn ts_v6(&self) -> Option<Ipv6Addr> {
        self.has(flag::TS_V6).then(|| self.ts_v6.into())
    }

    pub fn wg_v4(&self) -> Option<Ipv4Addr> {
        self.has(flag::WG_V4).then(|| self.wg_v4.into())
    }

    pub fn wg_v6(&self) -> Option<Ipv6Addr> {
        self.has(flag::WG_V6).then(|| self.wg_v6.into())
    }

    pub fn dest_v4(&self) -> Option<Ipv4Addr> {
        self.has(flag::DEST_V4).then(|| self.dest_v4.into())
    }

    pub fn dest_v6(&self) -> Option<Ipv6Addr> {
        self.has(flag::DEST_V6).then(|| self.dest_v6.into())
    }

    /// Sets the node's tailnet addresses (`None` clears one).
    pub fn set_ts(&mut self, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) {
        self.set(flag::TS_V4, v4.is_some());
        self.ts_v4 = v4.map_or([0; 4], |a| a.octets());
        self.set(flag::TS_V6, v6.is_some());
        self.ts_v6 = v6.map_or([0; 16], |a| a.octets());
    }

    pub fn set_wg(&mut self, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) {
        self.set(flag::WG_V4, v4.is_some());
        self.wg_v4 = v4.map_or([0; 4], |a| a.octets());
        self.set(flag::WG_V6, v6.is_some());
        self.wg_v6 = v6.map_or([0; 16], |a| a.octets());
    }

    pub fn set_dest(&mut self, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) {
        self.set(flag::DEST_V4, v4.is_some());
        self.dest_v4 = v4.map_or([0; 4], |a| a.octets());
        self.set(flag::DEST_V6, v6.is_some());
        self.dest_v6 = v6.map_or([0; 16], |a| a.octets());
    }

    /// The node's `which` address of the family, if the daemon set it.
    #[inline(always)]
    pub fn node_v4(&self, which: NodeAddress) -> Option<&[u8; 4]> {
        match which {
            NodeAddress::Tailnet => self.has(flag::TS_V4).then_some(&self.ts_v4),
            NodeAddress::WireGuard => self.has(flag::WG_V4).then_some(&self.wg_v4),
            NodeAddress::DestIp => self.has(flag::DEST_V4).then_some(&self.dest_v4),
        }
    }

    #[inline(always)]
    pub fn node_v6(&self, which: NodeAddress) -> Option<&[u8; 16]> {
        match which {
            NodeAddress::Tailnet => self.has(flag::TS_V6).then_some(&self.ts_v6),
            NodeAddress::WireGuard => self.has(flag::WG_V6).then_some(&self.wg_v6),
            NodeAddress::DestIp => self.has(flag::DEST_V6).then_some(&self.dest_v6),
        }
    }

    /// Copies the node's `which` address into `out` (an IPv4 one into its
    /// first four bytes, the rest zero); false if it has none.
    #[inline(always)]
    pub fn copy_node_address(&self, ipv6: bool, which: NodeAddress, out: &mut [u8; 16]) -> bool {
        if ipv6 {
            match self.node_v6(which) {
                Some(node) => {
                    *out = *node;
                    true
                }
                None => false,
            }
        } else {
            match self.node_v4(which) {
                Some(node) => {
                    *out = [0; 16];
                    out[0] = node[0];
                    out[1] = node[1];
                    out[2] = node[2];
                    out[3] = node[3];
                    true
                }
                None => false,
            }
        }
    }
}

/// Which of the node's own addresses (of a packet's family) to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAddress {
    Tailnet,
    WireGuard,
    DestIp,
}

impl NodeAddress {
    /// The node's address on `device`'s side.
    #[inline(always)]
    pub const fn on(device: Device) -> NodeAddress {
        match device {
            Device::Tailscale => NodeAddress::Tailnet,
            Device::WireGuard => NodeAddress::WireGuard,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: `Pod` per bytemuck's derive (no padding, any bit pattern valid).
unsafe impl aya::Pod for Config {}

#[cfg(feature = "user")]
// SAFETY: as for `Config`.
unsafe impl aya::Pod for FloorHop {}

/// The value of the route tries (`ROUTES_V4`, `ROUTES_V6`): which device a
/// destination is routed out of.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Route {
    /// The [`Device`]'s number, or [`Route::KERNEL`]'s.
    pub egress: u32,
}

impl Route {
    /// Routed out of the WireGuard device (a peer's allowed IPs).
    pub const WIREGUARD: Self = Self::out_of(Device::WireGuard);
    /// Routed out of the Tailscale device (tailnet ranges, table 52).
    pub const TAILSCALE: Self = Self::out_of(Device::Tailscale);
    /// Routed by the main table out of neither device (the uplink's own
    /// network, a static route): not ours to forward. It shadows a
    /// WireGuard default route as wg-quick's `suppress_prefixlength 0`
    /// rule does, and goes to the kernel's FIB (local or dropped).
    pub const KERNEL: Self = Self {
        egress: Device::COUNT,
    };

    /// Routed out of `device`.
    pub const fn out_of(device: Device) -> Self {
        Self {
            egress: device as u32,
        }
    }

    /// The device it is routed out of; `None` for [`Route::KERNEL`].
    pub const fn device(self) -> Option<Device> {
        Device::from_number(self.egress)
    }
}

#[cfg(feature = "user")]
// SAFETY: `Pod` per bytemuck's derive.
unsafe impl aya::Pod for Route {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_absent_ones_read_as_none() {
        let mut c = Config::default();
        assert_eq!(c.ts_v4(), None);
        c.set_ts(Some(Ipv4Addr::new(100, 64, 0, 7)), None);
        assert_eq!(c.ts_v4(), Some(Ipv4Addr::new(100, 64, 0, 7)));
        assert_eq!(c.ts_v4, [100, 64, 0, 7], "network order, as in packets");
        assert_eq!(c.ts_v6(), None);
        c.set_ts(None, Some("fd7a:115c:a1e0::7".parse().unwrap()));
        assert_eq!(c.ts_v4(), None);
        assert_eq!(c.ts_v4, [0; 4], "a cleared address leaves no trace");
        assert_eq!(c.ts_v6(), Some("fd7a:115c:a1e0::7".parse().unwrap()));
    }

    #[test]
    fn a_route_names_its_device_by_the_devices_number() {
        for device in Device::ALL {
            assert_eq!(Route::out_of(device).egress, device as u32);
            assert_eq!(Route::out_of(device).device(), Some(device));
        }
        assert_eq!(Route::WIREGUARD.device(), Some(Device::WireGuard));
        assert_eq!(Route::TAILSCALE.device(), Some(Device::Tailscale));
        assert_eq!(Route::KERNEL.device(), None);
    }

    #[test]
    fn link_addresses_are_the_next_hop_then_the_device() {
        let mut c = Config::default();
        assert!(!c.link(Device::WireGuard).is_known());
        let a = LinkAddresses::new([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]);
        c.set_link(Device::Tailscale, a);
        assert_eq!(
            c.link(Device::Tailscale).header,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        );
        assert!(c.link(Device::Tailscale).is_known());
        assert!(
            !c.link(Device::WireGuard).is_known(),
            "one device's addresses only"
        );
    }

    #[test]
    fn flags_are_independent() {
        let mut c = Config::default();
        c.set(flag::ISOLATE_PEERS, true);
        c.set_dest(Some(Ipv4Addr::new(10, 0, 0, 2)), None);
        assert!(c.has(flag::ISOLATE_PEERS) && c.has(flag::DEST_V4));
        c.set(flag::ISOLATE_PEERS, false);
        assert!(!c.has(flag::ISOLATE_PEERS) && c.has(flag::DEST_V4));
        assert_eq!(core::mem::size_of::<Config>(), 128);
    }
}
