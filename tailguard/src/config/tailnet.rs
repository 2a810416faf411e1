//! What is fixed about a tailnet on every node, as tailscaled sets it up:
//! its address ranges, its routing table and the fwmark bits it uses. The
//! plan keeps clear of them; the datapath and the status page rely on them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The tailnet's address ranges: Tailscale's CGNAT range for IPv4 and its
/// ULA prefix for IPv6. They always lead to the Tailscale device, whatever
/// tailscaled's table holds yet.
pub const TAILNET_RANGES: [IpNet; 2] = [
    IpNet::V4(match Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10) {
        Ok(net) => net,
        Err(_) => panic!("a valid prefix"),
    }),
    IpNet::V6(
        match Ipv6Net::new(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0), 48) {
            Ok(net) => net,
            Err(_) => panic!("a valid prefix"),
        },
    ),
];

/// tailscaled's routing table: its routes to peers, their subnets and the
/// exit node.
pub const TAILSCALE_TABLE: u32 = 52;

/// The fwmark bits tailscaled uses for its own marks.
pub const TAILSCALE_MARK_MASK: u32 = 0xff_0000;

/// `ip` is a tailnet address.
pub fn in_tailnet(ip: IpAddr) -> bool {
    TAILNET_RANGES.iter().any(|range| range.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranges_are_tailscales() {
        assert_eq!(
            TAILNET_RANGES.map(|r| r.to_string()),
            ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]
        );
        assert!(in_tailnet("100.100.100.100".parse().unwrap()));
        assert!(!in_tailnet("100.128.0.1".parse().unwrap()));
    }
}
