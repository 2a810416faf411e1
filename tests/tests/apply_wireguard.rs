//! The WireGuard side brought up for real: TailGuard's namespace and a peer
//! namespace running wireguard-go, joined by a veth link. The kernel state is
//! read back with iproute2 and wg — not with TailGuard's own netlink code —
//! and must be exactly as before once torn down.

use std::{path::Path, process::Command};

use tailguard::{
    config::plan::Plan,
    config::settings::parse_args,
    config::wg_quick,
    host::netlink::Netlink,
    wireguard::bring_up::{SetupError, WgSetup},
};
use tailguard_tests::{
    netns::{routing_state, run},
    topology::*,
    traffic::ping,
    wg::Testbed,
};

fn plan(bed: &Testbed, interface: &str, allowed_ips: &str) -> Plan {
    let text = bed.config(interface, allowed_ips);
    let config = wg_quick::parse(&text, Path::new("test.conf")).expect("config");
    let (settings, _) = parse_args(&[&format!("--wg-device={}", bed.device)]).expect("settings");
    Plan::new(&settings, &config)
}

fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

fn wg(args: &[&str]) -> String {
    run(Command::new("wg").args(args)).trim().to_string()
}

/// TailGuard's WireGuard side, brought up on the current (namespace)
/// thread with a runtime of its own.
struct Up {
    rt: tokio::runtime::Runtime,
    nl: Netlink,
    setup: WgSetup,
}

impl Up {
    fn try_new(plan: &Plan) -> Result<Self, SetupError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let nl = rt
            .block_on(async { Netlink::connect() })
            .expect("rtnetlink");
        match rt.block_on(WgSetup::bring_up(&nl, plan)) {
            Ok(setup) => Ok(Self { rt, nl, setup }),
            Err(e) => Err(e),
        }
    }

    fn new(plan: &Plan) -> Self {
        Self::try_new(plan).unwrap_or_else(|e| panic!("bring-up: {e}"))
    }

    /// A second start over this one.
    fn again(&self, plan: &Plan) -> WgSetup {
        self.rt
            .block_on(WgSetup::bring_up(&self.nl, plan))
            .expect("second bring-up")
    }

    fn down(self) {
        self.rt
            .block_on(self.setup.teardown(&self.nl))
            .expect("teardown");
    }
}

#[test]
fn device_comes_up_as_planned_and_leaves_no_trace() {
    let bed = Testbed::new("wgup");
    let plan = plan(
        &bed,
        "ListenPort = 51821\nMTU = 1380",
        "10.66.0.1/32, fd66::1/128, 192.168.77.0/24",
    );
    let dev = &bed.device;
    bed.ours.run(|| {
        let before = routing_state();
        let up = Up::new(&plan);

        let addrs = ip(&["-br", "addr", "show", "dev", dev]);
        assert!(
            addrs.contains(&with_prefix(NODE_WG, WG_PREFIX))
                && addrs.contains(&with_prefix(NODE_WG_V6, WG_PREFIX_V6)),
            "{addrs}"
        );
        let link = ip(&["link", "show", "dev", dev]);
        assert!(link.contains("mtu 1380") && link.contains(",UP"), "{link}");
        let routes = ip(&["route", "show", "dev", dev]) + &ip(&["-6", "route", "show", "dev", dev]);
        for r in ["10.66.0.1 proto", "192.168.77.0/24", "fd66::1 proto"] {
            assert!(routes.contains(r), "route {r} missing:\n{routes}");
        }
        // No fwmark in the file and no default route: the listen port.
        assert_eq!(wg(&["show", dev, "fwmark"]), "0xca6d");
        assert_eq!(wg(&["show", dev, "listen-port"]), "51821");
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
        // The WireGuard side's routes and own networks ahead of table 52.
        for to in [
            WG_SERVER,
            "192.168.77.0/24",
            WG_NET,
            WG_SERVER_V6,
            WG_NET_V6,
        ] {
            let rule = format!("5260:\tfrom all to {to} lookup main");
            assert!(rules.contains(&rule), "{rule:?} missing:\n{rules}");
        }

        // A handshake happens and traffic crosses, both families.
        ping(WG_SERVER);
        ping(WG_SERVER_V6);
        let handshakes = wg(&["show", dev, "latest-handshakes"]);
        let when: u64 = handshakes
            .split_whitespace()
            .nth(1)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        assert!(when > 0, "no handshake: {handshakes}");

        // A second start changes nothing; tearing both down is harmless.
        let state = routing_state();
        let again = up.again(&plan);
        assert_eq!(
            routing_state(),
            state,
            "a second start must not change the kernel state"
        );
        ping(WG_SERVER);
        up.rt.block_on(again.teardown(&up.nl)).expect("teardown");
        up.down();
        assert_eq!(
            routing_state(),
            before,
            "teardown must leave the namespace as it was"
        );
    });
}

#[test]
fn default_routes_get_wg_quick_policy_routing() {
    let bed = Testbed::new("wgdef");
    let plan = plan(&bed, "", "0.0.0.0/0, ::/0");
    let dev = &bed.device;
    bed.ours.run(|| {
        let before = routing_state();
        let up = Up::new(&plan);
        assert_eq!(wg(&["show", dev, "fwmark"]), "0xca6c");
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
        ping(WG_SERVER);
        let via = ip(&["route", "get", "192.168.99.1"]);
        assert!(via.contains(&format!("dev {dev} table 51820")), "{via}");
        let marked = ip(&["route", "get", UNDERLAY_PEER, "mark", "0xca6c"]);
        assert!(
            !marked.contains(dev.as_str()),
            "marked packets must not enter the tunnel: {marked}"
        );
        up.down();
        assert_eq!(routing_state(), before);
    });
}

#[test]
fn a_failing_hook_stops_the_start_and_undoes_it() {
    let bed = Testbed::new("wghook");
    let plan = plan(
        &bed,
        "PostUp = echo broken %i >&2; false",
        WG_SERVER_ONLY_V4,
    );
    bed.ours.run(|| {
        let before = routing_state();
        let error = match Up::try_new(&plan) {
            Ok(_) => panic!("a failing PostUp must fail the start"),
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains("PostUp hook") && error.contains(&format!("broken {}", bed.device)),
            "{error}"
        );
        assert_eq!(routing_state(), before, "nothing may stay half-applied");
    });
}

/// wg-quick's MTU rule: no `MTU =`, so the device takes the MTU of the link
/// its peer's endpoint is reached by, less WireGuard's 80 bytes.
#[test]
fn mtu_follows_the_route_to_the_endpoint() {
    let bed = Testbed::new("wgmtu");
    let plan = plan(&bed, "", WG_SERVER_ONLY_V4);
    bed.ours.run(|| {
        ip(&["link", "set", "dev", &bed.links.0, "mtu", "1400"]);
        let up = Up::new(&plan);
        let link = ip(&["link", "show", "dev", &bed.device]);
        assert!(link.contains("mtu 1320"), "1400 - 80 expected:\n{link}");
        ping(WG_SERVER);
        up.down();
    });
}

/// `Table = off` adds no routes; `Table = N` puts every route, the default
/// one included, in table N with no policy routing.
#[test]
fn table_setting_is_honoured() {
    let bed = Testbed::new("wgtable");
    let dev = &bed.device;
    for (table, in_table) in [("off", false), ("1234", true)] {
        let plan = plan(
            &bed,
            &format!("Table = {table}"),
            "192.168.77.0/24, 0.0.0.0/0",
        );
        bed.ours.run(|| {
            let up = Up::new(&plan);
            let main = ip(&["route", "show", "dev", dev]);
            assert!(
                !main.contains("192.168.77.0/24"),
                "Table={table}, main:\n{main}"
            );
            let t1234: String = ip(&["route", "show", "table", "all"])
                .lines()
                .filter(|l| l.contains("table 1234"))
                .collect();
            assert_eq!(
                t1234.contains("192.168.77.0/24"),
                in_table,
                "Table={table}:\n{t1234}"
            );
            assert_eq!(
                t1234.contains(&format!("default dev {dev}")),
                in_table,
                "Table={table}:\n{t1234}"
            );
            let rules = ip(&["rule"]);
            assert!(
                !rules.contains("suppress_prefixlength"),
                "Table={table}: no policy routing:\n{rules}"
            );
            up.down();
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
    let bed = Testbed::new("wg52");
    let plan = plan(&bed, "ListenPort = 51822", WG_SERVER_ONLY_V4);
    bed.ours.run(|| {
        ip(&["rule", "add", "pref", "5270", "table", "52"]);
        ip(&[
            "route",
            "add",
            "blackhole",
            &format!("{UNDERLAY_PEER}/32"),
            "table",
            "52",
        ]);
        let up = Up::new(&plan);
        let marked = ip(&["route", "get", UNDERLAY_PEER, "mark", "0xca6e"]);
        assert!(
            !marked.contains("blackhole") && marked.contains(&bed.links.0),
            "{marked}"
        );
        ping(WG_SERVER);
        up.down();
    });
}

/// All four hooks run through `sh -c`, in wg-quick's order, with `%i` as the
/// device name.
#[test]
fn hooks_run_in_order_with_the_device_name() {
    let bed = Testbed::new("wghooks");
    let log = std::env::temp_dir().join(format!("tg-hooks-{}", bed.device));
    let hooks = ["PreUp", "PostUp", "PreDown", "PostDown"]
        .map(|h| format!("{h} = echo {} %i >> {}", h.to_lowercase(), log.display()))
        .join("\n");
    let plan = plan(&bed, &hooks, WG_SERVER_ONLY_V4);
    let dev = &bed.device;
    bed.ours.run(|| {
        let up = Up::new(&plan);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            format!("preup {dev}\npostup {dev}\n")
        );
        up.down();
    });
    let ran = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert_eq!(
        ran,
        format!("preup {dev}\npostup {dev}\npredown {dev}\npostdown {dev}\n")
    );
}
