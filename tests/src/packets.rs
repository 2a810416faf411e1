//! Crafted packets, built with etherparse (not with our own code), so their
//! headers and checksums are an independent reference.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{PacketBuilder, PacketBuilderStep, UdpHeader};

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

/// An IPv4 UDP packet (no link-layer header).
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(sport, dport);
    write(builder, payload)
}

/// An IPv6 UDP packet (no link-layer header).
pub fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).udp(sport, dport);
    write(builder, payload)
}

/// `packet` behind an Ethernet header with the given EtherType.
pub fn ethernet(ethertype: u16, packet: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + packet.len());
    frame.extend_from_slice(&MAC_B);
    frame.extend_from_slice(&MAC_A);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(packet);
    frame
}

/// An ARP request frame: not IP.
pub fn arp_request() -> Vec<u8> {
    let mut arp = vec![0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[10, 0, 0, 1]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 0, 0, 2]);
    ethernet(0x0806, &arp)
}

fn write(builder: PacketBuilderStep<UdpHeader>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, payload)
        .expect("writing to a Vec cannot fail");
    out
}
