//! GSO packets and packets whose payload lies outside the linear head (as
//! wireguard-go and tailscaled hand them to the kernel through their TUN
//! devices) are counted by their family, never as malformed: their IP
//! length covers what `skb->len` counts, not what the programs can point
//! into.

use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use tailguard::{
    config::settings::AttachMode,
    datapath::{Counters, Datapath, LoadOptions},
};
use tailguard_common::{Counter, Device, Direction, PacketClass};
use tailguard_tests::{netns::NetNs, require_root, topology::*, tun::Tun};

/// `struct virtio_net_hdr` (little-endian, as on every host the tests run).
fn vnet_hdr(
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
) -> Vec<u8> {
    // VIRTIO_NET_HDR_F_NEEDS_CSUM for the GSO ones: the kernel insists.
    let flags = u8::from(gso_type != 0);
    let mut h = vec![flags, gso_type];
    for field in [hdr_len, gso_size, csum_start, csum_offset] {
        h.extend_from_slice(&field.to_le_bytes());
    }
    h
}

const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

fn tcp(ipv6: bool, payload: usize) -> Vec<u8> {
    let ip = if ipv6 {
        PacketBuilder::ipv6(
            CRAFTED_WG_CLIENT_V6
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            CRAFTED_TAILNET_PEER_V6
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            64,
        )
    } else {
        PacketBuilder::ipv4([10, 66, 0, 7], [100, 64, 0, 9], 64)
    };
    let mut out = Vec::new();
    ip.tcp(40000, 443, 1, 64240)
        .ack(1)
        .write(&mut out, &vec![0x5a; payload])
        .unwrap();
    out
}

#[test]
fn gso_and_paged_packets_are_not_malformed() {
    require_root();
    let ns = NetNs::new("gso");
    ns.run(|| {
        let mut wg = Tun::create_with_vnet_hdr("tggso0");
        let _ts = Tun::create("tggso1");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut datapath = Datapath::load(&LoadOptions::default()).expect("loading programs");
        for (device, name) in [(Device::WireGuard, "tggso0"), (Device::Tailscale, "tggso1")] {
            runtime
                .block_on(datapath.attach(device, name, AttachMode::Auto))
                .expect("attach");
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(datapath.counters().unwrap(), Counters::zero());

        // (what, packet as the kernel gets it, its family)
        let cases = [
            (
                "TCP/IPv4 GSO, 20000 bytes",
                [vnet_hdr(GSO_TCPV4, 40, 1400, 20, 16), tcp(false, 19960)].concat(),
                PacketClass::Ipv4,
            ),
            (
                "TCP/IPv6 GSO, 20000 bytes",
                [vnet_hdr(GSO_TCPV6, 60, 1380, 40, 16), tcp(true, 19940)].concat(),
                PacketClass::Ipv6,
            ),
            (
                "IPv4 written with a virtio_net_hdr, not GSO",
                [vnet_hdr(GSO_NONE, 40, 0, 0, 0), tcp(false, 1360)].concat(),
                PacketClass::Ipv4,
            ),
        ];
        let mut expected = [Counter::default(); 2];
        for (what, written, class) in &cases {
            eprintln!("case: {what}");
            wg.inject(written);
            let slot = usize::from(*class == PacketClass::Ipv6);
            expected[slot] = expected[slot].add(Counter {
                packets: 1,
                bytes: (written.len() - 10) as u64,
            });
        }
        let get = |c: &Counters, class| c.get(Device::WireGuard, Direction::Ingress, class);
        let deadline = Instant::now() + Duration::from_secs(5);
        let counters = loop {
            let c = datapath.counters().unwrap();
            let seen = get(&c, PacketClass::Ipv4).packets
                + get(&c, PacketClass::Ipv6).packets
                + get(&c, PacketClass::Malformed).packets;
            if seen >= cases.len() as u64 || Instant::now() > deadline {
                break c;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            get(&counters, PacketClass::Malformed),
            Counter::default(),
            "malformed"
        );
        assert_eq!(get(&counters, PacketClass::Ipv4), expected[0], "IPv4");
        assert_eq!(get(&counters, PacketClass::Ipv6), expected[1], "IPv6");
        runtime.block_on(datapath.detach()).expect("detach");
    });
}
