//! The datagrams being fragmented: what each one's first fragment was, so
//! the later ones (which carry no ports) follow it (see
//! `tailguard_common::fragment`).

use aya_ebpf::{macros::map, maps::LruHashMap};
use tailguard_common::{
    Device,
    fragment::{FRAG_MAX_ENTRIES, FragEntry, FragKey},
    wire::{ipv4, ipv6},
};

use crate::packet::Packet;

#[map]
static FRAGMENTS: LruHashMap<FragKey, FragEntry> =
    LruHashMap::with_max_entries(FRAG_MAX_ENTRIES, 0);

/// The datagram `p` belongs to, as it arrives on `device`.
#[inline(always)]
pub fn key_of(p: &Packet, device: Device) -> FragKey {
    FragKey {
        src: p.src,
        dst: p.dst,
        id: p.frag_id,
        proto: p.frag_proto,
        ingress: device as u8,
        family: if p.ipv6 { ipv6::VERSION } else { ipv4::VERSION },
        _pad: 0,
    }
}

/// What the first fragment of `p` was, before anything was translated.
#[inline(always)]
pub fn first_of(p: &Packet) -> FragEntry {
    FragEntry {
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        ours: 0,
        _pad: 0,
    }
}

/// Remembers a first fragment. If the map refuses, the later fragments are
/// treated as of an unknown datagram.
#[inline(always)]
pub fn remember(key: &FragKey, first: &FragEntry) {
    let _ = FRAGMENTS.insert(key, first, 0);
}

/// The first fragment of `key`'s datagram, if it was seen.
#[inline(always)]
pub fn recall(key: &FragKey) -> Option<FragEntry> {
    // SAFETY: a plain read of a map value.
    unsafe { FRAGMENTS.get(key) }.copied()
}
