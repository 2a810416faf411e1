//! The `tailguard` daemon as users start it — settings from the environment,
//! `<device>.conf` from the config directory — next to a real WireGuard peer:
//! it brings WireGuard up, attaches its programs (to the Tailscale device as
//! soon as that exists), and on SIGTERM leaves the namespace as it found it.

use std::{process::Command, time::Duration};

use aya::programs::{SchedClassifier, TcAttachType};
use tailguard_tests::{
    daemon::DaemonUnderTest,
    netns::{routing_state, run},
    require_root, tailguard_bin,
    topology::*,
    traffic::ping,
    tun::Tun,
    wg::Testbed,
};

const TS: &str = "tailscale0";

fn attached_programs(ifname: &str) -> Vec<String> {
    let Ok(ifindex) = nix::net::if_::if_nametoindex(ifname) else {
        return Vec::new();
    };
    [TcAttachType::Ingress, TcAttachType::Egress]
        .iter()
        .flat_map(|hook| {
            SchedClassifier::query_tcx(ifindex, *hook)
                .expect("TCX query")
                .1
        })
        .map(|p| p.name_as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn daemon_brings_up_wireguard_waits_for_tailscale_and_removes_everything_on_sigterm() {
    let bed = Testbed::new("daemon");
    let dir = bed.config_dir(&bed.config("ListenPort = 51821", WG_SERVER_ONLY));
    bed.ours.run(|| {
        let before = routing_state();
        let mut daemon = DaemonUnderTest::builder((&bed, &dir))
            .envs(&[("TS_DEVICE", TS)])
            .start();
        daemon.wait_for("attaching to WireGuard", |_| {
            attached_programs(&bed.device).len() == 2
        });
        assert_eq!(
            attached_programs(&bed.device),
            ["tg_wg_ingress", "tg_wg_egress"]
        );
        ping(WG_SERVER);

        // tailscaled creates its device later; the programs follow it.
        let _ts = Tun::create(TS);
        daemon.wait_for("attaching to the Tailscale device", |_| {
            attached_programs(TS).len() == 2
        });
        assert_eq!(attached_programs(TS), ["tg_ts_ingress", "tg_ts_egress"]);

        let log = daemon.stop();
        assert!(log.contains("waiting for the Tailscale device"), "{log}");
        assert!(log.contains("everything set up was removed"), "{log}");
        assert!(attached_programs(TS).is_empty(), "programs left on {TS}");
        drop(_ts);
        assert_eq!(
            routing_state(),
            before,
            "the namespace must be as before:\n{log}"
        );
    });
}

#[test]
fn a_config_error_stops_the_daemon_before_it_touches_anything() {
    let bed = Testbed::new("daemon-bad");
    let broken = bed.config("MTU = tall", WG_SERVER_ONLY_V4);
    let dir = bed.config_dir(&broken);
    bed.ours.run(|| {
        let before = routing_state();
        let (status, log) = DaemonUnderTest::builder((&bed, &dir))
            .envs(&[("TS_DEVICE", TS)])
            .start()
            .exit();
        assert!(!status.success(), "{log}");
        assert!(
            log.contains(&format!("{}.conf:4: MTU: \"tall\"", bed.device)),
            "{log}"
        );
        assert_eq!(routing_state(), before);
    });
}

#[test]
fn a_device_that_is_not_wireguard_is_refused_and_nothing_is_left() {
    let bed = Testbed::new("daemon-tun");
    let dir = bed.config_dir(&bed.config("", WG_SERVER_ONLY_V4));
    bed.ours.run(|| {
        let _squatter = Tun::create(&bed.device);
        let before = routing_state();
        let (status, log) = DaemonUnderTest::builder((&bed, &dir))
            .envs(&[("TS_DEVICE", TS)])
            .start()
            .exit();
        assert!(!status.success(), "{log}");
        assert!(
            log.contains(&format!(
                "{} exists and is a tun device, not WireGuard",
                bed.device
            )),
            "{log}"
        );
        assert_eq!(routing_state(), before);
    });
}

/// After a SIGKILL the kernel keeps what the daemon set up (rules, routes,
/// the userspace WireGuard and its device, clsact filters). The next start
/// takes it all over instead of failing or stacking a second copy, and its
/// SIGTERM removes everything.
#[test]
fn restart_after_sigkill_takes_over_and_then_cleans_up() {
    let bed = Testbed::new("daemon-kill");
    let dir = bed.config_dir(&bed.config("", "0.0.0.0/0, ::/0"));
    bed.ours.run(|| {
        let _ts = Tun::create(TS);
        let before = routing_state();
        let clsact = [("TS_DEVICE", TS), ("TG_TC_ATTACH", "clsact")];
        let mut first = DaemonUnderTest::builder((&bed, &dir)).envs(&clsact).start();
        first.wait_for("attaching", |_| clsact_filters(TS).len() == 2);
        first.kill();
        let left = routing_state();
        assert!(
            left.contains("not from all fwmark 0xca6c lookup 51820"),
            "the kill leaves the rules:\n{left}"
        );

        let mut second = DaemonUnderTest::builder((&bed, &dir)).envs(&clsact).start();
        // The first one's filters are still there: the second's own log
        // says when it has taken them over (and can be stopped cleanly).
        second.wait_for("taking over and running", |d| {
            let log = d.log();
            log.contains("removed a stale tg_ts_ingress filter")
                && log.contains("running; SIGINT or SIGTERM stops")
        });
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            clsact_filters(&bed.device),
            ["ingress: tg_wg_ingress", "egress: tg_wg_egress"]
        );
        assert_eq!(
            clsact_filters(TS),
            ["ingress: tg_ts_ingress", "egress: tg_ts_egress"]
        );
        assert_eq!(
            routing_state(),
            left,
            "taking over must not duplicate rules or routes"
        );
        ping(WG_SERVER);

        let log = second.stop();
        assert!(clsact_filters(TS).is_empty(), "{log}");
        assert_eq!(
            routing_state(),
            before,
            "after SIGTERM the namespace must be as before:\n{log}"
        );
    });
}

/// A clsact qdisc goes with its device: when the Tailscale device is gone
/// before the daemon stops (tailscaled removes its TUN as it exits), the
/// stop is clean and leaves the namespace as it was. (Found on Debian 12's
/// 6.1, which has no TCX.)
#[test]
fn clsact_programs_of_a_deleted_device_need_no_removal() {
    let bed = Testbed::new("daemon-gone");
    let dir = bed.config_dir(&bed.config("", "0.0.0.0/0, ::/0"));
    bed.ours.run(|| {
        let before = routing_state();
        let ts = Tun::create(TS);
        let clsact = [("TS_DEVICE", TS), ("TG_TC_ATTACH", "clsact")];
        let mut daemon = DaemonUnderTest::builder((&bed, &dir)).envs(&clsact).start();
        daemon.wait_for("attaching", |_| clsact_filters(TS).len() == 2);
        drop(ts);
        let log = daemon.stop();
        assert!(log.contains("programs went with their device"), "{log}");
        assert!(!log.contains("teardown left"), "{log}");
        assert_eq!(routing_state(), before, "{log}");
    });
}

#[test]
fn without_privileges_the_error_says_what_is_needed() {
    require_root();
    // `setpriv` (util-linux) drops to an unprivileged user for one command.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(tailguard_bin())
        .arg("programs")
        .output()
        .expect("running setpriv");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "loading programs as nobody must fail:\n{log}"
    );
    assert!(
        log.contains("needs root, or CAP_BPF and CAP_NET_ADMIN"),
        "the error must say why:\n{log}"
    );
}

/// `tc filter show` lines naming one of our programs, per hook.
fn clsact_filters(ifname: &str) -> Vec<String> {
    ["ingress", "egress"]
        .iter()
        .flat_map(|hook| {
            let out = run(Command::new("tc").args(["filter", "show", "dev", ifname, hook]));
            out.lines()
                .filter(|l| l.contains("direct-action"))
                .map(|l| {
                    format!(
                        "{hook}: {}",
                        l.split_whitespace()
                            .find(|w| w.starts_with("tg_"))
                            .unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A peer endpoint given as a host name follows the name: when it resolves to
/// a new address, the daemon updates that peer (and only that) on its next
/// look-up. The daemon gets a hosts file of its own, bind-mounted over
/// /etc/hosts in a private mount namespace: the host's stays untouched.
#[test]
fn endpoint_host_names_are_resolved_again() {
    let bed = Testbed::new("daemon-dns");
    // The peer is also reachable on a second address.
    run(Command::new("ip").args([
        "-n",
        bed.ours.name(),
        "addr",
        "add",
        &with_prefix(UPLINK, LINK_PREFIX),
        "dev",
        &bed.links.0,
    ]));
    run(Command::new("ip").args([
        "-n",
        bed.theirs.name(),
        "addr",
        "add",
        &with_prefix(INTERNET, LINK_PREFIX),
        "dev",
        &bed.links.1,
    ]));
    let text = bed.config("", WG_SERVER_ONLY_V4).replace(
        &endpoint(UNDERLAY_PEER, WG_PORT),
        "peer.tailguard.test:51820",
    );
    let dir = bed.config_dir(&text);
    let hosts = dir.0.join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n10.200.0.2 peer.tailguard.test\n",
    )
    .unwrap();
    bed.ours.run(|| {
        // The resolver file left alone: the name is in the bound hosts file.
        let mut daemon = DaemonUnderTest::builder((&bed, &dir))
            .with_file_at("/etc/hosts", &hosts)
            .env("TG_RESOLV_CONF", "")
            .env("TG_ENDPOINT_REFRESH", "1")
            .start();
        // Empty until the device exists.
        let endpoints = || {
            let out = Command::new("wg")
                .args(["show", &bed.device, "endpoints"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        // Fully up (programs attach last), with the name's first address.
        daemon.wait_for("using the first address", |_| {
            attached_programs(&bed.device).len() == 2
                && endpoints().contains(&endpoint(UNDERLAY_PEER, WG_PORT))
        });
        ping(WG_SERVER);

        std::fs::write(
            &hosts,
            "127.0.0.1 localhost\n10.201.0.2 peer.tailguard.test\n",
        )
        .unwrap();
        daemon.wait_for("following the name to the new address", |_| {
            endpoints().contains(&endpoint(INTERNET, WG_PORT))
        });
        ping(WG_SERVER);

        let log = daemon.stop();
        assert!(
            log.contains("peer endpoint re-resolved to a new address"),
            "{log}"
        );
        assert_eq!(
            log.matches("re-resolved to a new address").count(),
            1,
            "only the change is applied:\n{log}"
        );
    });
}

/// Connection state pinned by an incompatible version (here: the table of
/// another layout, made with bpftool, and the single map of versions
/// before the per-family tables) is discarded with a warning, and the
/// daemon pins its own in its place.
#[test]
fn an_incompatible_pinned_state_is_discarded_and_said() {
    let bed = Testbed::new("daemon-pin");
    let dir = bed.config_dir(&bed.config("", WG_SERVER_ONLY_V4));
    let state = dir.bpf_dir().join(&bed.device);
    let (pin, legacy) = (state.join("NAT4"), state.join("NAT"));
    bed.ours.run(|| {
        tailguard_tests::ensure_bpffs();
        std::fs::create_dir_all(&state).unwrap();
        let pin_text = pin.display().to_string();
        for (path, name) in [(&pin_text, "NAT4"), (&legacy.display().to_string(), "NAT")] {
            run(Command::new("bpftool").args([
                "map", "create", path, "type", "hash", "key", "4", "value", "4", "entries", "8",
                "name", name,
            ]));
        }
        let mut daemon = DaemonUnderTest::builder((&bed, &dir)).envs(&[("TS_DEVICE", TS)]).start();
        daemon.wait_for("attaching to WireGuard", |_| {
            attached_programs(&bed.device).len() == 2
        });
        let log = daemon.stop();
        assert!(
            log.contains("connection state of another layout or size (TailGuard version or TG_NAT_* changed): discarded"),
            "{log}"
        );
        assert!(!legacy.exists(), "the old version's map is gone");
        let shown = run(Command::new("bpftool").args(["-j", "map", "show", "pinned", &pin_text]));
        let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
        assert_eq!(
            (&shown["type"], &shown["bytes_key"], &shown["bytes_value"]),
            (
                &serde_json::json!("hash"),
                &serde_json::json!(16),
                &serde_json::json!(12)
            ),
            "the daemon's own table is pinned now: {shown}"
        );
    });
}
