//! The fast path on Ethernet devices (veth), as the benchmarks use it: a
//! client and a server namespace joined through a router namespace whose two
//! veth ends carry the programs in the WireGuard and Tailscale roles. The
//! router's kernel does not forward at all, so whatever arrives came through
//! the programs, with the next hop's MAC filled in by the kernel
//! (`bpf_redirect_neigh`) or, once the daemon's side has read the neighbour
//! table, by the programs themselves.

use std::{process::Command, time::Duration};

use tailguard::{
    config::settings::AttachMode,
    datapath::{
        Datapath, LinkLayer, LoadOptions,
        link_addresses::{Follower, NextHop},
    },
    host::netlink::Netlink,
};
use tailguard_common::{Device, Outcome, config::LinkAddresses};
use tailguard_tests::{
    netns::{NetNs, run, veth},
    node, require_root,
    topology::*,
    traffic::{WhoAmI, who_am_i},
};

/// Client, router and server; the router's veth ends carry the programs.
struct EthernetHop {
    client: NetNs,
    router: NetNs,
    server: NetNs,
    /// The router's ends: towards the client (WireGuard role), towards the
    /// server (Tailscale role); the client's and the server's ends.
    wg_side: String,
    ts_side: String,
    client_end: String,
    server_end: String,
    /// The server's `WhoAmI` port (the server itself stays with the caller:
    /// it is not `Sync`).
    server_port: u16,
}

impl EthernetHop {
    fn new() -> (Self, WhoAmI) {
        let client = NetNs::new("eth-client");
        let router = NetNs::new("eth-router");
        let server = NetNs::new("eth-server");
        let (client_end, wg_side) = veth(
            &client,
            &with_prefix(ROUTER_CLIENT, 24),
            &router,
            &with_prefix(ROUTER_WG, 24),
        );
        let (ts_side, server_end) = veth(
            &router,
            &with_prefix(NODE_TS, TAILNET_PREFIX),
            &server,
            &with_prefix(ROUTER_SERVER, TAILNET_PREFIX),
        );
        client.run(|| run(Command::new("ip").args(["route", "add", TAILNET, "via", ROUTER_WG])));
        router.run(|| {
            assert_eq!(
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                    .unwrap()
                    .trim(),
                "0",
                "the router's kernel must not forward: only the programs may"
            );
        });
        let server_app = server.run(|| WhoAmI::listen(false));
        let hop = Self {
            client,
            router,
            server,
            wg_side,
            ts_side,
            client_end,
            server_end,
            server_port: server_app.port,
        };
        (hop, server_app)
    }

    /// Runs `body` in the router with the programs attached and configured.
    fn with_programs(&self, body: impl FnOnce(&tokio::runtime::Runtime, &mut Datapath) + Send) {
        self.router.run(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut dp = Datapath::load(&LoadOptions::uniform(LinkLayer::Ethernet))
                .expect("loading programs");
            for (device, ifname) in [
                (Device::WireGuard, &self.wg_side),
                (Device::Tailscale, &self.ts_side),
            ] {
                runtime
                    .block_on(dp.attach(device, ifname, AttachMode::Auto))
                    .expect("attach");
            }
            node::veth_router(&mut dp, (index(&self.wg_side), index(&self.ts_side)), []).unwrap();
            body(&runtime, &mut dp);
            runtime
                .block_on(dp.detach())
                .map_err(|e| format!("{e:?}"))
                .unwrap();
        });
    }

    /// What the server saw as the client's address, through the programs.
    fn exchange(&self) -> Result<String, String> {
        self.client
            .run(|| who_am_i(ROUTER_SERVER, self.server_port))
    }

    /// A device's MAC, as `ip link` reports it (this thread's /sys is
    /// the host's: it does not follow the namespace).
    fn mac(ns: &NetNs, ifname: &str) -> String {
        let out =
            run(Command::new("ip").args(["-n", ns.name(), "-o", "link", "show", "dev", ifname]));
        let mut words = out.split_whitespace();
        words.find(|w| *w == "link/ether");
        words.next().expect("an Ethernet address").to_string()
    }
}

fn index(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).unwrap()
}

fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("a MAC address"))
        .collect();
    bytes.try_into().expect("six bytes")
}

#[test]
fn the_fast_path_forwards_and_masquerades_between_veth_links() {
    require_root();
    let (hop, _server) = EthernetHop::new();
    hop.with_programs(|_, dp| {
        assert_eq!(
            hop.exchange().as_deref(),
            Ok(NODE_TS),
            "masqueraded by the programs"
        );
        let outcomes = dp.outcomes().unwrap();
        assert!(outcomes.get(Device::WireGuard, Outcome::Redirected).packets > 0);
        assert!(outcomes.get(Device::Tailscale, Outcome::Redirected).packets > 0);
    });
}

/// Once the neighbour table knows both next hops, the programs address the
/// frames themselves: a wrong entry in the kernel's table changes nothing
/// until the follower has read it, and then breaks delivery, which a right
/// entry restores.
#[test]
fn frames_carry_the_neighbour_tables_addresses_as_they_change() {
    require_root();
    let (hop, _server) = EthernetHop::new();
    let client_mac = EthernetHop::mac(&hop.client, &hop.client_end);
    let [server_mac, wg_mac, ts_mac] = [
        (&hop.server, &hop.server_end),
        (&hop.router, &hop.wg_side),
        (&hop.router, &hop.ts_side),
    ]
    .map(|(ns, ifname)| parse_mac(&EthernetHop::mac(ns, ifname)));
    let set_neighbour = |mac: &str| {
        run(Command::new("ip").args([
            "neigh",
            "replace",
            ROUTER_CLIENT,
            "lladdr",
            mac,
            "nud",
            "permanent",
            "dev",
            &hop.wg_side,
        ]))
    };
    hop.with_programs(|runtime, dp| {
        let netlink = runtime.block_on(async { Netlink::connect() }).unwrap();
        let hops = vec![
            NextHop {
                device: Device::WireGuard,
                ifindex: index(&hop.wg_side),
                address: ROUTER_CLIENT.parse().unwrap(),
            },
            NextHop {
                device: Device::Tailscale,
                ifindex: index(&hop.ts_side),
                address: ROUTER_SERVER.parse().unwrap(),
            },
        ];
        let mut follower = runtime
            .block_on(Follower::start(dp, &netlink, hops))
            .expect("following the neighbour table");
        let links = |dp: &Datapath| {
            let c = dp.config().unwrap();
            (*c.link(Device::WireGuard), *c.link(Device::Tailscale))
        };
        assert_eq!(
            links(dp),
            Default::default(),
            "no neighbour is known before any traffic"
        );
        // Unknown next hops: the kernel addresses the frames.
        assert_eq!(hop.exchange().as_deref(), Ok(NODE_TS));
        let mut changed = |dp: &mut Datapath| {
            // The timer is made inside the runtime, which it needs.
            runtime
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(5), follower.changed(dp, &netlink))
                        .await
                })
                .expect("a neighbour change within 5 s")
                .expect("reading the neighbours")
        };
        // The exchange resolved both neighbours (each change is one
        // notification; the follower reads the whole table at each).
        while changed(dp) < 2 {}
        let right = (
            LinkAddresses::new(parse_mac(&client_mac), wg_mac),
            LinkAddresses::new(server_mac, ts_mac),
        );
        assert_eq!(links(dp), right, "the next hops' and the router's own MACs");

        hop.router.run(|| set_neighbour("02:00:00:00:00:99"));
        assert_eq!(
            hop.exchange().as_deref(),
            Ok(NODE_TS),
            "the frames carry the programs' addresses, not the kernel's lookup"
        );
        while links(dp).0 == right.0 {
            changed(dp);
        }
        assert_eq!(
            links(dp).0,
            LinkAddresses::new([2, 0, 0, 0, 0, 0x99], wg_mac),
            "the changed entry, read again"
        );
        assert!(
            hop.exchange().is_err(),
            "answers addressed to a MAC the client does not have are not taken"
        );

        hop.router.run(|| set_neighbour(&client_mac));
        while links(dp) != right {
            changed(dp);
        }
        assert_eq!(hop.exchange().as_deref(), Ok(NODE_TS), "delivered again");
    });
}
