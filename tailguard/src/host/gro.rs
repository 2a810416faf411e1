//! UDP GRO forwarding on the uplink (the default route's device):
//! `rx-udp-gro-forwarding on`, `rx-gro-list off`, as Tailscale advises for
//! nodes that forward UDP (WireGuard traffic). Through the kernel's ethtool
//! netlink family; the previous values come back when TailGuard stops.
//! Never fatal: a device that cannot do it is logged and left alone.
//!
//! The ethtool crate reads features but cannot yet write them (its bitset
//! encoder is unimplemented), so the one FEATURES_SET message we need is
//! encoded here; reading back still goes through the crate.

use std::collections::HashMap;

use ethtool::{EthtoolAttr, EthtoolFeatureAttr};
use futures_util::TryStreamExt as _;
use netlink_packet_core::{
    DecodeError, Emitable, NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use tracing::{info, warn};

use crate::host::netlink::Netlink;

pub const UDP_GRO_FORWARDING: &str = "rx-udp-gro-forwarding";
pub const GRO_LIST: &str = "rx-gro-list";

/// What failed while reading or setting the uplink's features.
#[derive(Debug, thiserror::Error)]
pub enum GroError {
    /// Opening a netlink socket, or the kernel refusing the change.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Ethtool(#[from] ethtool::EthtoolError),
    #[error(transparent)]
    Genetlink(#[from] genetlink::GenetlinkError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("restoring the GRO features of {device}")]
    Restore {
        device: String,
        #[source]
        source: Box<GroError>,
    },
}

/// What we changed, to put back.
pub struct GroSetup {
    ifname: String,
    ifindex: u32,
    previous: Vec<(&'static str, bool)>,
}

impl GroSetup {
    /// Turns UDP GRO forwarding on (and GRO lists off) on the uplink.
    /// Returns `None`, having said why, when there is nothing to do or it
    /// cannot be done.
    pub async fn enable(nl: &Netlink) -> Option<Self> {
        let uplink = match nl.default_route(false).await {
            Ok(Some(route)) => Some(route),
            _ => nl.default_route(true).await.ok().flatten(),
        };
        let Some((ifindex, _)) = uplink else {
            info!("no default route: UDP GRO forwarding left as it is");
            return None;
        };
        let ifname = match nl.link_name(ifindex).await {
            Ok(Some(name)) => name,
            _ => return None,
        };
        match Self::apply(&ifname, ifindex).await {
            Ok(Some(setup)) => Some(setup),
            Ok(None) => None,
            Err(e) => {
                warn!(device = ifname, "could not enable UDP GRO forwarding: {e}");
                None
            }
        }
    }

    async fn apply(ifname: &str, ifindex: u32) -> Result<Option<Self>, GroError> {
        let (changeable, active) = features(ifname).await?;
        if !changeable.contains(&UDP_GRO_FORWARDING.to_string()) {
            info!(
                device = ifname,
                "the uplink cannot do UDP GRO forwarding; left as it is"
            );
            return Ok(None);
        }
        let wanted = [(UDP_GRO_FORWARDING, true), (GRO_LIST, false)];
        let previous: Vec<(&'static str, bool)> = wanted
            .iter()
            .filter(|(name, _)| changeable.contains(&name.to_string()))
            .map(|(name, _)| (*name, active.get(*name).copied().unwrap_or(false)))
            .collect();
        let changes: Vec<(&'static str, bool)> = wanted
            .into_iter()
            .filter(|(name, on)| previous.contains(&(*name, !*on)))
            .collect();
        if changes.is_empty() {
            info!(device = ifname, "UDP GRO forwarding already on");
            return Ok(None);
        }
        set_features(ifindex, &changes).await?;
        info!(device = ifname, "UDP GRO forwarding on, GRO lists off");
        Ok(Some(Self {
            ifname: ifname.to_string(),
            ifindex,
            previous,
        }))
    }

    /// Puts the previous values back.
    pub async fn restore(self) -> Result<(), GroError> {
        set_features(self.ifindex, &self.previous)
            .await
            .map_err(|e| GroError::Restore {
                device: self.ifname,
                source: Box::new(e),
            })
    }
}

/// The features the device lets us change, and which are on now.
pub async fn features(ifname: &str) -> Result<(Vec<String>, HashMap<String, bool>), GroError> {
    let (connection, mut handle, _) = ethtool::new_connection()?;
    let task = tokio::spawn(connection);
    let replies: Vec<_> = handle
        .feature()
        .get(Some(ifname))
        .execute()
        .await?
        .try_collect()
        .await?;
    task.abort();
    let mut changeable = Vec::new();
    let mut active = HashMap::new();
    for reply in replies {
        for attr in reply.payload.nlas {
            match attr {
                EthtoolAttr::Feature(EthtoolFeatureAttr::Hw(bits)) => {
                    changeable.extend(bits.into_iter().filter(|b| b.value).map(|b| b.name));
                }
                EthtoolAttr::Feature(EthtoolFeatureAttr::Active(bits)) => {
                    active.extend(bits.into_iter().map(|b| (b.name, b.value)));
                }
                _ => {}
            }
        }
    }
    Ok((changeable, active))
}

async fn set_features(ifindex: u32, bits: &[(&'static str, bool)]) -> Result<(), GroError> {
    let (connection, mut handle, _) = genetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut message = NetlinkMessage::from(GenlMessage::from_payload(FeaturesSet {
        ifindex,
        bits: bits.to_vec(),
    }));
    message.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let result = async {
        let mut replies = handle.request(message).await?;
        while let Some(reply) = replies.try_next().await? {
            if let NetlinkPayload::Error(e) = reply.payload
                && e.code.is_some()
            {
                return Err(e.to_io().into());
            }
        }
        Ok(())
    }
    .await;
    task.abort();
    result
}

// The ethtool netlink family (include/uapi/linux/ethtool_netlink*.h).
const ETHTOOL_GENL_VERSION: u8 = 1;
const ETHTOOL_MSG_FEATURES_SET: u8 = 12;
const ETHTOOL_A_FEATURES_HEADER: u16 = 1;
const ETHTOOL_A_FEATURES_WANTED: u16 = 3;
const ETHTOOL_A_HEADER_DEV_INDEX: u16 = 1;
const ETHTOOL_A_HEADER_FLAGS: u16 = 3;
const ETHTOOL_FLAG_OMIT_REPLY: u32 = 1 << 1;
const ETHTOOL_A_BITSET_BITS: u16 = 3;
const ETHTOOL_A_BITSET_BITS_BIT: u16 = 1;
const ETHTOOL_A_BITSET_BIT_NAME: u16 = 2;
const ETHTOOL_A_BITSET_BIT_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;

/// ETHTOOL_MSG_FEATURES_SET for a few named bits. Without NOMASK the listed
/// bits are the mask: only they change; VALUE present means on. The reply
/// (the features that resulted) is omitted; only the ack comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FeaturesSet {
    ifindex: u32,
    bits: Vec<(&'static str, bool)>,
}

impl FeaturesSet {
    fn encode(&self) -> Vec<u8> {
        let header = nested(
            ETHTOOL_A_FEATURES_HEADER,
            &[
                attr(ETHTOOL_A_HEADER_DEV_INDEX, &self.ifindex.to_ne_bytes()),
                attr(
                    ETHTOOL_A_HEADER_FLAGS,
                    &ETHTOOL_FLAG_OMIT_REPLY.to_ne_bytes(),
                ),
            ],
        );
        let bits: Vec<Vec<u8>> = self
            .bits
            .iter()
            .map(|(name, on)| {
                let mut name_z = name.as_bytes().to_vec();
                name_z.push(0);
                let mut fields = vec![attr(ETHTOOL_A_BITSET_BIT_NAME, &name_z)];
                if *on {
                    fields.push(attr(ETHTOOL_A_BITSET_BIT_VALUE, &[]));
                }
                nested(ETHTOOL_A_BITSET_BITS_BIT, &fields)
            })
            .collect();
        let wanted = nested(
            ETHTOOL_A_FEATURES_WANTED,
            &[nested(ETHTOOL_A_BITSET_BITS, &bits)],
        );
        [header, wanted].concat()
    }
}

/// One netlink attribute: length, type, value, padding to 4 bytes.
fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

fn nested(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
    attr(kind | NLA_F_NESTED, &children.concat())
}

impl GenlFamily for FeaturesSet {
    fn family_name() -> &'static str {
        "ethtool"
    }

    fn command(&self) -> u8 {
        ETHTOOL_MSG_FEATURES_SET
    }

    fn version(&self) -> u8 {
        ETHTOOL_GENL_VERSION
    }
}

impl Emitable for FeaturesSet {
    fn buffer_len(&self) -> usize {
        self.encode().len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        buffer.copy_from_slice(&self.encode());
    }
}

impl ParseableParametrized<[u8], GenlHeader> for FeaturesSet {
    /// Only acks come back (the reply is omitted); nothing to parse.
    fn parse_with_param(_buf: &[u8], _header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self {
            ifindex: 0,
            bits: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        assert_eq!(attr(2, b"ab\0"), [7, 0, 2, 0, b'a', b'b', 0, 0]);
        assert_eq!(attr(3, &[]), [4, 0, 3, 0]);
        assert_eq!(nested(1, &[attr(3, &[])]), [8, 0, 1, 0x80, 4, 0, 3, 0]);
    }

    #[test]
    fn features_set_names_each_bit_and_its_value() {
        let message = FeaturesSet {
            ifindex: 7,
            bits: vec![("rx-x", true), ("rx-y", false)],
        }
        .encode();
        // Header: nested(1) { DEV_INDEX = 7, FLAGS = OMIT_REPLY }.
        assert_eq!(&message[..4], &[20, 0, 1, 0x80]);
        assert_eq!(&message[4..12], &[8, 0, 1, 0, 7, 0, 0, 0]);
        assert_eq!(&message[12..20], &[8, 0, 3, 0, 2, 0, 0, 0]);
        // Wanted: nested(3) { BITS: nested(3) { BIT { NAME "rx-x", VALUE }, BIT { NAME "rx-y" } } }.
        let wanted = &message[20..];
        assert_eq!(&wanted[2..4], &[3, 0x80]);
        assert_eq!(&wanted[6..8], &[3, 0x80]);
        let first_bit = &wanted[8..];
        assert_eq!(&first_bit[..4], &[20, 0, 1, 0x80]);
        assert_eq!(
            &first_bit[4..16],
            &[9, 0, 2, 0, b'r', b'x', b'-', b'x', 0, 0, 0, 0]
        );
        assert_eq!(&first_bit[16..20], &[4, 0, 3, 0], "VALUE flag: on");
        let second_bit = &first_bit[20..];
        assert_eq!(&second_bit[..4], &[16, 0, 1, 0x80], "no VALUE flag: off");
        assert_eq!(
            u16::from_ne_bytes([wanted[0], wanted[1]]) as usize,
            wanted.len()
        );
    }
}
