//! Name resolution set up and restored: the resolver file (a file of the
//! test's own, never the host's), and host routes that keep the fallback
//! name servers on the uplink.

use std::{path::Path, process::Command};

use tailguard::{
    config::plan::Plan, config::settings::parse_args, config::wg_quick, host::netlink::Netlink,
    host::resolver::ResolverSetup,
};
use tailguard_tests::{
    netns::{NetNs, routing_state, run, veth},
    require_root,
    topology::*,
};

const ORIGINAL: &str = "nameserver 192.0.2.53\nsearch example.invalid\noptions ndots:2 timeout:1\n";

#[test]
fn resolver_file_and_fallback_routes_come_and_go() {
    require_root();
    let ours = NetNs::new("dns");
    let uplink = NetNs::new("dns-uplink");
    veth(
        &ours,
        &with_prefix(UNDERLAY, LINK_PREFIX),
        &uplink,
        &with_prefix(UNDERLAY_PEER, LINK_PREFIX),
    );
    let dir = std::env::temp_dir().join(format!("tg-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("resolv.conf");
    std::fs::write(&file, ORIGINAL).unwrap();

    let config = wg_quick::parse(
        "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nDNS = 10.66.0.1, corp.test\n",
        Path::new("wg0.conf"),
    )
    .unwrap();
    let (settings, _) = parse_args(&[
        "--nameservers=9.9.9.9,2620:fe::fe",
        &format!("--resolv-conf={}", file.display()),
    ])
    .unwrap();
    let plan = Plan::new(&settings, &config);

    ours.run(|| {
        run(Command::new("ip").args(["route", "add", "default", "via", UNDERLAY_PEER]));
        let before = routing_state();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let nl = Netlink::connect().unwrap();
            let first = ResolverSetup::apply(&nl, &plan.resolver).await.expect("apply");
            let written = std::fs::read_to_string(&file).unwrap();
            assert!(
                written.ends_with(
                    "nameserver 10.66.0.1\nnameserver 9.9.9.9\nnameserver 2620:fe::fe\nsearch corp.test\noptions ndots:2 timeout:1\n"
                ),
                "{written}"
            );
            let route = run(Command::new("ip").args(["route", "show", "9.9.9.9"]));
            assert!(route.contains("9.9.9.9 via 10.200.0.2"), "host route via the uplink: {route}");
            // No IPv6 default route here: no host route for the IPv6 server.
            assert!(!run(Command::new("ip").args(["-6", "route"])).contains("2620:fe::fe"));

            // A start after a crash (no teardown) must still know the original.
            let second = ResolverSetup::apply(&nl, &plan.resolver).await.expect("apply again");
            assert_eq!(std::fs::read_to_string(&file).unwrap(), written);
            second.teardown(&nl).await.expect("teardown");
            assert_eq!(std::fs::read_to_string(&file).unwrap(), ORIGINAL, "the original must come back");
            first.teardown(&nl).await.expect("a second teardown is harmless");
        });
        assert_eq!(std::fs::read_to_string(&file).unwrap(), ORIGINAL);
        assert!(!dir.join("resolv.conf.tailguard").exists(), "the backup must go");
        assert_eq!(routing_state(), before);
    });
    std::fs::remove_dir_all(&dir).unwrap();
}
