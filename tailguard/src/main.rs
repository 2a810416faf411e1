//! The `tailguard` command: the daemon and its helper commands.

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tailguard::datapath::{AttachMode, Datapath, LinkLayer, LoadOptions};
use tailguard_common::{Device, Direction};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// Said with every load failure: the usual cause is missing privileges.
const LOAD_HINT: &str = "loading the eBPF programs (needs root, or CAP_BPF and CAP_NET_ADMIN)";

#[derive(Parser)]
#[command(version, about = "Joins a WireGuard network to a Tailscale tailnet")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Load the eBPF programs through the kernel verifier and list them with
    /// their instruction counts; attaches nothing.
    Programs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// WireGuard device.
    #[arg(long, env = "WG_DEVICE", default_value = "wg0", global = true)]
    wg_device: String,
    /// Tailscale TUN device.
    #[arg(long, env = "TS_DEVICE", default_value = "tailscale0", global = true)]
    ts_device: String,
    /// How to attach the TC programs: TCX (kernel 6.6+), a clsact qdisc, or
    /// TCX with clsact as the fallback.
    #[arg(long, env = "TG_TC_ATTACH", value_enum, default_value_t = TcAttach::Auto, global = true)]
    tc_attach: TcAttach,
}

#[derive(Clone, Copy, ValueEnum)]
enum TcAttach {
    Auto,
    Tcx,
    Clsact,
}

impl From<TcAttach> for AttachMode {
    fn from(value: TcAttach) -> Self {
        match value {
            TcAttach::Auto => Self::Auto,
            TcAttach::Tcx => Self::Tcx,
            TcAttach::Clsact => Self::Clsact,
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&cli.run).await,
        Command::Programs => programs(),
    }
}

/// Loads the programs for both link layers (the daemon's L3 devices, and the
/// Ethernet mode the tests and benchmarks use) so both pass the verifier.
fn programs() -> Result<()> {
    for layer in [LinkLayer::Ip, LinkLayer::Ethernet] {
        let datapath = Datapath::load(&LoadOptions::uniform(layer))
            .with_context(|| format!("{LOAD_HINT} for {layer:?} devices"))?;
        println!("programs for {layer:?} devices, accepted by the verifier:");
        println!(
            "  {:<16} {:>6} {:>13} {:>14} {:>11}",
            "program", "id", "instructions", "verifier insns", "JIT bytes"
        );
        for p in datapath.programs()? {
            println!(
                "  {:<16} {:>6} {:>13} {:>14} {:>11}",
                p.program.name(),
                p.id,
                p.instructions,
                p.verified_instructions,
                p.jited_bytes
            );
        }
    }
    Ok(())
}

async fn run(args: &RunArgs) -> Result<()> {
    let mut datapath = Datapath::load(&LoadOptions::default()).context(LOAD_HINT)?;
    let mode = args.tc_attach.into();
    let attached = async {
        datapath
            .attach(Device::WireGuard, &args.wg_device, mode)
            .await?;
        datapath
            .attach(Device::Tailscale, &args.ts_device, mode)
            .await
    }
    .await;
    if let Err(e) = attached {
        // Leave nothing half-applied: undo the first device if the second failed.
        let _ = datapath.detach().await;
        return Err(e).context("attaching the eBPF programs");
    }
    info!(wg = %args.wg_device, ts = %args.ts_device, "running; SIGINT or SIGTERM stops");

    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }

    let counters = datapath.counters()?;
    for device in Device::ALL {
        for direction in Direction::ALL {
            let c = counters.hook_total(device, direction);
            info!(
                device = device.name(),
                direction = direction.name(),
                packets = c.packets,
                bytes = c.bytes,
                "counted"
            );
        }
    }
    datapath.detach().await.map_err(|errors| {
        let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("teardown left {} error(s): {}", list.len(), list.join("; "))
    })?;
    info!("stopped; programs detached");
    Ok(())
}
