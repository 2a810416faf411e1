//! The route tries as the kernel holds them: only the prefixes that change
//! an answer, up to a million per family, and a clear refusal beyond that
//! which leaves the tries as they were; packets routed by what is held
//! (`BPF_PROG_TEST_RUN`).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use tailguard::datapath::{Datapath, Error};
use tailguard_common::{Device, config::MAX_ROUTES};
use tailguard_tests::{
    crafted::*,
    node,
    topology::{TAILNET, WG_NET},
};

/// `n` host routes to the tailnet that are not inside its range (subnet
/// routes tailnet peers advertise, one host each): none is redundant.
fn subnet_hosts(n: u32) -> impl Iterator<Item = IpNet> {
    let first = u32::from(Ipv4Addr::new(44, 0, 0, 0));
    (0..n).map(move |i| Ipv4Net::new(Ipv4Addr::from(first + i), 32).unwrap().into())
}

/// How many IPv4 prefixes the trie holds.
fn held_v4(dp: &Datapath) -> usize {
    dp.routes()
        .unwrap()
        .keys()
        .filter(|net| matches!(net, IpNet::V4(_)))
        .count()
}

/// A new UDP flow from the WireGuard client to `dst`: its verdict.
fn sent_to(dp: &Datapath, dst: Ipv4Addr) -> u32 {
    run(
        dp,
        Device::WireGuard,
        &frame(CLIENT4.into(), IpAddr::V4(dst), 40000, 53, L4::Udp, 64),
    )
    .verdict
}

#[test]
fn a_million_routes_fit_and_one_more_is_refused_leaving_the_tries_as_they_were() {
    let mut dp = datapath(false);
    // The bridge's own: the WireGuard network and the tailnet range.
    let own = 2;
    let fit = MAX_ROUTES - own;
    node::bridge(&mut dp, (WG_IFINDEX, TS_IFINDEX), false, subnet_hosts(fit))
        .expect("a million routes fit");
    assert_eq!(held_v4(&dp), MAX_ROUTES as usize);
    let last = Ipv4Addr::from(u32::from(Ipv4Addr::new(44, 0, 0, 0)) + fit - 1);
    assert_eq!(sent_to(&dp, last), REDIRECT, "the last route routes");

    let err = node::bridge(
        &mut dp,
        (WG_IFINDEX, TS_IFINDEX),
        false,
        subnet_hosts(fit + 1),
    )
    .expect_err("one more is refused");
    assert!(matches!(err, Error::TooManyRoutes { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("{} IPv4 routes", MAX_ROUTES + 1))
            && message.contains(&MAX_ROUTES.to_string()),
        "says how many and the limit: {message}"
    );
    assert_eq!(held_v4(&dp), MAX_ROUTES as usize, "nothing half-applied");
    assert_eq!(sent_to(&dp, last), REDIRECT);
}

/// Tailnet peers' /32s inside the tailnet's range lead where the range
/// does: the trie leaves them out and routes them all the same.
#[test]
fn routes_that_change_no_answer_are_left_out_and_still_answered() {
    let mut dp = datapath(false);
    let tailnet: Ipv4Net = TAILNET.parse().unwrap();
    let peers: Vec<IpNet> = tailnet
        .hosts()
        .skip(1000)
        .take(500)
        .map(|a| Ipv4Net::new(a, 32).unwrap().into())
        .collect();
    node::bridge(&mut dp, (WG_IFINDEX, TS_IFINDEX), false, peers.clone()).unwrap();
    let held = dp.routes().unwrap();
    let wg: IpNet = WG_NET.parse().unwrap();
    assert!(held.contains_key(&IpNet::V4(tailnet)) && held.contains_key(&wg));
    assert!(
        peers.iter().all(|p| !held.contains_key(p)),
        "no /32 inside the tailnet range is held"
    );
    assert_eq!(held_v4(&dp), 2);
    for peer in peers.iter().step_by(97) {
        let IpAddr::V4(addr) = peer.addr() else {
            unreachable!()
        };
        assert_eq!(sent_to(&dp, addr), REDIRECT, "{addr} routed to the tailnet");
    }
}
