//! Flows the kernel has stay the kernel's, with real traffic and both
//! datapaths: the host's own UDP from its tailnet address gets its replies
//! with `TS_DEST_IP` set, a packet to one of the fast path's translation
//! ports that the fast path leaves to the kernel is not sent to
//! `TS_DEST_IP`, and a UDP flow started before the daemon keeps its source
//! port.

use std::{
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use etherparse::PacketBuilder;
use tailguard::firewall::FAST_PATH_PORTS;
use tailguard_tests::{
    bridge::Bridge,
    daemon::{DATAPATHS, DaemonUnderTest, counted, health, status},
    netns::{run, sysctl},
    topology::*,
    traffic::*,
    tun::EgressInjector,
};

/// Packets the WireGuard server's probe counted (see `probe`).
fn probed() -> u64 {
    let out = run(Command::new("nft").args(["-j", "list", "table", "inet", "probe"]));
    let json: serde_json::Value = serde_json::from_str(&out).expect("nft's JSON");
    json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|item| {
            item["rule"]["expr"]
                .as_array()?
                .iter()
                .find_map(|e| e["counter"]["packets"].as_u64())
        })
        .expect("the probe's counter")
}

/// Counts, in the calling thread's namespace, the TCP packets arriving for
/// `port`.
fn probe(port: u16) {
    let rules = format!(
        "table inet probe {{\n  chain arriving {{\n    type filter hook prerouting priority -300;\n    \
         tcp dport {port} counter\n  }}\n}}\n"
    );
    let path = std::env::temp_dir().join(format!("tg-probe-{}.nft", std::process::id()));
    std::fs::write(&path, rules).unwrap();
    run(Command::new("nft").arg("-f").arg(&path));
    let _ = std::fs::remove_file(&path);
}

/// The `TS_DEST_IP` rules of the node's table, as nftables lists them.
fn dstnat_rules() -> Vec<serde_json::Value> {
    let out = run(Command::new("nft").args(["-j", "list", "chain", "inet", "tailguard", "dstnat"]));
    let json: serde_json::Value = serde_json::from_str(&out).expect("nft's JSON");
    json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| item.get("rule").cloned())
        .collect()
}

#[test]
fn dest_ip_leaves_the_hosts_own_udp_and_the_fast_path_ports_alone() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("kf-{datapath}"));
        b.bed.ours.run(|| {
            sysctl("net.ipv4.ip_forward", "1");
            sysctl("net.ipv6.conf.all.forwarding", "1");
        });
        let echo = b.tailnet.run(UdpEcho::listen);
        let node = b.bed.ours.run(|| {
            DaemonUnderTest::builder(&b)
                .datapath(datapath)
                .envs(&[("TS_DEST_IP", WG_SERVER_BOTH)])
                .start_healthy()
        });
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());

        // The host's own query from its tailnet address, both families:
        // answered, and nothing of it reaches TS_DEST_IP.
        for (own, peer) in [(NODE_TS, TAILNET_PEER), (NODE_TS_V6, TAILNET_PEER_V6)] {
            let socket = b.bed.ours.run(|| {
                UdpSocket::bind(SocketAddr::new(own.parse().unwrap(), 0)).expect("binding")
            });
            let port = socket.local_addr().unwrap().port();
            let dest = b.bed.theirs.run(|| {
                let s = UdpSocket::bind(format!("[::]:{port}")).expect("binding at TS_DEST_IP");
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                s
            });
            for round in 0..3 {
                let answer = udp_ask(&socket, peer, echo.port, b"the host asks");
                assert_eq!(
                    answer.as_deref(),
                    Some(&b"the host asks"[..]),
                    "{}",
                    ctx(&format!("{own}: answer {round}"))
                );
            }
            let mut buffer = [0u8; 64];
            assert!(
                dest.recv(&mut buffer).is_err(),
                "{}",
                ctx(&format!("{own}: the answer went to TS_DEST_IP"))
            );
        }
        if datapath == "ebpf" {
            assert!(
                b.bed
                    .ours
                    .run(|| counted("tailscale", "kernel:tracked-flow"))
                    >= 6,
                "{}",
                ctx("the replies were the kernel's")
            );
        }

        // The rule in the kernel: only the eBPF datapath has translation
        // ports to keep TS_DEST_IP off.
        let rules = b.bed.ours.run(dstnat_rules);
        let exception = rules.iter().find(|r| r["comment"] == FAST_PATH_PORTS);
        if datapath == "ebpf" {
            let exception = exception.unwrap_or_else(|| panic!("{}", ctx(&format!("{rules:#?}"))));
            let text = exception["expr"].to_string();
            assert!(text.contains("[61000,65535]"), "{text}");
            let first = rules.iter().position(|r| r["comment"] == FAST_PATH_PORTS);
            let dnat = rules
                .iter()
                .position(|r| r["expr"].to_string().contains("dnat"));
            assert!(
                first < dnat,
                "{}",
                ctx("the exception comes before the DNAT")
            );
        } else {
            assert!(exception.is_none(), "{}", ctx(&format!("{rules:#?}")));
        }

        // A TCP segment to a translation port that is not a flow's start:
        // the fast path leaves it to the kernel, whose TS_DEST_IP rule must
        // not take it (netfilter alone: TS_DEST_IP takes every port).
        b.bed.theirs.run(|| probe(61234));
        let ifindex = b.tailnet.run(|| {
            nix::net::if_::if_nametoindex(b.tailnet_peer.name.as_str())
                .expect("the tailnet peer's device")
        });
        let mut segment = Vec::new();
        PacketBuilder::ipv4([100, 64, 0, 2], [100, 64, 0, 1], 64)
            .tcp(40000, 61234, 1, 64240)
            .ack(1)
            .write(&mut segment, b"mid-stream")
            .unwrap();
        b.tailnet.run(|| {
            let injector = EgressInjector::new();
            for _ in 0..3 {
                injector.send(ifindex, &segment);
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        let reached = b.bed.theirs.run(probed);
        if datapath == "ebpf" {
            assert_eq!(
                reached,
                0,
                "{}",
                ctx("a translation port went to TS_DEST_IP")
            );
            assert!(
                b.bed
                    .ours
                    .run(|| counted("tailscale", "kernel:not-our-flow"))
                    >= 3
            );
        } else {
            assert_eq!(
                reached,
                3,
                "{}",
                ctx("netfilter: TS_DEST_IP takes every port")
            );
        }
        // The fast path's own packets are not taken for the kernel's (its
        // egress programs know them by their mark): UDP between WireGuard
        // peers, which leaves no entry behind, stays on the fast path both
        // ways.
        let server = b.bed.theirs.run(UdpEcho::listen);
        let socket = b.client.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
        assert!(
            ask_until_answered(&socket, WG_SERVER, server.port),
            "{}",
            ctx("wg -> wg UDP")
        );
        if datapath == "ebpf" {
            let counts = || {
                b.bed.ours.run(|| {
                    (
                        counted("wireguard", "redirected"),
                        counted("wireguard", "kernel:tracked-flow"),
                    )
                })
            };
            std::thread::sleep(Duration::from_millis(1500));
            let (redirected, tracked) = counts();
            for _ in 0..3 {
                assert!(udp_ask(&socket, WG_SERVER, server.port, b"peer to peer").is_some());
            }
            std::thread::sleep(Duration::from_millis(1500));
            let (redirected_after, tracked_after) = counts();
            assert!(
                redirected_after >= redirected + 6 && tracked_after == tracked,
                "{}",
                ctx(&format!(
                    "redirected {redirected} -> {redirected_after}, \
                     kernel:tracked-flow {tracked} -> {tracked_after}"
                ))
            );
        }
        node.stop();
    }
}

/// Asks until an answer comes (the tunnels may still be making their
/// handshakes): whether one came within ten tries.
fn ask_until_answered(socket: &UdpSocket, addr: &str, port: u16) -> bool {
    (0..10).any(|_| udp_ask(socket, addr, port, b"still there?").is_some())
}

/// A UDP flow the kernel forwarded before the fast path took over keeps
/// the source port the kernel's masquerade gave it: the tailnet peer sees
/// the same source before and after. Here the flow starts while no daemon
/// runs: the first was killed (SIGKILL), which leaves the devices and the
/// nftables table to the kernel but takes the programs' TCX links with it;
/// the next start takes over.
#[test]
fn a_udp_flow_from_before_the_fast_path_keeps_its_source_port() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("kfb-{datapath}"));
        let env = [("TG_DATAPATH", datapath)];
        b.bed.ours.run(|| {
            sysctl("net.ipv4.ip_forward", "1");
            sysctl("net.ipv6.conf.all.forwarding", "1");
        });
        let echo = b.tailnet.run(UdpEcho::listen);
        let node = b
            .bed
            .ours
            .run(|| DaemonUnderTest::builder(&b).envs(&env).start_healthy());
        // The stand-in outlives the kill; the next daemon attaches to it
        // (and to its device).
        let ts_device = node.standin().ts_device.clone();
        let socket_path = node.standin().socket.display().to_string();
        node.kill();
        let socket = b.bed.theirs.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
        assert!(
            ask_until_answered(&socket, TAILNET_PEER, echo.port),
            "{datapath}: the kernel forwards while no daemon runs"
        );
        let before = echo.next_source().expect("the echo saw the flow");
        assert_eq!(before.ip().to_canonical().to_string(), NODE_TS);
        echo.forget_seen();

        let again = [("TG_DATAPATH", datapath), ("TS_DEVICE", ts_device.as_str())];
        let mut node = b
            .bed
            .ours
            .run(|| DaemonUnderTest::builder(&b).envs(&again).start_healthy());
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());
        for _ in 0..4 {
            assert!(
                udp_ask(&socket, TAILNET_PEER, echo.port, b"and now?").is_some(),
                "{}",
                ctx("no answer after the restart")
            );
        }
        let sources: Vec<SocketAddr> = (0..4).filter_map(|_| echo.next_source()).collect();
        assert!(
            sources.len() == 4 && sources.iter().all(|s| *s == before),
            "{}",
            ctx(&format!("before {before}, after {sources:?}"))
        );
        if datapath == "ebpf" {
            b.bed.ours.run(|| {
                node.wait_for("the datagrams counted as the kernel's", |_| {
                    counted("wireguard", "kernel:tracked-flow") >= 4
                })
            });
        }
        b.bed.ours.run(|| node.stop());
        stop_orphan(&socket_path);
    }
}

/// Ends the stand-in the killed daemon left behind (found by its socket,
/// which is this test's own), and what it started.
fn stop_orphan(socket: &str) {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(socket) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// Fallen back to netfilter (no BPF privilege), the daemon has no
/// translation ports to keep free: `TS_DEST_IP` takes every port, as with
/// `TG_DATAPATH=netfilter`.
#[test]
fn fallen_back_to_netfilter_dest_ip_takes_every_port() {
    let b = Bridge::new("kff");
    let mut node = b.bed.ours.run(|| {
        let wrapper = [
            "setpriv",
            "--inh-caps=-bpf,-sys_admin",
            "--bounding-set=-bpf,-sys_admin",
        ];
        DaemonUnderTest::builder(&b)
            .via(&wrapper)
            .envs(&[("TS_DEST_IP", WG_SERVER_BOTH)])
            .start()
    });
    b.bed.ours.run(|| {
        node.wait_for("health", |_| health().0);
        assert_eq!(status().datapath, "netfilter");
        node.wait_for("the TS_DEST_IP rules", |_| {
            dstnat_rules()
                .iter()
                .any(|r| r["expr"].to_string().contains("dnat"))
        });
        let rules = dstnat_rules();
        assert!(
            !rules.iter().any(|r| r["comment"] == FAST_PATH_PORTS),
            "{rules:#?}\n{}",
            node.log()
        );
        node.stop()
    });
}
