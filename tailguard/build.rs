//! Compiles the eBPF programs (crate `tailguard-ebpf`) with the pinned nightly
//! and bpf-linker, and leaves the object in `OUT_DIR` for `include_bytes!`.
//! This is the one build route: `cargo build`, the tests and `cargo xtask
//! build-ebpf` all come through here.
//!
//! `AYA_BUILD_SKIP=1` (aya-build's own switch) builds no programs, so that
//! `cargo check`, clippy and editors work before `cargo xtask setup` has
//! built bpf-linker: the object is then an empty file, which the daemon
//! refuses when it loads its fast path.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};
use xtask::toolchain;

/// aya-build's switch, read as aya-build 0.2 reads it (`1` or `true`).
const AYA_BUILD_SKIP: &str = "AYA_BUILD_SKIP";

/// The object's file name in `OUT_DIR`: the eBPF crate's binary target.
const OBJECT: &str = "tailguard";

/// The benchmarks' floor: an object (and a feature of the eBPF crate) of
/// its own, built only with this crate's `bench` feature.
const BENCH_FLOOR: &str = "bench-floor";

fn bench() -> bool {
    env::var_os("CARGO_FEATURE_BENCH").is_some()
}

/// The objects `include_bytes!` reads.
fn objects() -> Vec<&'static str> {
    let mut objects = vec![OBJECT];
    if bench() {
        objects.push(BENCH_FLOOR);
    }
    objects
}

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed={AYA_BUILD_SKIP}");
    if let Some(value) = skip_requested() {
        // aya-build writes nothing then, and `include_bytes!` needs a file.
        let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
        for name in objects() {
            let object = out_dir.join(name);
            fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
        }
        println!(
            "cargo::warning={AYA_BUILD_SKIP}={value}: no eBPF programs built; this tailguard \
             cannot load its fast path"
        );
        return Ok(());
    }

    let nightly = toolchain::ebpf_nightly()?;
    let linker = toolchain::bpf_linker(&nightly)?;
    if !linker.exists() {
        bail!(
            "bpf-linker for {nightly} is missing at {}: run `cargo xtask setup` first \
             (or set {AYA_BUILD_SKIP}=1 to check or lint without the eBPF programs)",
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
    let features: &[&str] = if bench() { &[BENCH_FLOOR] } else { &[] };
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

/// `AYA_BUILD_SKIP`'s value when it asks aya-build to build nothing.
fn skip_requested() -> Option<String> {
    let value = env::var(AYA_BUILD_SKIP).ok()?;
    (value == "1" || value.eq_ignore_ascii_case("true")).then_some(value)
}
