//! The Ethernet addresses the programs write into the frames they redirect
//! out of an Ethernet device (the benchmarks' veth hop; WireGuard and TUN
//! devices have none): the next hop's, from the kernel's neighbour table,
//! and the device's own. Known addresses spare each frame the route and
//! neighbour lookup of `bpf_redirect_neigh`, which the programs fall back
//! to only while a next hop is unresolved.
//!
//! The daemon's own devices are L3, so it calls none of this: what drives it
//! is whoever attaches the programs to Ethernet devices (the benchmarks and
//! tests), with one next hop per device (a point-to-point link).

use std::net::IpAddr;

use futures_util::StreamExt as _;
use tailguard_common::{Device, config::LinkAddresses};

use super::{Datapath, Error};
use crate::host::netlink::{KernelChanges, Netlink};

/// The one neighbour a device's frames go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub device: Device,
    pub ifindex: u32,
    pub address: IpAddr,
}

/// Reads each next hop's addresses from the kernel and gives them to the
/// programs (unknown, so looked up per frame, while a neighbour is
/// unresolved). Returns how many are known.
pub async fn refresh(
    dp: &mut Datapath,
    netlink: &Netlink,
    hops: &[NextHop],
) -> Result<usize, Error> {
    let mut known = 0;
    for hop in hops {
        let addresses = netlink
            .link_addresses(hop.ifindex, hop.address)
            .await
            .map_err(|e| Error::Device {
                device: format!("link {}", hop.ifindex),
                message: format!("reading the neighbour {}: {e}", hop.address),
            })?
            .map_or_else(LinkAddresses::default, |(next_hop, own)| {
                LinkAddresses::new(next_hop, own)
            });
        known += usize::from(addresses.is_known());
        dp.set_link_addresses(hop.device, addresses)?;
    }
    Ok(known)
}

/// Keeps the programs' addresses equal to the kernel's neighbour table:
/// [`Follower::changed`] returns after the table changed and the
/// addresses were read again.
pub struct Follower {
    hops: Vec<NextHop>,
    changes: KernelChanges,
}

impl Follower {
    /// Starts listening for neighbour changes, then reads the addresses once.
    pub async fn start(
        dp: &mut Datapath,
        netlink: &Netlink,
        hops: Vec<NextHop>,
    ) -> Result<Self, Error> {
        // Listening first: a change between the read and the listen would
        // otherwise go unseen.
        let changes = Netlink::watch_neighbours().map_err(|e| Error::Device {
            device: "neighbour table".into(),
            message: format!("listening for changes: {e}"),
        })?;
        refresh(dp, netlink, &hops).await?;
        Ok(Self { hops, changes })
    }

    /// Waits for the neighbour table to change, then reads every next hop's
    /// addresses again. Returns how many are known.
    pub async fn changed(&mut self, dp: &mut Datapath, netlink: &Netlink) -> Result<usize, Error> {
        if self.changes.next().await.is_none() {
            return Err(Error::Device {
                device: "neighbour table".into(),
                message: "the kernel closed the notifications".into(),
            });
        }
        refresh(dp, netlink, &self.hops).await
    }
}
