//! The embedded eBPF object and its programs.

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, SchedClassifier},
};
use tailguard_common::{
    Device, Direction,
    nat::{FlowKey, NAT_MAX_ENTRIES, NatEntry, nat_entries},
};

use super::Error;

/// The object built by `build.rs` (aya-build) from the `tailguard-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tailguard"));

/// What a device's packets start with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkLayer {
    /// The IP header (WireGuard, TUN): the production case.
    #[default]
    Ip,
    /// An Ethernet header (veth; and `BPF_PROG_TEST_RUN`, which always
    /// builds an Ethernet frame).
    Ethernet,
}

/// Settings fixed when the object is loaded.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub wireguard: LinkLayer,
    pub tailscale: LinkLayer,
    /// Where the connection-state map is pinned (reused if it is there);
    /// `None`: an unpinned map that goes with the programs.
    pub nat_pin: Option<std::path::PathBuf>,
    /// Flows the connection-state map holds; 0: the compiled default.
    pub nat_flows: u32,
}

impl LoadOptions {
    /// Both devices with the same link layer.
    pub const fn uniform(link_layer: LinkLayer) -> Self {
        Self {
            wireguard: link_layer,
            tailscale: link_layer,
            nat_pin: None,
            nat_flows: 0,
        }
    }

    /// Entries of the connection-state map: two per flow, and room for
    /// what the kernel's LRU keeps aside. Each CPU holds up to 128 free
    /// entries of its own (`LOCAL_FREE_TARGET`), which the others cannot
    /// use: a map sized exactly starts evicting live flows early (seen:
    /// 1,000 flows in 2,000 entries on 2 CPUs kept 976).
    pub fn nat_entries(&self) -> u32 {
        let flows = if self.nat_flows == 0 {
            NAT_MAX_ENTRIES
        } else {
            nat_entries(self.nat_flows)
        };
        let cpus = aya::util::nr_cpus().map_or(1, std::num::NonZeroU32::get);
        flows.saturating_add(128 * cpus)
    }
}

/// About what the kernel allocates for the connection table of `flows`
/// flows: each entry its key, its value and the hash table's own element
/// header and bucket (the benchmarks measured 322 bytes per flow at a
/// million flows, two entries each).
pub fn nat_table_bytes(flows: u32) -> u64 {
    const PER_ENTRY_OVERHEAD: u64 = 64;
    let options = LoadOptions {
        nat_flows: flows,
        ..LoadOptions::default()
    };
    let entry = (size_of::<FlowKey>() + size_of::<NatEntry>()) as u64 + PER_ENTRY_OVERHEAD;
    u64::from(options.nat_entries()) * entry
}

/// One of the programs: which device role and which hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    pub device: Device,
    pub direction: Direction,
}

impl Program {
    pub const ALL: [Self; 4] = [
        Self::new(Device::WireGuard, Direction::Ingress),
        Self::new(Device::WireGuard, Direction::Egress),
        Self::new(Device::Tailscale, Direction::Ingress),
        Self::new(Device::Tailscale, Direction::Egress),
    ];

    pub const fn new(device: Device, direction: Direction) -> Self {
        Self { device, direction }
    }

    /// The function name in `tailguard-ebpf/src/main.rs`.
    pub const fn name(self) -> &'static str {
        match (self.device, self.direction) {
            (Device::WireGuard, Direction::Ingress) => "tg_wg_ingress",
            (Device::WireGuard, Direction::Egress) => "tg_wg_egress",
            (Device::Tailscale, Direction::Ingress) => "tg_ts_ingress",
            (Device::Tailscale, Direction::Egress) => "tg_ts_egress",
        }
    }
}

/// What the kernel says about one loaded program.
#[derive(Clone, Debug)]
pub struct ProgramSummary {
    pub program: Program,
    pub id: u32,
    /// Instructions after the verifier's rewrites (`xlated_prog_len / 8`).
    pub instructions: u32,
    /// Instructions the verifier walked through to prove the program safe.
    pub verified_instructions: u32,
    pub jited_bytes: u32,
}

pub(super) fn load(options: &LoadOptions) -> Result<Ebpf, Error> {
    let flag = |layer: LinkLayer| u8::from(layer == LinkLayer::Ethernet);
    let (wg, ts) = (flag(options.wireguard), flag(options.tailscale));
    let mut loader = EbpfLoader::new();
    loader
        .override_global("WG_ETHERNET", &wg, true)
        .override_global("TS_ETHERNET", &ts, true);
    loader.map_max_entries("NAT", options.nat_entries());
    if let Some(pin) = &options.nat_pin {
        loader.map_pin_path("NAT", pin.as_path());
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| Error::Object(Box::new(e)))?;
    for program in Program::ALL {
        let name = program.name();
        let classifier: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| missing(name))?
            .try_into()
            .map_err(|e| program_error(name, e))?;
        classifier.load().map_err(|e| program_error(name, e))?;
    }
    Ok(ebpf)
}

pub(super) fn program(ebpf: &Ebpf, program: Program) -> Result<&SchedClassifier, Error> {
    let name = program.name();
    ebpf.program(name)
        .ok_or_else(|| missing(name))?
        .try_into()
        .map_err(|e| program_error(name, e))
}

pub(super) fn program_mut(
    ebpf: &mut Ebpf,
    program: Program,
) -> Result<&mut SchedClassifier, Error> {
    let name = program.name();
    ebpf.program_mut(name)
        .ok_or_else(|| missing(name))?
        .try_into()
        .map_err(|e| program_error(name, e))
}

pub(super) fn summaries(ebpf: &Ebpf) -> Result<Vec<ProgramSummary>, Error> {
    Program::ALL
        .into_iter()
        .map(|p| {
            let info = program(ebpf, p)?
                .info()
                .map_err(|e| program_error(p.name(), e))?;
            Ok(ProgramSummary {
                program: p,
                id: info.id(),
                instructions: info.size_translated().unwrap_or(0) / 8,
                verified_instructions: info.verified_instruction_count().unwrap_or(0),
                jited_bytes: info.size_jitted(),
            })
        })
        .collect()
}

pub(super) fn program_error(name: &'static str, source: ProgramError) -> Error {
    Error::Program {
        name,
        source: Box::new(source),
    }
}

fn missing(name: &'static str) -> Error {
    program_error(name, ProgramError::NotLoaded)
}
