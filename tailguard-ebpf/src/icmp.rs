//! ICMP errors about flows the fast path owns (destination unreachable,
//! fragmentation needed / packet too big, time exceeded, parameter problem):
//! the packet they quote is one we translated, so the error is translated
//! back, quote and all, and sent to whoever sent the original. That is what
//! makes path-MTU discovery work across the 1420/1280-byte MTUs.

use aya_ebpf::programs::TcContext;
use tailguard_common::{
    Config, Device, Outcome,
    fragment::{Fragment, IPV6_MAX_EXT_HEADERS, Ipv6Step, ipv6_step},
    nat::FlowKey,
    wire::{
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, icmp, icmpv6, ip_version, ipv4,
        ipv6, tcp, udp,
    },
};

use crate::{
    nat,
    packet::is_extension,
    rewrite::{self, Failed},
};

/// How much of the quoted transport header an error must carry: the 8
/// bytes that hold the ports (as the kernel's conntrack insists too).
const QUOTED_L4: usize = 8;

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
    /// anything else.
    #[inline(always)]
    pub fn read(ctx: &TcContext, l3: usize, e: &mut Self) -> Option<()> {
        let first: u8 = ctx.load(l3).ok()?;
        let ipv6 = ip_version(first) == ipv6::VERSION;
        *e = Self {
            ipv6,
            l3,
            l4: 0,
            src: [0; 16],
            dst: [0; 16],
            ttl: 0,
            len: ctx.len().checked_sub(l3 as u32)?,
            inner_l3: 0,
            inner_l4: 0,
            inner_proto: 0,
            inner_src: [0; 16],
            inner_dst: [0; 16],
            inner_sport: 0,
            inner_dport: 0,
            inner_csum: 0,
        };
        if ipv6 {
            if ctx.load::<u8>(l3 + ipv6::NEXT_HEADER).ok()? != IPPROTO_ICMPV6 {
                return None;
            }
            e.l4 = l3 + ipv6::HEADER;
            e.ttl = ctx.load(l3 + ipv6::HOP_LIMIT).ok()?;
            e.src = ctx.load(l3 + ipv6::SRC).ok()?;
            e.dst = ctx.load(l3 + ipv6::DST).ok()?;
        } else {
            if ip_version(first) != ipv4::VERSION
                || ctx.load::<u8>(l3 + ipv4::PROTOCOL).ok()? != IPPROTO_ICMP
            {
                return None;
            }
            // Not a fragment (MF or an offset).
            let frag: u16 = ctx.load(l3 + ipv4::FRAG).ok()?;
            if u16::from_be(frag) & (ipv4::FLAG_MF | ipv4::OFFSET_MASK) != 0 {
                return None;
            }
            let ihl = ipv4::header_len(first);
            if ihl < ipv4::HEADER {
                return None;
            }
            e.l4 = l3 + ihl;
            e.ttl = ctx.load(l3 + ipv4::TTL).ok()?;
            let s: [u8; ipv4::ADDR_LEN] = ctx.load(l3 + ipv4::SRC).ok()?;
            let d: [u8; ipv4::ADDR_LEN] = ctx.load(l3 + ipv4::DST).ok()?;
            e.src[..ipv4::ADDR_LEN].copy_from_slice(&s);
            e.dst[..ipv4::ADDR_LEN].copy_from_slice(&d);
        }
        if !is_error(ipv6, ctx.load(e.l4 + icmp::TYPE).ok()?) {
            return None;
        }
        // The quote: the same family, a well-formed header whose lengths
        // cover at least the 8 bytes after it, and (IPv4) no later fragment,
        // which would carry no ports. Anything else is not an error about a
        // packet we sent; the kernel judges it.
        e.inner_l3 = e.l4 + icmp::HEADER;
        let inner_first: u8 = ctx.load(e.inner_l3).ok()?;
        // What the quoted packet says it carried after its IP header.
        let inner_payload;
        let mut first_fragment = false;
        if ipv6 {
            if ip_version(inner_first) != ipv6::VERSION {
                return None;
            }
            inner_payload =
                usize::from(u16::from_be(ctx.load(e.inner_l3 + ipv6::PAYLOAD_LEN).ok()?));
            e.inner_proto = ctx.load(e.inner_l3 + ipv6::NEXT_HEADER).ok()?;
            e.inner_l4 = e.inner_l3 + ipv6::HEADER;
            // The quoted packet's extension headers, as `Packet` walks
            // them: a first fragment's quote holds the ports; a later one's
            // does not.
            for _ in 0..IPV6_MAX_EXT_HEADERS {
                if !is_extension(e.inner_proto) {
                    break;
                }
                let h: [u8; 8] = ctx.load(e.inner_l4).ok()?;
                match ipv6_step(e.inner_proto, h) {
                    Ipv6Step::Skip { next, len } | Ipv6Step::SourceRouted { next, len } => {
                        e.inner_l4 += len;
                        e.inner_proto = next;
                    }
                    Ipv6Step::Fragment { next, part, .. } => {
                        if part == Fragment::Later {
                            return None;
                        }
                        first_fragment = true;
                        e.inner_l4 += ipv6::FRAGMENT_HEADER;
                        e.inner_proto = next;
                    }
                    Ipv6Step::Upper(_) => break,
                }
            }
            e.inner_src = ctx.load(e.inner_l3 + ipv6::SRC).ok()?;
            e.inner_dst = ctx.load(e.inner_l3 + ipv6::DST).ok()?;
        } else {
            let ihl = ipv4::header_len(inner_first);
            if ip_version(inner_first) != ipv4::VERSION || ihl < ipv4::HEADER {
                return None;
            }
            let total = usize::from(u16::from_be(ctx.load(e.inner_l3 + ipv4::TOTAL_LEN).ok()?));
            let frag = u16::from_be(ctx.load(e.inner_l3 + ipv4::FRAG).ok()?);
            if frag & ipv4::OFFSET_MASK != 0 || total < ihl {
                return None;
            }
            inner_payload = total - ihl;
            // A first fragment's UDP length is the whole datagram's.
            first_fragment = frag & ipv4::FLAG_MF != 0;
            e.inner_proto = ctx.load(e.inner_l3 + ipv4::PROTOCOL).ok()?;
            e.inner_l4 = e.inner_l3 + ihl;
            let s: [u8; ipv4::ADDR_LEN] = ctx.load(e.inner_l3 + ipv4::SRC).ok()?;
            let d: [u8; ipv4::ADDR_LEN] = ctx.load(e.inner_l3 + ipv4::DST).ok()?;
            e.inner_src[..ipv4::ADDR_LEN].copy_from_slice(&s);
            e.inner_dst[..ipv4::ADDR_LEN].copy_from_slice(&d);
        }
        // How much of the quoted transport header the error carries: the
        // 8 bytes that hold the ports at least, as the kernel's conntrack
        // insists too.
        let quoted = (ctx.len() as usize).saturating_sub(e.inner_l4);
        if inner_payload < QUOTED_L4 || quoted < QUOTED_L4 {
            return None;
        }
        match e.inner_proto {
            IPPROTO_TCP => {
                e.inner_sport = ctx.load(e.inner_l4 + tcp::SRC_PORT).ok()?;
                e.inner_dport = ctx.load(e.inner_l4 + tcp::DST_PORT).ok()?;
                // Only a whole TCP header holds the checksum (as the
                // kernel's NAT requires too).
                if quoted >= tcp::HEADER {
                    e.inner_csum = e.inner_l4 + tcp::CHECKSUM;
                }
            }
            IPPROTO_UDP => {
                let udp_len = usize::from(u16::from_be(ctx.load(e.inner_l4 + udp::LEN).ok()?));
                if udp_len < udp::HEADER || (udp_len > inner_payload && !first_fragment) {
                    return None;
                }
                e.inner_sport = ctx.load(e.inner_l4 + udp::SRC_PORT).ok()?;
                e.inner_dport = ctx.load(e.inner_l4 + udp::DST_PORT).ok()?;
                if ctx.load::<u16>(e.inner_l4 + udp::CHECKSUM).ok()? != 0 {
                    e.inner_csum = e.inner_l4 + udp::CHECKSUM;
                }
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                let t: u8 = ctx.load(e.inner_l4 + icmp::TYPE).ok()?;
                if t != icmp::ECHO_REQUEST && t != icmpv6::ECHO_REQUEST {
                    return None;
                }
                e.inner_sport = ctx.load(e.inner_l4 + icmp::ECHO_ID).ok()?;
                e.inner_csum = e.inner_l4 + icmp::CHECKSUM;
            }
            _ => return None,
        }
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
