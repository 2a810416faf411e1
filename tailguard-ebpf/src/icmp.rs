//! ICMP errors about flows the fast path owns (destination unreachable,
//! fragmentation needed / packet too big, time exceeded, parameter problem):
//! the packet they quote is one we translated, so the error is translated
//! back, quote and all, and sent to whoever sent the original. That is what
//! makes path-MTU discovery work across the 1420/1280-byte MTUs.

use aya_ebpf::programs::TcContext;
use tailguard_common::{
    Config, Device, Outcome,
    classify::{QUOTED_L4, quoted_payload, quoted_udp_len},
    fragment::Fragment,
    nat::FlowKey,
    wire::{
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, icmp, icmpv6, ipv4, ipv6, tcp, udp,
    },
};

use crate::{
    nat,
    packet::Packet,
    parse::read,
    rewrite::{self, Failed},
};

/// The outer packet's fields that change, and where the quote starts.
#[repr(C, align(8))]
pub struct IcmpError {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub inner_src: [u8; 16],
    pub inner_dst: [u8; 16],
    pub ipv6: bool,
    pub l3: usize,
    /// Where the ICMP header starts (its checksum is at +2).
    pub l4: usize,
    pub ttl: u8,
    pub len: u32,
    /// The quoted packet: its IP header, transport header, protocol.
    pub inner_l3: usize,
    pub inner_l4: usize,
    pub inner_proto: u8,
    /// Ports, or the echo identifier in `inner_sport` (and 0).
    pub inner_sport: u16,
    pub inner_dport: u16,
    /// Where the quoted transport checksum sits, when the quote holds it
    /// and it is in use (a zero UDP checksum means none); 0 otherwise.
    pub inner_csum: usize,
    /// Where `Packet`'s reader puts the headers it reads: the error's own
    /// IP header, then the quoted packet's, at its offset.
    headers: Packet,
}

fn is_error(ipv6: bool, icmp_type: u8) -> bool {
    if ipv6 {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        (icmpv6::DEST_UNREACHABLE..=icmpv6::PARAMETER_PROBLEM).contains(&icmp_type)
    } else {
        icmp_type == icmp::DEST_UNREACHABLE
            || icmp_type == icmp::TIME_EXCEEDED
            || icmp_type == icmp::PARAMETER_PROBLEM
    }
}

impl IcmpError {
    /// Reads an ICMP error and the header it quotes into `e` (scratch
    /// space: it does not fit the stack next to the rest); `None` for
    /// anything else. Both IP headers are read as `Packet` reads every
    /// packet, the quote by its own rules: it may be cut short after the
    /// first `QUOTED_L4` bytes of its transport header, and its length
    /// fields are the original packet's.
    #[inline(always)]
    pub fn read(ctx: &TcContext, l3: usize, e: &mut Self) -> Option<()> {
        let outer = &mut e.headers;
        outer.read_ip_header(ctx, l3)?;
        // ICMP right after the IP header (behind IPv6 extension headers it
        // is the kernel's), not in an IPv4 fragment.
        if outer.proto != outer.icmp_proto() || outer.part != Fragment::Whole {
            return None;
        }
        // Type and code: a one-byte read would not pass the verifier.
        let kind: [u8; 2] = read(ctx, outer.l4 + icmp::TYPE)?;
        if !is_error(outer.ipv6, kind[0]) {
            return None;
        }
        e.ipv6 = outer.ipv6;
        e.l3 = l3;
        e.l4 = outer.l4;
        e.src = outer.src;
        e.dst = outer.dst;
        e.ttl = outer.ttl;
        e.len = outer.len;
        e.inner_l3 = outer.l4 + icmp::HEADER;
        // The quote: the same family, a well-formed header whose lengths
        // cover at least the 8 bytes after it, and no later fragment, which
        // would carry no ports (an IPv6 quote's extension headers walked as
        // `Packet` walks them). Anything else is not an error about a
        // packet we sent; the kernel judges it.
        let q = &mut e.headers;
        q.read_ip_header(ctx, e.inner_l3)?;
        if q.ipv6 != e.ipv6 {
            return None;
        }
        let header = q.l4 - q.l3;
        if q.ipv6 {
            q.walk_extensions(ctx)?;
        }
        if q.unreadable || q.part == Fragment::Later {
            return None;
        }
        let payload = quoted_payload(q.ipv6, usize::from(q.stated_len), header)?;
        // How much of the quoted transport header the error carries.
        let quoted = (ctx.len() as usize).saturating_sub(q.l4);
        // TCP, UDP or (its family's) ICMP: the quote's first 8 bytes of it
        // hold what the flow is known by.
        if !matches!(q.proto, IPPROTO_TCP | IPPROTO_UDP) && q.proto != q.icmp_proto() {
            return None;
        }
        let h: [u8; QUOTED_L4] = read(ctx, q.l4)?;
        e.inner_csum = 0;
        match q.proto {
            IPPROTO_TCP => {
                q.take_ports(&h);
                // Only a whole TCP header holds the checksum (as the
                // kernel's NAT requires too).
                if quoted >= tcp::HEADER {
                    e.inner_csum = q.l4 + tcp::CHECKSUM;
                }
            }
            IPPROTO_UDP => {
                let udp_len = usize::from(u16::from_be_bytes([h[udp::LEN], h[udp::LEN + 1]]));
                if !quoted_udp_len(udp_len, payload, q.part == Fragment::First) {
                    return None;
                }
                q.take_ports(&h);
                if h[udp::CHECKSUM] != 0 || h[udp::CHECKSUM + 1] != 0 {
                    e.inner_csum = q.l4 + udp::CHECKSUM;
                }
            }
            _ => {
                q.take_echo(&h);
                // An echo request: its reply would be a flow's.
                if !q.starts_flow() {
                    return None;
                }
                e.inner_csum = q.l4 + icmp::CHECKSUM;
            }
        }
        e.inner_l4 = q.l4;
        e.inner_proto = q.proto;
        e.inner_src = q.src;
        e.inner_dst = q.dst;
        e.inner_sport = q.sport;
        e.inner_dport = q.dport;
        Some(())
    }

    fn inner_icmp(&self) -> bool {
        self.inner_proto == IPPROTO_ICMP || self.inner_proto == IPPROTO_ICMPV6
    }

    /// The quoted packet left us; its reply would arrive with this key,
    /// and the reply's entry says how to turn it back.
    #[inline(always)]
    pub fn reply_key(&self, device: Device) -> FlowKey {
        let quoted = FlowKey {
            src: self.inner_src,
            dst: self.inner_dst,
            sport: self.inner_sport,
            dport: self.inner_dport,
            proto: self.inner_proto,
            ingress: device as u8,
            family: if self.ipv6 {
                ipv6::VERSION
            } else {
                ipv4::VERSION
            },
            _pad: 0,
        };
        quoted.reply(device as u8)
    }
}

/// Translates an ICMP error about one of our flows and redirects it, or
/// `None` when it is not one (the kernel has it then).
#[inline(always)]
pub fn translate(
    ctx: &TcContext,
    cfg: &Config,
    device: Device,
    l3: usize,
) -> Option<(i32, Outcome)> {
    let s = nat::scratch()?;
    IcmpError::read(ctx, l3, &mut s.error)?;
    s.key = s.error.reply_key(device);
    // (A flow the kernel's, see `kernel_flows`, is not in the table: nor
    // is the error about it ours.)
    nat::find(s)?;
    if !tailguard_common::nat::resolve(cfg, &s.key, &s.half, &mut s.translation) {
        return None;
    }
    let e = &mut s.error;
    // The quoted packet left us from the flow's translated address, so an
    // error about it is addressed there; one to anyone else only quotes
    // our flow and is not ours to deliver.
    if e.dst != e.inner_src {
        return None;
    }
    Some(crate::policy::send_error(ctx, cfg, e, &s.translation))
}

/// Rewrites the error as `entry` (the flow's reply entry) says: the quote
/// becomes the packet its sender sent, the error goes to that sender, and an
/// error from the flow's far end itself comes from the address the sender
/// talked to.
#[inline(always)]
pub fn rewrite_error(
    ctx: &TcContext,
    e: &mut IcmpError,
    entry: &tailguard_common::nat::Translation,
) -> Result<(), Failed> {
    let csum = e.l4 + icmp::CHECKSUM;
    let echo = e.inner_icmp();
    // First the quoted transport checksum, from the quote's old fields.
    rewrite::set_quoted_l4_checksum(ctx, e, entry)?;
    // The quote: source back to the original sender, destination back to
    // what it addressed, ports likewise.
    rewrite::set_quoted_addr(
        ctx,
        csum,
        e.inner_l3,
        e.ipv6,
        true,
        &e.inner_src,
        &entry.dst,
    )?;
    rewrite::set_quoted_addr(
        ctx,
        csum,
        e.inner_l3,
        e.ipv6,
        false,
        &e.inner_dst,
        &entry.src,
    )?;
    if echo {
        let id = e.inner_l4 + icmp::ECHO_ID;
        rewrite::set_quoted_port(ctx, csum, id, e.inner_sport, entry.sport)?;
    } else {
        // TCP's and UDP's ports sit alike.
        let (sport, dport) = (e.inner_l4 + udp::SRC_PORT, e.inner_l4 + udp::DST_PORT);
        rewrite::set_quoted_port(ctx, csum, sport, e.inner_sport, entry.dport)?;
        rewrite::set_quoted_port(ctx, csum, dport, e.inner_dport, entry.sport)?;
    }
    // The outer header.
    let from_far_end = e.src == e.inner_dst;
    let new_src = if from_far_end { entry.src } else { e.src };
    rewrite::set_outer_addr(ctx, e, true, &new_src)?;
    rewrite::set_outer_addr(ctx, e, false, &entry.dst)?;
    Ok(())
}
