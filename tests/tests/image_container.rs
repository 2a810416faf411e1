//! The image on a real Docker engine (`cargo xtask test` starts one when
//! none runs and builds `tailguard:smoke`: the image with the Tailscale
//! stand-in as tailscaled, through the `TAILSCALE_IMAGE` build argument).
//!
//! The container runs as users run it — the image's own entrypoint and
//! health check, `wg0.conf` mounted, the documented capabilities, device
//! and sysctls — in the scenario suite's topology: its network namespace
//! (held by a second, idle container, the way a pod's is) is TailGuard's,
//! between real userspace WireGuard peers and the stand-in's tailnet peer.

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use tailguard_tests::{
    bridge::Bridge,
    netns::{NetNs, routing_state, run},
    require_root,
    topology::*,
    traffic::{WhoAmI, who_am_i},
};

/// `cargo xtask test` builds it (`cargo xtask image` alone, too).
const IMAGE: &str = "tailguard:smoke";

/// The sysctls the documentation passes (`/proc/sys` is read-only inside).
/// Here they go to the container holding the namespace, which owns them.
const SYSCTLS: [&str; 6] = [
    // Docker turns IPv6 off without an IPv6 network.
    "net.ipv6.conf.all.disable_ipv6=0",
    "net.ipv6.conf.default.disable_ipv6=0",
    "net.ipv4.ip_forward=1",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv4.conf.all.src_valid_mark=1",
    "net.ipv4.ip_local_reserved_ports=61000-65535",
];

fn docker(args: &[&str]) -> Output {
    Command::new("/usr/bin/docker")
        .args(args)
        .output()
        .expect("running /usr/bin/docker (cargo xtask setup installs docker.io)")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A container removed (with its volumes) on drop.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.0]);
    }
}

/// What a container could change on the host: its firewall, links,
/// routes and rules, forwarding switches, and eBPF programs.
fn host_state() -> String {
    let mut state = run(Command::new("nft").args(["list", "ruleset"]));
    state.push_str(&routing_state());
    for key in ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"] {
        state.push_str(&std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap());
    }
    let programs = run(Command::new("bpftool").args(["prog", "list"]));
    state.extend(programs.lines().filter(|l| l.contains("tg_")));
    state
}

/// Fails the test with a clear reason when the engine or the image is
/// missing.
fn require_engine_and_image() {
    let version = docker(&["version", "--format", "{{.Server.Version}}"]);
    assert!(
        version.status.success(),
        "no Docker engine answers (DOCKER_HOST={:?}): `cargo xtask test` starts one and builds {IMAGE}: {}",
        std::env::var("DOCKER_HOST").unwrap_or_default(),
        String::from_utf8_lossy(&version.stderr)
    );
    assert!(
        docker(&["image", "inspect", IMAGE]).status.success(),
        "no image {IMAGE}: `cargo xtask image` (or `cargo xtask test`) builds it"
    );
}

/// Started without the grants it needs, the container says which, with
/// the flag that gives it, and stops.
#[test]
fn without_its_grants_the_container_names_them() {
    require_root();
    require_engine_and_image();
    let out = docker(&["run", "--rm", "--network", "none", IMAGE]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("missing CAP_NET_ADMIN") && log.contains("--cap-add NET_ADMIN"),
        "{log}"
    );
    let out = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--cap-add",
        "NET_ADMIN",
        IMAGE,
    ]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("--device /dev/net/tun"), "{log}");
}

/// An example's generate.sh makes a matching pair with nothing but the
/// image: private keys readable by the owner only, each side's public key
/// in the other's file.
#[test]
fn an_examples_generator_writes_a_matching_pair_with_only_the_image() {
    require_root();
    require_engine_and_image();
    let dir = std::env::temp_dir().join(format!("tg-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A copy of the examples (the script and the one it calls).
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    std::fs::create_dir_all(dir.join("bridge")).unwrap();
    std::fs::copy(examples.join("wg-pair.sh"), dir.join("wg-pair.sh")).unwrap();
    std::fs::copy(
        examples.join("bridge/generate.sh"),
        dir.join("bridge/generate.sh"),
    )
    .unwrap();
    let script = dir.join("bridge/generate.sh");
    let dir = dir.join("bridge");
    let out = Command::new(&script)
        .arg("vpn.example.com")
        .env("TAILGUARD_IMAGE", IMAGE)
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let wg0 = std::fs::read_to_string(dir.join("config/wg0.conf")).unwrap();
    let peer = std::fs::read_to_string(dir.join("peer.conf")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    for file in [dir.join("config/wg0.conf"), dir.join("peer.conf")] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    let private = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("PrivateKey = "))
            .expect("a private key")
            .to_string()
    };
    let public_of = |key: String| tailguard_tests::wg::public_key(&key);
    assert!(
        wg0.contains(&format!("PublicKey = {}", public_of(private(&peer)))),
        "{wg0}"
    );
    assert!(
        peer.contains(&format!("PublicKey = {}", public_of(private(&wg0)))),
        "{peer}"
    );
    assert!(peer.contains("Endpoint = vpn.example.com:51820"), "{peer}");
    assert!(
        peer.contains(TAILNET),
        "the client routes the tailnet: {peer}"
    );
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn the_image_joins_the_networks_healthy_through_the_fast_path_and_stops_clean() {
    require_root();
    require_engine_and_image();
    let host_before = host_state();

    // The namespace's holder: sleeps, owns the network namespace and its
    // sysctls, as a pod's sandbox does.
    let name = format!("tg-smoke-{}", std::process::id());
    let holder = Container(format!("{name}-net"));
    let mut args = vec!["run", "-d", "--name", &holder.0, "--network", "none"];
    for sysctl in SYSCTLS {
        args.extend(["--sysctl", sysctl]);
    }
    args.extend(["--entrypoint", "sleep", IMAGE, "infinity"]);
    docker_ok(&args);
    let pid: u32 = docker_ok(&["inspect", "--format", "{{.State.Pid}}", &holder.0])
        .parse()
        .expect("a pid");
    let b = Bridge::in_namespace(NetNs::adopt("smoke", pid), "smoke");
    let empty = b.bed.ours.run(routing_state);

    // TailGuard, as documented, with the stand-in's settings; SYS_ADMIN
    // for eBPF because this engine does not know CAP_BPF.
    let node = Container(name.clone());
    let config = format!("{}:/etc/wireguard", b.dir.0.display());
    let network = format!("container:{}", holder.0);
    let device = format!("WG_DEVICE={}", b.bed.device);
    let env: Vec<String> = b
        .standin_env()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut args = vec![
        "run",
        "-d",
        "--name",
        &node.0,
        "--network",
        &network,
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "SYS_ADMIN",
        "--device",
        "/dev/net/tun",
        "-v",
        &config,
        "-e",
        &device,
        // The image checks every 30 s; the test need not wait that long.
        "--health-interval",
        "1s",
        "--health-start-period",
        "1s",
    ];
    for e in &env {
        args.extend(["-e", e]);
    }
    args.push(IMAGE);
    let started = Instant::now();
    docker_ok(&args);
    let deadline = started + Duration::from_secs(90);
    loop {
        let health = docker_ok(&["inspect", "--format", "{{.State.Health.Status}}", &node.0]);
        if health == "healthy" {
            break;
        }
        let running = docker_ok(&["inspect", "--format", "{{.State.Running}}", &node.0]);
        if Instant::now() > deadline || running != "true" {
            panic!(
                "not healthy ({health}, running: {running}):\n{}",
                String::from_utf8_lossy(&docker(&["logs", &node.0]).stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "healthy {:.1} s after docker run",
        started.elapsed().as_secs_f64()
    );
    let logs = String::from_utf8_lossy(&docker(&["logs", &node.0]).stderr).into_owned();
    assert!(!logs.contains("FAST PATH IS OFF"), "{logs}");

    // Both directions, each seeing the other's source as docs/policy.md says.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.client_connected() {
        assert!(
            Instant::now() < deadline,
            "the WireGuard client never connected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let at_tailnet = b.tailnet.run(|| WhoAmI::listen(false));
    let seen = b.client.run(|| who_am_i(TAILNET_PEER, at_tailnet.port));
    assert_eq!(
        seen.as_deref(),
        Ok(NODE_TS),
        "WireGuard -> tailnet, masqueraded"
    );
    let at_client = b.client.run(|| WhoAmI::listen(false));
    let seen = b.tailnet.run(|| who_am_i(WG_CLIENT, at_client.port));
    assert_eq!(seen.as_deref(), Ok(NODE_WG), "tailnet -> WireGuard, SNAT");
    // The fast path carried both directions: its counters (read by the
    // daemon once a second) show packets redirected from each device.
    let redirected_from_both = |stats: &str| {
        ["wireguard", "tailscale"].iter().all(|device| {
            stats.lines().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.len() >= 3
                    && words[0] == *device
                    && words[1] == "redirected"
                    && words[2] != "0"
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = docker_ok(&["exec", &node.0, "tailguard", "stats"]);
        if redirected_from_both(&stats) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not redirected both ways:\n{stats}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // docker stop: SIGTERM, and everything the daemon made is gone.
    docker_ok(&["stop", "--time", "20", &node.0]);
    assert_eq!(
        docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", &node.0]),
        "0",
        "{}",
        String::from_utf8_lossy(&docker(&["logs", &node.0]).stderr)
    );
    let after = b.bed.ours.run(routing_state);
    assert_eq!(after, empty, "the namespace must be as before the daemon");
    let table = b
        .bed
        .ours
        .run(|| run(Command::new("nft").args(["list", "ruleset"])));
    assert!(!table.contains("tailguard"), "{table}");
    drop(node);
    drop(b);
    drop(holder);
    assert_eq!(host_state(), host_before, "the host must be as it was");
}
