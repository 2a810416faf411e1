//! Faults of the WireGuard side, injected while the daemon runs (real
//! wireguard-go, the Tailscale stand-in): each is noticed and reported
//! with its reason, and the WireGuard side brought up again from the plan,
//! with traffic through it both ways. The times are printed (`FAULT |`
//! lines).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tailguard_tests::{
    bridge::Bridge,
    daemon::{DATAPATHS, DaemonUnderTest, counted, health, status},
    netns::run,
    topology::*,
    traffic::{Echo, echo_line},
    wg::Testbed,
};

/// Within this long of a fault, health says so.
const NOTICED_WITHIN: Duration = Duration::from_secs(10);

/// Times from a fault to its notice and to traffic both ways again.
struct Healed {
    noticed: Duration,
    recovered: Duration,
}

/// One ping through the WireGuard link, answered: from `ns` to `to`.
fn ping(ns: &tailguard_tests::netns::NetNs, to: &str) -> bool {
    ns.run(|| {
        Command::new("ping")
            .args(["-c", "1", "-W", "1", to])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Runs the daemon (with `datapath`) in a fresh testbed, healthy and with
/// traffic through WireGuard, then `fault` (given the testbed and the
/// daemon); waits for `/healthz` to say the WireGuard device is not
/// up, then for health and traffic both ways again.
fn heal(
    name: &str,
    datapath: &str,
    fault: &(impl Fn(&Testbed, &DaemonUnderTest) + Send + Sync),
) -> Healed {
    let bed = Testbed::new(&format!("{name}-{datapath}"));
    let dir = bed.config_dir(&bed.config("", WG_SERVER_ONLY_V4));
    bed.ours.run(|| {
        let mut node = DaemonUnderTest::builder((&bed, &dir))
            .standin()
            .envs(&[("TS_AUTHKEY", "tskey-x"), ("TG_DATAPATH", datapath)])
            .start();
        node.wait_for("health", |_| health().0);
        node.wait_for("traffic through WireGuard", |_| ping(&bed.ours, WG_SERVER));
        let port = listen_port(&bed.device);
        let at = Instant::now();
        fault(&bed, &node);
        let gone = format!("the WireGuard device {} is gone", bed.device);
        // Recovery may well be quicker than a poll of `/healthz`: the log
        // line says when the daemon noticed too.
        node.wait_for("unhealthy, saying the WireGuard device is not up", |n| {
            let (healthy, why) = health();
            n.log().contains(&gone) || !healthy && why.contains("the WireGuard device is not up")
        });
        let noticed = at.elapsed();
        node.wait_for("the WireGuard side up again and healthy", |_| health().0);
        // A ping and its answer: both ways through the tunnel (the node's
        // own input policy takes no pings from WireGuard peers).
        node.wait_for("traffic with the WireGuard peer again", |_| {
            ping(&bed.ours, WG_SERVER)
        });
        let recovered = at.elapsed();
        assert_eq!(
            listen_port(&bed.device),
            port,
            "the port WireGuard picked is kept: peers know this node by it"
        );
        assert_eq!(
            status().recoveries.wireguard_brought_back,
            1,
            "counted in /status"
        );
        let log = node.log();
        for said in [gone, format!("the WireGuard device {} is back", bed.device)] {
            assert_eq!(log.matches(&said).count(), 1, "{said:?} once:\n{log}");
        }
        node.stop();
        Healed { noticed, recovered }
    })
}

/// Sends `signal` (`kill`'s spelling) to the daemon's wireguard-go for
/// `bed`'s device; its pid.
fn signal_wireguard_go(bed: &Testbed, node: &DaemonUnderTest, signal: &str) -> String {
    let pid = node.child_pid(&format!("wireguard-go.*{}", bed.device));
    assert!(!pid.is_empty(), "wireguard-go runs as the daemon's child");
    run(Command::new("kill").args([signal, &pid]));
    pid
}

/// The device's listen port, as `wg` reports it (in the calling thread's
/// namespace).
fn listen_port(device: &str) -> String {
    run(Command::new("wg").args(["show", device, "listen-port"]))
        .trim()
        .to_string()
}

/// [`heal`] once per datapath, each reported as `fault`.
fn heal_in_both(
    fault: &str,
    name: &str,
    inject: &(impl Fn(&Testbed, &DaemonUnderTest) + Send + Sync),
) {
    for datapath in DATAPATHS {
        report(fault, datapath, &heal(name, datapath, inject));
    }
}

fn report(fault: &str, datapath: &str, healed: &Healed) {
    assert!(
        healed.noticed <= tailguard_tests::patience(NOTICED_WITHIN),
        "noticed after {:?}",
        healed.noticed
    );
    println!(
        "FAULT | {fault} ({datapath}) | detected {:.1} s | recovered (health, traffic both ways) {:.1} s",
        healed.noticed.as_secs_f32(),
        healed.recovered.as_secs_f32()
    );
}

#[test]
fn a_deleted_wireguard_device_is_brought_back() {
    let delete = |bed: &Testbed, _: &DaemonUnderTest| {
        run(Command::new("ip").args(["link", "del", &bed.device]));
    };
    heal_in_both("WireGuard device deleted", "heal-del", &delete);
}

#[test]
fn a_killed_wireguard_go_is_started_again() {
    let kill = |bed: &Testbed, node: &DaemonUnderTest| {
        signal_wireguard_go(bed, node, "-KILL");
    };
    heal_in_both("wireguard-go killed", "heal-kill", &kill);
}

/// A stopped (hung) wireguard-go: its UAPI socket takes the query and
/// never answers. The query times out, the daemon kills it, and the
/// re-creation brings the side back.
#[test]
fn a_stopped_wireguard_go_is_killed_and_started_again() {
    let stop = |bed: &Testbed, node: &DaemonUnderTest| {
        signal_wireguard_go(bed, node, "-STOP");
    };
    heal_in_both("wireguard-go stopped (SIGSTOP)", "heal-stop", &stop);
}

/// SIGTERM while wireguard-go is stopped: the teardown does not wait for
/// it in vain.
#[test]
fn the_daemon_stops_while_wireguard_go_is_stopped() {
    let bed = Testbed::new("heal-stopterm");
    let dir = bed.config_dir(&bed.config("", WG_SERVER_ONLY_V4));
    bed.ours.run(|| {
        let mut node = DaemonUnderTest::builder((&bed, &dir))
            .standin()
            .envs(&[("TS_AUTHKEY", "tskey-x")])
            .start();
        node.wait_for("health", |_| health().0);
        let pid = signal_wireguard_go(&bed, &node, "-STOP");
        let at = Instant::now();
        node.stop();
        let took = at.elapsed();
        assert!(
            took <= tailguard_tests::patience(Duration::from_secs(10)),
            "stopped after {took:?}"
        );
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "wireguard-go is gone"
        );
        println!(
            "FAULT | SIGTERM to the daemon while wireguard-go is stopped | stopped in {:.1} s",
            took.as_secs_f32()
        );
    });
}

/// An established TCP connection through the fast path (a WireGuard peer
/// to a tailnet peer), its device deleted under it: the connection
/// table's flows do not depend on the device's index, so once the device
/// is back the same connection carries data again (TCP retransmits what
/// was lost meanwhile).
#[test]
fn an_established_connection_survives_the_device_coming_back() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("heal-tcp-{datapath}"));
        let echo = b.tailnet.run(Echo::listen);
        let mut node = b.bed.ours.run(|| {
            DaemonUnderTest::builder(&b)
                .datapath(datapath)
                .start_healthy()
        });
        let mut stream = b.bed.theirs.run(|| {
            let target = std::net::SocketAddr::new(TAILNET_PEER.parse().unwrap(), echo.port);
            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
                .expect("connecting through the bridge")
        });
        assert_eq!(echo_line(&mut stream, "before").as_deref(), Ok("before"));
        let redirected = || {
            b.bed.ours.run(|| {
                (
                    counted("tailscale", "redirected"),
                    counted("wireguard", "redirected"),
                )
            })
        };
        let before = redirected();
        run(Command::new("ip").args(["-n", b.bed.ours.name(), "link", "del", &b.bed.device]));
        let at = Instant::now();
        // Sent while the device is away: lost, retransmitted, answered.
        let answer = echo_line(&mut stream, "during");
        let stalled = at.elapsed();
        assert_eq!(
            answer.as_deref(),
            Ok("during"),
            "{datapath}:\n{}",
            node.log()
        );
        assert_eq!(echo_line(&mut stream, "after").as_deref(), Ok("after"));
        b.bed.ours.run(|| {
            assert_eq!(
                status().recoveries.wireguard_brought_back,
                1,
                "{}",
                node.log()
            );
        });
        if datapath == "ebpf" {
            // Both ways through the fast path after the device came back
            // (the counters are read each second).
            b.bed.ours.run(|| {
                node.wait_for("the fast path carrying the connection again", |_| {
                    let (ts, wg) = redirected();
                    ts > before.0 && wg > before.1
                })
            });
        }
        println!(
            "FAULT | WireGuard device deleted under an established TCP connection ({datapath}) | \
             the same connection answered again after {:.1} s | lost: nothing (TCP retransmitted)",
            stalled.as_secs_f32()
        );
        b.bed.ours.run(|| node.stop());
    }
}
