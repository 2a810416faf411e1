//! `tailguard-demo` (run by `cargo xtask demo`, as root): the real daemon
//! between a real WireGuard network and a stand-in tailnet, in namespaces of
//! its own, with traffic both ways and the live counters, until Ctrl-C (or
//! `TG_DEMO_SECONDS`); then everything is taken down.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use tailguard_tests::{bridge::Bridge, daemon::DaemonUnderTest, topology::*, traffic::*};

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the demo makes network namespaces and loads eBPF programs: run it as root");
        std::process::exit(1);
    }
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }.expect("installing a signal handler");
    }
    let seconds: Option<u64> = std::env::var("TG_DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());

    println!("TailGuard demo: building the networks (namespaces tg-demo-*) ...");
    let b = Bridge::new("demo");
    let tn = b.tailnet.run(|| WhoAmI::listen(false));
    let client = b.client.run(|| WhoAmI::listen(false));
    let server = b.bed.theirs.run(|| WhoAmI::listen(false));
    let node = b.bed.ours.run(|| {
        DaemonUnderTest::builder(&b)
            .envs(&[("TS_DEST_IP", WG_SERVER)])
            .start_healthy()
    });

    println!(
        "
What is real and what is a stand-in
  real       the tailguard daemon (this build: eBPF fast path, nftables table,
             policy routing), WireGuard (wireguard-go: userspace, as on hosts
             without the kernel module), Linux network namespaces and veth links
  stand-in   tailscaled and the tailnet's control plane: `tailscaled-standin`
             serves tailscaled's LocalAPI to the daemon and carries the tailnet
             over one more WireGuard link to a single \"tailnet peer\"

What is connected to what
  WireGuard server 10.66.0.1 ==WireGuard==+
                                          +== TailGuard 10.66.0.2 | 100.64.0.1 ==tailnet== tailnet peer 100.64.0.2
  WireGuard client 10.66.0.3 ==WireGuard==+   (TS_DEST_IP=10.66.0.1)

Traffic each second (TCP; each server reports the source it sees)
  WireGuard client -> tailnet peer 100.64.0.2      (masqueraded to 100.64.0.1)
  tailnet peer     -> WireGuard client 10.66.0.3   (source-NATed to 10.66.0.2)
  tailnet peer     -> 100.64.0.1, the node itself  (TS_DEST_IP: the WireGuard server answers)
  WireGuard server -> 10.201.0.2 on the uplink     (UDP; not allowed: dropped by the fast path)

Ctrl-C stops the demo and removes everything it made.
"
    );
    let started = Instant::now();
    let mut round = 0u64;
    while !STOP.load(Ordering::Relaxed) && seconds.is_none_or(|s| started.elapsed().as_secs() < s) {
        let a = b.client.run(|| who_am_i(TAILNET_PEER, tn.port));
        let c = b.tailnet.run(|| who_am_i(WG_CLIENT, client.port));
        let d = b.tailnet.run(|| who_am_i(NODE_TS, server.port));
        b.bed
            .theirs
            .run(|| send_datagram(&udp_sender(), INTERNET, 9, 64));
        let show = |r: Result<String, String>| r.unwrap_or_else(|e| format!("FAILED ({e})"));
        println!(
            "[{round:>3}] client->tailnet seen as {} | tailnet->client seen as {} | tailnet->100.64.0.1 reached the server, seen as {}",
            show(a),
            show(c),
            show(d)
        );
        if round % 5 == 2 {
            let stats = b.tailguard("stats");
            println!("\n`tailguard stats` in TailGuard's namespace:\n{stats}");
        }
        round += 1;
        std::thread::sleep(Duration::from_secs(1));
    }

    println!("stopping: the daemon takes down what it set up ...");
    b.bed.ours.run(|| node.stop());
    b.tailguard("cleanup");
    drop(b);
    println!("done: the demo's namespaces, links and programs are gone");
}

/// Set by SIGINT/SIGTERM: the loop ends and everything is taken down.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::Relaxed);
}
