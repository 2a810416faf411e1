//! The benchmarks' floor (`tailguard-ebpf/src/bench_floor.rs`: a program
//! that only writes the frame's Ethernet addresses and redirects), from an
//! object of its own: the daemon's object holds only the programs it
//! attaches.

use aya::{Ebpf, maps::Array, programs::SchedClassifier};
use tailguard_common::config::FloorHop;

use super::{Error, maps, object};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-floor"));

const NAME: &str = "tg_bench_floor";
const HOP: &str = "HOP";

/// The floor program, loaded through the verifier.
pub struct BenchFloor(Ebpf);

impl BenchFloor {
    pub fn load() -> Result<Self, Error> {
        // aya would call an empty object (AYA_BUILD_SKIP) a malformed ELF file.
        if OBJECT.is_empty() {
            return Err(Error::ObjectNotBuilt);
        }
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| Error::Object(Box::new(e)))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(NAME)
            .ok_or_else(|| object::missing(NAME))?
            .try_into()
            .map_err(|e| object::program_error(NAME, e))?;
        program.load().map_err(|e| object::program_error(NAME, e))?;
        Ok(Self(ebpf))
    }

    pub fn program(&self) -> Result<&SchedClassifier, Error> {
        self.0
            .program(NAME)
            .ok_or_else(|| object::missing(NAME))?
            .try_into()
            .map_err(|e| object::program_error(NAME, e))
    }

    /// Where the program redirects to and with which Ethernet addresses
    /// (by default: the loopback device, the frame left as it came).
    pub fn set_hop(&mut self, hop: &FloorHop) -> Result<(), Error> {
        let mut map: Array<_, FloorHop> =
            Array::try_from(maps::get_mut(&mut self.0, HOP)?).map_err(maps::map_error(HOP))?;
        map.set(0, hop, 0).map_err(maps::map_error(HOP))
    }
}
