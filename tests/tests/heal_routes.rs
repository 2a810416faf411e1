//! Routes follow health: while the WireGuard side is down (its server
//! silent past the handshake window, or `TG_HEALTH_PROBE` refused) the
//! node is not ready and withdraws the routes and exit node it advertises;
//! once it is back it advertises them again. Asserted on the preferences
//! the Tailscale stand-in receives, with real wireguard-go, in both
//! datapaths; the times are printed (`FAULT |` lines).

use std::{
    net::TcpListener,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tailguard_tests::{
    daemon::{DATAPATHS, DaemonUnderTest, health, status},
    netns::run,
    standin,
    topology::*,
    wg::Testbed,
};

/// What the node advertises with the peer's AllowedIPs of
/// [`WG_SERVER_EXIT`]: the LAN, and both default routes as exit node.
fn offered() -> Value {
    json!(["192.168.8.0/24", "0.0.0.0/0", "::/0"])
}

/// The routes the stand-in holds as advertised now.
fn advertised(node: &DaemonUnderTest) -> Value {
    standin::prefs(&node.standin().socket)["AdvertiseRoutes"].clone()
}

/// The advertised routes of every preferences change the stand-in got, in
/// order (those that set them).
fn route_changes(node: &DaemonUnderTest) -> Vec<Value> {
    let log = standin::ask(
        &node.standin().socket,
        hyper::Method::GET,
        "/standin/log",
        Value::Null,
    );
    log.as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.get("PATCH prefs"))
        .filter(|prefs| prefs["AdvertiseRoutesSet"] == json!(true))
        .map(|prefs| prefs["AdvertiseRoutes"].clone())
        .collect()
}

/// The daemon of `bed` with the stand-in, logged in, ready, its routes
/// advertised and a ping answered through the tunnel (so a handshake).
fn ready(
    bed: &Testbed,
    dir: &tailguard_tests::wg::ConfigDir,
    env: &[(&str, &str)],
) -> DaemonUnderTest {
    let mut node = DaemonUnderTest::builder((bed, dir))
        .standin()
        .envs(&[("TS_AUTHKEY", "tskey-x")])
        .envs(env)
        .start();
    node.wait_for("health", |_| health().0);
    node.wait_for("the routes advertised", |n| advertised(n) == offered());
    node.wait_for("a ping through the tunnel", |_| ping(WG_SERVER));
    node
}

fn ping(to: &str) -> bool {
    Command::new("ping")
        .args(["-c", "1", "-W", "1", to])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// After a withdrawal: not ready with `reason`, `/status` saying why, the
/// stand-in told to advertise nothing, and the log saying so once.
fn withdrawn(node: &DaemonUnderTest, reason: &str) {
    let (ready, why) = health();
    assert!(!ready && why.contains(reason), "{why}");
    let routes = status().routes;
    assert!(!routes.advertised, "{routes:?}");
    assert!(
        routes
            .withdrawn_because
            .as_deref()
            .is_some_and(|w| w.contains(reason)),
        "{routes:?}"
    );
    assert_eq!(routes.withdrawals, 1, "{routes:?}");
    assert_eq!(
        advertised(node),
        json!([]),
        "none, the exit node's included"
    );
    let said = "withdrawing the routes and exit node from the tailnet";
    assert_eq!(node.log().matches(said).count(), 1, "{}", node.log());
}

/// Back: ready, advertised again, and the stand-in saw exactly this
/// sequence of route changes: offered, withdrawn, offered.
fn advertised_again(node: &DaemonUnderTest) {
    assert!(health().0, "{}", health().1);
    assert!(status().routes.advertised);
    assert_eq!(
        route_changes(node),
        [offered(), json!([]), offered()],
        "at start, withdrawn, again"
    );
    let said = "advertising the routes and exit node again";
    assert_eq!(node.log().matches(said).count(), 1, "{}", node.log());
}

/// The seed README's client config: keepalives every 25 s.
const KEEPALIVE: &str = "PersistentKeepalive = 25\n";

fn config_dir(bed: &Testbed, peer_lines: &str) -> tailguard_tests::wg::ConfigDir {
    bed.config_dir(&(bed.config("", WG_SERVER_EXIT) + peer_lines))
}

/// How long after its last packet to send WireGuard keeps trying a
/// handshake (REKEY_ATTEMPT_TIME, counted from the last packet that asked
/// for one), and some room.
const GIVEN_UP: Duration = Duration::from_secs(100);

/// Pings the WireGuard server every second from the calling thread's
/// namespace until `stop`: traffic, for a peer without a keepalive.
fn traffic_until(stop: &std::sync::atomic::AtomicBool) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        ping(WG_SERVER);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The WireGuard server goes silent (its link down): the node keeps
/// sending keepalives (or, without one, traffic) and handshake initiations
/// that nobody answers; past the handshake window the routes go, and come
/// back with the link.
///
/// Without a keepalive of its own the peer gets one while it is silent:
/// the traffic stops when the routes go and the link comes back only once
/// WireGuard has given up its own handshake ([`GIVEN_UP`] after the last
/// packet), so only that keepalive can see it return.
fn silent_server(datapath: &str, keepalive: bool) {
    let what = if keepalive { "keepalive" } else { "traffic" };
    let bed = Testbed::new(&format!("heal-silent-{what}-{datapath}"));
    let dir = config_dir(&bed, if keepalive { KEEPALIVE } else { "" });
    bed.ours.run(|| {
        let mut node = ready(&bed, &dir, &[("TG_DATAPATH", datapath)]);
        // With a keepalive, no traffic at all.
        let stop_traffic = std::sync::atomic::AtomicBool::new(keepalive);
        std::thread::scope(|s| {
            s.spawn(|| bed.ours.run(|| traffic_until(&stop_traffic)));
            // Stopped by the scope's end too, should an assertion fail.
            let stop = StopGuard(&stop_traffic);
            run(Command::new("ip").args([
                "-n",
                bed.theirs.name(),
                "link",
                "set",
                &bed.links.1,
                "down",
            ]));
            silent_then_back(&bed, &mut node, datapath, what, || {
                stop.stop();
                if !keepalive {
                    std::thread::sleep(GIVEN_UP);
                }
            });
        });
        node.stop();
    });
}

/// The traffic's stop switch, set when told or dropped: however the test
/// ends (a failed assertion too, else the scope would wait for the
/// traffic's thread for ever).
struct StopGuard<'a>(&'a std::sync::atomic::AtomicBool);

impl StopGuard<'_> {
    fn stop(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The rest of [`silent_server`], from the link gone down: the routes
/// withdrawn past the window, `meanwhile`, the link up, the routes back.
fn silent_then_back(
    bed: &Testbed,
    node: &mut DaemonUnderTest,
    datapath: &str,
    what: &str,
    meanwhile: impl FnOnce(),
) {
    {
        let at = Instant::now();
        let handshake = last_handshake(&bed.device);
        // The window, the unanswered initiations' grace, a reading's period
        // and some room.
        node.wait_within(Duration::from_secs(240), "the routes withdrawn", |n| {
            advertised(n) == json!([])
        });
        let detected = at.elapsed();
        let after_handshake = SystemTime::now()
            .duration_since(handshake)
            .unwrap_or_default();
        withdrawn(node, "has not answered: no handshake for over 180 s");
        assert!(
            after_handshake >= Duration::from_secs(180),
            "not before the window: {after_handshake:?}"
        );
        meanwhile();
        run(Command::new("ip").args(["-n", bed.theirs.name(), "link", "set", &bed.links.1, "up"]));
        let back = Instant::now();
        node.wait_within(
            Duration::from_secs(60),
            "the routes advertised again",
            |n| advertised(n) == offered(),
        );
        let recovered = back.elapsed();
        node.wait_for("health", |_| health().0);
        advertised_again(node);
        assert!(ping(WG_SERVER), "traffic through the tunnel again");
        println!(
            "FAULT | WireGuard server silent ({datapath}, {what}) | routes withdrawn {:.1} s after the link went down \
             ({:.1} s after the last handshake) | advertised again {:.1} s after it came back | lost: the tailnet's \
             routes through this node until then (peers fail over to another router)",
            detected.as_secs_f32(),
            after_handshake.as_secs_f32(),
            recovered.as_secs_f32()
        );
    }
}

/// When the device's one peer last made a handshake, as `wg` says (in the
/// calling thread's namespace).
fn last_handshake(device: &str) -> SystemTime {
    let out = run(Command::new("wg").args(["show", device, "latest-handshakes"]));
    let seconds: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a handshake in {out:?}"));
    assert!(seconds > 0, "a handshake was made: {out:?}");
    UNIX_EPOCH + Duration::from_secs(seconds)
}

/// Both datapaths, and a peer without a keepalive, at once: each waits
/// out the handshake window.
#[test]
fn a_silent_wireguard_server_gets_the_routes_withdrawn_until_it_answers() {
    std::thread::scope(|s| {
        for datapath in DATAPATHS {
            s.spawn(move || silent_server(datapath, true));
        }
        s.spawn(|| silent_server("ebpf", false));
    });
}

/// `TG_HEALTH_PROBE`'s target, a TCP service behind WireGuard, in the
/// server's namespace: listening while the returned listener lives.
fn probe_target(bed: &Testbed, port: u16) -> TcpListener {
    bed.theirs
        .run(|| TcpListener::bind((WG_SERVER, port)).expect("listening behind WireGuard"))
}

#[test]
fn a_probe_that_stops_answering_gets_the_routes_withdrawn_until_it_answers() {
    const PORT: u16 = 8080;
    for datapath in DATAPATHS {
        let bed = Testbed::new(&format!("heal-probe-{datapath}"));
        let dir = config_dir(&bed, KEEPALIVE);
        let target = probe_target(&bed, PORT);
        let probe = format!("{WG_SERVER}:{PORT}");
        bed.ours.run(|| {
            let mut node = ready(
                &bed,
                &dir,
                &[("TG_DATAPATH", datapath), ("TG_HEALTH_PROBE", &probe)],
            );
            drop(target);
            let at = Instant::now();
            node.wait_for("the routes withdrawn", |n| advertised(n) == json!([]));
            let detected = at.elapsed();
            withdrawn(
                &node,
                &format!("TG_HEALTH_PROBE={probe} does not accept a connection"),
            );
            let _target = probe_target(&bed, PORT);
            let back = Instant::now();
            node.wait_for("the routes advertised again", |n| advertised(n) == offered());
            let recovered = back.elapsed();
            node.wait_for("health", |_| health().0);
            advertised_again(&node);
            println!(
                "FAULT | TG_HEALTH_PROBE refused ({datapath}) | routes withdrawn {:.1} s | advertised again \
                 {:.1} s after it answers | lost: the tailnet's routes through this node until then",
                detected.as_secs_f32(),
                recovered.as_secs_f32()
            );
            node.stop();
        });
    }
}
