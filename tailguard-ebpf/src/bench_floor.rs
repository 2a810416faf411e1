//! The benchmarks' floor: a program that only writes the frame's Ethernet
//! addresses and redirects (`FloorHop`), against which the policy's
//! per-packet cost is measured (`benches/src/per_packet.rs`) and the veth
//! hop's (`benches/src/hop.rs`). Its own object, built only for the
//! benchmarks (the `bench-floor` feature): the daemon's object holds only
//! the programs it attaches.
#![no_std]
#![no_main]
// As in `main.rs`: aya's `#[classifier]` wrapper takes the raw `__sk_buff`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use aya_ebpf::{
    helpers::bpf_redirect,
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};
use tailguard_common::config::FloorHop;

#[map]
static HOP: Array<FloorHop> = Array::with_max_entries(1, 0);

/// The loopback device, where `BPF_PROG_TEST_RUN` redirects go nowhere.
const LOOPBACK: u32 = 1;

#[classifier]
pub fn tg_bench_floor(ctx: TcContext) -> i32 {
    let mut ifindex = LOOPBACK;
    if let Some(hop) = HOP.get(0) {
        // The same write as the fast path's `link_layer::address_frame`.
        if hop.link.is_known() && ctx.data() + 12 <= ctx.data_end() {
            // SAFETY: the check above: 12 bytes lie within the packet.
            unsafe { (ctx.data() as *mut [u8; 12]).write_unaligned(hop.link.header) };
        }
        if hop.ifindex != 0 {
            ifindex = hop.ifindex;
        }
    }
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Unreachable, as in `main.rs`: `no_std` binaries must name one.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
