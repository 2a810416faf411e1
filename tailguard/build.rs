//! Compiles the eBPF programs (crate `tailguard-ebpf`) with the pinned nightly
//! and bpf-linker, and leaves the object in `OUT_DIR` for `include_bytes!`.
//! This is the one build route: `cargo build`, the tests and `cargo xtask
//! build-ebpf` all come through here.

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};
use xtask::toolchain;

fn main() -> anyhow::Result<()> {
    let nightly = toolchain::ebpf_nightly()?;
    let linker = toolchain::bpf_linker(&nightly)?;
    if !linker.exists() {
        bail!(
            "bpf-linker for {nightly} is missing at {}: run `cargo xtask setup` first",
            linker.display()
        );
    }
    println!("cargo::rerun-if-changed={}", linker.display());
    // Point cargo at our linker for the BPF target rather than at whatever
    // bpf-linker may be on PATH: a linker built for another LLVM fails.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker) };

    let root = toolchain::workspace_root().join("tailguard-ebpf");
    let root = root.to_str().context("workspace path is not UTF-8")?;
    // The benchmarks' floor is its own object, built only for them.
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_BENCH").is_some() {
        &["bench-floor"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [Package {
            name: "tailguard-ebpf",
            root_dir: root,
            features,
            ..Default::default()
        }],
        Toolchain::Custom(&nightly),
    )
}
