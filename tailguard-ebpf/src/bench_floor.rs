//! The benchmarks' floor: a program that only redirects (to ifindex 1),
//! against which the policy's per-packet cost is measured
//! (`benches/src/per_packet.rs`). Its own object, built only for the
//! benchmarks (the `bench-floor` feature): the daemon's object holds only
//! the programs it attaches.
#![no_std]
#![no_main]
// As in `main.rs`: aya's `#[classifier]` wrapper takes the raw `__sk_buff`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use aya_ebpf::{helpers::bpf_redirect, macros::classifier, programs::TcContext};

#[classifier]
pub fn tg_bench_floor(_ctx: TcContext) -> i32 {
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(1, 0) as i32 }
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
