//! Faults of the WireGuard side, injected while the daemon runs (real
//! wireguard-go, the Tailscale stand-in): each is noticed and reported
//! with its reason. The times are printed (`FAULT |` lines).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tailguard_tests::{
    daemon::{DaemonUnderTest, health},
    netns::run,
    topology::*,
    wg::Testbed,
};

/// Within this long of a fault, health says so.
const NOTICED_WITHIN: Duration = Duration::from_secs(10);

/// Runs the daemon in a fresh testbed, healthy, then `fault` (given the
/// testbed and the daemon's pid); returns how long until `/healthz` said
/// the WireGuard device is not up.
fn noticed_after(name: &str, fault: impl Fn(&Testbed, u32) + Send + Sync) -> Duration {
    let bed = Testbed::new(name);
    let dir = bed.config_dir(&bed.config("", WG_SERVER_ONLY_V4));
    bed.ours.run(|| {
        let mut node = DaemonUnderTest::builder((&bed, &dir))
            .standin()
            .envs(&[("TS_AUTHKEY", "tskey-x")])
            .start();
        node.wait_for("health", |_| health().0);
        let at = Instant::now();
        fault(&bed, node.pid());
        node.wait_for("unhealthy, saying the WireGuard device is not up", |_| {
            let (healthy, why) = health();
            !healthy && why.contains("the WireGuard device is not up")
        });
        let noticed = at.elapsed();
        assert!(
            node.log()
                .matches(&format!("the WireGuard device {} is gone", bed.device))
                .count()
                == 1,
            "said once:\n{}",
            node.log()
        );
        node.stop();
        noticed
    })
}

#[test]
fn a_deleted_wireguard_device_is_reported() {
    let noticed = noticed_after("heal-del", |bed, _| {
        run(Command::new("ip").args(["link", "del", &bed.device]));
    });
    assert!(noticed <= NOTICED_WITHIN, "noticed after {noticed:?}");
    println!(
        "FAULT | WireGuard device deleted | detected {:.1} s | recovery: not yet (reported only)",
        noticed.as_secs_f32()
    );
}

#[test]
fn a_killed_wireguard_go_is_reported() {
    let noticed = noticed_after("heal-wgkill", |bed, daemon| {
        let out = Command::new("pgrep")
            .args([
                "-P",
                &daemon.to_string(),
                "-f",
                &format!("wireguard-go.*{}", bed.device),
            ])
            .output()
            .unwrap();
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!pid.is_empty(), "wireguard-go runs as the daemon's child");
        run(Command::new("kill").args(["-9", &pid]));
    });
    assert!(noticed <= NOTICED_WITHIN, "noticed after {noticed:?}");
    println!(
        "FAULT | wireguard-go killed | detected {:.1} s | recovery: not yet (reported only)",
        noticed.as_secs_f32()
    );
}
