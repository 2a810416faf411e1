//! The bridge as users run it, in four namespaces (the addresses are
//! [`crate::topology`]'s):
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
//! that routes the tailnet ranges to it, as in the simple bridge (README.md, pattern 3).
//! [`Bridge::with_more_clients`] adds more such clients, each in a namespace
//! of its own ([`MORE_WG_CLIENTS`]), for tests that need more peers on the
//! WireGuard side.
//!
//! The WireGuard side routes the tailnet ranges to TailGuard (README.md's
//! "simple bridge"); the tailnet peer routes the WireGuard side's networks
//! to the node, as Tailscale does for advertised routes. Both links are real
//! userspace WireGuard.

use std::process::Command;

use crate::{
    netns::{NetNs, run, unique_ifname, veth},
    topology::*,
    wg::{ConfigDir, KeyPair, Testbed, WgPeer},
};

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
    /// The clients [`Bridge::with_more_clients`] adds (none otherwise).
    pub more_clients: Vec<Client>,
}

/// A WireGuard client of TailGuard that [`Bridge::with_more_clients`] adds,
/// set up as the second WireGuard peer is.
pub struct Client {
    /// Its namespace.
    pub ns: NetNs,
    pub addresses: ClientAddresses,
    peer: WgPeer,
}

impl Client {
    /// Its WireGuard device (in `ns`).
    pub fn device(&self) -> &str {
        &self.peer.name
    }
}

impl Bridge {
    pub fn new(purpose: &str) -> Self {
        Self::with_server_allowed_ips(purpose, WG_SERVER_ONLY)
    }

    /// As [`Bridge::new`], with TailGuard's `AllowedIPs` for the WireGuard
    /// server given (e.g. `0.0.0.0/0, ::/0, 192.168.8.0/24`: README.md's
    /// "WireGuard as exit node" with the LAN behind the server).
    /// TailGuard's namespace forwards both families, as a bridge must
    /// ([`NetNs::for_daemon`]); `bed.ours.set_forwarding` changes that.
    pub fn with_server_allowed_ips(purpose: &str, allowed: &str) -> Self {
        crate::require_root();
        Self::around(NetNs::for_daemon(purpose), purpose, allowed, 0)
    }

    /// As [`Bridge::new`], with `count` more WireGuard clients of TailGuard
    /// ([`Bridge::more_clients`], addressed as [`MORE_WG_CLIENTS`] says).
    pub fn with_more_clients(purpose: &str, count: usize) -> Self {
        assert!(
            count <= MORE_WG_CLIENTS.len(),
            "the topology has addresses for {} more WireGuard clients, not {count}",
            MORE_WG_CLIENTS.len()
        );
        crate::require_root();
        Self::around(NetNs::for_daemon(purpose), purpose, WG_SERVER_ONLY, count)
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
        Self::around(ours, purpose, WG_SERVER_ONLY, 0)
    }

    fn around(ours: NetNs, purpose: &str, allowed: &str, more_clients: usize) -> Self {
        let clients: Vec<(ClientAddresses, KeyPair)> = std::iter::once(WG_CLIENT_ADDRESSES)
            .chain(MORE_WG_CLIENTS.into_iter().take(more_clients))
            .map(|addresses| (addresses, KeyPair::generate()))
            .collect();
        // The server takes from TailGuard what its clients send it.
        let client_sources: String = clients
            .iter()
            .map(|(c, _)| format!("{}/32,", c.address))
            .collect();
        let bed = Testbed::around(
            ours,
            purpose,
            &format!("{NODE_WG}/32,{client_sources}{NODE_WG_V6}/128,{TAILNET_BOTH},{INTERNET_NET}"),
        );
        bed.theirs.run(|| {
            for range in [TAILNET, TAILNET_V6, INTERNET_NET] {
                run(Command::new("ip").args(["route", "add", range, "dev", &bed.peer.name]));
            }
        });
        // The keepalive makes the first handshake early: the server side
        // has no endpoint for TailGuard until TailGuard has spoken.
        let peer = format!("{allowed}\nPersistentKeepalive = 1");
        let client_peers: String = clients
            .iter()
            .map(|(c, keys)| {
                format!(
                    "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32, {}/128\n",
                    keys.public, c.address, c.address_v6
                )
            })
            .collect();
        let config = format!(
            "{}{client_peers}",
            bed.config(&format!("ListenPort = {WG_CLIENT_PORT}"), &peer)
        );
        let dir = bed.config_dir(&config);
        let mut clients = clients.iter().enumerate().map(|(n, (addresses, keys))| {
            // The second peer's namespace keeps the name it always had.
            let name = match n {
                0 => format!("{purpose}-cl"),
                n => format!("{purpose}-cl{n}"),
            };
            let (ns, peer) = start_client(&bed, &name, addresses, keys);
            Client {
                ns,
                addresses: *addresses,
                peer,
            }
        });
        let Client {
            ns: client,
            peer: client_peer,
            ..
        } = clients.next().expect("the second WireGuard peer");
        let more_clients = clients.collect();

        let tailnet = NetNs::new(&format!("{purpose}-tn"));
        veth(
            &bed.ours,
            &with_prefix(TAILNET_UNDERLAY, LINK_PREFIX),
            &tailnet,
            &with_prefix(TAILNET_UNDERLAY_PEER, LINK_PREFIX),
        );
        let (node_keys, peer_keys) = (KeyPair::generate(), KeyPair::generate());
        let device = unique_ifname("tpr");
        let tailnet_peer = tailnet.run(|| {
            let peer = WgPeer::start(
                &device,
                &peer_keys,
                TAILNET_PORT,
                &format!(
                    "{},{}",
                    with_prefix(TAILNET_PEER, TAILNET_PREFIX),
                    with_prefix(TAILNET_PEER_V6, TAILNET_PREFIX_V6)
                ),
                &[(
                    &node_keys.public,
                    &format!(
                        "{NODE_TS}/32,{NODE_TS_V6}/128,{WG_NET},{WG_NET_V6},{INTERNET_NET},{LAN_NET}"
                    ),
                    Some(&endpoint(TAILNET_UNDERLAY, TAILNET_PORT)),
                )],
            );
            // The node's advertised routes, as Tailscale installs them.
            // (10.201.0.0/24 too, to show it is refused rather than unrouted.)
            for net in [WG_NET, WG_NET_V6, INTERNET_NET, LAN_NET] {
                run(Command::new("ip").args(["route", "add", net, "dev", &device]));
            }
            peer
        });

        // The server's LAN: the server forwards to it, its hosts answer
        // through the server.
        let lan = NetNs::new(&format!("{purpose}-lan"));
        veth(
            &bed.theirs,
            &with_prefix(LAN_GATEWAY, 24),
            &lan,
            &with_prefix(LAN_HOST, 24),
        );
        bed.theirs
            .run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap());
        lan.run(|| run(Command::new("ip").args(["route", "add", "default", "via", LAN_GATEWAY])));

        let internet = NetNs::new(&format!("{purpose}-net"));
        veth(
            &bed.ours,
            &with_prefix(UPLINK, LINK_PREFIX),
            &internet,
            &with_prefix(INTERNET, LINK_PREFIX),
        );
        // It answers everyone through TailGuard's uplink, so that only
        // TailGuard's policy can stop traffic from the two sides reaching it.
        internet.run(|| run(Command::new("ip").args(["route", "add", "default", "via", UPLINK])));
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
            more_clients,
        }
    }

    /// What the daemon's environment must hold for the stand-in to log in
    /// and carry the tailnet to this bridge's tailnet peer.
    pub fn standin_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TS_AUTHKEY", "tskey-bridge".into()),
            ("STANDIN_WG_PRIVATE_KEY", self.node_keys.private.clone()),
            ("STANDIN_WG_LISTEN_PORT", TAILNET_PORT.to_string()),
            ("STANDIN_PEER_PUBLIC_KEY", self.peer_keys.public.clone()),
            (
                "STANDIN_PEER_ENDPOINT",
                endpoint(TAILNET_UNDERLAY_PEER, TAILNET_PORT),
            ),
            (
                "STANDIN_PEER_ALLOWED_IPS",
                format!("{TAILNET_PEER}/32,{TAILNET_PEER_V6}/128"),
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
            let allowed = format!("{WG_NET},{WG_NET_V6},{TAILNET_BOTH},0.0.0.0/0");
            let device = &self.client_peer.name;
            let tailguard = &self.bed.keys.public;
            run(Command::new("wg").args([
                "set",
                device,
                "peer",
                tailguard,
                "allowed-ips",
                &allowed,
            ]));
            run(Command::new("ip").args(["route", "add", "default", "dev", device]));
        });
    }

    /// The second WireGuard peer (and every client [`Bridge::more_clients`]
    /// has) has a handshake with TailGuard. Each retries only every 5 s, so
    /// after TailGuard starts this can take a while.
    pub fn client_connected(&self) -> bool {
        std::iter::once((&self.client, self.client_device()))
            .chain(self.more_clients.iter().map(|c| (&c.ns, c.device())))
            .all(|(ns, device)| {
                ns.run(|| {
                    run(Command::new("wg").args(["show", device, "latest-handshakes"]))
                        .split_whitespace()
                        .nth(1)
                        .is_some_and(|t| t != "0")
                })
            })
    }
}

/// A WireGuard client of TailGuard in a namespace of its own (`name`),
/// joined to TailGuard's by an underlay link: it routes the tailnet to
/// TailGuard (README.md's simple bridge) and speaks first, so TailGuard
/// learns where it is.
fn start_client(
    bed: &Testbed,
    name: &str,
    addresses: &ClientAddresses,
    keys: &KeyPair,
) -> (NetNs, WgPeer) {
    let ns = NetNs::new(name);
    veth(
        &bed.ours,
        &with_prefix(addresses.underlay, LINK_PREFIX),
        &ns,
        &with_prefix(addresses.underlay_peer, LINK_PREFIX),
    );
    let device = unique_ifname("wgc");
    let peer = ns.run(|| {
        let peer = WgPeer::start(
            &device,
            keys,
            WG_CLIENT_PORT,
            &format!(
                "{},{}",
                with_prefix(addresses.address, WG_PREFIX),
                with_prefix(addresses.address_v6, WG_PREFIX_V6)
            ),
            &[(
                &bed.keys.public,
                &format!("{WG_NET},{WG_NET_V6},{TAILNET_BOTH}"),
                Some(&endpoint(addresses.underlay, WG_CLIENT_PORT)),
            )],
        );
        for range in [TAILNET, TAILNET_V6] {
            run(Command::new("ip").args(["route", "add", range, "dev", &device]));
        }
        run(Command::new("wg").args([
            "set",
            &device,
            "peer",
            &bed.keys.public,
            "persistent-keepalive",
            "1",
        ]));
        peer
    });
    (ns, peer)
}
