//! The forwarding policy (docs/policy.md) for packets entering either
//! device. A new flow is decided by `tailguard_common::policy::new_flow`,
//! whose rows (`PolicyRule`) name the nftables rules too
//! (`tailguard/src/firewall/rules.rs`); whatever this does not take goes to
//! the kernel, where the row's nftables rule applies.
//!
//! Stack is scarce (512 bytes for the whole program), so keys, entries and
//! addresses live in the per-CPU scratch space, not in locals.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use tailguard_common::{
    Config, Device, Direction, Outcome, PacketClass, PolicyRule, Route,
    config::{NodeAddress, flag},
    fragment::Fragment,
    nat::{TableEvent, Translation},
    policy::{self, Bound, NewFlow, Switches},
    wire::{AF_INET, AF_INET6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, udp},
};

use crate::{
    config::{config, route_v4, route_v6},
    fragments,
    icmp::{self, IcmpError},
    kernel_flows,
    link_layer::{address_frame, has_ethernet, ip_header_offset},
    nat::{self, Made, Scratch},
    packet::Packet,
    rewrite, table, too_big,
};

/// Decides, translates and redirects, or hands the packet to the kernel.
#[inline(always)]
pub fn ingress(ctx: &TcContext, device: Device) -> i32 {
    let (class, p) = Packet::read(ctx, device, Direction::Ingress);
    nat::note_class(class);
    let (verdict, outcome) = decide(ctx, device, class, p);
    nat::count(device, outcome, ctx.len());
    verdict
}

fn kernel(outcome: Outcome) -> (i32, Outcome) {
    (TC_ACT_UNSPEC, outcome)
}

/// What the fast path counts under the rows it applies itself (constants,
/// so the rows' table stays out of the program).
const REPLIES: Outcome = PolicyRule::ForwardReplies.outcome();
const ISOLATED_PEERS: Outcome = PolicyRule::ForwardIsolatedPeers.outcome();
const REFUSED: Outcome = PolicyRule::ForwardRefused.outcome();
const UDP6_ZERO_CHECKSUM: Outcome = PolicyRule::ForwardUdp6ZeroChecksum.outcome();

#[inline(always)]
fn decide(
    ctx: &TcContext,
    device: Device,
    class: PacketClass,
    p: Option<&mut Packet>,
) -> (i32, Outcome) {
    let Some(cfg) = config() else {
        return kernel(Outcome::KernelNotConfigured);
    };
    let Some(p) = p else {
        if class != PacketClass::Ipv4 && class != PacketClass::Ipv6 {
            return kernel(Outcome::KernelNotHandled);
        }
        // An ICMP error about a flow of ours is translated back; anything
        // else unusual is the kernel's.
        return icmp::translate(ctx, cfg, device, ip_header_offset(device))
            .unwrap_or_else(|| kernel(Outcome::KernelNotHandled));
    };
    let Some(s) = nat::scratch() else {
        return kernel(Outcome::KernelNotConfigured);
    };
    if p.unreadable {
        return ours_or_kernel(cfg, p, device, Outcome::DropExtHeaders);
    }
    // One call of `flow` for every kind of packet: inlined once, the
    // programs stay within the verifier's and the jumps' reach.
    match p.part {
        Fragment::Whole => {}
        // The ports are the first fragment's; the datagram goes where it
        // went.
        Fragment::Later => {
            s.frag_key = fragments::key_of(p, device);
            match fragments::recall(&s.frag_key) {
                Some(first) if first.ours != 0 => {
                    p.sport = first.sport;
                    p.dport = first.dport;
                    p.proto = first.proto;
                }
                // The kernel has the first fragment and reassembles.
                Some(_) => return kernel(Outcome::KernelNotHandled),
                None => return ours_or_kernel(cfg, p, device, Outcome::DropFragmentUnknown),
            }
        }
        Fragment::First => {
            s.frag_key = fragments::key_of(p, device);
            s.frag_first = fragments::first_of(p);
        }
    }
    let decided = flow(ctx, cfg, p, s, device);
    if p.part == Fragment::First {
        // Anything but "the kernel's" (translated, or dropped by the
        // policy) the later fragments get from the fast path too.
        s.frag_first.ours = u8::from(decided.0 != TC_ACT_UNSPEC);
        fragments::remember(&s.frag_key, &s.frag_first);
    }
    decided
}

/// The flow of `p`: the way its flow is translated if it is ours, else
/// the policy's decision for a new one.
#[inline(always)]
fn flow(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut Packet,
    s: &mut Scratch,
    device: Device,
) -> (i32, Outcome) {
    s.key = nat::key_of(p, device);
    let now = nat::now(cfg);
    // A packet of a flow we own: translated the way its flow is.
    if let Some(stored) = nat::find(s) {
        if p.options {
            // The kernel would take it for a connection of its own and
            // translate it anew (or answer it as the host's).
            return (TC_ACT_SHOT, Outcome::DropOptionsOfOurFlow);
        }
        if !nat::follow(cfg, s, stored, p.tcp_flags, now) {
            return kernel(Outcome::KernelNotOurFlow);
        }
        return send(ctx, cfg, p, &s.translation, device);
    }
    // `forward:replies` in the kernel (see `kernel_flows`): a datagram of
    // a flow the kernel tracks, or a SYN it was left (retransmitted).
    let may_start = p.proto != IPPROTO_TCP || p.starts_flow();
    if may_start && kernel_flows::owns(&s.key, now) {
        return kernel(Outcome::KernelTrackedFlow);
    }
    if p.options {
        // nft: the kernel processes options and source routes
        // (`accept_source_route`), then its rules apply; the flow it starts
        // is the kernel's from then on.
        if may_start {
            kernel_flows::keep(&s.key, now);
        }
        return kernel(Outcome::KernelIpOptions);
    }
    // A first fragment too short for its transport header: nothing to
    // judge it (or its later fragments) by.
    if p.part == Fragment::First && p.len < (p.l4 - p.l3) as u32 + p.l4_len.max(udp::HEADER as u32)
    {
        return (TC_ACT_SHOT, Outcome::DropTinyFragment);
    }
    // (A later fragment of a datagram the fast path took carries no flags;
    // its flow follows from the route, as the first fragment's did.)
    if p.part != Fragment::Later && !p.starts_flow() {
        // The kernel's conntrack owns it (`forward:replies`).
        return kernel(REPLIES);
    }
    match device {
        Device::WireGuard => from_wireguard(ctx, cfg, p, s, now),
        Device::Tailscale => from_tailscale(ctx, cfg, p, s, now),
    }
}

/// A packet whose flow cannot be known (a later fragment whose first the
/// fast path has not seen, an IPv6 header chain too long to walk): dropped
/// with `outcome` if the fast path would forward it, so the kernel never
/// takes it for a new connection; the host's own (to one of its addresses
/// and not sent on to `TS_DEST_IP`, or outside our routes) goes to the
/// kernel.
#[inline(always)]
fn ours_or_kernel(cfg: &Config, p: &Packet, device: Device, outcome: Outcome) -> (i32, Outcome) {
    match destination(cfg, p, device) {
        Bound::DestIp | Bound::Tailnet | Bound::WireGuard => (TC_ACT_SHOT, outcome),
        Bound::Host | Bound::Elsewhere => kernel(Outcome::KernelNotHandled),
    }
}

/// Where `p`, arrived on `device`, is bound, as the nftables table sees it.
#[inline(always)]
fn destination(cfg: &Config, p: &Packet, device: Device) -> Bound {
    if is_node_address(cfg, p, NodeAddress::Tailnet, &p.dst) {
        let dest_ip = if p.ipv6 { flag::DEST_V6 } else { flag::DEST_V4 };
        return if device == Device::Tailscale && cfg.has(dest_ip) {
            Bound::DestIp
        } else {
            Bound::Host
        };
    }
    if is_node_address(cfg, p, NodeAddress::WireGuard, &p.dst) {
        return Bound::Host;
    }
    match (route(p), device) {
        (Some(Route::TAILSCALE), Device::WireGuard) => Bound::Tailnet,
        (Some(Route::WIREGUARD), _) => Bound::WireGuard,
        _ => Bound::Elsewhere,
    }
}

/// The switches the policy's rows depend on, as the daemon set them.
#[inline(always)]
fn switches(cfg: &Config) -> Switches {
    Switches {
        isolate_peers: cfg.has(flag::ISOLATE_PEERS),
        snat_to_wg: cfg.has(flag::SNAT_TO_WG),
    }
}

/// `addr` is the node's `which` address.
#[inline(always)]
fn is_node_address(cfg: &Config, p: &Packet, which: NodeAddress, addr: &[u8; 16]) -> bool {
    if p.ipv6 {
        cfg.node_v6(which).is_some_and(|node| *node == *addr)
    } else {
        cfg.node_v4(which).is_some_and(|node| {
            node[0] == addr[0] && node[1] == addr[1] && node[2] == addr[2] && node[3] == addr[3]
        })
    }
}

fn route(p: &Packet) -> Option<Route> {
    if p.ipv6 {
        route_v6(p.dst)
    } else {
        route_v4([p.dst[0], p.dst[1], p.dst[2], p.dst[3]])
    }
}

/// Where a packet leaves through `egress` (a device role), if the fast
/// path may send it: the device's index and MTU. Else what the kernel must
/// do with it: the user left the family's forwarding off (the kernel does
/// not forward it either), the device is not there yet, the TTL would
/// expire (the kernel answers "time exceeded"), or it is too big
/// (`too_big` answers it, or the kernel fragments it; what `too_big`
/// fragments itself `fits`).
#[inline(always)]
fn egress(
    cfg: &Config,
    egress: Device,
    ipv6: bool,
    ttl: u8,
    fits: impl Fn(u32) -> bool,
) -> Result<(u32, u32), (i32, Outcome)> {
    let forwarding = if ipv6 {
        flag::FORWARD_V6
    } else {
        flag::FORWARD_V4
    };
    if !cfg.has(forwarding) {
        return Err(kernel(Outcome::KernelForwardingOff));
    }
    let (ifindex, mtu) = (cfg.ifindex(egress), cfg.mtu(egress));
    if ifindex == 0 {
        return Err(kernel(Outcome::KernelNoRoute));
    }
    if ttl <= 1 {
        return Err(kernel(Outcome::KernelTtl));
    }
    if !fits(mtu) {
        return Err(kernel(Outcome::KernelTooBig));
    }
    Ok((ifindex, mtu))
}

#[inline(always)]
fn from_wireguard(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut Packet,
    s: &mut Scratch,
    now: u32,
) -> (i32, Outcome) {
    let bound = destination(cfg, p, Device::WireGuard);
    match policy::new_flow(Device::WireGuard, bound, p.ipv6, switches(cfg)) {
        // The input rows (the kernel's).
        NewFlow::ToHost => kernel(Outcome::KernelLocal),
        // `forward:wg-to-ts`, masqueraded by `srcnat:wg-to-ts`.
        NewFlow::Forwarded {
            forward: PolicyRule::ForwardWgToTs,
            snat,
            ..
        } => {
            if !cfg.copy_node_address(p.ipv6, NodeAddress::Tailnet, &mut s.src) {
                return kernel(Outcome::KernelNoRoute);
            }
            s.dst = p.dst;
            start(
                ctx,
                cfg,
                p,
                s,
                snat.is_some(),
                false,
                Device::Tailscale,
                now,
            )
        }
        // `forward:wg-to-wg`, untranslated.
        NewFlow::Forwarded { .. } => {
            s.translation = Translation {
                src: p.src,
                dst: p.dst,
                sport: p.sport,
                dport: p.dport,
                egress: Device::WireGuard as u32,
            };
            send(ctx, cfg, p, &s.translation, Device::WireGuard)
        }
        NewFlow::Refused(PolicyRule::ForwardIsolatedPeers) => {
            // The kernel's forward chain drops it, but only after the
            // kernel's own checks (forwarding on, TTL, size), whose
            // answers are the kernel's to give.
            if let Err(verdict) = egress(cfg, Device::WireGuard, p.ipv6, p.ttl, |mtu| p.fits(mtu)) {
                return verdict;
            }
            (TC_ACT_SHOT, ISOLATED_PEERS)
        }
        // `forward:refused` (wg -> the uplink).
        NewFlow::Refused(_) => outside_our_routes(ctx, p, s),
    }
}

#[inline(always)]
fn from_tailscale(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut Packet,
    s: &mut Scratch,
    now: u32,
) -> (i32, Outcome) {
    let bound = destination(cfg, p, Device::Tailscale);
    match policy::new_flow(Device::Tailscale, bound, p.ipv6, switches(cfg)) {
        NewFlow::ToHost => kernel(Outcome::KernelLocal),
        // `forward:ts-to-wg`, after `dstnat:ts-dest-ip-*` if it applies,
        // and `srcnat:ts-to-wg` unless it is off.
        NewFlow::Forwarded { dnat, snat, .. } => {
            if dnat.is_some() {
                if !cfg.copy_node_address(p.ipv6, NodeAddress::DestIp, &mut s.dst) {
                    return kernel(Outcome::KernelLocal);
                }
            } else {
                s.dst = p.dst;
            }
            to_wireguard(ctx, cfg, p, s, snat.is_some(), dnat.is_some(), now)
        }
        // `forward:refused`: ts -> anything but wg.
        NewFlow::Refused(_) => outside_our_routes(ctx, p, s),
    }
}

/// A destination outside our routes: the host's own (another address of
/// it, e.g. on the uplink) goes to the kernel's input policy; anything the
/// kernel would forward (the uplink, the internet) is dropped, as the
/// forward chain's policy would. The kernel's FIB says which, and only
/// these packets pay for asking it.
#[inline(always)]
fn outside_our_routes(ctx: &TcContext, p: &Packet, s: &mut Scratch) -> (i32, Outcome) {
    let f = &mut s.fib;
    // SAFETY: an all-zero `bpf_fib_lookup` is valid (plain integers).
    *f = unsafe { core::mem::zeroed() };
    // SAFETY: the context points at the kernel's `__sk_buff` for this run.
    f.ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    f.__bindgen_anon_1.tot_len = p.len as u16;
    let word = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    if p.ipv6 {
        f.family = AF_INET6;
        f.__bindgen_anon_3.ipv6_src = [
            word(&p.src, 0),
            word(&p.src, 4),
            word(&p.src, 8),
            word(&p.src, 12),
        ];
        f.__bindgen_anon_4.ipv6_dst = [
            word(&p.dst, 0),
            word(&p.dst, 4),
            word(&p.dst, 8),
            word(&p.dst, 12),
        ];
    } else {
        f.family = AF_INET;
        f.__bindgen_anon_3.ipv4_src = word(&p.src, 0);
        f.__bindgen_anon_4.ipv4_dst = word(&p.dst, 0);
    }
    // SAFETY: `f` is a whole `bpf_fib_lookup` in map memory.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            f as *mut bpf_fib_lookup,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // What the kernel would forward (success, no neighbour yet) reaches its
    // forward chain, whose policy drops it: the fast path drops it first.
    // The kernel's own checks come before that chain, and their answers are
    // the kernel's to give: time exceeded (TTL 1), too big (needs
    // fragmenting), a route's unreachable or prohibit; so is anything local,
    // forwarding off, or an error.
    let forwarded =
        ret == BPF_FIB_LKUP_RET_SUCCESS as i64 || ret == BPF_FIB_LKUP_RET_NO_NEIGH as i64;
    if forwarded && p.ttl > 1 {
        return (TC_ACT_SHOT, REFUSED);
    }
    if forwarded {
        return kernel(Outcome::KernelTtl);
    }
    if ret == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return kernel(Outcome::KernelTooBig);
    }
    kernel(Outcome::KernelLocal)
}

/// ts -> wg (to `s.dst`, `TS_DEST_IP` if `service`): source-NATed to the
/// node's WireGuard address if `snat` (`srcnat:ts-to-wg`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn to_wireguard(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut Packet,
    s: &mut Scratch,
    snat: bool,
    service: bool,
    now: u32,
) -> (i32, Outcome) {
    if snat {
        if !cfg.copy_node_address(p.ipv6, NodeAddress::WireGuard, &mut s.src) {
            return kernel(Outcome::KernelNoRoute);
        }
    } else {
        s.src = p.src;
    }
    start(ctx, cfg, p, s, snat, service, Device::WireGuard, now)
}

/// The first packet of a flow: checks what would make the kernel answer
/// instead, records the flow (see `nat::create`), sends the packet.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn start(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut Packet,
    s: &mut Scratch,
    allocate: bool,
    service: bool,
    to: Device,
    now: u32,
) -> (i32, Outcome) {
    if p.part == Fragment::Later {
        // Its first fragment started no flow (the policy dropped it).
        return (TC_ACT_SHOT, Outcome::DropFragmentUnknown);
    }
    let fits = |mtu| p.fits(mtu) || too_big::fragmentable(ctx, p, to, mtu);
    let (ifindex, mtu) = match egress(cfg, to, p.ipv6, p.ttl, fits) {
        Ok(device) => device,
        Err(verdict) => return too_big::answer_or(ctx, cfg, p, to, verdict),
    };
    // After the size: the kernel's forwarding answers "too big" before its
    // rules see the checksum.
    if p.udp6_no_checksum {
        return (TC_ACT_SHOT, UDP6_ZERO_CHECKSUM);
    }
    match nat::create(cfg, p, s, allocate, service, to, now) {
        // A new flow always crosses from the other network.
        Made::Created | Made::Adopted => translate(
            ctx,
            p,
            &s.translation,
            to,
            ifindex,
            mtu,
            cfg.mtu(to.other()),
        ),
        Made::Lost => kernel(Outcome::KernelNotOurFlow),
        Made::Refused(why) => {
            table::count(why);
            // The kernel's conntrack has the flow from now on: so do we
            // (a SYN's retransmission too, or its connection would be
            // split between the kernel's port and one of ours).
            kernel_flows::keep(&s.key, now);
            kernel(match why {
                TableEvent::OverBudget => Outcome::KernelOverBudget,
                TableEvent::TableFull => Outcome::KernelTableFull,
                _ => Outcome::KernelNoPort,
            })
        }
    }
}

/// Sends a packet of a flow we own, arrived on `from`, as its `entry` says.
#[inline(always)]
fn send(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut Packet,
    entry: &Translation,
    from: Device,
) -> (i32, Outcome) {
    let to = Device::from_role(entry.egress);
    let fits = |mtu| p.fits(mtu) || too_big::fragmentable(ctx, p, to, mtu);
    match egress(cfg, to, p.ipv6, p.ttl, fits) {
        // IPv6 forbids a zero UDP checksum (`forward:udp6-zero-checksum`);
        // a too-big one is answered first, as the kernel does.
        Ok(_) if p.udp6_no_checksum => (TC_ACT_SHOT, UDP6_ZERO_CHECKSUM),
        Ok((ifindex, mtu)) => translate(ctx, p, entry, to, ifindex, mtu, cfg.mtu(from)),
        Err(verdict) => too_big::answer_or(ctx, cfg, p, to, verdict),
    }
}

/// Rewrites `p` as `entry` says, takes one from its TTL, clamps the MSS of a
/// SYN to the smaller MTU of the devices it came in by (`arrival_mtu`) and goes out by (nft:
/// `mss:clamp`, whose `rt mtu` is the smaller of the routes both ways), and
/// redirects it (in fragments if it is too big, see `too_big::fragment`).
#[inline(always)]
fn translate(
    ctx: &TcContext,
    p: &mut Packet,
    entry: &Translation,
    to: Device,
    ifindex: u32,
    mtu: u32,
    arrival_mtu: u32,
) -> (i32, Outcome) {
    let rewritten = rewrite::translate_headers(ctx, p, entry)
        .and_then(|()| rewrite::clear_df_of_fragment(ctx, p))
        .and_then(|()| rewrite::clamp_mss(ctx, p, mtu.min(arrival_mtu)));
    if rewritten.is_err() {
        return (TC_ACT_SHOT, Outcome::DropHelperFailed);
    }
    if !p.fits(mtu) {
        return too_big::fragment(ctx, p, to, ifindex, mtu);
    }
    (redirect(ctx, to, ifindex), Outcome::Redirected)
}

/// Sends a translated ICMP error (see `icmp`) the way its flow's replies go.
#[inline(always)]
pub fn send_error(
    ctx: &TcContext,
    cfg: &Config,
    e: &mut IcmpError,
    entry: &Translation,
) -> (i32, Outcome) {
    let to = Device::from_role(entry.egress);
    let (ifindex, _) = match egress(cfg, to, e.ipv6, e.ttl, |mtu| e.len <= mtu) {
        Ok(device) => device,
        Err(verdict) => return verdict,
    };
    let proto = if e.ipv6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    let rewritten = icmp::rewrite_error(ctx, e, entry)
        .and_then(|()| rewrite::decrement_ttl_at(ctx, e.l3, e.ipv6, e.ttl, proto));
    if rewritten.is_err() {
        return (TC_ACT_SHOT, Outcome::DropHelperFailed);
    }
    (redirect(ctx, to, ifindex), Outcome::ErrorTranslated)
}

/// Sends the packet out of `ifindex`, the device `to`. On L3 devices it
/// goes as it is; on Ethernet devices (veth) with the next hop's and the
/// device's addresses the daemon read from the neighbour table, or, while
/// it has none, with those the kernel looks up (`bpf_redirect_neigh`).
/// Returns TC_ACT_REDIRECT, or TC_ACT_SHOT if the helper refused.
#[inline(always)]
pub fn redirect(ctx: &TcContext, to: Device, ifindex: u32) -> i32 {
    kernel_flows::mark_sent(ctx);
    if has_ethernet(to) && !address_frame(ctx, to) {
        // SAFETY: a plain helper call; no params means "look the next hop
        // up".
        unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    } else {
        // SAFETY: a plain helper call.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    }
}
