//! The `tailguard` daemon as users start it: it attaches its programs to the
//! WireGuard and Tailscale devices, and on SIGTERM removes them again.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tailguard_tests::{
    netns::{NetNs, run},
    require_root, tailguard_bin,
    tun::Tun,
};

const HOOKS: [TcAttachType; 2] = [TcAttachType::Ingress, TcAttachType::Egress];

fn attached_programs(ifname: &str) -> Vec<String> {
    let ifindex = nix::net::if_::if_nametoindex(ifname).unwrap_or_else(|e| panic!("{ifname}: {e}"));
    HOOKS
        .iter()
        .flat_map(|hook| {
            SchedClassifier::query_tcx(ifindex, *hook)
                .expect("TCX query")
                .1
        })
        .map(|p| p.name_as_str().unwrap_or_default().to_string())
        .collect()
}

fn start(wg: &str, ts: &str) -> Child {
    start_with(wg, ts, "auto")
}

fn start_with(wg: &str, ts: &str, tc_attach: &str) -> Child {
    Command::new(tailguard_bin())
        .arg("run")
        .env("WG_DEVICE", wg)
        .env("TS_DEVICE", ts)
        .env("TG_TC_ATTACH", tc_attach)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tailguard")
}

#[test]
fn daemon_attaches_on_start_and_removes_everything_on_sigterm() {
    require_root();
    let ns = NetNs::new("daemon");
    ns.run(|| {
        let _wg = Tun::create("wg0");
        let _ts = Tun::create("tailscale0");
        let mut daemon = start("wg0", "tailscale0");

        let deadline = Instant::now() + Duration::from_secs(15);
        while attached_programs("wg0").len() + attached_programs("tailscale0").len() < 4 {
            if let Some(status) = daemon.try_wait().unwrap() {
                let out = daemon.wait_with_output().unwrap();
                panic!(
                    "tailguard exited early ({status}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                Instant::now() < deadline,
                "tailguard did not attach its programs within 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(attached_programs("wg0"), ["tg_wg_ingress", "tg_wg_egress"]);
        assert_eq!(
            attached_programs("tailscale0"),
            ["tg_ts_ingress", "tg_ts_egress"]
        );

        kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM).unwrap();
        let out = daemon.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "tailguard failed on SIGTERM ({}):\n{log}",
            out.status
        );
        assert!(log.contains("programs detached"), "shutdown log:\n{log}");
        assert!(attached_programs("wg0").is_empty(), "programs left on wg0");
        assert!(
            attached_programs("tailscale0").is_empty(),
            "programs left on tailscale0"
        );
    });
}

#[test]
fn daemon_names_a_missing_device_and_leaves_nothing_half_applied() {
    require_root();
    let ns = NetNs::new("daemon-missing");
    ns.run(|| {
        let _wg = Tun::create("wg0");
        let daemon = start("wg0", "tailscale0");
        let out = daemon.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "tailguard must fail without its Tailscale device:\n{log}"
        );
        assert!(
            log.contains("device tailscale0: no such interface"),
            "the error must name the missing device:\n{log}"
        );
        assert!(
            attached_programs("wg0").is_empty(),
            "the wg0 programs must be removed again"
        );
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

fn wait_for_filters(daemon: &mut Child, ifname: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while clsact_filters(ifname).len() < count {
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "tailguard exited early"
        );
        assert!(
            Instant::now() < deadline,
            "tailguard did not attach to {ifname} within 15 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// clsact filters outlive a killed daemon; the next start must replace them,
/// not add a second set, and its SIGTERM must remove them.
#[test]
fn restart_after_sigkill_replaces_stale_clsact_filters() {
    require_root();
    let ns = NetNs::new("daemon-kill");
    ns.run(|| {
        let _wg = Tun::create("wg0");
        let _ts = Tun::create("tailscale0");
        let expected_wg = ["ingress: tg_wg_ingress", "egress: tg_wg_egress"];

        let mut first = start_with("wg0", "tailscale0", "clsact");
        wait_for_filters(&mut first, "tailscale0", 2);
        first.kill().unwrap();
        first.wait().unwrap();
        assert_eq!(
            clsact_filters("wg0"),
            expected_wg,
            "filters left by the killed daemon"
        );

        let mut second = start_with("wg0", "tailscale0", "clsact");
        wait_for_filters(&mut second, "tailscale0", 2);
        // Give a wrongly stacking second attach time to show itself.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            clsact_filters("wg0"),
            expected_wg,
            "one filter per hook after the restart"
        );
        assert_eq!(
            clsact_filters("tailscale0"),
            ["ingress: tg_ts_ingress", "egress: tg_ts_egress"]
        );

        kill(Pid::from_raw(second.id() as i32), Signal::SIGTERM).unwrap();
        let out = second.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tailguard failed on SIGTERM:\n{log}");
        assert!(
            log.contains("removed a stale tg_wg_ingress filter"),
            "the restart must say what it cleaned:\n{log}"
        );
        assert!(
            clsact_filters("wg0").is_empty() && clsact_filters("tailscale0").is_empty(),
            "filters left after SIGTERM"
        );
    });
}
