//! The four usage patterns (README.md, examples/README.md), each as a user would check it: the
//! whole daemon started from the environment and `wg0.conf`, between real
//! userspace WireGuard peers and the Tailscale stand-in's tailnet peer
//! (`tests/src/bridge.rs` draws the topology), once per datapath.

use std::process::Command;

use serde_json::json;
use tailguard_tests::{
    bridge::Bridge,
    daemon::{DATAPATHS, DaemonUnderTest},
    standin,
    topology::*,
    traffic::*,
};

const BULK: usize = 1 << 20;

/// Pattern 3, simple bridge: WireGuard clients reach tailnet peers and the
/// other way round, both families, each side seeing the node's address.
#[test]
fn simple_bridge() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("sc3-{datapath}"));
        let tn4 = b.tailnet.run(|| WhoAmI::listen(false));
        let tn6 = b.tailnet.run(|| WhoAmI::listen(true));
        let tn_sink = b.tailnet.run(Sink::listen);
        let cl4 = b.client.run(|| WhoAmI::listen(false));
        let cl6 = b.client.run(|| WhoAmI::listen(true));
        let cl_sink = b.client.run(Sink::listen);
        let inet = b.internet.run(|| WhoAmI::listen(false));
        let node = b.bed.ours.run(|| {
            DaemonUnderTest::builder(&b)
                .datapath(datapath)
                .start_healthy()
        });
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());

        // WireGuard client -> tailnet.
        b.client.run(|| {
            ping(TAILNET_PEER);
            ping(TAILNET_PEER_V6);
        });
        let seen = b.client.run(|| who_am_i(TAILNET_PEER, tn4.port));
        assert_eq!(seen.as_deref(), Ok(NODE_TS), "{}", ctx("client -> tailnet"));
        let seen = b.client.run(|| who_am_i(TAILNET_PEER_V6, tn6.port));
        assert_eq!(
            seen.as_deref(),
            Ok(NODE_TS_V6),
            "{}",
            ctx("client -> tailnet, IPv6")
        );
        let sent = b.client.run(|| send_bulk(TAILNET_PEER, tn_sink.port, BULK));
        assert_eq!(
            sent,
            Ok(BULK as u64),
            "{}",
            ctx("client -> tailnet, TCP transfer")
        );

        // Tailnet -> WireGuard client.
        b.tailnet.run(|| {
            ping(WG_CLIENT);
            ping(WG_CLIENT_V6);
        });
        let seen = b.tailnet.run(|| who_am_i(WG_CLIENT, cl4.port));
        assert_eq!(seen.as_deref(), Ok(NODE_WG), "{}", ctx("tailnet -> client"));
        let seen = b.tailnet.run(|| who_am_i(WG_CLIENT_V6, cl6.port));
        assert_eq!(
            seen.as_deref(),
            Ok(NODE_WG_V6),
            "{}",
            ctx("tailnet -> client, IPv6")
        );
        let sent = b
            .tailnet
            .run(|| send_bulk(WG_CLIENT_V6, cl_sink.port, BULK));
        assert_eq!(
            sent,
            Ok(BULK as u64),
            "{}",
            ctx("tailnet -> client, TCP transfer")
        );

        // Refused: the internet through the node, from either side.
        assert!(
            b.client.run(|| who_am_i(INTERNET, inet.port)).is_err(),
            "{}",
            ctx("client -> internet")
        );
        assert!(
            b.tailnet.run(|| who_am_i(INTERNET, inet.port)).is_err(),
            "{}",
            ctx("tailnet -> internet")
        );

        // What Tailscale was told: the WireGuard side's routes, routes
        // accepted, DNS left alone, no exit node.
        let p = standin::prefs(&node.standin().socket);
        assert_eq!(
            p["AdvertiseRoutes"],
            json!([
                WG_SERVER_ONLY_V4,
                "fd66::1/128",
                "10.66.0.3/32",
                "fd66::3/128"
            ]),
            "{p}"
        );
        assert_eq!(
            (&p["RouteAll"], &p["CorpDNS"]),
            (&json!(true), &json!(false)),
            "{p}"
        );
        b.bed.ours.run(|| node.stop());
    }
}

/// Pattern 2, simple server: the host is reachable from both networks,
/// which reach nothing through it: peers isolated, nothing advertised to the
/// tailnet, and the WireGuard client routes only its own network to it.
#[test]
fn simple_server() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("sc2-{datapath}"));
        // As its example runs it: no forwarding switch on.
        b.bed.ours.set_forwarding(false, false);
        // As such a client is configured: no tailnet routes; and a tailnet
        // that was told nothing has no route to the WireGuard side.
        b.client.run(|| {
            for range in [TAILNET, TAILNET_V6] {
                tailguard_tests::netns::run(Command::new("ip").args(["route", "del", range]));
            }
        });
        b.tailnet.run(|| {
            for net in [WG_NET, WG_NET_V6] {
                tailguard_tests::netns::run(Command::new("ip").args(["route", "del", net]));
            }
        });
        let host = b.bed.ours.run(|| WhoAmI::listen(true));
        let host_sink = b.bed.ours.run(Sink::listen);
        let server = b.bed.theirs.run(|| WhoAmI::listen(false));
        let tn4 = b.tailnet.run(|| WhoAmI::listen(false));
        let env = [
            ("TG_DATAPATH", datapath),
            ("TG_EXPOSE_HOST", "1"),
            ("TG_CLIENT_MODE", "1"),
            ("WG_ISOLATE_PEERS", "1"),
        ];
        let node = b
            .bed
            .ours
            .run(|| DaemonUnderTest::builder(&b).envs(&env).start_healthy());
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());

        // The host, from both sides.
        b.client.run(|| ping(NODE_WG));
        b.tailnet.run(|| {
            ping(NODE_TS);
            ping(NODE_TS_V6);
        });
        let seen = b.client.run(|| who_am_i(NODE_WG, host.port));
        assert_eq!(seen.as_deref(), Ok(WG_CLIENT), "{}", ctx("client -> host"));
        let seen = b.tailnet.run(|| who_am_i(NODE_TS_V6, host.port));
        assert_eq!(
            seen.as_deref(),
            Ok(TAILNET_PEER_V6),
            "{}",
            ctx("tailnet -> host, IPv6")
        );
        let sent = b.tailnet.run(|| send_bulk(NODE_TS, host_sink.port, BULK));
        assert_eq!(
            sent,
            Ok(BULK as u64),
            "{}",
            ctx("tailnet -> host, TCP transfer")
        );
        let sent = b.client.run(|| send_bulk(NODE_WG, host_sink.port, BULK));
        assert_eq!(
            sent,
            Ok(BULK as u64),
            "{}",
            ctx("client -> host, TCP transfer")
        );

        // Nothing between them.
        assert!(
            b.client.run(|| who_am_i(WG_SERVER, server.port)).is_err(),
            "{}",
            ctx("peers isolated")
        );
        assert!(
            b.client.run(|| who_am_i(TAILNET_PEER, tn4.port)).is_err(),
            "{}",
            ctx("client -> tailnet")
        );
        assert!(
            b.tailnet.run(|| who_am_i(WG_SERVER, server.port)).is_err(),
            "{}",
            ctx("tailnet -> WireGuard")
        );

        // Tailscale: a client that accepts DNS and advertises nothing.
        let p = standin::prefs(&node.standin().socket);
        assert_eq!(p["AdvertiseRoutes"], json!([]), "{p}");
        assert_eq!(p["CorpDNS"], json!(true), "{p}");
        b.bed.ours.run(|| node.stop());
    }
}

/// Pattern 1, WireGuard as exit node: TailGuard is a client of a WireGuard
/// server with `AllowedIPs = 0.0.0.0/0, ::/0` and the server's LAN;
/// `TS_DEST_IP` makes the server reachable at the node's tailnet address.
#[test]
fn wireguard_as_exit_node() {
    for datapath in DATAPATHS {
        let b = Bridge::with_server_allowed_ips(&format!("sc1-{datapath}"), WG_SERVER_EXIT);
        let server = b.bed.theirs.run(|| WhoAmI::listen(false));
        let server_sink = b.bed.theirs.run(Sink::listen);
        let lan = b.lan.run(|| WhoAmI::listen(false));
        let tn_sink = b.tailnet.run(Sink::listen);
        let env = [("TG_DATAPATH", datapath), ("TS_DEST_IP", WG_SERVER)];
        // A new namespace may inherit the switch from the host's: off, so
        // that the node's own setting shows.
        b.bed
            .ours
            .run(|| tailguard_tests::netns::sysctl("net.ipv4.conf.all.src_valid_mark", "0"));
        let node = b
            .bed
            .ours
            .run(|| DaemonUnderTest::builder(&b).envs(&env).start_healthy());
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());

        // The WireGuard server, at the node's own tailnet address.
        if let Err(failure) = b.tailnet.run(|| try_ping(NODE_TS)) {
            panic!("{}", ctx(&format!("tailnet -> TS_DEST_IP: {failure}")));
        }
        let seen = b.tailnet.run(|| who_am_i(NODE_TS, server.port));
        assert_eq!(
            seen.as_deref(),
            Ok(NODE_WG),
            "{}",
            ctx("tailnet -> TS_DEST_IP")
        );
        let sent = b.tailnet.run(|| send_bulk(NODE_TS, server_sink.port, BULK));
        assert_eq!(
            sent,
            Ok(BULK as u64),
            "{}",
            ctx("tailnet -> TS_DEST_IP, TCP transfer")
        );

        // The LAN behind it, advertised and reachable.
        b.tailnet.run(|| ping(LAN_HOST));
        let seen = b.tailnet.run(|| who_am_i(LAN_HOST, lan.port));
        assert_eq!(seen.as_deref(), Ok(NODE_WG), "{}", ctx("tailnet -> LAN"));

        // And the other way: the WireGuard side reaches the tailnet.
        let sent = b
            .bed
            .theirs
            .run(|| send_bulk(TAILNET_PEER, tn_sink.port, BULK));
        assert_eq!(
            sent,
            Ok(BULK as u64),
            "{}",
            ctx("WireGuard server -> tailnet")
        );

        // Tailscale was told: the LAN (and the second peer's addresses),
        // and both default routes: an exit node.
        let p = standin::prefs(&node.standin().socket);
        assert_eq!(
            p["AdvertiseRoutes"],
            json!([LAN_NET, "10.66.0.3/32", "fd66::3/128", "0.0.0.0/0", "::/0"]),
            "{p}"
        );
        assert_eq!(p["CorpDNS"], json!(false), "{p}");

        // wg-quick's IPv4 policy routing needs src_valid_mark while the
        // node runs; the stop puts back what the namespace had.
        let src_valid_mark = || {
            std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/src_valid_mark")
                .unwrap()
                .trim()
                .to_string()
        };
        let running = b.bed.ours.run(src_valid_mark);
        assert_eq!(running, "1", "{}", ctx("src_valid_mark while running"));
        let after = b.bed.ours.run(|| {
            node.stop();
            src_valid_mark()
        });
        assert_eq!(after, "0", "{datapath}: src_valid_mark put back");
    }
}

/// Pattern 4, a Tailscale exit node for WireGuard clients: client mode with
/// `TS_EXIT_NODE=auto:any`; a WireGuard client's internet traffic leaves
/// through the tailnet peer acting as exit node.
#[test]
fn tailscale_exit_node_for_wireguard_clients() {
    use tailguard_tests::netns::{NetNs, run, veth};
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("sc4-{datapath}"));
        // The exit node's internet, reachable only through the tailnet peer,
        // which forwards and masquerades like a Tailscale exit node.
        let internet = NetNs::new(&format!("sc4-{datapath}-inet"));
        veth(&b.tailnet, "10.220.0.1/24", &internet, "10.220.0.2/24");
        b.tailnet.run(|| {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
            for rule in [
                "add table ip exit",
                "add chain ip exit post { type nat hook postrouting priority srcnat; }",
                "add rule ip exit post ip daddr 10.220.0.0/24 masquerade",
            ] {
                run(Command::new("nft").args(rule.split(' ')));
            }
        });
        let site = internet.run(|| WhoAmI::listen(false));
        // The client sends everything to TailGuard.
        b.client_routes_everything_to_tailguard();

        let env = [
            ("TG_DATAPATH", datapath),
            ("TG_CLIENT_MODE", "1"),
            ("TS_EXIT_NODE", "auto:any"),
            // The stand-in's tailnet, with the peer as exit node: its
            // default route in table 52 and through the tunnel to the peer.
            ("STANDIN_ROUTES", &format!("{TAILNET_BOTH},0.0.0.0/0")),
            (
                "STANDIN_PEER_ALLOWED_IPS",
                &format!("{TAILNET_PEER}/32,{TAILNET_PEER_V6}/128,0.0.0.0/0"),
            ),
        ];
        let mut node = b
            .bed
            .ours
            .run(|| DaemonUnderTest::builder(&b).envs(&env).start_healthy());

        let seen = b.client.run(|| who_am_i("10.220.0.2", site.port));
        assert_eq!(
            seen.as_deref(),
            Ok("10.220.0.1"),
            "{datapath}: client -> internet via the exit node\n{}",
            node.log()
        );
        b.client.run(|| ping("10.220.0.2"));

        // Tailscale was told: DNS accepted, nothing advertised, any exit
        // node with LAN access (set once healthy).
        let socket = node.standin().socket.clone();
        b.bed.ours.run(|| {
            node.wait_for("the exit node preference", |_| {
                standin::prefs(&socket)["AutoExitNode"] == "any"
            })
        });
        let p = standin::prefs(&node.standin().socket);
        assert_eq!(p["AdvertiseRoutes"], json!([]), "{p}");
        assert_eq!(
            (&p["CorpDNS"], &p["ExitNodeAllowLANAccess"]),
            (&json!(true), &json!(true)),
            "{p}"
        );
        b.bed.ours.run(|| node.stop());
    }
}
