//! The UDP flows the kernel's conntrack tracks, read when the fast path
//! takes over a device, so that those flows stay the kernel's (see
//! `tailguard-ebpf/src/kernel_flows.rs`): the programs mark them as such in
//! the `KERNEL_FLOWS` map from then on, this gives them the flows from
//! before.

use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use tailguard_common::{Device, nat::FlowKey, wire::IPPROTO_UDP};

use crate::datapath::{Datapath, Routes};

/// What failed while handing the kernel's flows to the fast path.
#[derive(Debug, thiserror::Error)]
pub enum KernelFlowsError {
    /// A step on the netfilter netlink socket; `step` says which.
    #[error("{step}")]
    Socket {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("a conntrack message")]
    Decode(#[source] netlink_packet_core::DecodeError),
    #[error("the conntrack table: {0}")]
    Refused(netlink_packet_core::ErrorMessage),
    #[error(transparent)]
    Datapath(#[from] super::Error),
}

/// `step` failed on the netfilter socket with `source`.
fn socket_step(step: &'static str) -> impl FnOnce(std::io::Error) -> KernelFlowsError {
    move |source| KernelFlowsError::Socket { step, source }
}

/// One direction of a flow, as its packets carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Direction {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl Direction {
    /// The key of this direction's packets arriving on `device`.
    pub fn key(&self, device: Device) -> FlowKey {
        let mut key = FlowKey {
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: IPPROTO_UDP,
            ingress: device as u8,
            family: if self.src.is_ipv6() { 6 } else { 4 },
            ..FlowKey::default()
        };
        let place = |out: &mut [u8; 16], addr: IpAddr| match addr {
            IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => *out = a.octets(),
        };
        place(&mut key.src, self.src);
        place(&mut key.dst, self.dst);
        key
    }
}

/// Both directions (the original and the reply, NAT included) of every UDP
/// flow in the calling thread's network namespace's conntrack table.
pub fn udp_flows() -> Result<Vec<[Direction; 2]>, KernelFlowsError> {
    let mut socket =
        Socket::new(NETLINK_NETFILTER).map_err(socket_step("a netfilter netlink socket"))?;
    socket
        .bind_auto()
        .map_err(socket_step("binding the netfilter socket"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(socket_step("connecting the netfilter socket"))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Get(vec![]),
        )),
    );
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);
    socket
        .send(&buffer, 0)
        .map_err(socket_step("asking for the conntrack table"))?;

    let mut flows = Vec::new();
    let mut received = vec![0u8; 1 << 16];
    loop {
        let size = socket
            .recv(&mut &mut received[..], 0)
            .map_err(socket_step("reading the conntrack table"))?;
        let mut offset = 0;
        while offset < size {
            let message = <NetlinkMessage<NetfilterMessage>>::deserialize(&received[offset..size])
                .map_err(KernelFlowsError::Decode)?;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(flows),
                NetlinkPayload::Error(e) => return Err(KernelFlowsError::Refused(e)),
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner:
                        NetfilterMessageInner::Conntrack(
                            ConntrackMessage::New(attributes) | ConntrackMessage::Get(attributes),
                        ),
                    ..
                }) => flows.extend(udp_flow(&attributes)),
                _ => {}
            }
            let length = message.header.length as usize;
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// The flow's two directions, if it is UDP with both fully given.
fn udp_flow(attributes: &[ConntrackAttribute]) -> Option<[Direction; 2]> {
    let mut original = None;
    let mut reply = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(t) => original = direction(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = direction(t),
            _ => {}
        }
    }
    Some([original?, reply?])
}

fn direction(tuple: &[Tuple]) -> Option<Direction> {
    let (mut src, mut dst, mut sport, mut dport, mut udp) = (None, None, None, None, false);
    for part in tuple {
        match part {
            Tuple::Ip(ip) => {
                for field in ip {
                    match field {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(proto) => {
                for field in proto {
                    match field {
                        ProtoTuple::Protocol(p) => udp = *p == Protocol::Udp,
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !udp {
        return None;
    }
    Some(Direction {
        src: src?,
        dst: dst?,
        sport: sport?,
        dport: dport?,
    })
}

/// The device packets from `addr` arrive on, by the routes back to it (as
/// WireGuard's allowed IPs and Tailscale's table 52 hold them), if any.
fn arrives_on(routes: &Routes, addr: IpAddr) -> Option<Device> {
    routes
        .iter()
        .filter(|(net, _)| net.contains(&addr))
        .max_by_key(|(net, _)| net.prefix_len())?
        .1
        .device()
}

/// The keys saying the flows' packets are the kernel's, in either
/// direction, for the device each direction's packets arrive on (by
/// `routes`; a direction from elsewhere, such as WireGuard's own datagrams
/// on the uplink, needs none): at most `limit` of them.
pub fn kernel_keys<'a>(
    flows: &'a [[Direction; 2]],
    routes: &'a Routes,
    limit: usize,
) -> impl Iterator<Item = FlowKey> + 'a {
    flows
        .iter()
        .flatten()
        .filter_map(|d| Some(d.key(arrives_on(routes, d.src)?)))
        .take(limit)
}

/// Gives the fast path the UDP flows the kernel tracks now (at most
/// `limit` of them): their packets stay the kernel's. How many marks were
/// written.
pub fn keep_for_kernel(
    datapath: &mut Datapath,
    routes: &Routes,
    limit: usize,
) -> Result<usize, KernelFlowsError> {
    let flows = udp_flows()?;
    let now = super::sweeper::now();
    let mut marks = datapath.kernel_flows()?;
    let mut written = 0;
    for key in kernel_keys(&flows, routes, limit) {
        if marks.insert(&key, &now, 0).is_ok() {
            written += 1;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use tailguard_common::Route;

    use super::*;

    fn d(src: &str, sport: u16, dst: &str, dport: u16) -> Direction {
        Direction {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
        }
    }

    #[test]
    fn keys_carry_ports_in_network_order_and_v4_in_the_first_bytes() {
        let key = d("10.66.0.3", 5000, "100.64.0.2", 53).key(Device::WireGuard);
        assert_eq!(key.src[..4], [10, 66, 0, 3]);
        assert_eq!(key.src[4..], [0; 12]);
        assert_eq!(key.sport.to_ne_bytes(), 5000u16.to_be_bytes());
        assert_eq!(
            (key.proto, key.ingress, key.family),
            (17, Device::WireGuard as u8, 4)
        );
        let v6 = d("fd66::3", 1, "fd7a:115c:a1e0::2", 2).key(Device::Tailscale);
        assert_eq!(v6.family, 6);
        assert_eq!(
            v6.dst,
            "fd7a:115c:a1e0::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }

    #[test]
    fn each_direction_keyed_for_the_device_it_arrives_on() {
        let mut routes = Routes::new();
        routes.insert("10.66.0.0/24".parse().unwrap(), Route::WIREGUARD);
        routes.insert("100.64.0.0/10".parse().unwrap(), Route::TAILSCALE);
        routes.insert("100.64.9.0/24".parse().unwrap(), Route::WIREGUARD);
        let masqueraded = [
            d("10.66.0.3", 5000, "100.64.0.2", 53),
            d("100.64.0.2", 53, "100.64.0.1", 5000),
        ];
        let underlay = [
            d("10.202.0.2", 51821, "10.202.0.1", 51821),
            d("10.202.0.1", 51821, "10.202.0.2", 51821),
        ];
        let subnet = [
            d("100.64.9.7", 1, "100.64.0.2", 2),
            d("100.64.0.2", 2, "100.64.0.1", 1),
        ];
        let flows = [underlay, masqueraded, subnet];
        let keys: Vec<_> = kernel_keys(&flows, &routes, 100).collect();
        assert_eq!(
            keys,
            [
                masqueraded[0].key(Device::WireGuard),
                masqueraded[1].key(Device::Tailscale),
                subnet[0].key(Device::WireGuard),
                subnet[1].key(Device::Tailscale),
            ],
            "the underlay arrives on neither; the longest prefix decides"
        );
        assert_eq!(kernel_keys(&flows, &routes, 3).count(), 3);
    }
}
