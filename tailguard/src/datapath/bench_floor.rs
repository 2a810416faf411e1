//! The benchmarks' floor (`tailguard-ebpf/src/bench_floor.rs`: a program
//! that only redirects), from an object of its own: the daemon's object
//! holds only the programs it attaches.

use aya::{Ebpf, programs::SchedClassifier};

use super::{Error, object};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-floor"));

const NAME: &str = "tg_bench_floor";

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
}
