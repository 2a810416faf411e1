//! The eBPF datapath: the TC programs embedded in this binary, loaded with
//! aya and attached to the WireGuard and Tailscale devices; the maps the
//! daemon fills (configuration, route tries), the connection table
//! (`table`, pinned by `pin`, swept by `sweeper`), and the counters.

mod attach;
#[cfg(feature = "bench")]
mod bench_floor;
pub mod clock;
mod counters;
pub mod kernel_flows;
pub mod link_addresses;
pub mod map_contents;
mod maps;
mod object;
pub mod pin;
pub mod sweeper;
pub mod table;

pub use attach::Backend;
#[cfg(feature = "bench")]
pub use bench_floor::BenchFloor;
pub use counters::{Counters, Outcomes};
pub use maps::Routes;
pub use object::{LinkLayer, LoadOptions, Program};

use std::collections::BTreeMap;

use crate::errors::one_line;

use crate::config::settings::AttachMode;

use aya::{
    Ebpf,
    programs::{ProgramError, SchedClassifier},
};
use tailguard_common::{Config, Device, Direction, config::LinkAddresses};

/// The loaded programs and everything they are attached to. Dropping it
/// detaches the programs; [`Datapath::detach`] also removes any clsact qdisc
/// it had to create, and should be preferred.
pub struct Datapath {
    ebpf: Ebpf,
    attachments: attach::Attachments,
    /// The table's clock as measured at load, for the configuration entry.
    clock: tailguard_common::config::Clock,
    /// The Ethernet addresses of frames out of each device, by
    /// `Device as usize` (see `link_addresses`), for the configuration entry.
    links: [LinkAddresses; 2],
}

/// Errors of the datapath, naming the program or device involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this tailguard carries no eBPF programs: it was built with AYA_BUILD_SKIP=1 \
         (for `cargo check`); build it without that to use the fast path"
    )]
    ObjectNotBuilt,
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
    #[error(
        "{count} {family} routes change where a destination goes, more than the fast \
         path's {max}: the tailnet's and the WireGuard side's routes together must stay \
         within it (or set TG_DATAPATH=netfilter)"
    )]
    TooManyRoutes {
        family: &'static str,
        count: usize,
        max: u32,
    },
    #[error("device {device}: {message}")]
    Device { device: String, message: String },
    #[error(
        "the kernel's jiffies did not move, or never closely enough to time them, within \
         {seconds} s (read by {probe}): the connection table has no clock"
    )]
    ClockStoodStill { probe: &'static str, seconds: u64 },
}

/// The longest [`Error::summary`], in characters: a log line, a field of
/// `/status`.
const SUMMARY_MAX: usize = 300;

impl Error {
    /// What failed and why, in one short line: for a program the verifier
    /// refused, which one and the verifier's own reason (the last words of
    /// its log), never the thousands of lines it traced on its way; for
    /// anything else, the error and its sources, each said once.
    pub fn summary(&self) -> String {
        let line = match self {
            Self::Program { name, source } => match source.as_ref() {
                ProgramError::LoadError {
                    io_error,
                    verifier_log,
                } => match object::verifier_reason(&verifier_log.to_string()) {
                    Some(reason) => format!("{name} was refused by the verifier: {reason}"),
                    None => format!("{name}: the BPF_PROG_LOAD syscall returned {io_error}"),
                },
                _ => one_line(self),
            },
            _ => one_line(self),
        };
        match line.char_indices().nth(SUMMARY_MAX) {
            Some((cut, _)) => format!("{}…", &line[..cut]),
            None => line,
        }
    }
}

impl Datapath {
    /// Loads every program through the kernel verifier.
    pub fn load(options: &LoadOptions) -> Result<Self, Error> {
        let mut ebpf = object::load(options)?;
        let clock = clock::measure(&mut ebpf)?;
        Ok(Self {
            ebpf,
            attachments: attach::Attachments::default(),
            clock,
            links: Default::default(),
        })
    }

    /// The program for `device`'s `direction` hook.
    pub fn program(&self, device: Device, direction: Direction) -> Result<&SchedClassifier, Error> {
        object::program(&self.ebpf, Program::new(device, direction))
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

    /// Writes the configuration entry the programs read, with the table's
    /// clock as measured at load and the link addresses last set (whatever
    /// `config` says of them).
    pub fn write_config(&mut self, config: &Config) -> Result<(), Error> {
        let mut config = Config {
            clock: self.clock,
            ..*config
        };
        for device in Device::ALL {
            config.set_link(device, self.links[device as usize]);
        }
        maps::write_config(&mut self.ebpf, &config)
    }

    /// Gives the programs the Ethernet addresses of frames they redirect
    /// out of `device` (see `link_addresses`), in the entry they read now
    /// and in every one written later.
    pub fn set_link_addresses(
        &mut self,
        device: Device,
        addresses: LinkAddresses,
    ) -> Result<(), Error> {
        self.links[device as usize] = addresses;
        let current = self.config()?;
        self.write_config(&current)
    }

    /// The configuration entry as the kernel holds it.
    pub fn config(&self) -> Result<Config, Error> {
        maps::read_config(&self.ebpf)
    }

    /// Makes the route tries answer every destination as `routes` does
    /// (holding only the prefixes that change an answer).
    pub fn sync_routes(&mut self, routes: &Routes) -> Result<(), Error> {
        maps::sync_routes(&mut self.ebpf, routes)
    }

    /// The route tries as the kernel holds them.
    pub fn routes(&self) -> Result<Routes, Error> {
        maps::read_routes(&self.ebpf)
    }

    /// Kernel memory of each map, in bytes, as the kernel accounts it
    /// (`memlock` in the map's fdinfo: the whole preallocated table for the
    /// connection state, however full it is).
    pub fn map_memory(&self) -> Result<BTreeMap<String, u64>, Error> {
        maps::memory(&self.ebpf)
    }

    /// Detaches every program and removes the clsact qdiscs this datapath
    /// created. Keeps going past errors and reports them all.
    pub async fn detach(mut self) -> Result<(), Vec<Error>> {
        self.attachments.detach(&mut self.ebpf).await
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use nix::errno::Errno;

    use super::*;

    fn refused(errno: i32, log: &str) -> Error {
        object::program_error(
            "tg_wg_ingress",
            ProgramError::LoadError {
                io_error: io::Error::from_raw_os_error(errno),
                verifier_log: aya_obj::VerifierLog::new(log.to_string()),
            },
        )
    }

    #[test]
    fn a_refused_program_is_summed_up_by_the_verifiers_reason() {
        let trace = "10477: (bf) r1 = r6                   ; R1_w=ctx(off=0,imm=0)\n".repeat(5000);
        let log = format!(
            "{trace}combined stack size of 3 calls is 544. Too large\n\
             verification time 18982898 usec\nstack depth 0+456+0+0\n\
             processed 240657 insns (limit 1000000) max_states_per_insn 26\n"
        );
        assert_eq!(
            refused(Errno::EACCES as i32, &log).summary(),
            "tg_wg_ingress was refused by the verifier: combined stack size of 3 calls is 544. \
             Too large"
        );
    }

    #[test]
    fn other_errors_are_their_chain_in_one_line() {
        // Without privileges the kernel refuses before verifying: no log.
        assert_eq!(
            refused(Errno::EPERM as i32, "").summary(),
            "tg_wg_ingress: the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1)"
        );
        let map = Error::Object(Box::new(aya::EbpfError::MapError(
            aya::maps::MapError::CreateError {
                name: "CONFIG".into(),
                io_error: io::Error::from_raw_os_error(Errno::EPERM as i32),
            },
        )));
        assert_eq!(
            map.summary(),
            "loading the eBPF object: map error: failed to create map `CONFIG`: \
             Operation not permitted (os error 1)"
        );
        let device = Error::Device {
            device: "wg0".into(),
            message: "adding a clsact qdisc: netlink error\nwith a second line".into(),
        };
        assert_eq!(
            device.summary(),
            "device wg0: adding a clsact qdisc: netlink error"
        );
    }

    #[test]
    fn a_summary_is_capped() {
        let reason = "x".repeat(1000);
        let summary = refused(
            Errno::EACCES as i32,
            &format!("{reason}\nprocessed 1 insns (limit 1000000)\n"),
        )
        .summary();
        assert_eq!(summary.chars().count(), SUMMARY_MAX + 1, "{summary}");
        assert!(summary.ends_with('…'), "{summary}");
    }
}
