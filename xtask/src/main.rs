//! `cargo xtask`: the project's tasks. Run `cargo xtask --help`.
mod apt;
mod backports;
mod bench;
mod build_ebpf;
mod command;
mod demo;
mod fuzz;
mod image;
mod run;
mod setup;
mod test;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "TailGuard project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Bring this machine to a working build and test environment (as root):
    /// Debian packages, the pinned Rust toolchains, bpf-linker, cargo-fuzz.
    /// Idempotent.
    Setup {
        /// Only the Rust toolchains and bpf-linker: what building needs
        /// (the container image's build stage).
        #[arg(long)]
        toolchains_only: bool,
    },
    /// Build the daemon with its embedded eBPF object, load every program
    /// through the kernel verifier and print its instruction count (as root).
    BuildEbpf,
    /// Setup, build, and show TailGuard working (as root): the real daemon
    /// between a WireGuard network and a stand-in tailnet, in namespaces of
    /// its own, traffic both ways and live counters until Ctrl-C; then it
    /// removes everything it made.
    Demo,
    /// Setup, then build and run the daemon (as root); arguments after `--`
    /// go to `tailguard`, e.g. `cargo xtask run -- --help`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then the benchmarks (as root, ~5 minutes): per-packet cost,
    /// forwarding over veth and between userspace WireGuard with each
    /// datapath in turn, scale; results in `benches/results/` and README.
    /// Measures, never asserts.
    Bench,
    /// Setup, then the container image with the Tailscale stand-in as
    /// tailscaled (`tailguard:smoke`), on this machine's Docker engine or
    /// one started for the task, from locally made bases.
    Image,
    /// Setup, formatting and lint checks, then every test: unit tests, a
    /// short run of each fuzz target, BPF_PROG_TEST_RUN tests, the
    /// privileged namespace tests and the VM tier (as root).
    Test,
    /// Setup, then the VM tier (as root): Debian's 6.1 and 6.12 kernels,
    /// each booted in a VM with this machine's files, every program through
    /// their verifier and usage patterns over kernel WireGuard.
    VmTest {
        /// Only this kernel.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(vm::KERNELS.map(|k| k.name)))]
        kernel: Option<String>,
    },
    /// The fuzz targets (the wg-quick, settings and TS_EXTRA_ARGS parsers),
    /// each for a while: fails on a panic or a secret shown in a message.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Only this target.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(fuzz::TARGETS))]
        target: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup { toolchains_only } => {
            if toolchains_only {
                setup::toolchains()
            } else {
                setup::run()
            }
        }
        Task::BuildEbpf => build_ebpf::run(),
        Task::Run { args } => run::run(&args),
        Task::Demo => demo::run(),
        Task::Bench => bench::run(),
        Task::Test => test::run(),
        Task::Image => image::run(),
        Task::Fuzz { seconds, target } => fuzz::run(seconds, target.as_deref()),
        Task::VmTest { kernel } => {
            command::stage("setup", setup::run)?;
            vm::run(kernel.as_deref())
        }
    }
}
