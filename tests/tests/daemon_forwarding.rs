//! The forwarding policy (docs/policy.md) with real traffic: a
//! WireGuard server namespace and a tailnet peer on either side of the
//! daemon, every check run once per datapath, expecting the same results.

use std::process::Command;

use tailguard_tests::{
    bridge::Bridge,
    daemon::{DATAPATHS, DaemonUnderTest, counted, health, status},
    netns::{routing_state, run},
    topology::*,
    traffic::*,
};

/// With the eBPF datapath, the fast path carried traffic entering from both
/// devices (and, with `dropped`, dropped isolated peers' traffic itself);
/// with netfilter, there are no programs at all.
fn assert_path(node: &mut DaemonUnderTest, datapath: &str, dropped: Option<&str>) {
    let s = status();
    assert_eq!(s.datapath, datapath, "{s:#?}");
    // Chosen, not fallen back to: nothing to explain.
    assert_eq!(s.datapath_fallback, None, "{s:#?}");
    if datapath == "ebpf" {
        node.wait_for("the fast path's counters", |_| {
            counted("wireguard", "redirected") > 0
                && counted("tailscale", "redirected") > 0
                && dropped.is_none_or(|reason| counted("wireguard", reason) > 0)
        });
    } else {
        assert!(s.counters.is_none(), "{s:#?}");
    }
}

#[test]
fn forwarding_rows_nat_and_dest_ip() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("fwd-{datapath}"));
        let wg4 = b.bed.theirs.run(|| WhoAmI::listen(false));
        let wg6 = b.bed.theirs.run(|| WhoAmI::listen(true));
        let tn4 = b.tailnet.run(|| WhoAmI::listen(false));
        let tn6 = b.tailnet.run(|| WhoAmI::listen(true));
        let inet = b.internet.run(|| WhoAmI::listen(false));
        let host = b.bed.ours.run(|| WhoAmI::listen(false));
        let mut node = b.bed.ours.run(|| {
            DaemonUnderTest::builder(&b)
                .datapath(datapath)
                .envs(&[("TS_DEST_IP", WG_SERVER_BOTH), ("TG_WEBUI_PORT", "8088")])
                .start_healthy()
        });
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());

        // wg -> ts: masqueraded to the node's tailnet address.
        let seen = b.bed.theirs.run(|| who_am_i(TAILNET_PEER, tn4.port));
        assert_eq!(seen.as_deref(), Ok(NODE_TS), "{}", ctx("wg -> ts, IPv4"));
        let seen = b.bed.theirs.run(|| who_am_i(TAILNET_PEER_V6, tn6.port));
        assert_eq!(seen.as_deref(), Ok(NODE_TS_V6), "{}", ctx("wg -> ts, IPv6"));

        // ts -> wg: source-NATed to the node's WireGuard address.
        let seen = b.tailnet.run(|| who_am_i(WG_SERVER, wg4.port));
        assert_eq!(seen.as_deref(), Ok(NODE_WG), "{}", ctx("ts -> wg, IPv4"));
        let seen = b.tailnet.run(|| who_am_i(WG_SERVER_V6, wg6.port));
        assert_eq!(seen.as_deref(), Ok(NODE_WG_V6), "{}", ctx("ts -> wg, IPv6"));

        // TS_DEST_IP: the node's own tailnet address leads to the WG server.
        let seen = b.tailnet.run(|| who_am_i(NODE_TS, wg4.port));
        assert_eq!(seen.as_deref(), Ok(NODE_WG), "{}", ctx("TS_DEST_IP, IPv4"));
        let seen = b.tailnet.run(|| who_am_i(NODE_TS_V6, wg6.port));
        assert_eq!(
            seen.as_deref(),
            Ok(NODE_WG_V6),
            "{}",
            ctx("TS_DEST_IP, IPv6")
        );

        // wg -> wg: forwarded as it is (WG_ISOLATE_PEERS=0).
        let seen = b.client.run(|| who_am_i(WG_SERVER, wg4.port));
        assert_eq!(seen.as_deref(), Ok(WG_CLIENT), "{}", ctx("wg -> wg"));

        // Neither side reaches the uplink, which the node itself does reach.
        let seen = b.bed.ours.run(|| who_am_i(INTERNET, inet.port));
        assert_eq!(
            seen.as_deref(),
            Ok(UPLINK),
            "{}",
            ctx("the node to the uplink")
        );
        let refused = b.bed.theirs.run(|| who_am_i(INTERNET, inet.port));
        assert!(refused.is_err(), "{}", ctx("wg -> uplink must be dropped"));
        let refused = b.tailnet.run(|| who_am_i(INTERNET, inet.port));
        assert!(refused.is_err(), "{}", ctx("ts -> uplink must be dropped"));
        assert_eq!(
            inet.last_seen(),
            Some(UPLINK.into()),
            "only the node got through"
        );

        // The host is not exposed: new connections from either side dropped.
        let refused = b.bed.theirs.run(|| who_am_i(NODE_WG, host.port));
        assert!(refused.is_err(), "{}", ctx("wg -> host must be dropped"));
        let refused = b.tailnet.run(|| who_am_i(NODE_WG, host.port));
        assert!(refused.is_err(), "{}", ctx("ts -> host must be dropped"));
        // ... but the status page is open to both sides.
        let page = b.bed.theirs.run(|| http_get(NODE_WG, 8088, "/status"));
        assert!(
            page.contains("\"forwarding\""),
            "{}",
            ctx(&format!("status page from wg: {page}"))
        );
        let page = b.tailnet.run(|| http_get(NODE_WG, 8088, "/healthz"));
        assert!(
            page.contains("healthy"),
            "{}",
            ctx(&format!("status page from ts: {page}"))
        );

        b.bed.ours.run(|| {
            assert_path(&mut node, datapath, Some("drop:not-forwarded"));
            let table = run(Command::new("nft").args(["list", "table", "inet", "tailguard"]));
            assert!(table.contains("policy drop"), "{table}");
            let reserved = "/proc/sys/net/ipv4/ip_local_reserved_ports";
            let ports = std::fs::read_to_string(reserved).unwrap();
            assert_eq!(
                ports.trim(),
                "61000-65535",
                "the fast path's ports reserved"
            );
            node.stop();
            let tables = run(Command::new("nft").args(["list", "tables"]));
            assert!(
                !tables.contains("tailguard"),
                "{datapath}: table left behind: {tables}"
            );
            let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
            assert_eq!(
                forwarding.trim(),
                "1",
                "{datapath}: IP forwarding left to the user"
            );
            let ports = std::fs::read_to_string(reserved).unwrap();
            assert_eq!(ports.trim(), "", "{datapath}: reserved ports restored");
        });
    }
}

#[test]
fn exposed_host_isolated_peers_and_tailnet_sources_kept() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("fwx-{datapath}"));
        let wg4 = b.bed.theirs.run(|| WhoAmI::listen(false));
        let host = b.bed.ours.run(|| WhoAmI::listen(false));
        let before = b.bed.ours.run(routing_state);
        let mut node = b.bed.ours.run(|| {
            DaemonUnderTest::builder(&b)
                .datapath(datapath)
                .envs(&[
                    ("TG_EXPOSE_HOST", "1"),
                    ("WG_ISOLATE_PEERS", "1"),
                    ("TS_EXTRA_ARGS", "--snat-subnet-routes=false"),
                ])
                .start_healthy()
        });
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());

        // TG_EXPOSE_HOST=1: the host answers both sides.
        let seen = b.bed.theirs.run(|| who_am_i(NODE_WG, host.port));
        assert_eq!(seen.as_deref(), Ok(WG_SERVER), "{}", ctx("wg -> host"));
        let seen = b.tailnet.run(|| who_am_i(NODE_TS, host.port));
        assert_eq!(seen.as_deref(), Ok(TAILNET_PEER), "{}", ctx("ts -> host"));

        // --snat-subnet-routes=false: the WireGuard side sees tailnet sources
        // (it routes the tailnet back through TailGuard).
        let seen = b.tailnet.run(|| who_am_i(WG_SERVER, wg4.port));
        assert_eq!(
            seen.as_deref(),
            Ok(TAILNET_PEER),
            "{}",
            ctx("ts -> wg without SNAT")
        );

        // WG_ISOLATE_PEERS=1: no traffic between WireGuard peers, though
        // each still reaches the (exposed) host.
        let refused = b.client.run(|| who_am_i(WG_SERVER, wg4.port));
        assert!(
            refused.is_err(),
            "{}",
            ctx("wg -> wg must be dropped when isolated")
        );
        let seen = b.client.run(|| who_am_i(NODE_WG, host.port));
        assert_eq!(
            seen.as_deref(),
            Ok(WG_CLIENT),
            "{}",
            ctx("second peer -> host")
        );
        b.bed.ours.run(|| {
            assert_path(&mut node, datapath, Some("drop:isolated-peers"));
            node.stop()
        });
        assert_eq!(
            b.bed.ours.run(routing_state),
            before,
            "{datapath}: routing as before"
        );
    }
}

/// Bulk TCP across both MTUs (1420 on WireGuard, 1280 on Tailscale) in both
/// directions, and a UDP datagram larger than either, sent fragmented.
#[test]
fn bulk_transfers_and_fragmented_datagrams_cross_both_mtus() {
    const BULK: usize = 2 << 20;
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("fwm-{datapath}"));
        let wg_sink = b.bed.theirs.run(Sink::listen);
        let tn_sink = b.tailnet.run(Sink::listen);
        let wg_udp = b.bed.theirs.run(UdpSink::bind);
        let tn_udp = b.tailnet.run(UdpSink::bind);
        let node = b.bed.ours.run(|| {
            DaemonUnderTest::builder(&b)
                .datapath(datapath)
                .start_healthy()
        });
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());

        let sent = b
            .bed
            .theirs
            .run(|| send_bulk(TAILNET_PEER, tn_sink.port, BULK));
        assert_eq!(sent, Ok(BULK as u64), "{}", ctx("wg -> ts bulk"));
        let sent = b
            .tailnet
            .run(|| send_bulk(WG_SERVER_V6, wg_sink.port, BULK));
        assert_eq!(sent, Ok(BULK as u64), "{}", ctx("ts -> wg bulk, IPv6"));

        // IPv4: fragmented by the sender, whole at the receiver.
        let wg_sender = b.bed.theirs.run(udp_sender);
        let tn_sender = b.tailnet.run(udp_sender);
        send_datagram(&wg_sender, TAILNET_PEER, tn_udp.port, 4000);
        assert_eq!(
            tn_udp.receive(),
            Some(4000),
            "{}",
            ctx("wg -> ts, fragmented UDP")
        );
        send_datagram(&tn_sender, WG_SERVER, wg_udp.port, 4000);
        assert_eq!(
            wg_udp.receive(),
            Some(4000),
            "{}",
            ctx("ts -> wg, fragmented UDP")
        );
        // IPv6: the sender fragments for its 1420-byte link; TailGuard may
        // not fragment again for the 1280-byte tailnet, so the first
        // datagram comes back as "packet too big", translated back to the
        // sender, which learns the path MTU; the next one arrives whole.
        send_datagram(&wg_sender, TAILNET_PEER_V6, tn_udp.port, 4000);
        let first = tn_udp.receive();
        let route = b
            .bed
            .theirs
            .run(|| run(Command::new("ip").args(["-6", "route", "get", TAILNET_PEER_V6])));
        assert!(
            first.is_none() && route.contains("mtu 1280"),
            "{}",
            ctx(&format!("path MTU learned from packet too big: {route}"))
        );
        send_datagram(&wg_sender, TAILNET_PEER_V6, tn_udp.port, 4000);
        assert_eq!(
            tn_udp.receive(),
            Some(4000),
            "{}",
            ctx("wg -> ts, fragmented UDP, IPv6")
        );
        b.bed.ours.run(|| node.stop());
    }
}

/// An established TCP connection through the bridge survives a stop and a
/// start of the daemon (with the eBPF datapath, through the pinned
/// connection state; with netfilter, through the kernel's conntrack).
#[test]
fn an_established_connection_survives_a_restart() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("fwr-{datapath}"));
        let echo = b.tailnet.run(Echo::listen);
        let env = [("TG_DATAPATH", datapath), ("TG_NAT_FLOWS", "4096")];
        let mut node = b
            .bed
            .ours
            .run(|| DaemonUnderTest::builder(&b).envs(&env).start_healthy());
        let mut stream = b.bed.theirs.run(|| {
            let target = std::net::SocketAddr::new(TAILNET_PEER.parse().unwrap(), echo.port);
            std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(3))
                .expect("connecting through the bridge")
        });
        assert_eq!(echo_line(&mut stream, "before").as_deref(), Ok("before"));
        if datapath == "ebpf" {
            // `tailguard stats`: the flow, established, in the IPv4 table
            // TG_NAT_FLOWS sized (a quarter of it kept for IPv6), and the
            // counters (which the daemon publishes each second; the
            // table's after each sweep).
            b.bed.ours.run(|| {
                node.wait_for("the flow in tailguard stats", |_| {
                    let s = b.tailguard("stats");
                    s.contains("connection table ipv4: 1 flows of 3072")
                        && s.contains("connection table ipv6: 0 flows of 1024")
                        && s.contains("live by state: established 1")
                        && s.contains("events: created 1")
                        && s.contains("wireguard  redirected")
                        && s.contains("tailscale  redirected")
                })
            });
        }
        b.bed.ours.run(|| node.stop());
        let pinned = b.dir.bpf_dir().join(&b.bed.device).join("NAT4");
        assert_eq!(pinned.exists(), datapath == "ebpf", "{}", pinned.display());

        let mut node = b
            .bed
            .ours
            .run(|| DaemonUnderTest::builder(&b).envs(&env).start_healthy());
        let answer = echo_line(&mut stream, "after");
        assert_eq!(
            answer.as_deref(),
            Ok("after"),
            "{datapath}:\n{}",
            node.log()
        );
        if datapath == "ebpf" {
            b.bed.ours.run(|| {
                node.wait_for("the pinned flow carrying the reply", |_| {
                    counted("tailscale", "redirected") > 0
                });
            });
        }
        b.bed.ours.run(|| node.stop());
        // `tailguard cleanup` removes what stop leaves on purpose.
        b.tailguard("cleanup");
        assert!(
            !pinned.exists(),
            "{datapath}: cleanup removes the pinned state"
        );
    }
}

/// When the programs cannot be loaded (here: no CAP_BPF or CAP_SYS_ADMIN),
/// the daemon says so loudly and forwards with the netfilter datapath: the
/// same policy, the same results.
#[test]
fn without_the_fast_path_it_falls_back_to_netfilter() {
    let b = Bridge::new("fwf");
    let tn4 = b.tailnet.run(|| WhoAmI::listen(false));
    let mut node = b.bed.ours.run(|| {
        let wrapper = [
            "setpriv",
            "--inh-caps=-bpf,-sys_admin",
            "--bounding-set=-bpf,-sys_admin",
        ];
        DaemonUnderTest::builder(&b).via(&wrapper).start()
    });
    b.bed.ours.run(|| node.wait_for("health", |_| health().0));
    let log = node.log();
    let kernel = kernel_release();
    // One line: the kernel, why, and what forwards instead; the next line
    // is the next message (no verifier log, no error chain on lines of
    // their own).
    let mut lines = log
        .lines()
        .skip_while(|l| !l.contains("THE eBPF FAST PATH IS OFF"));
    let off = lines
        .next()
        .unwrap_or_else(|| panic!("no fast-path-off line:\n{log}"));
    let next = lines.next().unwrap_or_default();
    assert!(
        off.contains(&format!("THE eBPF FAST PATH IS OFF on kernel {kernel}: "))
            && off.ends_with(
                "The netfilter datapath forwards everything (the same policy, forwarded by the \
                 kernel, slower)."
            )
            && !off.contains("Verifier output"),
        "{off}"
    );
    assert!(
        is_log_record(next),
        "after the fast-path-off line: {next}\n{log}"
    );
    let seen = b.bed.theirs.run(|| who_am_i(TAILNET_PEER, tn4.port));
    assert_eq!(seen.as_deref(), Ok(NODE_TS), "{}", node.log());
    b.bed.ours.run(|| {
        let s = status();
        assert_eq!(s.datapath, "netfilter", "{s:#?}");
        let fallback = s.datapath_fallback.clone().expect("why netfilter forwards");
        assert_eq!(fallback.kernel, kernel, "{s:#?}");
        // Without CAP_BPF the kernel refuses the first map.
        let reason = fallback.reason.as_str();
        assert!(reason.contains("Operation not permitted"), "{s:#?}");
        assert!(off.contains(reason.trim_end_matches('.')), "{off}\n{s:#?}");
        node.stop()
    });
}

/// `uname -r`.
fn kernel_release() -> String {
    let out = Command::new("uname")
        .arg("-r")
        .output()
        .expect("uname runs");
    assert!(out.status.success(), "uname -r: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A line that begins a record of the daemon's log (`<time> <LEVEL> ...`),
/// not the continuation of a message over several lines.
fn is_log_record(line: &str) -> bool {
    matches!(
        line.split_whitespace().nth(1),
        Some("TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR")
    )
}
