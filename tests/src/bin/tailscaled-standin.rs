//! `tailscaled-standin`: a TEST TOOL started in place of tailscaled (which
//! cannot be installed here). It takes tailscaled's flags, and:
//! - creates the `--tun` device as a real userspace WireGuard link
//!   (wireguard-go) to a "tailnet peer" namespace,
//! - once logged in, gives the node its tailnet addresses and installs
//!   tailscaled's routing: tailnet routes in table 52 and the rules at
//!   5210-5270,
//! - serves the LocalAPI on `--socket` (see `tailguard_tests::standin`),
//! - on SIGTERM/SIGINT removes all of it.
//!
//! What the tailnet looks like comes from the environment (the tests set it,
//! TailGuard passes it through):
//! - `STANDIN_WG_PRIVATE_KEY`, `STANDIN_WG_LISTEN_PORT`: its WireGuard side;
//! - `STANDIN_PEER_PUBLIC_KEY`, `STANDIN_PEER_ENDPOINT`, `STANDIN_PEER_ALLOWED_IPS`:
//!   the tailnet peer;
//! - `STANDIN_ADDRESSES`: the node's tailnet addresses (default
//!   100.64.0.1, fd7a:115c:a1e0::1);
//! - `STANDIN_ROUTES`: prefixes routed to the tailnet in table 52 (default
//!   100.64.0.0/10, fd7a:115c:a1e0::/48).

use std::{env, net::IpAddr, path::PathBuf, process::Command, sync::Arc, time::Duration};

use tailguard_tests::{
    standin::{StandIn, State},
    topology::*,
    wg::{set_key_port_peers, spawn_wireguard_go},
};
use tokio::signal::unix::{SignalKind, signal};

struct Args {
    tun: String,
    socket: PathBuf,
}

fn args() -> Args {
    let mut tun = "tailscale0".to_string();
    let mut socket = PathBuf::from("/var/run/tailscale/tailscaled.sock");
    let mut it = env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).unwrap_or_default();
        match flag.trim_start_matches('-') {
            "tun" => tun = value(),
            "socket" => socket = PathBuf::from(value()),
            // Accepted and ignored, as tailscaled's own flags.
            "port" | "statedir" | "state" | "verbose" => {
                let _ = value();
            }
            other => eprintln!("tailscaled-standin: ignoring flag {other}"),
        }
    }
    Args { tun, socket }
}

fn list(var: &str, default: &str) -> Vec<String> {
    env::var(var)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("tailscaled-standin: `{}` failed", args.join(" "));
    }
}

/// The device: wireguard-go for `--tun`, keyed and peered from the
/// environment.
fn create_device(tun: &str) -> std::process::Child {
    let child = spawn_wireguard_go(tun);
    if let Ok(key) = env::var("STANDIN_WG_PRIVATE_KEY") {
        let port: u16 = env::var("STANDIN_WG_LISTEN_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(41641);
        let peer = env::var("STANDIN_PEER_PUBLIC_KEY").unwrap_or_default();
        let allowed = env::var("STANDIN_PEER_ALLOWED_IPS").unwrap_or_else(|_| TAILNET_BOTH.into());
        let endpoint = env::var("STANDIN_PEER_ENDPOINT").unwrap_or_default();
        let mut peer_args = Vec::new();
        if !peer.is_empty() {
            peer_args.extend([
                "peer",
                &peer,
                "allowed-ips",
                &allowed,
                "persistent-keepalive",
                "1",
            ]);
            if !endpoint.is_empty() {
                peer_args.extend(["endpoint", &endpoint]);
            }
        }
        set_key_port_peers(tun, &key, port, &peer_args);
        // tailscaled marks its own packets 0x80000 so that its rule 5210
        // keeps them in the main table, out of table 52 (whose default
        // route, with an exit node in use, leads back into the tunnel).
        run(&["wg", "set", tun, "fwmark", "0x80000"]);
    }
    run(&["ip", "link", "set", tun, "mtu", "1280", "up"]);
    child
}

/// tailscaled's routing once it runs: tailnet routes in table 52 and its
/// rules. Returns the commands that undo it.
fn install_routing(tun: &str, addresses: &[IpAddr]) -> Vec<Vec<String>> {
    let mut undo = Vec::new();
    for addr in addresses {
        let (family, len) = if addr.is_ipv4() {
            ("-4", 32)
        } else {
            ("-6", 128)
        };
        let net = format!("{addr}/{len}");
        run(&["ip", family, "addr", "add", &net, "dev", tun]);
        undo.push(vec![
            "ip".into(),
            family.into(),
            "addr".into(),
            "del".into(),
            net,
            "dev".into(),
            tun.into(),
        ]);
    }
    for route in list("STANDIN_ROUTES", TAILNET_BOTH) {
        let family = if route.contains(':') { "-6" } else { "-4" };
        run(&[
            "ip", family, "route", "add", &route, "dev", tun, "table", "52",
        ]);
        undo.push(
            [
                "ip", family, "route", "del", &route, "dev", tun, "table", "52",
            ]
            .map(String::from)
            .to_vec(),
        );
    }
    for family in ["-4", "-6"] {
        for (pref, rule) in [
            ("5210", "fwmark 0x80000/0xff0000 table main"),
            ("5230", "fwmark 0x80000/0xff0000 table default"),
            ("5250", "fwmark 0x80000/0xff0000 type unreachable"),
            ("5270", "table 52"),
        ] {
            let mut add = vec!["ip", family, "rule", "add", "pref", pref];
            add.extend(rule.split(' '));
            run(&add);
            undo.push(
                ["ip", family, "rule", "del", "pref", pref]
                    .map(String::from)
                    .to_vec(),
            );
        }
    }
    undo
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = args();
    let addresses: Vec<IpAddr> = list("STANDIN_ADDRESSES", &format!("{NODE_TS},{NODE_TS_V6}"))
        .iter()
        .map(|a| a.parse().expect("STANDIN_ADDRESSES holds addresses"))
        .collect();
    // Listening first, as tailscaled does: a stop while the device is being
    // made still removes it.
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    let mut wireguard = create_device(&args.tun);
    let standin = Arc::new(StandIn::new(State {
        starting_until_routed: true,
        ..State::new(addresses.clone())
    }));
    let server = standin.clone();
    let socket = args.socket.clone();
    tokio::spawn(async move {
        if let Err(e) = server.serve(&socket).await {
            eprintln!("tailscaled-standin: serving {}: {e}", socket.display());
        }
    });
    eprintln!(
        "tailscaled-standin: {} up, LocalAPI on {}",
        args.tun,
        args.socket.display()
    );

    let mut undo = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                let state = standin.state();
                let logged_in = ["Starting", "Running"].contains(&state.backend_state.as_str());
                if logged_in && undo.is_empty() {
                    undo = install_routing(&args.tun, &state.addresses);
                }
                if state.backend_state == "Starting" {
                    standin.update(|s| s.backend_state = "Running".into());
                } else if !logged_in && !undo.is_empty() {
                    for cmd in undo.drain(..) {
                        run(&cmd.iter().map(String::as_str).collect::<Vec<_>>());
                    }
                }
            }
        }
    }
    for cmd in undo {
        run(&cmd.iter().map(String::as_str).collect::<Vec<_>>());
    }
    run(&["ip", "link", "del", &args.tun]);
    let _ = wireguard.wait();
    let _ = std::fs::remove_file(&args.socket);
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", args.tun));
}
