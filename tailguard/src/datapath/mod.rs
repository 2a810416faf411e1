//! The eBPF datapath: the TC programs embedded in this binary, loaded with
//! aya and attached to the WireGuard and Tailscale devices; the maps the
//! daemon fills (configuration, route tries), the connection state (pinned,
//! `pin`), and the counters.

mod attach;
mod counters;
mod maps;
mod object;
pub mod pin;

pub use attach::{AttachMode, Backend};
pub use counters::{Counters, Outcomes};
pub use maps::Routes;
pub use object::{LinkLayer, LoadOptions, Program, nat_table_bytes};

use std::collections::BTreeMap;

use aya::{Ebpf, programs::SchedClassifier};
use tailguard_common::{
    Config, Device, Direction,
    nat::{FlowKey, NatEntry},
};

/// The loaded programs and everything they are attached to. Dropping it
/// detaches the programs; [`Datapath::detach`] also removes any clsact qdisc
/// it had to create, and should be preferred.
pub struct Datapath {
    ebpf: Ebpf,
    attachments: attach::Attachments,
}

/// Errors of the datapath, naming the program or device involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("device {device}: {message}")]
    Device { device: String, message: String },
}

impl Datapath {
    /// Loads every program through the kernel verifier.
    pub fn load(options: &LoadOptions) -> Result<Self, Error> {
        Ok(Self {
            ebpf: object::load(options)?,
            attachments: attach::Attachments::default(),
        })
    }

    /// The program for `device`'s `direction` hook.
    pub fn program(&self, device: Device, direction: Direction) -> Result<&SchedClassifier, Error> {
        object::program(&self.ebpf, Program::new(device, direction))
    }

    /// The benchmarks' floor (`tg_bench_floor`: a program that only
    /// redirects), loaded on first use; the daemon never uses it.
    pub fn bench_floor(&mut self) -> Result<&SchedClassifier, Error> {
        const NAME: &str = "tg_bench_floor";
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(NAME)
            .ok_or_else(|| object::program_error(NAME, aya::programs::ProgramError::NotLoaded))?
            .try_into()
            .map_err(|e| object::program_error(NAME, e))?;
        if program.fd().is_err() {
            program.load().map_err(|e| object::program_error(NAME, e))?;
        }
        Ok(program)
    }

    /// Summaries of every loaded program, as the kernel reports them.
    pub fn programs(&self) -> Result<Vec<object::ProgramSummary>, Error> {
        object::summaries(&self.ebpf)
    }

    /// Attaches `device`'s ingress and egress programs to interface `ifname`.
    pub async fn attach(
        &mut self,
        device: Device,
        ifname: &str,
        mode: AttachMode,
    ) -> Result<Backend, Error> {
        self.attachments
            .attach(&mut self.ebpf, device, ifname, mode)
            .await
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, Error> {
        counters::read(&self.ebpf)
    }

    /// What the ingress programs did, summed over CPUs.
    pub fn outcomes(&self) -> Result<Outcomes, Error> {
        counters::read_outcomes(&self.ebpf)
    }

    /// Writes the configuration entry the programs read.
    pub fn write_config(&mut self, config: &Config) -> Result<(), Error> {
        maps::write_config(&mut self.ebpf, config)
    }

    /// The configuration entry as the kernel holds it.
    pub fn config(&self) -> Result<Config, Error> {
        maps::read_config(&self.ebpf)
    }

    /// Makes the route tries hold exactly `routes`.
    pub fn sync_routes(&mut self, routes: &Routes) -> Result<(), Error> {
        maps::sync_routes(&mut self.ebpf, routes)
    }

    /// The route tries as the kernel holds them.
    pub fn routes(&self) -> Result<Routes, Error> {
        maps::read_routes(&self.ebpf)
    }

    /// The connection-state map, to read (or, in tests, to fill).
    pub fn nat(
        &mut self,
    ) -> Result<aya::maps::HashMap<&mut aya::maps::MapData, FlowKey, NatEntry>, Error> {
        maps::nat(&mut self.ebpf)
    }

    /// Kernel memory of each map, in bytes, as the kernel accounts it
    /// (`memlock` in the map's fdinfo: the whole preallocated table for the
    /// LRU connection state, however full it is).
    pub fn map_memory(&self) -> Result<BTreeMap<String, u64>, Error> {
        maps::memory(&self.ebpf)
    }

    /// Detaches every program and removes the clsact qdiscs this datapath
    /// created. Keeps going past errors and reports them all.
    pub async fn detach(mut self) -> Result<(), Vec<Error>> {
        self.attachments.detach(&mut self.ebpf).await
    }
}
