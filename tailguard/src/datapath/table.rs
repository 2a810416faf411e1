//! The connection table as the daemon sees it (`tailguard_common::nat`):
//! the maps that hold it, with their sizes and what their pins must match;
//! reading it whole (in batches: one system call per few thousand entries,
//! not two per entry); the halves one at a time by key, for the sweeper and
//! the tests; and the programs' table events.

use std::collections::BTreeMap;
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use bytemuck::{Pod, Zeroable};
use tailguard_common::nat::{
    FlowKey, Half, Half4, Half6, Key4, Key6, SourceKey, TableEvent, TableSize,
};

use super::{Datapath, Error, maps};

pub const NAT4: &str = "NAT4";
pub const NAT6: &str = "NAT6";
pub const SOURCES: &str = "SOURCES";
pub const KERNEL_FLOWS: &str = "KERNEL_FLOWS";
const TABLE_EVENTS: &str = "TABLE_EVENTS";

/// `BPF_MAP_TYPE_HASH` and `BPF_MAP_TYPE_LRU_HASH`.
const HASH: u32 = 1;
const LRU_HASH: u32 = 9;

/// One map of the connection state, pinned so that flows outlive the
/// daemon: what a pin must match to be reused.
#[derive(Clone, Copy, Debug)]
pub struct StateMap {
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: usize,
    pub value_size: usize,
    /// Its entries for a table of this size.
    pub entries: fn(&TableSize) -> u32,
}

/// Every pinned map: the two tables, the budgets that count their flows,
/// and the kernel's UDP flows (see `kernel_flows`). They are reused or
/// discarded together: a table without its budgets would be miscounted.
pub const STATE_MAPS: [StateMap; 4] = [
    StateMap {
        name: NAT4,
        map_type: HASH,
        key_size: size_of::<Key4>(),
        value_size: size_of::<Half4>(),
        entries: |size| size.entries(false),
    },
    StateMap {
        name: NAT6,
        map_type: HASH,
        key_size: size_of::<Key6>(),
        value_size: size_of::<Half6>(),
        entries: |size| size.entries(true),
    },
    StateMap {
        name: SOURCES,
        map_type: HASH,
        key_size: size_of::<SourceKey>(),
        value_size: size_of::<i64>(),
        entries: TableSize::sources,
    },
    StateMap {
        name: KERNEL_FLOWS,
        map_type: LRU_HASH,
        key_size: size_of::<FlowKey>(),
        value_size: size_of::<u32>(),
        entries: TableSize::kernel_flows,
    },
];

/// Entries asked for per batch: more than any bucket holds (the kernel
/// refuses a batch smaller than a bucket with ENOSPC).
const BATCH: usize = 4096;

/// `union bpf_attr`'s part for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// `union bpf_attr`'s part for the element commands.
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Removes `key`'s entry and returns what it held at that moment
/// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, hash maps since Linux 5.14): one
/// step, so nothing a program writes in between is lost unseen.
fn take<K: Pod, V: Pod>(map: &MapData, name: &'static str, key: &K) -> Result<Option<V>, Error> {
    let mut value = V::zeroed();
    let mut attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        ..ElemAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size given; `key`
    // and `value` have the map's sizes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw mut attr,
            size_of::<ElemAttr>(),
        )
    };
    if ret == 0 {
        return Ok(Some(value));
    }
    let errno = std::io::Error::last_os_error();
    if errno.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(maps::map_error(name)(aya::maps::MapError::SyscallError(
        aya::sys::SyscallError {
            call: "bpf_map_lookup_and_delete_elem",
            io_error: errno,
        },
    )))
}
/// The map update flag "only if the key is new".
const BPF_NOEXIST: u64 = 1;

/// Every entry of a hash map, read with `BPF_MAP_LOOKUP_BATCH` (Linux
/// 5.6): consistent per bucket, not as a whole, which is all the sweeper
/// needs (what changes meanwhile it reads again before it acts).
fn read_all<K: Pod, V: Pod>(map: &MapData, name: &'static str) -> Result<Vec<(K, V)>, Error> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    let mut keys = vec![K::zeroed(); BATCH];
    let mut values = vec![V::zeroed(); BATCH];
    // The hash map's position is a bucket number.
    let mut position = 0u32;
    let mut next = 0u32;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const position as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix of the size given;
        // its buffers hold `count` keys and values of the map's sizes.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let errno = std::io::Error::last_os_error();
        let filled = attr.count as usize;
        out.extend(
            keys[..filled]
                .iter()
                .copied()
                .zip(values[..filled].iter().copied()),
        );
        if ret == 0 {
            position = next;
            first = false;
            continue;
        }
        // ENOENT: the end (its last entries are in this batch).
        if errno.raw_os_error() == Some(libc::ENOENT) {
            return Ok(out);
        }
        return Err(maps::map_error(name)(aya::maps::MapError::SyscallError(
            aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error: errno,
            },
        )));
    }
}

fn data<'a>(ebpf: &'a aya::Ebpf, name: &'static str) -> Result<&'a MapData, Error> {
    match maps::get(ebpf, name)? {
        Map::HashMap(data) | Map::LruHashMap(data) => Ok(data),
        _ => Err(maps::map_error(name)(aya::maps::MapError::InvalidName {
            name: name.to_string(),
        })),
    }
}

/// The programs' table events, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableEvents(pub BTreeMap<&'static str, u64>);

impl TableEvents {
    pub fn get(&self, event: TableEvent) -> u64 {
        self.0.get(event.name()).copied().unwrap_or(0)
    }
}

impl Datapath {
    /// Every half of both tables.
    pub fn halves(&self) -> Result<Vec<(FlowKey, Half)>, Error> {
        let v4 = read_all::<Key4, Half4>(data(&self.ebpf, NAT4)?, NAT4)?;
        let v6 = read_all::<Key6, Half6>(data(&self.ebpf, NAT6)?, NAT6)?;
        Ok(v4
            .iter()
            .map(|(k, h)| (FlowKey::from_v4(k), Half::from_v4(h)))
            .chain(
                v6.iter()
                    .map(|(k, h)| (FlowKey::from_v6(k), Half::from_v6(h))),
            )
            .collect())
    }

    /// The half keyed `key`, if any.
    pub fn half(&self, key: &FlowKey) -> Result<Option<Half>, Error> {
        let missing = |e: aya::maps::MapError| match e {
            aya::maps::MapError::KeyNotFound => Ok(None),
            other => Err(other),
        };
        if key.is_ipv6() {
            let map: HashMap<_, Key6, Half6> =
                HashMap::try_from(maps::get(&self.ebpf, NAT6)?).map_err(maps::map_error(NAT6))?;
            map.get(&key.to_v6(), 0)
                .map(|h| Some(Half::from_v6(&h)))
                .or_else(missing)
                .map_err(maps::map_error(NAT6))
        } else {
            let map: HashMap<_, Key4, Half4> =
                HashMap::try_from(maps::get(&self.ebpf, NAT4)?).map_err(maps::map_error(NAT4))?;
            map.get(&key.to_v4(), 0)
                .map(|h| Some(Half::from_v4(&h)))
                .or_else(missing)
                .map_err(maps::map_error(NAT4))
        }
    }

    /// Writes `half` under `key`; with `only_new`, only where no entry is
    /// (`Ok(false)`: one was).
    pub fn insert_half(
        &mut self,
        key: &FlowKey,
        half: &Half,
        only_new: bool,
    ) -> Result<bool, Error> {
        let flags = if only_new { BPF_NOEXIST } else { 0 };
        let result = if key.is_ipv6() {
            let mut map: HashMap<_, Key6, Half6> =
                HashMap::try_from(maps::get_mut(&mut self.ebpf, NAT6)?)
                    .map_err(maps::map_error(NAT6))?;
            map.insert(&key.to_v6(), &half.to_v6(), flags)
                .map_err(|e| (NAT6, e))
        } else {
            let mut map: HashMap<_, Key4, Half4> =
                HashMap::try_from(maps::get_mut(&mut self.ebpf, NAT4)?)
                    .map_err(maps::map_error(NAT4))?;
            map.insert(&key.to_v4(), &half.to_v4(), flags)
                .map_err(|e| (NAT4, e))
        };
        match result {
            Ok(()) => Ok(true),
            Err((_, aya::maps::MapError::SyscallError(e)))
                if only_new && e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err((name, e)) => Err(maps::map_error(name)(e)),
        }
    }

    /// Removes the half keyed `key` and returns it as it was at that moment.
    pub fn take_half(&mut self, key: &FlowKey) -> Result<Option<Half>, Error> {
        if key.is_ipv6() {
            Ok(
                take::<Key6, Half6>(data(&self.ebpf, NAT6)?, NAT6, &key.to_v6())?
                    .map(|h| Half::from_v6(&h)),
            )
        } else {
            Ok(
                take::<Key4, Half4>(data(&self.ebpf, NAT4)?, NAT4, &key.to_v4())?
                    .map(|h| Half::from_v4(&h)),
            )
        }
    }

    /// Removes the half keyed `key`; `Ok(false)`: there was none.
    pub fn remove_half(&mut self, key: &FlowKey) -> Result<bool, Error> {
        let result = if key.is_ipv6() {
            let mut map: HashMap<_, Key6, Half6> =
                HashMap::try_from(maps::get_mut(&mut self.ebpf, NAT6)?)
                    .map_err(maps::map_error(NAT6))?;
            map.remove(&key.to_v6()).map_err(|e| (NAT6, e))
        } else {
            let mut map: HashMap<_, Key4, Half4> =
                HashMap::try_from(maps::get_mut(&mut self.ebpf, NAT4)?)
                    .map_err(maps::map_error(NAT4))?;
            map.remove(&key.to_v4()).map_err(|e| (NAT4, e))
        };
        match result {
            Ok(()) => Ok(true),
            Err((_, aya::maps::MapError::KeyNotFound)) => Ok(false),
            Err((_, aya::maps::MapError::SyscallError(e)))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err((name, e)) => Err(maps::map_error(name)(e)),
        }
    }

    /// The unreplied flows each source holds, as the programs count them.
    pub fn sources(&self) -> Result<BTreeMap<SourceKey, i64>, Error> {
        Ok(
            read_all::<SourceKey, i64>(data(&self.ebpf, SOURCES)?, SOURCES)?
                .into_iter()
                .collect(),
        )
    }

    /// Sets a source's count (0 removes it).
    pub fn set_source(&mut self, source: &SourceKey, count: i64) -> Result<(), Error> {
        let mut map: HashMap<_, SourceKey, i64> =
            HashMap::try_from(maps::get_mut(&mut self.ebpf, SOURCES)?)
                .map_err(maps::map_error(SOURCES))?;
        let result = if count == 0 {
            map.remove(source)
        } else {
            map.insert(source, &count, 0)
        };
        match result {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(maps::map_error(SOURCES)(e)),
        }
    }

    /// The kernel's UDP flows the programs leave to it, by key.
    pub fn kernel_flows(&mut self) -> Result<HashMap<&mut MapData, FlowKey, u32>, Error> {
        HashMap::try_from(maps::get_mut(&mut self.ebpf, KERNEL_FLOWS)?)
            .map_err(maps::map_error(KERNEL_FLOWS))
    }

    /// What the programs did to the table, summed over CPUs.
    pub fn table_events(&self) -> Result<TableEvents, Error> {
        let map_error = maps::map_error(TABLE_EVENTS);
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(maps::get(&self.ebpf, TABLE_EVENTS)?).map_err(&map_error)?;
        let mut events = BTreeMap::new();
        for event in TableEvent::ALL {
            let per_cpu = map.get(&(event as u32), 0).map_err(&map_error)?;
            events.insert(event.name(), per_cpu.iter().sum());
        }
        Ok(TableEvents(events))
    }
}
