//! The demo (`cargo xtask demo` runs this binary): it connects both sides,
//! shows the fast path's counters, and on SIGINT (Ctrl-C) takes everything
//! down — no namespace, program or pinned state left behind.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tailguard_tests::require_root;

const DEMO: &str = env!("CARGO_BIN_EXE_tailguard-demo");

fn demo_namespaces(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("tg-demo-{pid}-")))
        .map(String::from)
        .collect()
}

#[test]
fn the_demo_shows_traffic_and_counters_and_leaves_nothing_on_ctrl_c() {
    require_root();
    let child = Command::new(DEMO)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the demo");
    let pid = child.id();
    // Long enough for the set-up, a few rounds and one counter listing.
    let mut waited = Duration::ZERO;
    while demo_namespaces(pid).is_empty() && waited < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
        waited += Duration::from_millis(200);
    }
    std::thread::sleep(Duration::from_secs(12));
    kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "stand-in   tailscaled and the tailnet's control plane",
        "client->tailnet seen as 100.64.0.1 | tailnet->client seen as 10.66.0.2 | tailnet->100.64.0.1 reached the server, seen as 10.66.0.2",
        "connection table ipv4: ",
        "wireguard  redirected",
        "wireguard  drop:not-forwarded",
        "done: the demo's namespaces, links and programs are gone",
    ] {
        assert!(text.contains(expected), "{expected:?} missing:\n{text}");
    }
    assert!(
        demo_namespaces(pid).is_empty(),
        "namespaces left: {:?}",
        demo_namespaces(pid)
    );
}
