//! Fragmented UDP through the bridge, once per datapath: a datagram larger
//! than the path, fragmented by its sender, arrives whole and intact, from
//! the same translated address and port as the flow's unfragmented
//! datagrams, both families, both directions (masqueraded wg -> ts,
//! source-NATed ts -> wg), and so does the fragmented answer.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use tailguard_tests::{
    bridge::Bridge,
    daemon::{DATAPATHS, DaemonUnderTest, counted},
    netns::{NetNs, set_mtu},
    topology::*,
    traffic::*,
};

/// Datagrams this long are fragmented by their senders (paths of 1280).
const BIG: usize = 3000;

fn socket() -> UdpSocket {
    udp_socket(Duration::from_secs(3))
}

/// The next datagram on `socket`, and where it came from (IPv4 as IPv4).
fn receive(socket: &UdpSocket, what: &str) -> (Vec<u8>, SocketAddr) {
    receive_datagram(socket).unwrap_or_else(|e| panic!("{what}: nothing arrived: {e}"))
}

/// A payload no two positions of which a mix-up of fragments would keep.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 8) as u8 ^ seed)
        .collect()
}

#[test]
fn fragmented_udp_keeps_its_flows_translation() {
    for datapath in DATAPATHS {
        let b = Bridge::new(&format!("frag-{datapath}"));
        // Both senders fragment at 1280 bytes, so that every fragment fits
        // both links (one too big for the tailnet is the path-MTU case).
        b.bed.theirs.run(|| set_mtu(&b.bed.peer.name, 1280));
        b.tailnet.run(|| set_mtu(&b.tailnet_peer.name, 1280));
        let mut node = b.bed.ours.run(|| {
            DaemonUnderTest::builder(&b)
                .datapath(datapath)
                .start_healthy()
        });
        // (sender, receiver's address, the node's address the receiver
        // must see)
        let cases: [(&NetNs, &NetNs, &str, &str); 4] = [
            (&b.bed.theirs, &b.tailnet, TAILNET_PEER, NODE_TS),
            (&b.bed.theirs, &b.tailnet, TAILNET_PEER_V6, NODE_TS_V6),
            (&b.tailnet, &b.bed.theirs, WG_SERVER, NODE_WG),
            (&b.tailnet, &b.bed.theirs, WG_SERVER_V6, NODE_WG_V6),
        ];
        for (i, (from, to, receiver, translated)) in cases.into_iter().enumerate() {
            let what = |s: &str| format!("{datapath}, to {receiver}: {s}\n{}", node.log());
            let sender = from.run(socket);
            let listener = to.run(socket);
            let target = SocketAddr::new(
                receiver.parse().unwrap(),
                listener.local_addr().unwrap().port(),
            );
            let translated: IpAddr = translated.parse().unwrap();

            sender.send_to(b"a whole datagram", target).unwrap();
            let (data, seen) = receive(&listener, &what("the whole datagram"));
            assert_eq!(data, b"a whole datagram", "{}", what("whole"));
            assert_eq!(seen.ip(), translated, "{}", what("whole: the source"));

            let big = pattern(BIG, i as u8);
            sender.send_to(&big, target).unwrap();
            let (data, seen_big) = receive(&listener, &what("the fragmented datagram"));
            assert!(data == big, "{}", what("the fragmented datagram's bytes"));
            assert_eq!(
                seen_big,
                seen,
                "{}",
                what("fragmented: the same translated address and port")
            );

            let answer = pattern(BIG, 0x80 | i as u8);
            listener.send_to(&answer, seen).unwrap();
            let (data, replier) = receive(&sender, &what("the fragmented answer"));
            assert!(data == answer, "{}", what("the answer's bytes"));
            assert_eq!(replier, target, "{}", what("the answer's source"));

            sender.send_to(b"after", target).unwrap();
            let (_, seen_after) = receive(&listener, &what("the datagram after"));
            assert_eq!(seen_after, seen, "{}", what("after: the same port"));
        }
        b.bed.ours.run(|| {
            if datapath == "ebpf" {
                // Each device took in 6 fragments and 4 whole datagrams
                // of the flows, and 6 fragments of the answers. (The status
                // page's counters are refreshed every few seconds.)
                node.wait_for("the fast path's counters", |_| {
                    counted("wireguard", "redirected") >= 16
                        && counted("tailscale", "redirected") >= 16
                });
                assert_eq!(
                    counted("wireguard", "drop:fragment-unknown")
                        + counted("tailscale", "drop:fragment-unknown"),
                    0,
                    "every fragment's first was seen first"
                );
            }
            node.stop();
        });
    }
}
