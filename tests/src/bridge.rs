//! The bridge as users run it, in four namespaces:
//!
//! ```text
//!  LAN 192.168.8.10 --veth-- wg server (Testbed's peer)
//!  wg side (Testbed's peer)   TailGuard (Testbed's ours)        tailnet peer
//!  10.66.0.1, fd66::1  ==wg==  10.66.0.2, fd66::2               100.64.0.2
//!  second WG peer      ==wg==  (listens on 51821)
//!                              stand-in device ==wg (tailnet)== fd7a:115c:a1e0::2
//!                              100.64.0.1, fd7a:115c:a1e0::1
//!                              uplink 10.201.0.1 --veth-- internet 10.201.0.2
//! ```
//!
//! The second WireGuard peer (10.66.0.3, fd66::3) is a client of TailGuard
//! that routes the tailnet ranges to it, as in the reference's simple bridge.
//!
//! The WireGuard side routes the tailnet ranges to TailGuard (the reference's
//! "simple bridge"); the tailnet peer routes the WireGuard side's networks
//! to the node, as Tailscale does for advertised routes. Both links are real
//! userspace WireGuard.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    daemon::{Daemon, WithStandIn},
    netns::{NetNs, run, unique_ifname, veth},
    wg::{ConfigDir, KeyPair, Testbed, WgPeer},
};

pub const WG_SERVER: &str = "10.66.0.1";
pub const WG_SERVER_V6: &str = "fd66::1";
pub const NODE_WG: &str = "10.66.0.2";
pub const NODE_WG_V6: &str = "fd66::2";
pub const NODE_TS: &str = "100.64.0.1";
pub const NODE_TS_V6: &str = "fd7a:115c:a1e0::1";
pub const TAILNET_PEER: &str = "100.64.0.2";
pub const TAILNET_PEER_V6: &str = "fd7a:115c:a1e0::2";
pub const INTERNET: &str = "10.201.0.2";
pub const WG_CLIENT: &str = "10.66.0.3";
pub const LAN_HOST: &str = "192.168.8.10";
pub const WG_CLIENT_V6: &str = "fd66::3";

pub struct Bridge {
    pub bed: Testbed,
    pub dir: ConfigDir,
    pub tailnet: NetNs,
    pub internet: NetNs,
    /// A LAN behind the WireGuard server (192.168.8.0/24; its host .10).
    pub lan: NetNs,
    /// The second WireGuard peer's namespace.
    pub client: NetNs,
    node_keys: KeyPair,
    peer_keys: KeyPair,
    /// The tailnet peer's WireGuard device (in `tailnet`).
    pub tailnet_peer: WgPeer,
    client_peer: WgPeer,
}

impl Bridge {
    pub fn new(purpose: &str) -> Self {
        Self::with_server_allowed_ips(purpose, "10.66.0.1/32, fd66::1/128")
    }

    /// As [`Bridge::new`], with TailGuard's `AllowedIPs` for the WireGuard
    /// server given (e.g. `0.0.0.0/0, ::/0, 192.168.8.0/24`: the reference's
    /// "WireGuard as exit node" with the LAN behind the server).
    /// TailGuard's namespace forwards both families, as a bridge must
    /// ([`NetNs::for_daemon`]); `bed.ours.set_forwarding` changes that.
    pub fn with_server_allowed_ips(purpose: &str, allowed: &str) -> Self {
        crate::require_root();
        Self::around(NetNs::for_daemon(purpose), purpose, allowed)
    }

    /// As [`Bridge::with_server_allowed_ips`], with the tailnet peer and
    /// the second WireGuard peer on 1500-byte links (an Ethernet host's),
    /// so that they send what the node's devices (1420 WireGuard, 1280
    /// tailnet) cannot take: for path MTU and MSS tests.
    pub fn with_ethernet_peers(purpose: &str, allowed: &str) -> Self {
        let b = Self::with_server_allowed_ips(purpose, allowed);
        let tailnet_device = b.tailnet_peer.name.clone();
        b.tailnet
            .run(|| crate::netns::set_mtu(&tailnet_device, 1500));
        let client_device = b.client.device_starting_with("wgc");
        b.client.run(|| crate::netns::set_mtu(&client_device, 1500));
        b
    }

    /// [`Bridge::new`] around a given namespace for TailGuard (a
    /// container's), its forwarding switches left as they are.
    pub fn in_namespace(ours: NetNs, purpose: &str) -> Self {
        Self::around(ours, purpose, "10.66.0.1/32, fd66::1/128")
    }

    fn around(ours: NetNs, purpose: &str, allowed: &str) -> Self {
        let tailnet_ranges = "100.64.0.0/10,fd7a:115c:a1e0::/48";
        let bed = Testbed::around(
            ours,
            purpose,
            &format!("10.66.0.2/32,10.66.0.3/32,fd66::2/128,{tailnet_ranges},10.201.0.0/24"),
        );
        bed.theirs.run(|| {
            for range in tailnet_ranges.split(',').chain(["10.201.0.0/24"]) {
                run(Command::new("ip").args(["route", "add", range, "dev", &bed.peer.name]));
            }
        });
        // The keepalive makes the first handshake early: the server side
        // has no endpoint for TailGuard until TailGuard has spoken.
        let peer = format!("{allowed}\nPersistentKeepalive = 1");
        let client_keys = KeyPair::generate();
        let config = format!(
            "{}\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.66.0.3/32, fd66::3/128\n",
            bed.config("ListenPort = 51821", &peer),
            client_keys.public
        );
        let dir = bed.config_dir(&config);
        let client = NetNs::new(&format!("{purpose}-cl"));
        veth(&bed.ours, "10.202.0.1/24", &client, "10.202.0.2/24");
        let client_device = unique_ifname("wgc");
        let client_peer = client.run(|| {
            WgPeer::start(
                &client_device,
                &client_keys,
                51821,
                "10.66.0.3/24,fd66::3/64",
                &[(
                    &bed.keys.public,
                    &format!("10.66.0.0/24,fd66::/64,{tailnet_ranges}"),
                    Some("10.202.0.1:51821"),
                )],
            )
        });
        // It routes the tailnet to TailGuard (the reference's simple bridge).
        client.run(|| {
            for range in tailnet_ranges.split(',') {
                run(Command::new("ip").args(["route", "add", range, "dev", &client_device]));
            }
        });
        // It speaks first, so TailGuard learns where it is.
        client.run(|| {
            run(Command::new("wg").args([
                "set",
                &client_device,
                "peer",
                &bed.keys.public,
                "persistent-keepalive",
                "1",
            ]))
        });

        let tailnet = NetNs::new(&format!("{purpose}-tn"));
        veth(&bed.ours, "10.210.0.1/24", &tailnet, "10.210.0.2/24");
        let (node_keys, peer_keys) = (KeyPair::generate(), KeyPair::generate());
        let device = unique_ifname("tpr");
        let tailnet_peer = tailnet.run(|| {
            let peer = WgPeer::start(
                &device,
                &peer_keys,
                41641,
                "100.64.0.2/10,fd7a:115c:a1e0::2/48",
                &[(
                    &node_keys.public,
                    "100.64.0.1/32,fd7a:115c:a1e0::1/128,10.66.0.0/24,fd66::/64,10.201.0.0/24,192.168.8.0/24",
                    Some("10.210.0.1:41641"),
                )],
            );
            // The node's advertised routes, as Tailscale installs them.
            // (10.201.0.0/24 too, to show it is refused rather than unrouted.)
            for net in ["10.66.0.0/24", "fd66::/64", "10.201.0.0/24", "192.168.8.0/24"] {
                run(Command::new("ip").args(["route", "add", net, "dev", &device]));
            }
            peer
        });

        // The server's LAN: the server forwards to it, its hosts answer
        // through the server.
        let lan = NetNs::new(&format!("{purpose}-lan"));
        veth(&bed.theirs, "192.168.8.1/24", &lan, "192.168.8.10/24");
        bed.theirs
            .run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap());
        lan.run(|| run(Command::new("ip").args(["route", "add", "default", "via", "192.168.8.1"])));

        let internet = NetNs::new(&format!("{purpose}-net"));
        veth(&bed.ours, "10.201.0.1/24", &internet, "10.201.0.2/24");
        // It answers everyone through TailGuard's uplink, so that only
        // TailGuard's policy can stop traffic from the two sides reaching it.
        internet
            .run(|| run(Command::new("ip").args(["route", "add", "default", "via", "10.201.0.1"])));
        Self {
            bed,
            dir,
            tailnet,
            internet,
            lan,
            client,
            node_keys,
            peer_keys,
            tailnet_peer,
            client_peer,
        }
    }

    /// Starts TailGuard (from the calling thread, which must be in the
    /// node's namespace) with the stand-in logged in, and `env` on top.
    pub fn start(&self, env: &[(&str, &str)]) -> WithStandIn {
        self.start_via(&[], env)
    }

    /// [`Bridge::start`] through a wrapper command (see [`Daemon::start_via`]).
    pub fn start_via(&self, wrapper: &[&str], env: &[(&str, &str)]) -> WithStandIn {
        let mut all = self.standin_env();
        all.extend_from_slice(env);
        Daemon::with_standin_via(wrapper, &self.bed, &self.dir, &all)
    }

    /// What the daemon's environment must hold for the stand-in to log in
    /// and carry the tailnet to this bridge's tailnet peer.
    pub fn standin_env(&self) -> Vec<(&str, &str)> {
        vec![
            ("TS_AUTHKEY", "tskey-bridge"),
            ("STANDIN_WG_PRIVATE_KEY", self.node_keys.private.as_str()),
            ("STANDIN_WG_LISTEN_PORT", "41641"),
            ("STANDIN_PEER_PUBLIC_KEY", self.peer_keys.public.as_str()),
            ("STANDIN_PEER_ENDPOINT", "10.210.0.2:41641"),
            (
                "STANDIN_PEER_ALLOWED_IPS",
                "100.64.0.2/32,fd7a:115c:a1e0::2/128",
            ),
        ]
    }
}

impl Bridge {
    /// The second WireGuard peer's device (in `client`).
    pub fn client_device(&self) -> &str {
        &self.client_peer.name
    }

    /// The public key of the stand-in's WireGuard link to the tailnet
    /// peer (the node, as the tailnet peer knows it).
    pub fn node_tailnet_public_key(&self) -> &str {
        &self.node_keys.public
    }

    /// [`Bridge::start`], then waits until the node is healthy and the
    /// second WireGuard peer has its handshake (it retries only every 5 s).
    pub fn start_healthy(&self, env: &[(&str, &str)]) -> WithStandIn {
        let mut node = self.start(env);
        node.daemon
            .wait_for("health", |_| crate::daemon::health().0);
        node.daemon
            .wait_for("the second WireGuard peer's handshake", |_| {
                self.client_connected()
            });
        // The fast path (when it runs) takes the tailnet side once its maps
        // know tailscaled's device and address: until then, flows are the
        // kernel's and stay so.
        node.daemon.wait_for("the fast path's tailnet side", |_| {
            let f = &crate::daemon::status()["forwarding"];
            f.get("ts_ifindex").is_none()
                || (f["ts_ifindex"].as_u64() != Some(0) && !f["ts_v4"].is_null())
        });
        // Where the peers are the kernel's, the daemon's device must be
        // too: a userspace one has its UAPI socket.
        if crate::wg::kernel_wireguard() {
            let socket = format!("/var/run/wireguard/{}.sock", self.bed.device);
            assert!(
                !std::path::Path::new(&socket).exists(),
                "the kernel has WireGuard, but the daemon runs userspace WireGuard:\n{}",
                node.daemon.log()
            );
        }
        node
    }

    /// `tailguard <command>` for this bridge's daemon (its device and pinned
    /// state), run in TailGuard's namespace: its standard output.
    pub fn tailguard(&self, command: &str) -> String {
        let out = self.bed.ours.run(|| {
            crate::daemon::tailguard(
                &[command],
                &[
                    ("WG_DEVICE", self.bed.device.as_ref()),
                    ("TG_BPF_DIR", self.dir.bpf_dir().as_os_str()),
                ],
            )
        });
        assert!(
            out.status.success(),
            "tailguard {command} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The second WireGuard peer sends everything to TailGuard (its
    /// default route), as a client using a Tailscale exit node through
    /// TailGuard does.
    pub fn client_routes_everything_to_tailguard(&self) {
        self.client.run(|| {
            let allowed = "10.66.0.0/24,fd66::/64,100.64.0.0/10,fd7a:115c:a1e0::/48,0.0.0.0/0";
            let device = &self.client_peer.name;
            let tailguard = &self.bed.keys.public;
            run(Command::new("wg").args([
                "set",
                device,
                "peer",
                tailguard,
                "allowed-ips",
                allowed,
            ]));
            run(Command::new("ip").args(["route", "add", "default", "dev", device]));
        });
    }

    /// The second WireGuard peer has a handshake with TailGuard. It retries
    /// only every 5 s, so after TailGuard starts this can take a while.
    pub fn client_connected(&self) -> bool {
        self.client.run(|| {
            run(Command::new("wg").args(["show", &self.client_peer.name, "latest-handshakes"]))
                .split_whitespace()
                .nth(1)
                .is_some_and(|t| t != "0")
        })
    }
}

/// A TCP server in the calling thread's namespace that tells each client the
/// address it sees the client coming from, and reports them in turn.
pub struct WhoAmI {
    pub port: u16,
    seen: std::sync::mpsc::Receiver<String>,
    _thread: JoinHandle<()>,
}

impl WhoAmI {
    pub fn listen(ipv6: bool) -> Self {
        let any = if ipv6 { "[::]:0" } else { "0.0.0.0:0" };
        let listener = TcpListener::bind(any).expect("binding the test server");
        let port = listener.local_addr().unwrap().port();
        let (tx, seen) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let peer = stream
                    .peer_addr()
                    .map(|a| a.ip().to_canonical().to_string())
                    .unwrap_or_default();
                let _ = stream.write_all(peer.as_bytes());
                if tx.send(peer).is_err() {
                    break;
                }
            }
        });
        Self {
            port,
            seen,
            _thread: thread,
        }
    }

    /// The source address the last client came from, as the server saw it.
    pub fn last_seen(&self) -> Option<String> {
        self.seen.try_iter().last()
    }
}

/// Connects to `addr:port` from the calling thread's namespace: the source
/// address the server saw, or why it failed (dropped traffic times out).
pub fn who_am_i(addr: &str, port: u16) -> Result<String, String> {
    let target = SocketAddr::new(addr.parse().expect("an address"), port);
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut seen = String::new();
    stream
        .read_to_string(&mut seen)
        .map_err(|e| format!("reading from {target}: {e}"))?;
    Ok(seen)
}

/// A TCP server that counts the bytes each client sends and answers with
/// the count once the client has finished sending.
pub struct Sink {
    pub port: u16,
    _thread: JoinHandle<()>,
}

impl Sink {
    pub fn listen() -> Self {
        let listener = TcpListener::bind("[::]:0").expect("binding the test server");
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let mut count = 0u64;
                let mut buffer = [0u8; 65536];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    count += n as u64;
                }
                let _ = stream.write_all(count.to_string().as_bytes());
            }
        });
        Self {
            port,
            _thread: thread,
        }
    }
}

/// Sends `bytes` to a [`Sink`] and returns how many it says arrived.
pub fn send_bulk(addr: &str, port: u16, bytes: usize) -> Result<u64, String> {
    let target = SocketAddr::new(addr.parse().expect("an address"), port);
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![0x5au8; 16384];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream
            .write_all(&chunk[..n])
            .map_err(|e| format!("sending to {target}: {e}"))?;
        left -= n;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("reading from {target}: {e}"))?;
    answer.parse().map_err(|e| format!("{answer:?}: {e}"))
}

/// A UDP socket that reports the size of each datagram it receives.
pub struct UdpSink {
    pub port: u16,
    socket: UdpSocket,
}

impl UdpSink {
    pub fn bind() -> Self {
        let socket = UdpSocket::bind("[::]:0").expect("binding the test socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        Self {
            port: socket.local_addr().unwrap().port(),
            socket,
        }
    }

    /// The size of the next datagram, if one comes within 3 s.
    pub fn receive(&self) -> Option<usize> {
        let mut buffer = vec![0u8; 65536];
        self.socket.recv_from(&mut buffer).ok().map(|(n, _)| n)
    }
}

/// A UDP socket to send from, in the calling thread's namespace. Keep it
/// for the next datagram: the kernel applies a "packet too big" to the
/// socket the datagram came from, and forgets it if that socket is gone.
pub fn udp_sender() -> UdpSocket {
    UdpSocket::bind("[::]:0").expect("binding")
}

/// Sends one UDP datagram of `size` bytes (the kernel fragments it).
pub fn send_datagram(socket: &UdpSocket, addr: &str, port: u16, size: usize) {
    let target = SocketAddr::new(addr.parse().expect("an address"), port);
    socket.send_to(&vec![0xa5; size], target).expect("sending");
}

/// A TCP server that echoes every line back, for connections that must
/// last (across a restart of the daemon).
pub struct Echo {
    pub port: u16,
    _thread: JoinHandle<()>,
}

impl Echo {
    pub fn listen() -> Self {
        let listener = TcpListener::bind("[::]:0").expect("binding the test server");
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                std::thread::spawn(move || {
                    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    let mut line = String::new();
                    while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0) {
                        if writer.write_all(line.as_bytes()).is_err() {
                            break;
                        }
                        line.clear();
                    }
                });
            }
        });
        Self {
            port,
            _thread: thread,
        }
    }
}

/// One line sent on `stream` and read back (waiting up to 30 s, long
/// enough for TCP to retransmit across a restart).
pub fn echo_line(stream: &mut TcpStream, line: &str) -> Result<String, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.last() != Some(&b'\n') {
        let n = stream.read(&mut byte).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
        answer.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&answer).trim_end().to_string())
}

/// `GET path` over plain HTTP/1.1 from the calling thread's namespace: the
/// whole response (status line, headers, body), or why it failed.
pub fn http_get(addr: &str, port: u16, path: &str) -> String {
    let target = SocketAddr::new(addr.parse().expect("an address"), port);
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    };
    attempt().unwrap_or_else(|e| format!("GET {target}{path} failed: {e}"))
}
