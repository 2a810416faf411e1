//! The programs configured as the daemon configures them, for the tests and
//! benchmarks that run them without the daemon. One place for the node's
//! addresses and routes, so the policy tests and the benchmarks measure the
//! same node.

use ipnet::IpNet;
use tailguard::datapath::{self, Datapath, Routes};
use tailguard_common::{Config, Route, config::flag};

use crate::topology::*;

/// A bridge node with `TS_DEST_IP` the WireGuard server, both families, MTUs
/// 1420 (WireGuard) and 1280 (Tailscale); routes to the WireGuard side's
/// network and the tailnet, plus `extra` to the tailnet.
pub fn bridge(
    dp: &mut Datapath,
    (wg_ifindex, ts_ifindex): (u32, u32),
    isolate: bool,
    extra: impl IntoIterator<Item = IpNet>,
) -> Result<(), datapath::Error> {
    let mut c = Config {
        wg_ifindex,
        ts_ifindex,
        wg_mtu: 1420,
        ts_mtu: 1280,
        ..Config::default()
    };
    c.set_ts(Some(TS4), Some(TS6));
    c.set_wg(Some(WG4), Some(WG6));
    c.set_dest(Some(DEST4), Some(DEST6));
    c.set(flag::SNAT_TO_WG, true);
    c.set(flag::ISOLATE_PEERS, isolate);
    forwarding_on(&mut c);
    dp.write_config(&c)?;
    let mut routes = Routes::new();
    for (net, route) in [
        (WG_NET, Route::WIREGUARD),
        (WG_NET_V6, Route::WIREGUARD),
        (TAILNET, Route::TAILSCALE),
        (TAILNET_V6, Route::TAILSCALE),
    ] {
        routes.insert(net.parse().expect("a prefix"), route);
    }
    routes.extend(extra.into_iter().map(|net| (net, Route::TAILSCALE)));
    dp.sync_routes(&routes)
}

/// A router between two veth links (the Ethernet mode's tests and the
/// benchmarks): its WireGuard side [`ROUTER_WG`] on [`ROUTER_WG_NET`], its
/// tailnet side [`TS4`] on [`TAILNET`], MTUs 1500, IPv4; `extra` more
/// routes to the tailnet.
pub fn veth_router(
    dp: &mut Datapath,
    (wg_ifindex, ts_ifindex): (u32, u32),
    extra: impl IntoIterator<Item = IpNet>,
) -> Result<(), datapath::Error> {
    let mut c = Config {
        wg_ifindex,
        ts_ifindex,
        wg_mtu: 1500,
        ts_mtu: 1500,
        ..Config::default()
    };
    c.set_ts(Some(TS4), None);
    c.set_wg(Some(ROUTER_WG.parse().expect("an address")), None);
    c.set(flag::SNAT_TO_WG, true);
    forwarding_on(&mut c);
    dp.write_config(&c)?;
    let mut routes = Routes::new();
    routes.insert(ROUTER_WG_NET.parse().expect("a prefix"), Route::WIREGUARD);
    routes.insert(TAILNET.parse().expect("a prefix"), Route::TAILSCALE);
    routes.extend(extra.into_iter().map(|net| (net, Route::TAILSCALE)));
    dp.sync_routes(&routes)
}

/// Both families forwarded, as the daemon says when the user's switches are
/// on. (The veth router's own kernel still forwards nothing: the flags
/// only tell the programs that the user wants a bridge.)
fn forwarding_on(c: &mut Config) {
    c.set(flag::FORWARD_V4, true);
    c.set(flag::FORWARD_V6, true);
}
