//! Forwarding is the user's switch (`net.ipv4.ip_forward`,
//! `net.ipv6.conf.all.forwarding`, a container's `--sysctl`): per family,
//! TailGuard forwards between the networks only when it is on at the
//! start, with either datapath, and never changes it. Without it, the
//! host still serves both networks itself (the simple-server pattern).

use std::{os::unix::fs::PermissionsExt as _, process::Command};

use tailguard_tests::{
    bridge::Bridge,
    daemon::{DATAPATHS, DaemonUnderTest, counted, health, status, tailguard},
    netns::{NetNs, run},
    topology::*,
    traffic::*,
    wg::{ConfigDir, KeyPair, Testbed},
};

const V4_OFF: &str = "IPv4 forwarding is off: nothing is forwarded between the networks; \
                      start with --sysctl net.ipv4.ip_forward=1 to bridge";
const V6_OFF: &str = "IPv6 forwarding is off: nothing is forwarded between the networks; \
                      start with --sysctl net.ipv6.conf.all.forwarding=1 to bridge";
const V4_ON: &str = "IPv4 forwarding is on (net.ipv4.ip_forward=1): traffic between the \
                     networks is forwarded as the policy allows";
const V6_ON: &str = "IPv6 forwarding is on (net.ipv6.conf.all.forwarding=1): traffic \
                     between the networks is forwarded as the policy allows";

/// Runs the daemon with `/proc/sys` read-only for it alone, as a
/// container's is when the engine was given no `--sysctl`.
const READ_ONLY_PROC_SYS: [&str; 5] = [
    "unshare",
    "--mount",
    "sh",
    "-c",
    "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$0\" \"$@\"",
];

/// The lines the daemon logs and `tailguard check` prints for the switches.
fn said(ipv4: bool, ipv6: bool) -> [&'static str; 2] {
    [
        if ipv4 { V4_ON } else { V4_OFF },
        if ipv6 { V6_ON } else { V6_OFF },
    ]
}

/// The kernel's count, in the calling thread's namespace, of packets it
/// received for an address not its own and did not forward
/// (`InAddrErrors`, which is where unforwarded packets go).
fn unforwarded(ipv6: bool) -> u64 {
    if ipv6 {
        let snmp6 = std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap();
        snmp6
            .lines()
            .find_map(|l| l.strip_prefix("Ip6InAddrErrors"))
            .and_then(|v| v.trim().parse().ok())
            .expect("Ip6InAddrErrors in snmp6")
    } else {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        let mut ip = snmp.lines().filter(|l| l.starts_with("Ip: "));
        let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
        let at = names
            .split_whitespace()
            .position(|n| n == "InAddrErrors")
            .expect("InAddrErrors in snmp");
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    }
}

/// The switches as `NetNs::forwarding` reads them, for `(ipv4, ipv6)`.
fn values(ipv4: bool, ipv6: bool) -> (String, String) {
    let value = |on| if on { "1\n" } else { "0\n" }.to_string();
    (value(ipv4), value(ipv6))
}

/// The simple-server pattern: no forwarding switch on. Both networks reach
/// the host's own service and its status page; nothing crosses between
/// them, in either direction, nor between WireGuard peers.
#[test]
fn without_the_switches_the_host_serves_both_networks_and_forwards_nothing() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("fws-{datapath}"));
        b.bed.ours.set_forwarding(false, false);
        let wg4 = b.bed.theirs.run(|| WhoAmI::listen(false));
        let wg6 = b.bed.theirs.run(|| WhoAmI::listen(true));
        let tn4 = b.tailnet.run(|| WhoAmI::listen(false));
        let tn6 = b.tailnet.run(|| WhoAmI::listen(true));
        let wg_udp = b.bed.theirs.run(UdpSink::bind);
        let tn_udp = b.tailnet.run(UdpSink::bind);
        let host = b.bed.ours.run(|| WhoAmI::listen(false));
        let (before_v4, before_v6) = b.bed.ours.run(|| (unforwarded(false), unforwarded(true)));
        let mut node = b.bed.ours.run(|| {
            DaemonUnderTest::builder(&b)
                .datapath(datapath)
                .envs(&[("TG_EXPOSE_HOST", "1"), ("TG_WEBUI_PORT", "8088")])
                .start_healthy()
        });
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());
        for line in said(false, false) {
            assert!(node.log().contains(line), "{}", ctx(line));
        }

        // The host's own service and status page, from both sides.
        let seen = b.bed.theirs.run(|| who_am_i(NODE_WG, host.port));
        assert_eq!(seen.as_deref(), Ok(WG_SERVER), "{}", ctx("wg -> host"));
        let seen = b.client.run(|| who_am_i(NODE_WG, host.port));
        assert_eq!(
            seen.as_deref(),
            Ok(WG_CLIENT),
            "{}",
            ctx("wg client -> host")
        );
        let seen = b.tailnet.run(|| who_am_i(NODE_TS, host.port));
        assert_eq!(seen.as_deref(), Ok(TAILNET_PEER), "{}", ctx("ts -> host"));
        let page = b.bed.theirs.run(|| http_get(NODE_WG, 8088, "/healthz"));
        assert!(page.contains("healthy"), "{}", ctx(&page));
        let page = b.tailnet.run(|| http_get(NODE_TS, 8088, "/healthz"));
        assert!(page.contains("healthy"), "{}", ctx(&page));

        // Nothing between the networks: TCP and UDP, both families.
        for (from, to, port, what) in [
            (&b.bed.theirs, TAILNET_PEER, tn4.port, "wg -> ts"),
            (&b.bed.theirs, TAILNET_PEER_V6, tn6.port, "wg -> ts, IPv6"),
            (&b.tailnet, WG_SERVER, wg4.port, "ts -> wg"),
            (&b.tailnet, WG_SERVER_V6, wg6.port, "ts -> wg, IPv6"),
            (&b.client, WG_SERVER, wg4.port, "wg -> wg"),
        ] {
            let crossed = from.run(|| who_am_i(to, port));
            assert!(crossed.is_err(), "{}", ctx(&format!("{what}: {crossed:?}")));
        }
        let sender = b.bed.theirs.run(udp_sender);
        send_datagram(&sender, TAILNET_PEER, tn_udp.port, 100);
        send_datagram(&sender, TAILNET_PEER_V6, tn_udp.port, 100);
        assert_eq!(tn_udp.receive(), None, "{}", ctx("wg -> ts, UDP"));
        let sender = b.tailnet.run(udp_sender);
        send_datagram(&sender, WG_SERVER, wg_udp.port, 100);
        send_datagram(&sender, WG_SERVER_V6, wg_udp.port, 100);
        assert_eq!(wg_udp.receive(), None, "{}", ctx("ts -> wg, UDP"));
        for (server, what) in [(&wg4, "wg, IPv4"), (&wg6, "wg, IPv6")] {
            assert_eq!(server.last_seen(), None, "{}", ctx(what));
        }
        for (server, what) in [(&tn4, "ts, IPv4"), (&tn6, "ts, IPv6")] {
            assert_eq!(server.last_seen(), None, "{}", ctx(what));
        }

        b.bed.ours.run(|| {
            // The kernel got them, and did what it does unforwarded.
            assert!(
                unforwarded(false) > before_v4,
                "{}",
                ctx("IPv4 InAddrErrors")
            );
            assert!(
                unforwarded(true) > before_v6,
                "{}",
                ctx("IPv6 InAddrErrors")
            );
        });
        b.bed.ours.run(|| {
            if datapath == "ebpf" {
                // The fast path handed them over, saying why, and
                // redirected nothing.
                node.wait_for("the forwarding-off counters", |_| {
                    counted("wireguard", "kernel:forwarding-off") > 0
                        && counted("tailscale", "kernel:forwarding-off") > 0
                });
                assert_eq!(counted("wireguard", "redirected"), 0, "{:#?}", status());
                assert_eq!(counted("tailscale", "redirected"), 0, "{:#?}", status());
                let f = status().forwarding.expect("the maps");
                assert_eq!((f.forward_v4, f.forward_v6), (false, false), "{f:#?}");
            } else {
                assert_eq!(status().datapath, "netfilter");
            }
        });
        b.bed.ours.run(|| node.stop());
        assert_eq!(b.bed.ours.forwarding(), values(false, false), "{datapath}");
    }
}

/// One family's switch on, the other's off: only the one is forwarded,
/// every way (wg -> ts, ts -> wg, `TS_DEST_IP`, and wg -> wg for IPv4).
#[test]
fn each_family_is_forwarded_only_with_its_own_switch() {
    for datapath in DATAPATHS {
        for (ipv4, ipv6) in [(true, false), (false, true)] {
            let b = Bridge::new(&format!("fwp-{datapath}-{}", u8::from(ipv4)));
            b.bed.ours.set_forwarding(ipv4, ipv6);
            let wg4 = b.bed.theirs.run(|| WhoAmI::listen(false));
            let wg6 = b.bed.theirs.run(|| WhoAmI::listen(true));
            let tn4 = b.tailnet.run(|| WhoAmI::listen(false));
            let tn6 = b.tailnet.run(|| WhoAmI::listen(true));
            let mut node = b.bed.ours.run(|| {
                DaemonUnderTest::builder(&b)
                    .datapath(datapath)
                    .envs(&[("TS_DEST_IP", WG_SERVER_BOTH)])
                    .start_healthy()
            });
            let ctx = |what: &str| {
                format!(
                    "{datapath}, IPv4 {ipv4}, IPv6 {ipv6}: {what}\n{}",
                    node.log()
                )
            };
            for line in said(ipv4, ipv6) {
                assert!(node.log().contains(line), "{}", ctx(line));
            }
            let cases: [(&NetNs, &str, u16, &str, bool, &str); 7] = [
                (
                    &b.bed.theirs,
                    TAILNET_PEER,
                    tn4.port,
                    NODE_TS,
                    ipv4,
                    "wg -> ts",
                ),
                (
                    &b.bed.theirs,
                    TAILNET_PEER_V6,
                    tn6.port,
                    NODE_TS_V6,
                    ipv6,
                    "wg -> ts, IPv6",
                ),
                (&b.tailnet, WG_SERVER, wg4.port, NODE_WG, ipv4, "ts -> wg"),
                (
                    &b.tailnet,
                    WG_SERVER_V6,
                    wg6.port,
                    NODE_WG_V6,
                    ipv6,
                    "ts -> wg, IPv6",
                ),
                (&b.tailnet, NODE_TS, wg4.port, NODE_WG, ipv4, "TS_DEST_IP"),
                (
                    &b.tailnet,
                    NODE_TS_V6,
                    wg6.port,
                    NODE_WG_V6,
                    ipv6,
                    "TS_DEST_IP, IPv6",
                ),
                (&b.client, WG_SERVER, wg4.port, WG_CLIENT, ipv4, "wg -> wg"),
            ];
            for (from, to, port, source, forwarded, what) in cases {
                let seen = from.run(|| who_am_i(to, port));
                if forwarded {
                    assert_eq!(seen.as_deref(), Ok(source), "{}", ctx(what));
                } else {
                    assert!(seen.is_err(), "{}", ctx(&format!("{what}: {seen:?}")));
                }
            }
            b.bed.ours.run(|| {
                if datapath == "ebpf" {
                    node.wait_for("both outcomes counted", |_| {
                        counted("wireguard", "redirected") > 0
                            && counted("tailscale", "redirected") > 0
                            && counted("wireguard", "kernel:forwarding-off") > 0
                            && counted("tailscale", "kernel:forwarding-off") > 0
                    });
                }
                node.stop();
            });
            assert_eq!(b.bed.ours.forwarding(), values(ipv4, ipv6), "{datapath}");
        }
    }
}

/// The daemon never writes the switches: in a mount namespace whose
/// `/proc/sys` is read-only (as in a container), it starts and stops with
/// each combination of them, says what each means, tells the fast path,
/// and leaves them as they were.
#[test]
fn the_daemon_only_reads_the_switches() {
    let read_only = READ_ONLY_PROC_SYS;
    for datapath in DATAPATHS {
        let bed = Testbed::new(&format!("fwo-{datapath}"));
        let dir = bed.config_dir(&bed.config("", WG_SERVER_ONLY));
        // Reserved beforehand, so that the daemon has nothing to write.
        bed.ours.run(|| {
            tailguard_tests::netns::sysctl("net.ipv4.ip_local_reserved_ports", "61000-65535")
        });
        for (ipv4, ipv6) in [(false, false), (true, false), (false, true), (true, true)] {
            bed.ours.set_forwarding(ipv4, ipv6);
            let ctx = |node: &DaemonUnderTest, what: &str| {
                format!(
                    "{datapath}, IPv4 {ipv4}, IPv6 {ipv6}: {what}\n{}",
                    node.log()
                )
            };
            bed.ours.run(|| {
                let env = [("TS_AUTHKEY", "tskey-x"), ("TG_DATAPATH", datapath)];
                let mut node = DaemonUnderTest::builder((&bed, &dir))
                    .standin()
                    .via(&read_only)
                    .envs(&env)
                    .start();
                node.wait_for("health", |_| health().0);
                for line in said(ipv4, ipv6) {
                    assert!(node.log().contains(line), "{}", ctx(&node, line));
                }
                if datapath == "ebpf" {
                    node.wait_for("the maps", |_| status().forwarding.is_some());
                    let f = status().forwarding.expect("the maps");
                    assert_eq!(
                        (f.forward_v4, f.forward_v6),
                        (ipv4, ipv6),
                        "{}",
                        ctx(&node, "the programs' flags")
                    );
                }
                assert_eq!(
                    bed.ours.forwarding(),
                    values(ipv4, ipv6),
                    "{}",
                    ctx(&node, "running")
                );
                let log = node.stop();
                assert!(log.contains("everything set up was removed"), "{log}");
            });
            assert_eq!(
                bed.ours.forwarding(),
                values(ipv4, ipv6),
                "{datapath}: after"
            );
        }
    }
}

/// A container started without `--sysctl` for the reserved ports: the
/// daemon starts without the reservation when the host's ephemeral ports
/// lie below the fast path's, and refuses (naming the `--sysctl`) when they
/// reach into them.
#[test]
fn a_read_only_proc_sys_needs_the_reserved_ports_only_when_ephemeral_ports_reach_ours() {
    let bed = Testbed::new("fwr");
    let dir = bed.config_dir(&bed.config("", WG_SERVER_ONLY));
    let env = [("TS_AUTHKEY", "tskey-x"), ("TG_DATAPATH", "ebpf")];
    let reserved = || {
        bed.ours
            .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap())
    };
    bed.ours.run(|| {
        tailguard_tests::netns::sysctl("net.ipv4.ip_local_reserved_ports", "\n");
        tailguard_tests::netns::sysctl("net.ipv4.ip_local_port_range", "32768 60999");
    });
    bed.ours.run(|| {
        let mut node = DaemonUnderTest::builder((&bed, &dir))
            .standin()
            .via(&READ_ONLY_PROC_SYS)
            .envs(&env)
            .start();
        node.wait_for("health", |_| health().0);
        let log = node.log();
        assert!(
            log.contains("starting without it") && log.contains("ip_local_reserved_ports"),
            "{log}"
        );
        let log = node.stop();
        assert!(log.contains("everything set up was removed"), "{log}");
    });
    assert_eq!(reserved().trim(), "", "nothing was written");

    bed.ours
        .run(|| tailguard_tests::netns::sysctl("net.ipv4.ip_local_port_range", "1024 65535"));
    let log = bed.ours.run(|| {
        let mut node = DaemonUnderTest::builder((&bed, &dir))
            .standin()
            .via(&READ_ONLY_PROC_SYS)
            .envs(&env)
            .start();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while node.exited().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "still running with the ephemeral ports in ours:\n{}",
                node.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let (status, log) = node.exit();
        assert!(!status.success(), "{log}");
        log
    });
    assert!(
        log.contains("--sysctl net.ipv4.ip_local_reserved_ports=61000-65535"),
        "{log}"
    );
}

/// `tailguard check` prints what each switch means, from the namespace it
/// runs in.
#[test]
fn check_says_which_families_are_forwarded() {
    tailguard_tests::require_root();
    let ns = NetNs::new("fwc");
    let (ours, peer) = (KeyPair::generate(), KeyPair::generate());
    let config = format!(
        "[Interface]\nPrivateKey = {}\nAddress = 10.9.0.2/24\n[Peer]\nPublicKey = {}\n\
         AllowedIPs = 10.9.0.0/24\n",
        ours.private, peer.public
    );
    let dir = std::env::temp_dir().join(format!("tg-fwc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wg0.conf");
    std::fs::write(&file, config).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let dir = ConfigDir(dir);
    for (ipv4, ipv6) in [(false, false), (true, false), (false, true), (true, true)] {
        ns.set_forwarding(ipv4, ipv6);
        let env = [
            ("WG_CONFIG_DIR", dir.0.as_os_str()),
            ("WG_DEVICE", "wg0".as_ref()),
        ];
        let out = ns.run(|| tailguard(&["check"], &env));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let [v4, v6] = said(ipv4, ipv6);
        assert!(
            stdout.ends_with(&format!("{v4}\n{v6}\n")),
            "IPv4 {ipv4}, IPv6 {ipv6}:\n{stdout}"
        );
        assert_eq!(ns.forwarding(), values(ipv4, ipv6));
    }
    // The command touched nothing.
    assert_eq!(
        ns.run(|| run(Command::new("ip").args(["-br", "link"])))
            .lines()
            .count(),
        1
    );
}

/// The examples as docker-compose reads them (each extends the root file):
/// the patterns that bridge start with both switches on; the simple server
/// with both off, so that it forwards nothing.
#[test]
fn the_examples_that_bridge_turn_forwarding_on_and_the_server_does_not() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for (example, on) in [
        ("bridge", true),
        ("exit-node", true),
        ("tailnet-exit", true),
        ("server", false),
    ] {
        let file = examples.join(example).join("docker-compose.yml");
        let config = run(Command::new("docker-compose")
            .arg("--file")
            .arg(&file)
            .arg("config"));
        let value = if on { "'1'" } else { "'0'" };
        for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
            assert!(
                config
                    .lines()
                    .any(|l| l.trim() == format!("{key}: {value}")),
                "{example}: {key} is not {value}:\n{config}"
            );
        }
    }
}
