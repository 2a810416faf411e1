//! The `tailguard` command: the daemon and its helper commands.

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigHandler, Signal};
use tailguard::{
    config::settings::{Settings, SettingsArgs},
    daemon::{self, LOAD_HINT},
    datapath::{Datapath, LinkLayer, LoadOptions},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

#[derive(Parser)]
#[command(version, about = "Joins a WireGuard network to a Tailscale tailnet")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: SettingsArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Check the settings and the WireGuard configuration and print what
    /// the daemon would set up; touches nothing.
    Check,
    /// Ask the running daemon whether it is ready: traffic can flow both
    /// ways now (`/healthz`, for Docker's HEALTHCHECK): exit status 0 if
    /// so, 1 with every reason if not.
    Health {
        /// Ask whether it is alive instead (`/livez`: its loop turns,
        /// ready or not).
        #[arg(long)]
        live: bool,
    },
    /// Print the running daemon's status as JSON: health, and the
    /// forwarding plane's maps as the kernel holds them.
    Status,
    /// Print the fast path's counters (packets and bytes per device and
    /// outcome: redirected, handed to the kernel and why, dropped and why)
    /// and how full its connection table is.
    Stats,
    /// Remove what a stopped (or killed) TailGuard leaves behind on purpose
    /// or by accident: its pinned connection state and its nftables table.
    Cleanup,
    /// Load the eBPF programs through the kernel verifier and list them with
    /// their instruction counts; attaches nothing.
    Programs,
    /// Write a matching pair of wg-quick files with fresh keys for one of
    /// the usage patterns: `wg0.conf` (TailGuard's) and `peer.conf` (the
    /// WireGuard host's at the other end).
    WgPair {
        #[arg(value_enum)]
        pattern: tailguard::cli::wg_pair::Pattern,
        /// Where the listening side is reached: TailGuard for `server`,
        /// `bridge` and `tailnet-exit`, the WireGuard server for
        /// `exit-node` (host or host:port; port 51820 by default).
        #[arg(long)]
        endpoint: String,
        /// Directory to write the two files to (made if missing).
        #[arg(long, default_value = ".")]
        out: std::path::PathBuf,
    },
}

/// Variables that may hold the Tailscale auth key: `TS_AUTHKEY` (ours),
/// `TS_AUTH_KEY` (Tailscale's other spelling), and `TS_EXTRA_ARGS` (where
/// a key given as `--authkey` ends up).
const SECRET_VARIABLES: [&str; 3] = ["TS_AUTHKEY", "TS_AUTH_KEY", "TS_EXTRA_ARGS"];

fn main() -> Result<()> {
    // The settings are read from the environment here, once; then the
    // variables that may hold a secret leave the environment, so that no
    // process we start — tailscaled (which gets the key over the LocalAPI),
    // wireguard-go, the wg-quick hooks, `nft`, and whatever is added later —
    // inherits them. Done to the whole process, before any thread exists,
    // so that no spawn can forget it.
    let cli = Cli::try_parse().unwrap_or_else(|e| exit_redacted(e));
    for variable in SECRET_VARIABLES {
        // SAFETY: single-threaded still: no runtime, no other thread exists
        // yet to read the environment while it changes.
        unsafe { std::env::remove_var(variable) };
    }
    // SIGPIPE ignored (std does it before `main`; said here because the
    // daemon relies on it): a log line written to a closed stderr (a
    // terminal gone, a log reader that died) fails that one write instead
    // of killing the daemon with everything it set up left in place.
    // SAFETY: no handler is installed, only the disposition `ignore`.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigIgn) }
        .context("ignoring SIGPIPE")?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Its report of a failed write goes to stderr with `eprintln!`,
        // which panics when that is the closed pipe the write failed on.
        .log_internal_errors(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(command(cli))
    }));
    // Name look-ups a stop abandoned (getaddrinfo cannot be cut short) must
    // not hold up the exit: the teardown is done by now.
    runtime.shutdown_background();
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

async fn command(cli: Cli) -> Result<()> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&validated(cli.settings)?).await,
        Command::Check => check(&validated(cli.settings)?).await,
        Command::Programs => programs(),
        Command::Health { live } => health(&validated(cli.settings)?, live).await,
        Command::Status => status(&validated(cli.settings)?).await,
        Command::Cleanup => cleanup(&validated(cli.settings)?).await,
        Command::Stats => stats(&validated(cli.settings)?).await,
        Command::WgPair {
            pattern,
            endpoint,
            out,
        } => wg_pair(pattern, &endpoint, &out),
    }
}

/// Prints clap's message (an error, or the help) and exits as clap would,
/// redacted: clap quotes a bad value back, and its help shows the
/// environment's values, where a key pasted into the wrong variable (or
/// TS_EXTRA_ARGS) must not be shown.
fn exit_redacted(e: clap::Error) -> ! {
    let (use_stderr, code) = (e.use_stderr(), e.exit_code());
    let text = tailguard::config::settings::redact_cli_error(e);
    if use_stderr {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    std::process::exit(code)
}

/// Checks the settings as a whole, logs what will be ignored, and stops on
/// contradictions.
fn validated(args: SettingsArgs) -> Result<Settings> {
    let (settings, warnings) = args.validate()?;
    for warning in warnings {
        warn!("{warning}");
    }
    Ok(settings)
}

async fn health(settings: &Settings, live: bool) -> Result<()> {
    match tailguard::http::health::check(settings.health_addr, live).await {
        Ok(report) => {
            print!("{report}");
            Ok(())
        }
        Err(report) => {
            print!("{report}");
            std::process::exit(1);
        }
    }
}

async fn status(settings: &Settings) -> Result<()> {
    let report = tailguard::http::health::ask_report(settings.health_addr).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

async fn stats(settings: &Settings) -> Result<()> {
    let report = tailguard::http::health::ask_report(settings.health_addr).await?;
    println!("datapath: {}", report.datapath);
    print_connection_table(report.connection_table.as_ref());
    println!(
        "{:<10} {:<24} {:>12} {:>14} {:>10}",
        "device", "outcome", "packets", "bytes", "packets/s"
    );
    for (device, outcomes) in report.counters.iter().flatten() {
        for (outcome, c) in outcomes {
            let rate = report
                .rates
                .as_ref()
                .and_then(|r| r.outcomes.get(device)?.get(outcome))
                .map_or(0.0, |r| r.packets);
            println!(
                "{device:<10} {outcome:<24} {:>12} {:>14} {rate:>10.1}",
                c.packets, c.bytes
            );
        }
    }
    Ok(())
}

/// The connection table's part of the report, as `tailguard stats` shows it.
fn print_connection_table(table: Option<&tailguard::report::ConnectionTableReport>) {
    let Some(table) = table else {
        println!("connection table: not swept yet (or the netfilter datapath)");
        return;
    };
    for (family, o) in [("ipv4", table.ipv4), ("ipv6", table.ipv6)] {
        println!(
            "connection table {family}: {} flows of {}",
            o.flows, o.capacity
        );
    }
    let line = |what: &str, counts: &std::collections::BTreeMap<String, u64>| {
        let counts: Vec<String> = counts
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let counts = if counts.is_empty() {
            "none".to_string()
        } else {
            counts.join(", ")
        };
        println!("  {what}: {counts}");
    };
    line("live by state", &table.live);
    line("expired by state", &table.expired);
    line("events", &table.events);
    println!(
        "  unreplied per source: {}; restored {}, orphans removed {}",
        table.unreplied_per_source, table.restored, table.orphans_removed
    );
}

async fn cleanup(settings: &Settings) -> Result<()> {
    let dir = tailguard::config::plan::pin_dir(settings);
    if tailguard::datapath::pin::remove(&dir)? {
        println!("removed the pinned connection state in {}", dir.display());
    }
    tailguard::firewall::Firewall::default().remove().await?;
    println!(
        "removed the nftables table inet {}",
        tailguard::firewall::TABLE
    );
    Ok(())
}

async fn check(settings: &Settings) -> Result<()> {
    let plan = daemon::plan(settings)?;
    // Read-only, as `check` promises: the devices are what they must be.
    let nl = tailguard::host::netlink::Netlink::connect().context("opening rtnetlink")?;
    tailguard::daemon::preflight::devices(&nl, &plan).await?;
    print!("{plan}");
    let forwarding =
        tailguard::host::sysctls::Forwarding::read().context("reading the forwarding switches")?;
    print!("{forwarding}");
    Ok(())
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

async fn run(settings: &Settings) -> Result<()> {
    // Listen before changing anything: a signal that arrives during the
    // start must still lead to a clean teardown (SIGTERM, SIGINT) or to
    // nothing (SIGHUP), not to the default action that kills us with
    // everything left in place.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let shutdown = async move {
        loop {
            tokio::select! {
                _ = int.recv() => return info!("SIGINT: stopping"),
                _ = term.recv() => return info!("SIGTERM: stopping"),
                // A closing terminal, `docker kill -s HUP`, a service
                // manager's reload: it will reload once reload exists.
                _ = hup.recv() => warn!("SIGHUP: reload is not supported yet; ignored"),
            }
        }
    };
    Ok(daemon::run(settings, shutdown).await?)
}

fn wg_pair(
    pattern: tailguard::cli::wg_pair::Pattern,
    endpoint: &str,
    out: &std::path::Path,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    use tailguard::cli::wg_pair::{Keys, pair};

    let (wg0, peer) = pair(pattern, endpoint, &Keys::generate(), &Keys::generate())?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (name, text) in [("wg0.conf", wg0), ("peer.conf", peer)] {
        let path = out.join(name);
        // Private keys inside: readable by the owner only, and never
        // written over.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
