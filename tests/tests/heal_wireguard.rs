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
    daemon::{DATAPATHS, DaemonUnderTest, health, status},
    netns::run,
    topology::*,
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
            status()["recoveries"]["wireguard_brought_back"],
            serde_json::json!(1),
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

fn report(fault: &str, datapath: &str, healed: &Healed) {
    assert!(
        healed.noticed <= NOTICED_WITHIN,
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
    for datapath in DATAPATHS {
        report(
            "WireGuard device deleted",
            datapath,
            &heal("heal-del", datapath, &delete),
        );
    }
}

#[test]
fn a_killed_wireguard_go_is_started_again() {
    let kill = |bed: &Testbed, node: &DaemonUnderTest| {
        let pid = node.child_pid(&format!("wireguard-go.*{}", bed.device));
        assert!(!pid.is_empty(), "wireguard-go runs as the daemon's child");
        run(Command::new("kill").args(["-9", &pid]));
    };
    for datapath in DATAPATHS {
        report(
            "wireguard-go killed",
            datapath,
            &heal("heal-kill", datapath, &kill),
        );
    }
}
