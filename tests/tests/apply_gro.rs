//! UDP GRO forwarding on the uplink, checked with the `ethtool` tool, and
//! restored afterwards.

use std::process::Command;

use tailguard::{host::gro::GroSetup, host::netlink::Netlink};
use tailguard_tests::{
    netns::{NetNs, run, veth},
    require_root,
    topology::*,
};

fn feature(dev: &str, name: &str) -> String {
    let out = run(Command::new("ethtool").args(["-k", dev]));
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("{name} not listed by ethtool -k {dev}:\n{out}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Our namespace (`tg-PURPOSE-…`), its peer's and our end of the veth
/// between them.
fn with_uplink(purpose: &str) -> (NetNs, NetNs, String) {
    require_root();
    let ours = NetNs::new(purpose);
    let other = NetNs::new(&format!("{purpose}-up"));
    let (uplink, _) = veth(
        &ours,
        &with_prefix(UNDERLAY, LINK_PREFIX),
        &other,
        &with_prefix(UNDERLAY_PEER, LINK_PREFIX),
    );
    (ours, other, uplink)
}

#[test]
fn uplink_gets_udp_gro_forwarding_until_we_stop() {
    let (ours, _other, uplink) = with_uplink("gro");
    ours.run(|| {
        run(Command::new("ip").args(["route", "add", "default", "via", UNDERLAY_PEER]));
        // Start from the opposite of what we want, to see both change.
        run(Command::new("ethtool").args([
            "-K",
            &uplink,
            "rx-udp-gro-forwarding",
            "off",
            "rx-gro-list",
            "on",
        ]));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let nl = Netlink::connect().unwrap();
            let setup = GroSetup::enable(&nl)
                .await
                .expect("veth can do UDP GRO forwarding");
            assert_eq!(feature(&uplink, "rx-udp-gro-forwarding"), "on");
            assert_eq!(feature(&uplink, "rx-gro-list"), "off");
            assert!(
                GroSetup::enable(&nl).await.is_none(),
                "a second time there is nothing to change"
            );
            setup.restore().await.expect("restore");
            assert_eq!(feature(&uplink, "rx-udp-gro-forwarding"), "off");
            assert_eq!(feature(&uplink, "rx-gro-list"), "on");
        });
    });
}

#[test]
fn without_a_default_route_nothing_is_touched() {
    let (ours, _other, uplink) = with_uplink("gro-none");
    ours.run(|| {
        let before = run(Command::new("ethtool").args(["-k", &uplink]));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(
                GroSetup::enable(&Netlink::connect().unwrap())
                    .await
                    .is_none()
            );
        });
        assert_eq!(run(Command::new("ethtool").args(["-k", &uplink])), before);
    });
}
