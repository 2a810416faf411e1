//! The pinned toolchains and the bpf-linker built for them.
//!
//! The pins live in the `rust-toolchain.toml` files (the workspace's stable at
//! the root, the eBPF build's dated nightly in `tailguard-ebpf/`); this module
//! reads them so nothing else repeats a version.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};

/// bpf-linker's version and the cargo feature naming the LLVM it links to.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// The workspace root (this crate sits one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The channel pinned by a `rust-toolchain.toml`.
fn pinned_channel(file: &Path) -> Result<String> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_string())
        .next()
        .ok_or_else(|| anyhow!("{}: no `channel = \"...\"` line", file.display()))
}

/// The stable toolchain the workspace builds with, e.g. `1.99.1`.
pub fn stable() -> Result<String> {
    pinned_channel(&workspace_root().join("rust-toolchain.toml"))
}

/// The dated nightly the eBPF crate builds with, e.g. `nightly-2026-10-30`.
pub fn ebpf_nightly() -> Result<String> {
    pinned_channel(&workspace_root().join("tailguard-ebpf/rust-toolchain.toml"))
}

/// Where TailGuard keeps the tools it builds for itself:
/// `$TAILGUARD_TOOLS_DIR`, else `$XDG_DATA_HOME/tailguard`, else
/// `~/.local/share/tailguard`.
pub fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("TAILGUARD_TOOLS_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(dir).join("tailguard"));
    }
    let home = env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?;
    Ok(PathBuf::from(home).join(".local/share/tailguard"))
}

/// The install root of the bpf-linker that matches `nightly`'s LLVM. One root
/// per nightly: a linker built for one LLVM cannot read another's bitcode.
pub fn bpf_linker_root(nightly: &str) -> Result<PathBuf> {
    Ok(tools_dir()?.join(format!("bpf-linker-{BPF_LINKER_VERSION}-{nightly}")))
}

/// The bpf-linker executable for `nightly`.
pub fn bpf_linker(nightly: &str) -> Result<PathBuf> {
    Ok(bpf_linker_root(nightly)?.join("bin/bpf-linker"))
}
