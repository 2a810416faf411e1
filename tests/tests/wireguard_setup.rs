//! The WireGuard side brought up for real: TailGuard's namespace and a peer
//! namespace running wireguard-go, joined by a veth link. The kernel state is
//! read back with iproute2 and wg — not with TailGuard's own netlink code —
//! and must be exactly as before once torn down.

use std::{path::Path, process::Command};

use tailguard::{netlink::Netlink, plan::Plan, settings::parse_args, wg_setup::WgSetup, wgconf};
use tailguard_tests::{
    netns::{routing_state, run},
    wg::{Testbed, ping},
};

fn plan(bed: &Testbed, interface: &str, allowed_ips: &str) -> Plan {
    let config =
        wgconf::parse(&bed.config(interface, allowed_ips), Path::new("test.conf")).expect("config");
    let (settings, _) = parse_args(&[&format!("--wg-device={}", bed.device)]).expect("settings");
    Plan::new(&settings, &config)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

#[test]
fn device_comes_up_as_planned_and_leaves_no_trace() {
    let pair = Testbed::new("wgup");
    let plan = plan(
        &pair,
        "ListenPort = 51821\nMTU = 1380",
        "10.66.0.1/32, fd66::1/128, 192.168.77.0/24",
    );
    let dev = pair.device.clone();
    pair.ours.run(|| {
        let before = routing_state();
        runtime().block_on(async {
            let nl = Netlink::connect().unwrap();
            let setup = WgSetup::bring_up(&nl, &plan, "wireguard-go")
                .await
                .expect("bring-up");

            let addrs = ip(&["-br", "addr", "show", "dev", &dev]);
            assert!(
                addrs.contains("10.66.0.2/24") && addrs.contains("fd66::2/64"),
                "{addrs}"
            );
            let link = ip(&["link", "show", "dev", &dev]);
            assert!(link.contains("mtu 1380") && link.contains(",UP"), "{link}");
            let routes =
                ip(&["route", "show", "dev", &dev]) + &ip(&["-6", "route", "show", "dev", &dev]);
            for r in ["10.66.0.1 proto", "192.168.77.0/24", "fd66::1 proto"] {
                assert!(routes.contains(r), "route {r} missing:\n{routes}");
            }
            // No fwmark in the file and no default route: the listen port.
            assert_eq!(
                run(Command::new("wg").args(["show", &dev, "fwmark"])).trim(),
                "0xca6d"
            );
            assert_eq!(
                run(Command::new("wg").args(["show", &dev, "listen-port"])).trim(),
                "51821"
            );
            let rules = ip(&["rule"]) + &ip(&["-6", "rule"]);
            assert_eq!(
                rules
                    .matches("5200:\tfrom all fwmark 0xca6d lookup main")
                    .count(),
                2,
                "{rules}"
            );
            assert!(
                !rules.contains("suppress_prefixlength"),
                "no policy routing without a default route:\n{rules}"
            );

            // A handshake happens and traffic crosses, both families.
            ping("10.66.0.1");
            ping("fd66::1");
            let handshakes = run(Command::new("wg").args(["show", &dev, "latest-handshakes"]));
            let when: u64 = handshakes
                .split_whitespace()
                .nth(1)
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            assert!(when > 0, "no handshake: {handshakes}");

            // A second start changes nothing.
            let state = routing_state();
            let again = WgSetup::bring_up(&nl, &plan, "wireguard-go")
                .await
                .expect("second bring-up");
            assert_eq!(
                routing_state(),
                state,
                "a second start must not change the kernel state"
            );
            ping("10.66.0.1");

            again.teardown(&nl).await.expect("teardown");
            setup
                .teardown(&nl)
                .await
                .expect("a second teardown finds nothing to do");
        });
        assert_eq!(
            routing_state(),
            before,
            "teardown must leave the namespace as it was"
        );
    });
}

#[test]
fn default_routes_get_wg_quick_policy_routing() {
    let pair = Testbed::new("wgdef");
    let plan = plan(&pair, "", "0.0.0.0/0, ::/0");
    let dev = pair.device.clone();
    pair.ours.run(|| {
        let before = routing_state();
        runtime().block_on(async {
            let nl = Netlink::connect().unwrap();
            let setup = WgSetup::bring_up(&nl, &plan, "wireguard-go")
                .await
                .expect("bring-up");
            assert_eq!(
                run(Command::new("wg").args(["show", &dev, "fwmark"])).trim(),
                "0xca6c"
            );
            for family in ["-4", "-6"] {
                let rules = ip(&[family, "rule"]);
                for expected in [
                    "5200:\tfrom all fwmark 0xca6c lookup main",
                    "32764:\tfrom all lookup main suppress_prefixlength 0",
                    "32765:\tnot from all fwmark 0xca6c lookup 51820",
                ] {
                    assert!(
                        rules.contains(expected),
                        "{family}: {expected:?} missing:\n{rules}"
                    );
                }
                let table = ip(&[family, "route", "show", "table", "51820"]);
                assert!(table.contains(&format!("default dev {dev}")), "{table}");
            }
            // Unmarked traffic takes the tunnel; WireGuard's own marked UDP
            // still leaves by the veth link, or nothing would arrive.
            ping("10.66.0.1");
            let via = ip(&["route", "get", "192.168.99.1"]);
            assert!(via.contains(&format!("dev {dev} table 51820")), "{via}");
            let marked = ip(&["route", "get", "10.200.0.2", "mark", "0xca6c"]);
            assert!(
                !marked.contains(&dev),
                "marked packets must not enter the tunnel: {marked}"
            );
            setup.teardown(&nl).await.expect("teardown");
        });
        assert_eq!(routing_state(), before);
    });
}

#[test]
fn a_failing_hook_stops_the_start_and_undoes_it() {
    let pair = Testbed::new("wghook");
    let plan = plan(&pair, "PostUp = echo broken %i >&2; false", "10.66.0.1/32");
    let dev = pair.device.clone();
    pair.ours.run(|| {
        let before = routing_state();
        let error = runtime().block_on(async {
            let nl = Netlink::connect().unwrap();
            match WgSetup::bring_up(&nl, &plan, "wireguard-go").await {
                Ok(_) => panic!("a failing PostUp must fail the start"),
                Err(e) => e.to_string(),
            }
        });
        assert!(
            error.contains("PostUp hook") && error.contains(&format!("broken {dev}")),
            "{error}"
        );
        assert_eq!(routing_state(), before, "nothing may stay half-applied");
    });
}

/// wg-quick's MTU rule: no `MTU =`, so the device takes the MTU of the link
/// its peer's endpoint is reached by, less WireGuard's 80 bytes.
#[test]
fn mtu_follows_the_route_to_the_endpoint() {
    let pair = Testbed::new("wgmtu");
    let plan = plan(&pair, "", "10.66.0.1/32");
    let dev = pair.device.clone();
    pair.ours.run(|| {
        ip(&["link", "set", "dev", &pair.links.0, "mtu", "1400"]);
        runtime().block_on(async {
            let nl = Netlink::connect().unwrap();
            let setup = WgSetup::bring_up(&nl, &plan, "wireguard-go")
                .await
                .expect("bring-up");
            let link = ip(&["link", "show", "dev", &dev]);
            assert!(link.contains("mtu 1320"), "1400 - 80 expected:\n{link}");
            ping("10.66.0.1");
            setup.teardown(&nl).await.expect("teardown");
        });
    });
}

/// `Table = off` adds no routes; `Table = N` puts every route, the default
/// one included, in table N with no policy routing.
#[test]
fn table_setting_is_honoured() {
    let pair = Testbed::new("wgtable");
    let dev = pair.device.clone();
    for (table, expect_main, expect_table) in [("off", false, false), ("1234", false, true)] {
        let plan = plan(
            &pair,
            &format!("Table = {table}"),
            "192.168.77.0/24, 0.0.0.0/0",
        );
        pair.ours.run(|| {
            runtime().block_on(async {
                let nl = Netlink::connect().unwrap();
                let setup = WgSetup::bring_up(&nl, &plan, "wireguard-go")
                    .await
                    .expect("bring-up");
                let main = ip(&["route", "show", "dev", &dev]);
                assert_eq!(
                    main.contains("192.168.77.0/24"),
                    expect_main,
                    "Table={table}, main:\n{main}"
                );
                let t1234: String = ip(&["route", "show", "table", "all"])
                    .lines()
                    .filter(|l| l.contains("table 1234"))
                    .collect();
                assert_eq!(
                    t1234.contains("192.168.77.0/24"),
                    expect_table,
                    "Table={table}:\n{t1234}"
                );
                assert_eq!(
                    t1234.contains(&format!("default dev {dev}")),
                    expect_table,
                    "Table={table}:\n{t1234}"
                );
                let rules = ip(&["rule"]);
                assert!(
                    !rules.contains("suppress_prefixlength"),
                    "Table={table}: no policy routing:\n{rules}"
                );
                setup.teardown(&nl).await.expect("teardown");
            });
        });
    }
}

/// tailscaled sends everything without its bypass mark into table 52 (rule
/// 5270); with a tailnet exit node, that table would take the route to the
/// WireGuard endpoint too and swallow the tunnel. Here table 52 blackholes
/// the endpoint: only our rule for WireGuard's fwmark (5200, ahead of
/// tailscaled's) lets the handshake through.
#[test]
fn wireguard_traffic_stays_out_of_tailscale_table_52() {
    let pair = Testbed::new("wg52");
    let plan = plan(&pair, "ListenPort = 51822", "10.66.0.1/32");
    pair.ours.run(|| {
        ip(&["rule", "add", "pref", "5270", "table", "52"]);
        ip(&["route", "add", "blackhole", "10.200.0.2/32", "table", "52"]);
        runtime().block_on(async {
            let nl = Netlink::connect().unwrap();
            let setup = WgSetup::bring_up(&nl, &plan, "wireguard-go")
                .await
                .expect("bring-up");
            let marked = ip(&["route", "get", "10.200.0.2", "mark", "0xca6e"]);
            assert!(
                !marked.contains("blackhole") && marked.contains(&pair.links.0),
                "{marked}"
            );
            ping("10.66.0.1");
            setup.teardown(&nl).await.expect("teardown");
        });
    });
}

/// All four hooks run through `sh -c`, in wg-quick's order, with `%i` as the
/// device name.
#[test]
fn hooks_run_in_order_with_the_device_name() {
    let pair = Testbed::new("wghooks");
    let log = std::env::temp_dir().join(format!("tg-hooks-{}", pair.device));
    let log_path = log.display().to_string();
    let hooks = ["PreUp", "PostUp", "PreDown", "PostDown"]
        .map(|h| format!("{h} = echo {} %i >> {log_path}", h.to_lowercase()))
        .join("\n");
    let plan = plan(&pair, &hooks, "10.66.0.1/32");
    let dev = pair.device.clone();
    pair.ours.run(|| {
        runtime().block_on(async {
            let nl = Netlink::connect().unwrap();
            let setup = WgSetup::bring_up(&nl, &plan, "wireguard-go")
                .await
                .expect("bring-up");
            assert_eq!(
                std::fs::read_to_string(&log).unwrap(),
                format!("preup {dev}\npostup {dev}\n")
            );
            setup.teardown(&nl).await.expect("teardown");
        });
    });
    let ran = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert_eq!(
        ran,
        format!("preup {dev}\npostup {dev}\npredown {dev}\npostdown {dev}\n")
    );
}
