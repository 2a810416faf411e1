//! A real WireGuard peer for the tests, set up with the `wg` and `ip` tools —
//! an implementation independent of TailGuard's: the kernel's where the
//! kernel has WireGuard (the VM tier's kernels), wireguard-go (userspace)
//! where it has not (this machine's own kernel). `TG_TEST_WIREGUARD=kernel`
//! makes the kernel's a requirement, so that a run meant to test it cannot
//! quietly test userspace instead.

use std::{
    io::Write as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{netns::run, topology::*};

/// A key pair from `wg genkey` / `wg pubkey`.
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

impl KeyPair {
    pub fn generate() -> Self {
        let private = run(Command::new("wg").arg("genkey")).trim().to_string();
        let public = public_key(&private);
        Self { private, public }
    }
}

/// The public key of a private one, by `wg pubkey`.
pub fn public_key(private: &str) -> String {
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running wg pubkey (is wireguard-tools installed? `cargo xtask setup`)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(private.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Starts wireguard-go for device `name` in the foreground (so it stays a
/// child that can be stopped) and waits for its UAPI socket.
pub fn spawn_wireguard_go(name: &str) -> Child {
    let child = Command::new("wireguard-go")
        .args(["-f", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting wireguard-go (`cargo xtask setup` installs it)");
    let socket = format!("/var/run/wireguard/{name}.sock");
    let deadline = Instant::now() + crate::patience(Duration::from_secs(5));
    while !std::path::Path::new(&socket).exists() {
        assert!(Instant::now() < deadline, "wireguard-go made no {socket}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// `wg set NAME private-key … listen-port PORT` plus `peer_args`, the key
/// going through a file of its own (as `wg` wants it) that is removed after.
pub fn set_key_port_peers(name: &str, private_key: &str, port: u16, peer_args: &[&str]) {
    let key_file = std::env::temp_dir().join(format!("{name}-{}.key", std::process::id()));
    std::fs::write(&key_file, private_key).expect("writing the key file");
    let mut set = Command::new("wg");
    set.args(["set", name, "private-key"])
        .arg(&key_file)
        .args(["listen-port", &port.to_string()]);
    set.args(peer_args);
    let out = set
        .output()
        .expect("running wg (`cargo xtask setup` installs wireguard-tools)");
    let _ = std::fs::remove_file(&key_file);
    assert!(
        out.status.success(),
        "wg set {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the peers' devices are the kernel's: when the kernel has
/// WireGuard (its module loaded: the VM tier loads it first), or when
/// `TG_TEST_WIREGUARD=kernel` demands it (then its absence is a failure).
pub fn kernel_wireguard() -> bool {
    let loaded = std::path::Path::new("/sys/module/wireguard").exists();
    match std::env::var("TG_TEST_WIREGUARD").as_deref() {
        Ok("kernel") => {
            assert!(
                loaded,
                "TG_TEST_WIREGUARD=kernel, but this kernel has no WireGuard module loaded"
            );
            true
        }
        Ok("userspace") => false,
        _ => loaded,
    }
}

/// A WireGuard device in the current thread's namespace: the kernel's, or
/// wireguard-go's (killed on drop, and by the namespace's drop, should this
/// leak). A kernel device goes with its namespace.
pub struct WgPeer {
    pub name: String,
    userspace: Option<Child>,
}

impl WgPeer {
    /// Starts the device, sets its key, port, address and peers, brings it up.
    pub fn start(
        name: &str,
        keys: &KeyPair,
        port: u16,
        address: &str,
        peers: &[(&str, &str, Option<&str>)],
    ) -> Self {
        let userspace = if kernel_wireguard() {
            run(Command::new("ip").args(["link", "add", name, "type", "wireguard"]));
            None
        } else {
            Some(spawn_wireguard_go(name))
        };
        let mut peer_args = Vec::new();
        for (public, allowed, endpoint) in peers {
            peer_args.extend(["peer", public, "allowed-ips", allowed]);
            if let Some(endpoint) = endpoint {
                peer_args.extend(["endpoint", endpoint]);
            }
        }
        set_key_port_peers(name, &keys.private, port, &peer_args);
        for addr in address.split(',') {
            run(Command::new("ip").args(["addr", "add", addr, "dev", name]));
        }
        run(Command::new("ip").args(["link", "set", name, "up"]));
        Self {
            name: name.to_string(),
            userspace,
        }
    }
}

impl Drop for WgPeer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.userspace {
            let _ = child.kill();
            let _ = child.wait();
            // Killed, wireguard-go cannot remove its socket itself.
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.name));
        }
    }
}

/// TailGuard's namespace ([`UNDERLAY`]) and a peer namespace
/// ([`UNDERLAY_PEER`]), joined by veth, where a WireGuard peer has
/// [`WG_SERVER`] and [`WG_SERVER_V6`] and accepts TailGuard's key for
/// [`NODE_WG`], [`NODE_WG_V6`] and [`TESTBED_LAN`].
pub struct Testbed {
    pub ours: crate::netns::NetNs,
    pub keys: KeyPair,
    pub peer_public: String,
    /// A WireGuard device name for TailGuard, unique to this test.
    pub device: String,
    /// The veth ends: ours, the peer's.
    pub links: (String, String),
    pub peer: WgPeer,
    pub theirs: crate::netns::NetNs,
}

impl Testbed {
    pub fn new(purpose: &str) -> Self {
        Self::with_peer_allowed_ips(
            purpose,
            &format!("{NODE_WG}/32,{NODE_WG_V6}/128,{TESTBED_LAN}"),
        )
    }

    /// As [`Testbed::new`], with what the peer accepts from TailGuard (and
    /// routes to it) given by `allowed`. TailGuard's namespace forwards
    /// both families (see [`crate::netns::NetNs::for_daemon`]).
    pub fn with_peer_allowed_ips(purpose: &str, allowed: &str) -> Self {
        crate::require_root();
        Self::around(crate::netns::NetNs::for_daemon(purpose), purpose, allowed)
    }

    /// As [`Testbed::with_peer_allowed_ips`], with TailGuard's namespace
    /// given (a container's) and its forwarding switches left as they are.
    pub fn around(ours: crate::netns::NetNs, purpose: &str, allowed: &str) -> Self {
        let theirs = crate::netns::NetNs::new(&format!("{purpose}-peer"));
        let links = crate::netns::veth(
            &ours,
            &with_prefix(UNDERLAY, LINK_PREFIX),
            &theirs,
            &with_prefix(UNDERLAY_PEER, LINK_PREFIX),
        );
        let keys = KeyPair::generate();
        let peer_keys = KeyPair::generate();
        let peer_device = crate::netns::unique_ifname("wgp");
        let peer = theirs.run(|| {
            WgPeer::start(
                &peer_device,
                &peer_keys,
                WG_PORT,
                &format!(
                    "{},{}",
                    with_prefix(WG_SERVER, WG_PREFIX),
                    with_prefix(WG_SERVER_V6, WG_PREFIX_V6)
                ),
                &[(&keys.public, allowed, None)],
            )
        });
        Self {
            ours,
            keys,
            peer_public: peer_keys.public,
            device: crate::netns::unique_ifname("wgt"),
            links,
            peer,
            theirs,
        }
    }

    /// A wg-quick file for TailGuard's side: `interface` adds lines to
    /// [Interface], `allowed_ips` is the peer's AllowedIPs.
    pub fn config(&self, interface: &str, allowed_ips: &str) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = {}, {}\n{interface}\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = {allowed_ips}\nEndpoint = {}\n",
            self.keys.private,
            with_prefix(NODE_WG, WG_PREFIX),
            with_prefix(NODE_WG_V6, WG_PREFIX_V6),
            self.peer_public,
            endpoint(UNDERLAY_PEER, WG_PORT)
        )
    }

    /// Writes the config as `<device>.conf` (mode 600) into a fresh directory.
    pub fn config_dir(&self, text: &str) -> ConfigDir {
        let dir = std::env::temp_dir().join(format!("tg-{}", self.device));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{}.conf", self.device));
        std::fs::write(&file, text).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        ConfigDir(dir)
    }
}

/// A configuration directory, removed on drop.
pub struct ConfigDir(pub std::path::PathBuf);

impl ConfigDir {
    /// The daemon's `TG_BPF_DIR` for this test: its pinned connection state
    /// goes there (bpffs is shared by all namespaces), and with it on drop.
    pub fn bpf_dir(&self) -> std::path::PathBuf {
        let name = self.0.file_name().expect("a named directory");
        std::path::Path::new("/sys/fs/bpf/tailguard-test").join(name)
    }
}

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(self.bpf_dir());
    }
}
