//! The fast path on Ethernet devices (veth), as the benchmarks use it: a
//! client and a server namespace joined through a router namespace whose two
//! veth ends carry the programs in the WireGuard and Tailscale roles. The
//! router's kernel does not forward at all, so whatever arrives came through
//! the programs, with the next hop's MAC filled in by the kernel.

use std::process::Command;

use tailguard::{
    config::settings::AttachMode,
    datapath::{Datapath, LinkLayer, LoadOptions},
};
use tailguard_common::{Device, Outcome};
use tailguard_tests::{
    netns::{NetNs, run, veth},
    node, require_root,
    topology::*,
    traffic::{WhoAmI, who_am_i},
};

#[test]
fn the_fast_path_forwards_and_masquerades_between_veth_links() {
    require_root();
    let client = NetNs::new("eth-client");
    let router = NetNs::new("eth-router");
    let server = NetNs::new("eth-server");
    let (_, wg_side) = veth(
        &client,
        &with_prefix(ROUTER_CLIENT, 24),
        &router,
        &with_prefix(ROUTER_WG, 24),
    );
    let (ts_side, _) = veth(
        &router,
        &with_prefix(NODE_TS, TAILNET_PREFIX),
        &server,
        &with_prefix(ROUTER_SERVER, TAILNET_PREFIX),
    );
    client.run(|| run(Command::new("ip").args(["route", "add", TAILNET, "via", ROUTER_WG])));
    router.run(|| {
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .unwrap()
                .trim(),
            "0",
            "the router's kernel must not forward: only the programs may"
        );
    });
    let server_app = server.run(|| WhoAmI::listen(false));

    router.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut dp =
            Datapath::load(&LoadOptions::uniform(LinkLayer::Ethernet)).expect("loading programs");
        for (device, ifname) in [(Device::WireGuard, &wg_side), (Device::Tailscale, &ts_side)] {
            runtime
                .block_on(dp.attach(device, ifname, AttachMode::Auto))
                .expect("attach");
        }
        let index = |name: &str| nix::net::if_::if_nametoindex(name).unwrap();
        node::veth_router(&mut dp, (index(&wg_side), index(&ts_side)), []).unwrap();

        let seen = client.run(|| who_am_i(ROUTER_SERVER, server_app.port));
        assert_eq!(seen.as_deref(), Ok(NODE_TS), "masqueraded by the programs");
        let outcomes = dp.outcomes().unwrap();
        assert!(outcomes.get(Device::WireGuard, Outcome::Redirected).packets > 0);
        assert!(outcomes.get(Device::Tailscale, Outcome::Redirected).packets > 0);
        runtime
            .block_on(dp.detach())
            .map_err(|e| format!("{e:?}"))
            .unwrap();
    });
}
