//! The forwarding hop over veth: a client and a server namespace joined
//! through a router namespace that is TailGuard (its WireGuard side facing
//! the client, its tailnet side the server), and directly by a second veth
//! pair (the baseline without a hop). The router forwards with one of the
//! two datapaths, set up as the daemon sets them up:
//!
//! - netfilter: the daemon's nftables table and sysctls, the kernel forwards;
//! - eBPF: the same, plus the programs in Ethernet mode on both veth ends,
//!   with their connection state pinned so that it outlives each round, and
//!   the links' Ethernet addresses given (so they redirect with
//!   `bpf_redirect`, as the floor does, not `bpf_redirect_neigh`);
//! - floor: the same, but instead of our programs the benchmarks' floor on
//!   the router's WireGuard side, which only writes the Ethernet addresses
//!   and redirects to the tailnet side: what any eBPF hop costs on this
//!   veth path, the cost our policy adds to is measured from.
//!
//! ```text
//!  client 10.1.0.2 --veth-- 10.1.0.1 router 100.64.0.1/10 --veth-- 100.64.0.9 server
//!  client 10.9.0.2 ------------------ veth ------------------------ 10.9.0.9 server
//! ```

use std::{net::Ipv4Addr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use ipnet::IpNet;
use tailguard::{
    config::{plan::SwitchesPlan, settings::AttachMode},
    datapath::{BenchFloor, Datapath, LinkLayer, LoadOptions},
    firewall::{Firewall, FirewallPlan},
    host::sysctls::Sysctls,
};
use tailguard_common::{
    Device,
    config::{FloorHop, LinkAddresses},
    nat::{NAT_MIN_FLOWS, TableSize},
};
use tailguard_tests::netns::{NetNs, run, sysctl, veth};

use crate::load::{self, CpuTime, UdpCounter};

/// How packets cross from client to server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Straight over one veth pair: what the endpoints cost by themselves.
    Direct,
    /// The floor program in place of ours: the hop's fixed eBPF cost.
    Floor,
    Ebpf,
    Netfilter,
}

impl Path {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Floor => "floor",
            Self::Ebpf => "ebpf",
            Self::Netfilter => "netfilter",
        }
    }
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const NODE_TS: Ipv4Addr = tailguard_tests::topology::TS4;
const SERVER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);
const CLIENT_DIRECT: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
const SERVER_DIRECT: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 9);

/// Where the eBPF connection state is pinned between rounds.
const PIN_BASE: &str = "/sys/fs/bpf/tailguard-bench";

pub struct Hop {
    // Fields drop in order: the counter before the namespaces it lives in.
    counter: UdpCounter,
    _soaker: load::Soaker,
    client: NetNs,
    router: NetNs,
    _server: NetNs,
    client_to_router: String,
    router_wg: String,
    router_ts: String,
    client_direct: String,
    macs_via_router: ([u8; 6], [u8; 6]),
    macs_direct: ([u8; 6], [u8; 6]),
    /// What frames leave the router's WireGuard and tailnet sides with.
    wg_link: LinkAddresses,
    ts_link: LinkAddresses,
    /// Loaded once, configured to forward to the tailnet side.
    floor: BenchFloor,
    discard_port: u16,
    /// Unused routes to the tailnet, on top of the router's own.
    extra_routes: usize,
    nat_flows: u32,
    pin: PathBuf,
    runtime: tokio::runtime::Runtime,
    firewall: Firewall,
    sysctls: Option<Sysctls>,
}

impl Hop {
    /// The topology with `extra_routes` more routes to the tailnet side
    /// (in the programs' trie and the router's kernel alike) and a
    /// connection table for `nat_flows` flows.
    pub fn new(extra_routes: usize, nat_flows: u32) -> Result<Self> {
        let client = NetNs::new("bench-client");
        let router = NetNs::new("bench-router");
        let server = NetNs::new("bench-server");
        let (client_to_router, router_wg) = veth(&client, "10.1.0.2/24", &router, "10.1.0.1/24");
        let (router_ts, server_to_router) =
            veth(&router, "100.64.0.1/10", &server, "100.64.0.9/10");
        let (client_direct, server_direct) = veth(&client, "10.9.0.2/24", &server, "10.9.0.9/24");
        run(Command::new("ip").args([
            "-n",
            client.name(),
            "route",
            "add",
            "100.64.0.0/10",
            "via",
            "10.1.0.1",
        ]));
        // The router's receive work on a CPU of its own, the sender's on
        // another: the hop's CPU time can be read off, and a flood
        // measures the hop rather than the sender. The server's side of
        // the hop is received on the hop's CPU too: handing each batch to
        // another CPU would cost an IPI (a VM exit here) per batch, which
        // a faster path pays more often per datagram (smaller batches);
        // that, not its program, would decide the comparison. The
        // server's receive (a drop at its device's ingress) is then in
        // every path's hop CPU alike, and out of the added-cost ratio.
        for (ns, device, cpu) in [
            (&router, &router_wg, load::HOP_CPU),
            (&router, &router_ts, load::HOP_CPU),
            (&client, &client_to_router, load::ENDPOINT_CPU),
            (&client, &client_direct, load::ENDPOINT_CPU),
            (&server, &server_to_router, load::HOP_CPU),
            (&server, &server_direct, load::ENDPOINT_CPU),
        ] {
            load::steer(ns, device, cpu);
        }
        let counter = UdpCounter::install(&server, &[&server_to_router, &server_direct]);
        let discard_port = server.run(load::tcp_discard);

        // The same routes in the router's kernel as in the programs' trie.
        let mut batch = String::new();
        for net in load::unused_routes(extra_routes) {
            batch.push_str(&format!("route add {net} dev {router_ts}\n"));
        }
        ip_batch(&router, &batch);

        // As the daemon runs as a bridge: the user's forwarding switch on,
        // the nftables table and the reserved ports in place (for both
        // datapaths), UDP flows kept as long as the fast path keeps them
        // (conntrack's default forgets unanswered ones after 30 s).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut firewall = Firewall::default();
        let plan = FirewallPlan {
            wg_device: router_wg.clone(),
            ts_device: router_ts.clone(),
            ts_port: 41641,
            snat_to_wg: true,
            ts_v4: Some(NODE_TS),
            ..FirewallPlan::default()
        };
        let sysctls = router.run(|| -> Result<Sysctls> {
            sysctl("net.ipv4.ip_forward", "1");
            sysctl("net.netfilter.nf_conntrack_udp_timeout", "120");
            runtime.block_on(firewall.apply(&plan))?;
            // The daemon's switches, as its plan sets them without policy routing.
            let switches = SwitchesPlan {
                src_valid_mark: false,
            };
            Ok(Sysctls::apply(&switches)?)
        })?;

        let macs_via_router = (
            load::mac(&client, &client_to_router),
            load::mac(&router, &router_wg),
        );
        let macs_direct = (
            load::mac(&client, &client_direct),
            load::mac(&server, &server_direct),
        );
        let wg_link = LinkAddresses::new(macs_via_router.0, macs_via_router.1);
        let ts_link = LinkAddresses::new(
            load::mac(&server, &server_to_router),
            load::mac(&router, &router_ts),
        );
        let mut floor = BenchFloor::load().context("loading the floor program")?;
        floor.set_hop(&FloorHop {
            link: ts_link,
            ifindex: router.run(|| nix::net::if_::if_nametoindex(router_ts.as_str()))?,
        })?;
        let pin = PathBuf::from(PIN_BASE).join(router.name());
        tailguard_tests::ensure_bpffs();
        std::fs::create_dir_all(&pin).with_context(|| format!("creating {}", pin.display()))?;
        Ok(Self {
            counter,
            _soaker: load::Soaker::start(load::HOP_CPU),
            client,
            router,
            _server: server,
            client_to_router,
            router_wg,
            router_ts,
            client_direct,
            macs_via_router,
            macs_direct,
            wg_link,
            ts_link,
            floor,
            discard_port,
            extra_routes,
            nat_flows,
            pin,
            runtime,
            firewall,
            sysctls: Some(sysctls),
        })
    }

    /// The flood's frames for `flows` flows along `path`.
    pub fn frames(&self, path: Path, flows: impl Iterator<Item = load::Flow>) -> Vec<Vec<u8>> {
        match path {
            Path::Direct => load::frames(self.macs_direct, CLIENT_DIRECT, SERVER_DIRECT, flows),
            Path::Floor | Path::Ebpf | Path::Netfilter => {
                load::frames(self.macs_via_router, CLIENT, SERVER, flows)
            }
        }
    }

    fn device(&self, path: Path) -> &str {
        match path {
            Path::Direct => &self.client_direct,
            _ => &self.client_to_router,
        }
    }

    /// Sets the router up for `path` and runs `f`; the programs are
    /// detached afterwards (their connection state stays pinned).
    pub fn with<T>(&self, path: Path, f: impl FnOnce(&Self) -> T) -> Result<T> {
        match path {
            Path::Direct | Path::Netfilter => Ok(f(self)),
            Path::Floor => {
                let (mut program, link) = self.router.run(|| self.attach_floor())?;
                let result = f(self);
                program.detach(link)?;
                Ok(result)
            }
            Path::Ebpf => {
                let datapath = self.router.run(|| self.attach())?;
                let result = f(self);
                self.router
                    .run(|| self.runtime.block_on(datapath.detach()))
                    .map_err(|e| anyhow::anyhow!("detaching: {e:?}"))?;
                Ok(result)
            }
        }
    }

    /// The floor program on the router's WireGuard side, where our ingress
    /// program sits, attached as ours are (`TcAttachType::Ingress` picks
    /// TCX where the kernel has it, as `AttachMode::Auto` does). Through a
    /// handle of its own: `BenchFloor` lends its program only to read.
    fn attach_floor(&self) -> Result<(SchedClassifier, aya::programs::tc::SchedClassifierLinkId)> {
        let loaded = self.floor.program()?;
        let mut program =
            SchedClassifier::from_program_info(loaded.info()?, "tg_bench_floor".into())?;
        let ifindex = nix::net::if_::if_nametoindex(self.router_wg.as_str())?;
        let link = program.attach(ifindex, TcAttachType::Ingress)?;
        Ok((program, link))
    }

    fn attach(&self) -> Result<Datapath> {
        let options = LoadOptions {
            pin_dir: Some(self.pin.clone()),
            nat: self.table_size(),
            ..LoadOptions::uniform(LinkLayer::Ethernet)
        };
        let mut dp = Datapath::load(&options)?;
        for (device, ifname) in [
            (Device::WireGuard, &self.router_wg),
            (Device::Tailscale, &self.router_ts),
        ] {
            self.runtime
                .block_on(dp.attach(device, ifname, AttachMode::Auto))?;
        }
        let index = |name: &str| nix::net::if_::if_nametoindex(name);
        let ifindexes = (
            index(self.router_wg.as_str())?,
            index(self.router_ts.as_str())?,
        );
        let extra = load::unused_routes(self.extra_routes).map(IpNet::V4);
        tailguard_tests::node::veth_router(&mut dp, ifindexes, extra)?;
        load::check_unused_routes(&dp, self.extra_routes)?;
        dp.set_link_addresses(Device::WireGuard, self.wg_link)?;
        dp.set_link_addresses(Device::Tailscale, self.ts_link)?;
        Ok(dp)
    }

    /// Kernel memory of the eBPF connection state and how many entries
    /// it holds; the programs loaded (not attached) to read it.
    pub fn ebpf_nat_memory(&self) -> Result<(u64, usize)> {
        let options = LoadOptions {
            pin_dir: Some(self.pin.clone()),
            nat: self.table_size(),
            ..LoadOptions::uniform(LinkLayer::Ethernet)
        };
        let dp = Datapath::load(&options)?;
        let bytes = dp.map_memory()?.get("NAT4").copied().unwrap_or(0);
        let entries = dp.halves()?.len();
        Ok((bytes, entries))
    }

    /// A table for the flows, all IPv4 from one client (no budget: the
    /// routers' configuration sets none).
    fn table_size(&self) -> TableSize {
        TableSize {
            v4_flows: self.nat_flows.max(NAT_MIN_FLOWS),
            v6_flows: NAT_MIN_FLOWS,
            unreplied_per_source: 0,
        }
    }

    /// One of conntrack's figures as the router's namespace sees it
    /// (`nf_conntrack_count`, `_max`, `_buckets`; 0 if unreadable).
    pub fn conntrack(&self, figure: &str) -> u64 {
        self.router.run(|| {
            std::fs::read_to_string(format!("/proc/sys/net/netfilter/nf_conntrack_{figure}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        })
    }

    /// Sends each frame once: the flows' first packets.
    pub fn open_flows(&self, path: Path, frames: &[Vec<u8>]) {
        load::send_once(&self.client, self.device(path), frames);
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Datagrams per second that reach the server during a flood of
    /// `frames` along `path`, and the hop's CPU ns per datagram that
    /// reached it.
    pub fn udp_rate(&self, path: Path, frames: &[Vec<u8>], duration: Duration) -> (f64, f64) {
        let before = self.counter.count();
        let cpu = CpuTime::now();
        let start = std::time::Instant::now();
        load::flood(&self.client, self.device(path), frames, duration);
        let elapsed = start.elapsed();
        // What is still queued arrives within a moment.
        std::thread::sleep(Duration::from_millis(100));
        let used = CpuTime::now().since(cpu);
        let arrived = (self.counter.count() - before) as f64;
        (arrived / elapsed.as_secs_f64(), used.hop * 1e9 / arrived)
    }

    /// One TCP stream to the server along `path`: Gbit/s, and the hop's
    /// CPU seconds per GB carried.
    pub fn tcp(&self, path: Path, duration: Duration) -> (f64, f64) {
        let target = match path {
            Path::Direct => SERVER_DIRECT,
            _ => SERVER,
        };
        let target = std::net::SocketAddr::new(target.into(), self.discard_port);
        let cpu = CpuTime::now();
        let start = std::time::Instant::now();
        let bytes = self.client.run(|| load::tcp_stream(target, duration));
        let elapsed = start.elapsed().as_secs_f64();
        let used = CpuTime::now().since(cpu);
        let gb = bytes as f64 / 1e9;
        (gb * 8.0 / elapsed, used.hop / gb)
    }
}

impl Drop for Hop {
    fn drop(&mut self) {
        let _ = self.router.run(|| {
            let _ = self.runtime.block_on(self.firewall.remove());
            self.sysctls.take().map(Sysctls::restore)
        });
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

fn ip_batch(ns: &NetNs, batch: &str) {
    if batch.is_empty() {
        return;
    }
    let file = std::env::temp_dir().join(format!("{}.routes", ns.name()));
    std::fs::write(&file, batch).expect("writing the route batch");
    run(Command::new("ip")
        .args(["-n", ns.name(), "-batch"])
        .arg(&file));
    let _ = std::fs::remove_file(file);
}
