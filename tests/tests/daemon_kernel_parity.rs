//! Two corners where the fast path once did otherwise than the kernel path
//! (the differential test's findings F and G), with real traffic once per
//! datapath on README.md's pattern 1: TailGuard a client of a WireGuard
//! server that takes everything (`AllowedIPs = 0.0.0.0/0, ::/0`).
//!
//! - The uplink's own network is the main table's, ahead of the WireGuard
//!   default route (wg-quick's `suppress_prefixlength 0`): traffic for it
//!   from either side is not forwarded, least of all into WireGuard.
//! - A forwarded SYN or SYN-ACK has its MSS clamped to the smaller MTU of
//!   the way in and the way out (nft's `rt mtu`).

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use etherparse::{Ipv4HeaderSlice, TcpHeaderSlice, TcpOptionElement};
use tailguard_tests::{
    bridge::Bridge,
    daemon::{DATAPATHS, DaemonUnderTest, counted, status},
    netns::{NetNs, run},
    topology::*,
    traffic::*,
};

/// Pattern 1, with both peers on 1500-byte links so that their own MSS is
/// above what the node's devices carry.
fn pattern_1(purpose: &str, datapath: &str) -> (Bridge, DaemonUnderTest) {
    let b = Bridge::with_ethernet_peers(purpose, "0.0.0.0/0, ::/0");
    let node = b.bed.ours.run(|| {
        DaemonUnderTest::builder(&b)
            .datapath(datapath)
            .start_healthy()
    });
    (b, node)
}

/// A static route out of the uplink (documentation prefixes), and the
/// WireGuard server's stand-in for a host behind it.
const STATIC_V4: &str = "198.51.100.0/24";
const STATIC_V6: &str = "2001:db8:51::/64";
const STATIC_HOST_V4: &str = "198.51.100.7/32";
const STATIC_HOST_V6: &str = "2001:db8:51::7/128";

/// The device the calling thread's namespace reaches `addr` by.
fn device_towards(addr: &str) -> String {
    let route = run(Command::new("ip").args(["-o", "route", "get", addr]));
    let mut words = route.split_whitespace();
    words
        .find(|w| *w == "dev")
        .and_then(|_| words.next())
        .unwrap_or_else(|| panic!("no device in {route}"))
        .to_string()
}

/// The WireGuard server also takes the second peer's IPv6 address from the
/// node (the bridge's server knows only its IPv4 one).
fn server_takes_the_second_peers_ipv6(b: &Bridge) {
    let server_device = b.bed.peer.name.clone();
    let node_key = b.bed.keys.public.clone();
    b.bed.theirs.run(|| {
        run(Command::new("wg").args([
            "set",
            &server_device,
            "peer",
            &node_key,
            "allowed-ips",
            "10.66.0.2/32,10.66.0.3/32,fd66::2/128,fd66::3/128,100.64.0.0/10,\
             fd7a:115c:a1e0::/48,10.201.0.0/24",
        ]))
    });
}

#[test]
fn uplink_traffic_is_not_sent_into_wireguard() {
    for datapath in DATAPATHS {
        let (b, mut node) = pattern_1(&format!("upl-{datapath}"), datapath);
        // The WireGuard server answers for the uplink's host too: whatever
        // the node wrongly sends into WireGuard reaches a listener.
        b.bed.theirs.run(|| {
            run(Command::new("ip").args(["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"]))
        });
        // The second peer sends everything to the node, the uplink too.
        b.client_routes_everything_to_tailguard();
        let server = b.bed.theirs.run(|| WhoAmI::listen(false));
        let uplink = b.internet.run(|| WhoAmI::listen(false));
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());

        // The node itself reaches the uplink's host: the route is there.
        let seen = b.bed.ours.run(|| who_am_i(INTERNET, uplink.port));
        assert_eq!(seen.as_deref(), Ok(UPLINK), "{}", ctx("node -> uplink"));
        let from_wg = b.client.run(|| tcp_connects(INTERNET, server.port));
        assert!(
            from_wg.is_err(),
            "{}",
            ctx(&format!("wg -> uplink: {from_wg:?}"))
        );
        let from_ts = b.tailnet.run(|| tcp_connects(INTERNET, server.port));
        assert!(
            from_ts.is_err(),
            "{}",
            ctx(&format!("ts -> uplink: {from_ts:?}"))
        );
        assert_eq!(server.last_seen(), None, "{}", ctx("the server heard it"));

        b.bed.ours.run(|| {
            let s = status();
            assert_eq!(s.datapath, datapath, "{s:#?}");
            if datapath == "ebpf" {
                // The fast path dropped them itself, as the forward policy.
                node.wait_for("both drops counted", |_| {
                    counted("wireguard", "drop:not-forwarded") > 0
                        && counted("tailscale", "drop:not-forwarded") > 0
                });
                let routes = s.forwarding.as_ref().map(|f| &f.routes);
                let egress = |net: &str| routes.and_then(|r| r.get(net)).map(String::as_str);
                assert_eq!(egress(INTERNET_NET), Some("kernel"), "{s:#?}");
                assert_eq!(egress("0.0.0.0/0"), Some("wireguard"), "{s:#?}");
            }
        });

        // Static routes out of the uplink, added while TailGuard runs: the
        // main table's too once the route change is seen, both families.
        let uplink_device = b.bed.ours.run(|| device_towards(INTERNET));
        b.bed.ours.run(|| {
            run(Command::new("ip").args(["route", "add", STATIC_V4, "via", INTERNET]));
            run(Command::new("ip").args(["-6", "route", "add", STATIC_V6, "dev", &uplink_device]));
        });
        b.bed.theirs.run(|| {
            for host in [STATIC_HOST_V4, STATIC_HOST_V6] {
                run(Command::new("ip").args(["addr", "add", host, "dev", "lo"]));
            }
        });
        server_takes_the_second_peers_ipv6(&b);
        let client_device = b.client.device_starting_with("wgc");
        b.client.run(|| {
            let everything = format!("{WG_NET},{WG_NET_V6},{TAILNET_BOTH},0.0.0.0/0,::/0");
            let key = &b.bed.keys.public;
            run(Command::new("wg").args([
                "set",
                &client_device,
                "peer",
                key,
                "allowed-ips",
                &everything,
            ]));
            run(Command::new("ip").args(["-6", "route", "add", "default", "dev", &client_device]));
        });
        let server_v6 = b.bed.theirs.run(|| WhoAmI::listen(true));
        if datapath == "ebpf" {
            b.bed.ours.run(|| {
                node.wait_for("the static routes in the route map", |_| {
                    let routes = status().forwarding.unwrap_or_default().routes;
                    let kernel = |net: &str| routes.get(net).is_some_and(|e| e == "kernel");
                    kernel(STATIC_V4) && kernel(STATIC_V6)
                })
            });
        }
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());
        for (host, port) in [
            (STATIC_HOST_V4, server.port),
            (STATIC_HOST_V6, server_v6.port),
        ] {
            let addr = host.split('/').next().unwrap();
            let from_wg = b.client.run(|| tcp_connects(addr, port));
            assert!(
                from_wg.is_err(),
                "{}",
                ctx(&format!("wg -> static route {addr}: {from_wg:?}"))
            );
        }
        assert_eq!(server.last_seen(), None, "{}", ctx("the server heard it"));
        assert_eq!(
            server_v6.last_seen(),
            None,
            "{}",
            ctx("the server heard it")
        );
        b.bed.ours.run(|| node.stop());
    }
}

/// A raw TCP socket: every TCP segment its namespace receives, as it
/// arrives (IPv4 with its header, IPv6 without).
struct Tap {
    fd: OwnedFd,
    ipv6: bool,
}

impl Tap {
    fn open(ipv6: bool) -> Self {
        let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: a plain socket(2) call; the descriptor is owned below.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: a plain setsockopt with a timeval.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
        Self { fd, ipv6 }
    }

    /// The MSS option of the first SYN (`syn_ack`: SYN-ACK) received for
    /// `port` (its destination port; `syn_ack`: its source port), waiting up
    /// to 5 s. `Some(None)`: one came without the option.
    fn mss(&self, port: u16, syn_ack: bool) -> Option<Option<u16>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: `buf` is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            let segment = if self.ipv6 {
                &buf[..n]
            } else {
                let Ok(ip) = Ipv4HeaderSlice::from_slice(&buf[..n]) else {
                    continue;
                };
                &buf[ip.slice().len()..n]
            };
            let Ok(tcp) = TcpHeaderSlice::from_slice(segment) else {
                continue;
            };
            let ours = if syn_ack {
                tcp.source_port() == port
            } else {
                tcp.destination_port() == port
            };
            if !ours || !tcp.syn() || tcp.ack() != syn_ack {
                continue;
            }
            return Some(tcp.options_iterator().find_map(|o| match o {
                Ok(TcpOptionElement::MaximumSegmentSize(mss)) => Some(mss),
                _ => None,
            }));
        }
        None
    }
}

/// Connects from `from` to `addr` (a listener in `to`): the MSS of the SYN
/// as `to` received it, and of the SYN-ACK as `from` received it.
fn handshake_mss(from: &NetNs, to: &NetNs, addr: &str) -> Result<(u16, u16), String> {
    let target: IpAddr = addr.parse().unwrap();
    let ipv6 = target.is_ipv6();
    let (listener, at_receiver) = to.run(|| {
        let any = if ipv6 { "[::]:0" } else { "0.0.0.0:0" };
        (TcpListener::bind(any).unwrap(), Tap::open(ipv6))
    });
    let port = listener.local_addr().unwrap().port();
    let (at_sender, connected) = from.run(|| {
        let tap = Tap::open(ipv6);
        let timeout = Duration::from_secs(3);
        (
            tap,
            TcpStream::connect_timeout(&SocketAddr::new(target, port), timeout),
        )
    });
    let _stream = connected.map_err(|e| format!("connecting to {addr}:{port}: {e}"))?;
    let syn = at_receiver.mss(port, false).ok_or("no SYN received")?;
    let syn_ack = at_sender.mss(port, true).ok_or("no SYN-ACK received")?;
    Ok((
        syn.ok_or("a SYN without MSS")?,
        syn_ack.ok_or("a SYN-ACK without MSS")?,
    ))
}

#[test]
fn syn_mss_is_clamped_to_the_smaller_mtu_of_both_ways() {
    // The node's devices: 1420 WireGuard, 1280 tailnet; the peers' links
    // 1500 (their own MSS 1460/1440) but the WireGuard server's 1420.
    let mut seen_by_datapath = Vec::new();
    for datapath in DATAPATHS {
        let (b, mut node) = pattern_1(&format!("mss-{datapath}"), datapath);
        server_takes_the_second_peers_ipv6(&b);
        let cases = [
            // (what, from, to, address, SYN MSS, SYN-ACK MSS as received)
            (
                "wg -> ts, IPv4",
                &b.bed.theirs,
                &b.tailnet,
                TAILNET_PEER,
                1240,
                1240,
            ),
            (
                "wg -> ts, IPv6",
                &b.bed.theirs,
                &b.tailnet,
                TAILNET_PEER_V6,
                1220,
                1220,
            ),
            (
                "ts -> wg, IPv4",
                &b.tailnet,
                &b.bed.theirs,
                WG_SERVER,
                1240,
                1240,
            ),
            (
                "ts -> wg, IPv6",
                &b.tailnet,
                &b.bed.theirs,
                WG_SERVER_V6,
                1220,
                1220,
            ),
            (
                "wg -> wg, IPv4",
                &b.client,
                &b.bed.theirs,
                WG_SERVER,
                1380,
                1380,
            ),
            (
                "wg -> wg, IPv6",
                &b.client,
                &b.bed.theirs,
                WG_SERVER_V6,
                1360,
                1360,
            ),
        ];
        let mut seen = Vec::new();
        for (what, from, to, addr, syn, syn_ack) in cases {
            let got = handshake_mss(from, to, addr);
            assert_eq!(
                got,
                Ok((syn, syn_ack)),
                "{datapath}: {what}: (SYN, SYN-ACK) MSS as received\n{}",
                node.log()
            );
            seen.push((what, got));
        }
        b.bed.ours.run(|| {
            assert_eq!(status().datapath, datapath);
            if datapath == "ebpf" {
                node.wait_for("the fast path carried them", |_| {
                    counted("wireguard", "redirected") > 0 && counted("tailscale", "redirected") > 0
                });
            }
            node.stop();
        });
        seen_by_datapath.push(seen);
    }
    assert_eq!(
        seen_by_datapath[0], seen_by_datapath[1],
        "ebpf vs netfilter"
    );
}
