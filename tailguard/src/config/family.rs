//! Addresses by family: the one place that picks a node's IPv4 and IPv6
//! address out of a list.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The first IPv4 and the first IPv6 address of `addrs`.
pub fn first_of_each(
    addrs: impl IntoIterator<Item = IpAddr>,
) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let (mut v4, mut v6) = (None, None);
    for addr in addrs {
        match addr {
            IpAddr::V4(a) => _ = v4.get_or_insert(a),
            IpAddr::V6(a) => _ = v6.get_or_insert(a),
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_each_family_wins() {
        let addrs = ["fd7a::1", "100.64.0.1", "100.64.0.2", "fd7a::2"].map(|a| a.parse().unwrap());
        assert_eq!(
            first_of_each(addrs),
            (
                Some("100.64.0.1".parse().unwrap()),
                Some("fd7a::1".parse().unwrap())
            )
        );
        assert_eq!(first_of_each([]), (None, None));
    }
}
