//! The test networks' addresses, prefixes and ports, in one place: every
//! helper that builds a namespace and every test that sends to one takes
//! them from here. [`crate::bridge`] draws the topology they make.
//!
//! Addresses are text (as commands, sockets and settings take them); the
//! few the programs' configuration needs as numbers are typed too, and a
//! unit test below keeps the two spellings the same, as it does for the
//! lists that join several of them.

use std::net::{Ipv4Addr, Ipv6Addr};

// The WireGuard side: TailGuard's namespace and the WireGuard server's
// (the Testbed's peer), joined by a veth link they tunnel over.

/// TailGuard's end of the underlay link to the WireGuard server.
pub const UNDERLAY: &str = "10.200.0.1";
/// The WireGuard server's end of it (the endpoint TailGuard dials).
pub const UNDERLAY_PEER: &str = "10.200.0.2";
/// The underlay links' prefix length.
pub const LINK_PREFIX: u8 = 24;
/// The WireGuard server's and TailGuard's listening port.
pub const WG_PORT: u16 = 51820;

/// The WireGuard network (TailGuard's `Address` and its server's).
pub const WG_NET: &str = "10.66.0.0/24";
pub const WG_NET_V6: &str = "fd66::/64";
pub const WG_PREFIX: u8 = 24;
pub const WG_PREFIX_V6: u8 = 64;
/// The WireGuard server TailGuard is a client of (and `TS_DEST_IP`).
pub const WG_SERVER: &str = "10.66.0.1";
pub const WG_SERVER_V6: &str = "fd66::1";
/// Both, as `TS_DEST_IP` takes them.
pub const WG_SERVER_BOTH: &str = "10.66.0.1,fd66::1";
/// The WireGuard server as TailGuard's peer: `AllowedIPs` of it alone.
pub const WG_SERVER_ONLY: &str = "10.66.0.1/32, fd66::1/128";
/// The WireGuard server's IPv4 address alone as TailGuard's peer.
pub const WG_SERVER_ONLY_V4: &str = "10.66.0.1/32";
/// The WireGuard server taking everything and its LAN (pattern 1: WireGuard
/// as exit node): `AllowedIPs` of it.
pub const WG_SERVER_EXIT: &str = "0.0.0.0/0, ::/0, 192.168.8.0/24";
/// TailGuard's own address on the WireGuard network.
pub const NODE_WG: &str = "10.66.0.2";
pub const NODE_WG_V6: &str = "fd66::2";
/// A network the WireGuard server routes to TailGuard in a bare testbed.
pub const TESTBED_LAN: &str = "192.168.99.0/24";

/// The second WireGuard peer: a client of TailGuard's own port.
pub const WG_CLIENT: &str = "10.66.0.3";
pub const WG_CLIENT_V6: &str = "fd66::3";
/// TailGuard's listening port for it.
pub const WG_CLIENT_PORT: u16 = 51821;
/// The underlay link to it: TailGuard's end and its own.
pub const CLIENT_UNDERLAY: &str = "10.202.0.1";
pub const CLIENT_UNDERLAY_PEER: &str = "10.202.0.2";

/// A WireGuard client of TailGuard (on [`WG_CLIENT_PORT`]), in a namespace
/// of its own: its addresses, and the underlay link to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddresses {
    pub address: &'static str,
    pub address_v6: &'static str,
    /// TailGuard's end of the underlay link.
    pub underlay: &'static str,
    /// The client's end of it.
    pub underlay_peer: &'static str,
}

/// The second WireGuard peer's, as one [`ClientAddresses`].
pub const WG_CLIENT_ADDRESSES: ClientAddresses = ClientAddresses {
    address: WG_CLIENT,
    address_v6: WG_CLIENT_V6,
    underlay: CLIENT_UNDERLAY,
    underlay_peer: CLIENT_UNDERLAY_PEER,
};

/// More WireGuard clients, for tests that need more peers on the WireGuard
/// side than the server and the second peer
/// ([`crate::bridge::Bridge::with_more_clients`]).
pub const MORE_WG_CLIENTS: [ClientAddresses; 2] = [
    ClientAddresses {
        address: "10.66.0.4",
        address_v6: "fd66::4",
        underlay: "10.203.0.1",
        underlay_peer: "10.203.0.2",
    },
    ClientAddresses {
        address: "10.66.0.5",
        address_v6: "fd66::5",
        underlay: "10.204.0.1",
        underlay_peer: "10.204.0.2",
    },
];

/// The LAN behind the WireGuard server: the server's end and a host on it.
pub const LAN_NET: &str = "192.168.8.0/24";
pub const LAN_GATEWAY: &str = "192.168.8.1";
pub const LAN_HOST: &str = "192.168.8.10";

// The tailnet side: the stand-in's device in TailGuard's namespace, and a
// tailnet peer in its own, joined by a WireGuard link over veth.

/// The tailnet's ranges (Tailscale's CGNAT and ULA prefixes).
pub const TAILNET: &str = "100.64.0.0/10";
pub const TAILNET_V6: &str = "fd7a:115c:a1e0::/48";
pub const TAILNET_PREFIX: u8 = 10;
pub const TAILNET_PREFIX_V6: u8 = 48;
/// Both, as lists of routes take them.
pub const TAILNET_BOTH: &str = "100.64.0.0/10,fd7a:115c:a1e0::/48";
/// The node's tailnet addresses (the stand-in's device).
pub const NODE_TS: &str = "100.64.0.1";
pub const NODE_TS_V6: &str = "fd7a:115c:a1e0::1";
/// The tailnet peer.
pub const TAILNET_PEER: &str = "100.64.0.2";
pub const TAILNET_PEER_V6: &str = "fd7a:115c:a1e0::2";
/// The tailnet link's port, at both ends.
pub const TAILNET_PORT: u16 = 41641;
/// The underlay link to the tailnet peer: TailGuard's end and its own.
pub const TAILNET_UNDERLAY: &str = "10.210.0.1";
pub const TAILNET_UNDERLAY_PEER: &str = "10.210.0.2";

// The uplink: TailGuard's own network, which neither side may reach
// through it.

/// The uplink's network, TailGuard's end of it, and a host beyond.
pub const INTERNET_NET: &str = "10.201.0.0/24";
pub const UPLINK: &str = "10.201.0.1";
pub const INTERNET: &str = "10.201.0.2";

// Hosts no namespace has, that crafted packets come from (the programs run
// without the daemon: `BPF_PROG_TEST_RUN`, TUN devices).

/// Another WireGuard client of TailGuard.
pub const CRAFTED_WG_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 7);
pub const CRAFTED_WG_CLIENT_V6: &str = "fd66::7";
/// Another tailnet peer.
pub const CRAFTED_TAILNET_PEER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);
pub const CRAFTED_TAILNET_PEER_V6: &str = "fd7a:115c:a1e0::9";

// The node as the programs' configuration has it (see `crate::node`).

/// [`NODE_TS`] and [`NODE_TS_V6`].
pub const TS4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
pub const TS6: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 1);
/// [`NODE_WG`] and [`NODE_WG_V6`].
pub const WG4: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);
pub const WG6: Ipv6Addr = Ipv6Addr::new(0xfd66, 0, 0, 0, 0, 0, 0, 2);
/// [`WG_SERVER`] and [`WG_SERVER_V6`]: `TS_DEST_IP`.
pub const DEST4: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 1);
pub const DEST6: Ipv6Addr = Ipv6Addr::new(0xfd66, 0, 0, 0, 0, 0, 0, 1);

// The Ethernet router of the benchmarks and `datapath_ethernet_mode`: a
// client, the router and a server, joined by veth.

/// The client's network (the router's WireGuard side), the router's end
/// of it, and the client.
pub const ROUTER_WG_NET: &str = "10.1.0.0/24";
pub const ROUTER_WG: &str = "10.1.0.1";
pub const ROUTER_CLIENT: &str = "10.1.0.2";
/// The router's tailnet side (its address: [`TS4`]) and the server on it.
pub const ROUTER_SERVER: &str = "100.64.0.9";

/// `address/prefix`, as `ip addr add` and `Address =` take it.
pub fn with_prefix(address: &str, prefix: u8) -> String {
    format!("{address}/{prefix}")
}

/// `address:port`, as an endpoint (IPv4).
pub fn endpoint(address: &str, port: u16) -> String {
    format!("{address}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_typed_addresses_and_the_lists_are_the_named_ones() {
        assert_eq!(TS4.to_string(), NODE_TS);
        assert_eq!(TS6.to_string(), NODE_TS_V6);
        assert_eq!(WG4.to_string(), NODE_WG);
        assert_eq!(WG6.to_string(), NODE_WG_V6);
        assert_eq!(DEST4.to_string(), WG_SERVER);
        assert_eq!(DEST6.to_string(), WG_SERVER_V6);
        assert_eq!(WG_SERVER_BOTH, format!("{WG_SERVER},{WG_SERVER_V6}"));
        assert_eq!(
            WG_SERVER_ONLY,
            format!("{WG_SERVER}/32, {WG_SERVER_V6}/128")
        );
        assert_eq!(WG_SERVER_ONLY_V4, format!("{WG_SERVER}/32"));
        assert_eq!(WG_SERVER_EXIT, format!("0.0.0.0/0, ::/0, {LAN_NET}"));
        assert_eq!(TAILNET_BOTH, format!("{TAILNET},{TAILNET_V6}"));
        assert_eq!(TAILNET, with_prefix("100.64.0.0", TAILNET_PREFIX));
        assert_eq!(
            TAILNET_V6,
            with_prefix("fd7a:115c:a1e0::", TAILNET_PREFIX_V6)
        );
        assert_eq!(WG_NET, with_prefix("10.66.0.0", WG_PREFIX));
        assert_eq!(WG_NET_V6, with_prefix("fd66::", WG_PREFIX_V6));
    }

    /// The clients' addresses are on the WireGuard network, and no two
    /// hosts (a namespace's or a crafted packet's) share one.
    #[test]
    fn every_wireguard_client_has_addresses_of_its_own() {
        let net: ipnet::Ipv4Net = WG_NET.parse().unwrap();
        let net6: ipnet::Ipv6Net = WG_NET_V6.parse().unwrap();
        let clients: Vec<ClientAddresses> = std::iter::once(WG_CLIENT_ADDRESSES)
            .chain(MORE_WG_CLIENTS)
            .collect();
        let mut taken = vec![
            WG_SERVER.to_string(),
            NODE_WG.to_string(),
            CRAFTED_WG_CLIENT.to_string(),
        ];
        let mut taken_v6 = vec![WG_SERVER_V6, NODE_WG_V6, CRAFTED_WG_CLIENT_V6];
        let mut underlays = vec![UNDERLAY, INTERNET_NET, TAILNET_UNDERLAY];
        for c in clients {
            assert!(
                net.contains(&c.address.parse::<Ipv4Addr>().unwrap()),
                "{c:?}"
            );
            assert!(
                net6.contains(&c.address_v6.parse::<Ipv6Addr>().unwrap()),
                "{c:?}"
            );
            assert!(!taken.iter().any(|a| a == c.address), "{c:?}");
            assert!(!taken_v6.contains(&c.address_v6), "{c:?}");
            let link = |a: &str| a.rsplit_once('.').unwrap().0.to_string();
            assert_eq!(link(c.underlay), link(c.underlay_peer), "{c:?}");
            assert!(
                !underlays.iter().any(|u| link(u) == link(c.underlay)),
                "{c:?}"
            );
            taken.push(c.address.to_string());
            taken_v6.push(c.address_v6);
            underlays.push(c.underlay);
        }
    }
}
