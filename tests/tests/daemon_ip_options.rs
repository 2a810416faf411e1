//! IPv4 options and IPv6 UDP without a checksum through the bridge, once
//! per datapath. A datagram with options that starts a flow is the
//! kernel's, on both datapaths alike; one with options inside a flow the
//! fast path owns is dropped there (the kernel has no connection for it and
//! would masquerade it to another port), while the netfilter datapath
//! forwards it in its connection: the one difference on purpose (README,
//! "How packets go"). IPv6 UDP with checksum 0 reaches no one on either.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use tailguard_common::PolicyRule;
use tailguard_tests::{
    bridge::Bridge,
    daemon::{DATAPATHS, DaemonUnderTest, counted},
    topology::*,
    traffic::*,
};

fn socket() -> UdpSocket {
    udp_socket(Duration::from_secs(2))
}

fn setsockopt(socket: &UdpSocket, level: i32, name: i32, value: &[u8]) {
    // SAFETY: `value` is a valid buffer of the given length.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as u32,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

/// A NOP and record route with room for one address (RFC 791).
const RECORD_ROUTE: [u8; 8] = [1, 7, 7, 4, 0, 0, 0, 0];
/// `UDP_NO_CHECK6_TX` (linux/udp.h): send IPv6 UDP with checksum 0.
const UDP_NO_CHECK6_TX: i32 = 101;

/// The next datagram's text and source, if one comes within 2 s.
fn receive(socket: &UdpSocket) -> Option<(String, SocketAddr)> {
    let (bytes, from) = receive_datagram(socket).ok()?;
    Some((String::from_utf8_lossy(&bytes).into_owned(), from))
}

#[test]
fn ipv4_options_and_udp6_without_checksum() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("opts-{datapath}"));
        let mut node = b.bed.ours.run(|| {
            DaemonUnderTest::builder(&b)
                .datapath(datapath)
                .start_healthy()
        });
        let ctx = |what: &str| format!("{datapath}: {what}\n{}", node.log());
        let listener = b.tailnet.run(socket);
        let port = listener.local_addr().unwrap().port();
        let peer4 = SocketAddr::new(TAILNET_PEER.parse().unwrap(), port);
        let peer6 = SocketAddr::new(TAILNET_PEER_V6.parse().unwrap(), port);

        // A flow the fast path owns (on the eBPF datapath), then a datagram
        // of it with options.
        let sender = b.bed.theirs.run(socket);
        sender.send_to(b"first", peer4).unwrap();
        let (_, seen) = receive(&listener).unwrap_or_else(|| panic!("{}", ctx("first")));
        assert_eq!(seen.ip().to_string(), NODE_TS, "{}", ctx("first"));
        setsockopt(&sender, libc::IPPROTO_IP, libc::IP_OPTIONS, &RECORD_ROUTE);
        sender.send_to(b"with options", peer4).unwrap();
        let with_options = receive(&listener);
        if datapath == "ebpf" {
            assert_eq!(
                with_options,
                None,
                "{}",
                ctx("options in our flow: dropped")
            );
        } else {
            assert_eq!(
                with_options,
                Some(("with options".into(), seen)),
                "{}",
                ctx("options in the kernel's connection")
            );
        }
        setsockopt(&sender, libc::IPPROTO_IP, libc::IP_OPTIONS, &[]);
        sender.send_to(b"after", peer4).unwrap();
        assert_eq!(
            receive(&listener),
            Some(("after".into(), seen)),
            "{}",
            ctx("the flow goes on, from its port")
        );

        // A new flow with options: the kernel's, masqueraded by it.
        let fresh = b.bed.theirs.run(socket);
        setsockopt(&fresh, libc::IPPROTO_IP, libc::IP_OPTIONS, &RECORD_ROUTE);
        fresh.send_to(b"new with options", peer4).unwrap();
        let (text, from) = receive(&listener).unwrap_or_else(|| panic!("{}", ctx("new")));
        assert_eq!(text, "new with options", "{}", ctx("new"));
        assert_eq!(from.ip().to_string(), NODE_TS, "{}", ctx("new"));
        assert!(
            from.port() < 61000,
            "{}",
            ctx("the kernel's masquerade port")
        );

        // IPv6 UDP with checksum 0 reaches no one; with one it does.
        let bare = b.bed.theirs.run(socket);
        setsockopt(&bare, libc::SOL_UDP, UDP_NO_CHECK6_TX, &1i32.to_ne_bytes());
        bare.send_to(b"no checksum", peer6).unwrap();
        assert_eq!(receive(&listener), None, "{}", ctx("checksum 0"));
        setsockopt(&bare, libc::SOL_UDP, UDP_NO_CHECK6_TX, &0i32.to_ne_bytes());
        bare.send_to(b"checksum", peer6).unwrap();
        let (text, _) = receive(&listener).unwrap_or_else(|| panic!("{}", ctx("checksummed")));
        assert_eq!(text, "checksum", "{}", ctx("checksummed"));

        b.bed.ours.run(|| {
            if datapath == "ebpf" {
                node.wait_for("the counted fates", |_| {
                    counted("wireguard", "drop:options-of-our-flow") == 1
                        && counted("wireguard", "kernel:ip-options") >= 1
                        && counted("wireguard", "drop:udp6-zero-checksum") == 1
                });
            } else {
                // The nftables twin drops it on the way, as the fast path does.
                let chain = tailguard_tests::netns::run(std::process::Command::new("nft").args([
                    "list",
                    "chain",
                    "inet",
                    "tailguard",
                    "forward",
                ]));
                let rule = chain
                    .lines()
                    .find(|l| l.contains(PolicyRule::ForwardUdp6ZeroChecksum.name()))
                    .unwrap_or_else(|| panic!("no checksum-0 rule:\n{chain}"));
                assert!(rule.contains("counter packets 1 "), "{rule}");
            }
            node.stop();
        });
    }
}
