//! TailGuard's TC programs, one per device role and hook.
//!
//! Every program reads the packet once (`packet::Packet::read`) and
//! counts it once. The ingress programs apply the forwarding policy
//! (`policy`): translate and redirect the packet to the other device, drop
//! it, or leave it to the kernel and its nftables twin; they count it by
//! class and outcome (`OUTCOMES`). The egress programs let the fast path's
//! own packets by untouched, count the kernel's by class (`COUNTERS`), and
//! note the UDP flows the kernel sends (`kernel_flows`).
#![no_std]
#![no_main]
// `parse::at_least_one` hides a value from the compiler with an empty `asm!`.
#![feature(asm_experimental_arch)]
// BPF's atomic compare-and-exchange and fetch-and-add (the target's `core`
// offers atomics without them).
#![feature(core_intrinsics)]
#![allow(internal_features)]
// aya's `#[classifier]` generates a public wrapper taking the kernel's raw
// `__sk_buff` pointer; that is the BPF calling convention, not our API.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod config;
mod counters;
mod fragments;
mod icmp;
mod kernel_flows;
mod link_layer;
mod nat;
mod packet;
mod parse;
mod policy;
mod rewrite;
mod table;
mod too_big;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use packet::Packet;
use tailguard_common::{CounterSlot, Device, Direction};

#[classifier]
#[inline(always)]
pub fn tg_wg_ingress(ctx: TcContext) -> i32 {
    policy::ingress(&ctx, Device::WireGuard)
}

#[classifier]
#[inline(always)]
pub fn tg_wg_egress(ctx: TcContext) -> i32 {
    egress(&ctx, Device::WireGuard)
}

#[classifier]
#[inline(always)]
pub fn tg_ts_ingress(ctx: TcContext) -> i32 {
    policy::ingress(&ctx, Device::Tailscale)
}

#[classifier]
#[inline(always)]
pub fn tg_ts_egress(ctx: TcContext) -> i32 {
    egress(&ctx, Device::Tailscale)
}

/// A packet leaving `device`: one the fast path sent goes on untouched (it
/// was counted at its ingress); one the kernel sends is counted by class
/// and, if it is UDP or an ICMP echo, makes its flow's replies the
/// kernel's (`kernel_flows`). `TC_ACT_UNSPEC` rather than `TC_ACT_OK`:
/// under TCX any other verdict ends the chain, and programs that others
/// attached after ours must still see the packet.
#[inline(always)]
fn egress(ctx: &TcContext, device: Device) -> i32 {
    if kernel_flows::sent_by_fast_path(ctx) {
        return TC_ACT_UNSPEC;
    }
    let (class, p) = Packet::read(ctx, device, Direction::Egress);
    if let Some(p) = p {
        kernel_flows::learn(p, device);
    }
    counters::count(
        CounterSlot::new(device, Direction::Egress, class),
        ctx.len(),
    );
    TC_ACT_UNSPEC
}

/// The daemon's measure of the table's clock (`tailguard_common::config::
/// Clock`), run only through `BPF_PROG_TEST_RUN`, never attached: writes
/// the jiffies and the monotonic clock's nanoseconds, read together, over
/// the first 16 bytes of the packet it is given.
#[classifier]
pub fn tg_clock(ctx: TcContext) -> i32 {
    // SAFETY: plain helper calls.
    let (jiffies, nanos) = unsafe { (bpf_jiffies64(), bpf_ktime_get_ns()) };
    if let Some(out) = parse::at_mut::<[u64; 2]>(&ctx, 0) {
        // SAFETY: `at_mut` checked that 16 bytes lie within the packet.
        unsafe { core::ptr::write_unaligned(out, [jiffies, nanos]) };
    }
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any path that could reach this; it exists only
    // because `no_std` binaries must name a panic handler.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
