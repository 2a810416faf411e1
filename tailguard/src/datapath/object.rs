//! The embedded eBPF object and its programs.

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, SchedClassifier},
};
use tailguard_common::{Device, Direction, nat::TableSize};

use super::table::STATE_MAPS;

use super::Error;

/// The object built by `build.rs` (aya-build) from the `tailguard-ebpf` crate;
/// empty when built with `AYA_BUILD_SKIP`.
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
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub wireguard: LinkLayer,
    pub tailscale: LinkLayer,
    /// Where the connection table's maps are pinned (reused if they are
    /// there, see `pin`); `None`: unpinned maps that go with the programs.
    pub pin_dir: Option<std::path::PathBuf>,
    /// The connection table's size.
    pub nat: TableSize,
}

impl LoadOptions {
    /// Both devices with the same link layer.
    pub const fn uniform(link_layer: LinkLayer) -> Self {
        Self {
            wireguard: link_layer,
            tailscale: link_layer,
            pin_dir: None,
            nat: TableSize::COMPILED,
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::uniform(LinkLayer::default())
    }
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
    load_object(OBJECT, options)
}

fn load_object(object: &[u8], options: &LoadOptions) -> Result<Ebpf, Error> {
    // aya would call an empty object a malformed ELF file.
    if object.is_empty() {
        return Err(Error::ObjectNotBuilt);
    }
    let flag = |layer: LinkLayer| u8::from(layer == LinkLayer::Ethernet);
    let (wg, ts) = (flag(options.wireguard), flag(options.tailscale));
    let mut loader = EbpfLoader::new();
    loader
        .override_global("WG_ETHERNET", &wg, true)
        .override_global("TS_ETHERNET", &ts, true);
    for map in STATE_MAPS {
        loader.map_max_entries(map.name, (map.entries)(&options.nat));
        if let Some(dir) = &options.pin_dir {
            loader.map_pin_path(map.name, dir.join(map.name));
        }
    }
    let mut ebpf = loader
        .load(object)
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

pub(super) fn missing(name: &'static str) -> Error {
    program_error(name, ProgramError::NotLoaded)
}

/// The verifier's own reason for refusing a program: the last words of its
/// log, the lines just before the statistics that close it ("verification
/// time", "stack depth", "processed N insns"), without the instructions and
/// register states it traced on its way there. `None` when the log has no
/// such words (empty: the kernel refused the program before verifying it,
/// as for missing privileges).
pub(super) fn verifier_reason(log: &str) -> Option<String> {
    let mut reason: Vec<&str> = log
        .lines()
        .map(str::trim)
        .rev()
        .skip_while(|line| line.is_empty() || is_statistics(line))
        .take_while(|line| !line.is_empty() && !is_trace(line))
        .collect();
    reason.reverse();
    (!reason.is_empty()).then(|| reason.join("; "))
}

/// The lines the verifier closes its log with (`BPF_LOG_STATS`).
fn is_statistics(line: &str) -> bool {
    line.starts_with("verification time ")
        || line.starts_with("stack depth ")
        || line.starts_with("processed ") && line.contains(" insns")
}

/// A line of the path the verifier walked: an instruction (`123: (85) call
/// ...`, or its state `123: R0=...`), a source line (`; return x;`), a
/// branch taken (`from 12 to 34: ...`), the states around a call
/// (`caller:`, `callee:`), or a register-state dump (`R1=ctx() R10=fp0`,
/// `frame1: R6_w=...`, `fp-8=mmmmmmmm`).
fn is_trace(line: &str) -> bool {
    let numbered = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    let instruction = line.split_once(':').is_some_and(|(n, _)| numbered(n));
    let branch = line
        .strip_prefix("from ")
        .and_then(|rest| rest.split_once(" to "))
        .is_some_and(|(from, to)| {
            numbered(from) && to.split_once(':').is_some_and(|(n, _)| numbered(n))
        });
    let first = line
        .split_whitespace()
        .find(|word| !(word.starts_with("frame") && word.ends_with(':')))
        .unwrap_or_default();
    instruction
        || branch
        || line.starts_with(';')
        || matches!(line, "caller:" | "callee:")
        || first
            .split_once('=')
            .is_some_and(|(slot, _)| is_register_or_slot(slot))
}

/// `R0`..`R10` (perhaps with a liveness mark, `R1_w`) or a stack slot
/// (`fp-8`), as register-state dumps name them.
fn is_register_or_slot(name: &str) -> bool {
    let name = name.split_once('_').map_or(name, |(name, _)| name);
    let digits = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix('R').is_some_and(digits) || name.strip_prefix("fp-").is_some_and(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_built_with_aya_build_skip_is_refused_by_name() {
        // Refused before any syscall: no privileges needed.
        let error = load_object(&[], &LoadOptions::default()).unwrap_err();
        assert!(matches!(error, Error::ObjectNotBuilt), "{error:?}");
        assert!(
            error.summary().contains("AYA_BUILD_SKIP=1"),
            "{}",
            error.summary()
        );
    }

    /// Debian 12's 6.1 refusing `tg_wg_ingress` before the per-CPU slot
    /// (the end of its log: the trace, the reason, the statistics).
    const MAP_VALUE_REFUSAL: &str = "\
from 10640 to 10652: R0=scalar(umin=1,umax=2048) R6=ctx(off=0,imm=0) R7=map_value(off=0,ks=4,vs=2048,imm=0) R10=fp0 fp-8=mmmmmmmm
10652: R0=scalar(umin=1,umax=2048) R6=ctx(off=0,imm=0) R7=map_value(off=0,ks=4,vs=2048,imm=0) R10=fp0
; let n = ctx.load_bytes(offset, &mut slot.bytes[..len]);
10652: (bf) r1 = r6                   ; R1_w=ctx(off=0,imm=0) R6=ctx(off=0,imm=0)
10653: (bf) r3 = r7                   ; R3_w=map_value(off=0,ks=4,vs=2048,imm=0) R7=map_value(off=0,ks=4,vs=2048,imm=0)
10661: (85) call bpf_skb_load_bytes#26
invalid access to map value, value_size=2048 off=0 size=0
R3 min value is outside of the allowed memory range
verification time 2731466 usec
stack depth 0+456+0+0
processed 39137 insns (limit 1000000) max_states_per_insn 11 total_states 1520 peak_states 1437 mark_read 75
";

    /// Debian 12's 6.1 refusing the call chain's stack (the report).
    const STACK_REFUSAL: &str = "\
10477: (bf) r1 = r6                   ; frame2: R1_w=ctx(off=0,imm=0) R6=ctx(off=0,imm=0)
; }
10478: (b7) r0 = 2                    ; frame2: R0_w=2
10479: (95) exit
from 10471 to 10480: safe
combined stack size of 3 calls is 544. Too large
verification time 18982898 usec
stack depth 0+456+0+0
processed 240657 insns (limit 1000000) max_states_per_insn 26 total_states 9436 peak_states 5438 mark_read 76
";

    #[test]
    fn the_verifier_reason_is_the_last_words_of_its_log() {
        assert_eq!(
            verifier_reason(MAP_VALUE_REFUSAL).as_deref(),
            Some(
                "invalid access to map value, value_size=2048 off=0 size=0; \
                 R3 min value is outside of the allowed memory range"
            )
        );
        assert_eq!(
            verifier_reason(STACK_REFUSAL).as_deref(),
            Some("combined stack size of 3 calls is 544. Too large")
        );
    }

    #[test]
    fn a_log_without_a_reason_gives_none() {
        assert_eq!(verifier_reason(""), None);
        assert_eq!(verifier_reason("\n"), None);
        // Cut off in the trace (and statistics only): no words of its own.
        assert_eq!(
            verifier_reason(
                "caller:\n frame1: R6=ctx() R10=fp0\ncallee:\n frame2: R1=ctx() R10=fp0\n\
                 10652: (bf) r1 = r6\n; return x;\nR1=ctx() R10=fp0\nfp-8=mmmmmmmm\n"
            ),
            None
        );
        assert_eq!(
            verifier_reason(
                "verification time 12 usec\nstack depth 8\nprocessed 3 insns (limit 1000000)\n"
            ),
            None
        );
    }
}
