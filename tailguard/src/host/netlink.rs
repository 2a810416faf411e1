//! The kernel's routing state over rtnetlink: links, addresses, routes and
//! rules. Every "add" treats "already there" as success and every "delete"
//! treats "already gone" as success, so each step can run twice.

use std::net::IpAddr;

use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    AddressFamily,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAttribute, RouteMessage},
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
};
use nix::errno::Errno;
use rtnetlink::{Handle, LinkUnspec, LinkWireguard, RouteMessageBuilder};

/// A failed netlink request, naming what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct NetlinkError {
    pub what: String,
    pub errno: Option<Errno>,
    message: String,
}

impl NetlinkError {
    fn new(what: impl Into<String>, error: rtnetlink::Error) -> Self {
        let errno = match &error {
            rtnetlink::Error::NetlinkError(e) => e.code.map(|c| Errno::from_raw(-c.get())),
            _ => None,
        };
        let message = match errno {
            Some(errno) => errno.desc().to_string(),
            None => error.to_string(),
        };
        Self {
            what: what.into(),
            errno,
            message,
        }
    }
}

type Result<T> = std::result::Result<T, NetlinkError>;

use crate::config::plan::{IpRule, MAIN_TABLE};

/// A route through a device, optionally via a gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceRoute {
    pub destination: IpNet,
    pub ifindex: u32,
    /// `None`: main.
    pub table: Option<u32>,
    pub gateway: Option<IpAddr>,
}

enum LinkQuery<'a> {
    Name(&'a str),
    Index(u32),
}

/// A stream with one `()` per link or route (or neighbour) change. Dropping it closes the
/// socket (the connection task would otherwise go on reading for nobody).
pub struct KernelChanges {
    messages: std::pin::Pin<Box<dyn futures_util::Stream<Item = ()> + Send>>,
    connection: tokio::task::JoinHandle<()>,
}

impl futures_util::Stream for KernelChanges {
    type Item = ();

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<()>> {
        self.messages.as_mut().poll_next(cx)
    }
}

impl Drop for KernelChanges {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// An rtnetlink connection. Open it on a thread that is in the namespace to
/// manage: the socket stays bound to the namespace it was opened in.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Connects; the connection runs as a task of the current tokio runtime.
    pub fn connect() -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Notifications of link and route changes (`ip monitor link route`),
    /// for callers that re-read what they need. Opened in the current
    /// namespace, like [`Netlink::connect`].
    pub fn watch_links_and_routes() -> std::io::Result<KernelChanges> {
        use rtnetlink::MulticastGroup;
        let (connection, _, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
        ])?;
        Ok(KernelChanges {
            messages: Box::pin(futures_util::StreamExt::map(messages, drop)),
            connection: tokio::spawn(connection),
        })
    }

    /// Notifications of neighbour-table changes (`ip monitor neigh`).
    pub fn watch_neighbours() -> std::io::Result<KernelChanges> {
        let (connection, _, messages) =
            rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Neigh])?;
        Ok(KernelChanges {
            messages: Box::pin(futures_util::StreamExt::map(messages, drop)),
            connection: tokio::spawn(connection),
        })
    }

    /// The Ethernet addresses of frames out of link `index` to the
    /// neighbour `next_hop`: the neighbour's, while the kernel holds it as
    /// usable (not incomplete or failed), and the link's own. `None` while
    /// either is unknown, or the link has no Ethernet address.
    pub async fn link_addresses(
        &self,
        index: u32,
        next_hop: IpAddr,
    ) -> Result<Option<([u8; 6], [u8; 6])>> {
        let ethernet = |bytes: &[u8]| <[u8; 6]>::try_from(bytes).ok();
        let own = self.link(LinkQuery::Index(index)).await?.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(mac) => ethernet(mac),
                _ => None,
            })
        });
        let Some(own) = own else {
            return Ok(None);
        };
        let what = || format!("listing the neighbours of link {index}");
        let mut neighbours = self.handle.neighbours().get().execute();
        while let Some(n) = neighbours
            .try_next()
            .await
            .map_err(|e| NetlinkError::new(what(), e))?
        {
            let usable = !matches!(
                n.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
            );
            if n.header.ifindex != index || !usable || neighbour_address(&n) != Some(next_hop) {
                continue;
            }
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(mac) => ethernet(mac),
                _ => None,
            });
            if let Some(mac) = mac {
                return Ok(Some((mac, own)));
            }
        }
        Ok(None)
    }

    /// A link by name or index; `None` when there is no such link.
    async fn link(&self, query: LinkQuery<'_>) -> Result<Option<LinkMessage>> {
        let request = self.handle.link().get();
        let (request, what) = match query {
            LinkQuery::Name(name) => (
                request.match_name(name.to_string()),
                format!("looking up {name}"),
            ),
            LinkQuery::Index(index) => (
                request.match_index(index),
                format!("looking up link {index}"),
            ),
        };
        tolerate(request.execute().try_next().await, Errno::ENODEV, || what)
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self
            .link(LinkQuery::Name(name))
            .await?
            .map(|l| l.header.index))
    }

    /// The name of a link, if it exists.
    pub async fn link_name(&self, index: u32) -> Result<Option<String>> {
        Ok(self.link(LinkQuery::Index(index)).await?.and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name),
                _ => None,
            })
        }))
    }

    /// The kind of a link (`wireguard`, `tun`, ...), if it exists.
    pub async fn link_kind(&self, name: &str) -> Result<Option<String>> {
        Ok(self.link(LinkQuery::Name(name)).await?.map(|l| {
            l.attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(InfoKind::Other(k)) => Some(k.clone()),
                        LinkInfo::Kind(k) => Some(k.to_string()),
                        _ => None,
                    }),
                    _ => None,
                })
                .unwrap_or_default()
        }))
    }

    /// `ip link add NAME type wireguard`. EOPNOTSUPP means the kernel has
    /// no WireGuard; a device that exists already is fine.
    pub async fn add_wireguard(&self, name: &str) -> Result<()> {
        let result = self
            .handle
            .link()
            .add(LinkWireguard::new(name).build())
            .execute()
            .await;
        tolerate(result, Errno::EEXIST, || {
            format!("creating WireGuard device {name}")
        })
    }

    pub async fn delete_link(&self, name: &str) -> Result<()> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(());
        };
        let result = self.handle.link().del(index).execute().await;
        tolerate(result, Errno::ENODEV, || format!("deleting {name}"))
    }

    /// Sets the MTU (if given) and brings the link up.
    pub async fn set_up(&self, index: u32, mtu: Option<u32>) -> Result<()> {
        let mut message = LinkUnspec::new_with_index(index).up();
        if let Some(mtu) = mtu {
            message = message.mtu(mtu);
        }
        self.handle
            .link()
            .set(message.build())
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("bringing up link {index}"), e))
    }

    /// The MTU of a link.
    pub async fn link_mtu(&self, index: u32) -> Result<u32> {
        let link = self
            .link(LinkQuery::Index(index))
            .await?
            .ok_or_else(|| NetlinkError {
                what: format!("reading link {index}"),
                errno: Some(Errno::ENODEV),
                message: "no such device".into(),
            })?;
        Ok(link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap_or(0))
    }

    pub async fn add_address(&self, index: u32, net: IpNet) -> Result<()> {
        let result = self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len())
            .execute()
            .await;
        tolerate(result, Errno::EEXIST, || {
            // The kernel says only "permission denied" when IPv6 is off,
            // as Docker leaves it in containers without an IPv6 network.
            let ipv6_off = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
                .is_ok_and(|v| v.trim() == "1");
            if net.addr().is_ipv6() && ipv6_off {
                format!(
                    "adding address {net}: IPv6 is disabled here (net.ipv6.conf.all.disable_ipv6=1; \
                     in a container, start it with --sysctl net.ipv6.conf.all.disable_ipv6=0 or on \
                     an IPv6 network)"
                )
            } else {
                format!("adding address {net}")
            }
        })
    }

    pub async fn add_route(&self, route: DeviceRoute) -> Result<()> {
        let result = self
            .handle
            .route()
            .add(route_message(route))
            .execute()
            .await;
        tolerate(result, Errno::EEXIST, || {
            format!(
                "adding route {} (table {})",
                route.destination,
                route.table.unwrap_or(MAIN_TABLE)
            )
        })
    }

    pub async fn delete_route(&self, route: DeviceRoute) -> Result<()> {
        let result = self
            .handle
            .route()
            .del(route_message(route))
            .execute()
            .await;
        tolerate(result, Errno::ESRCH, || {
            format!("removing route {}", route.destination)
        })
    }

    /// The device a packet to `addr` would leave by (`ip route get`).
    pub async fn route_to(&self, addr: IpAddr) -> Result<Option<u32>> {
        let message = match addr {
            IpAddr::V4(a) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let mut found = self.handle.route().get(message).execute();
        match found.try_next().await {
            Ok(route) => Ok(route.and_then(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            })),
            // No route (ENETUNREACH, EHOSTUNREACH...): no answer, not an error.
            Err(_) => Ok(None),
        }
    }

    /// The main table's default route of a family: its device and gateway.
    pub async fn default_route(&self, ipv6: bool) -> Result<Option<(u32, Option<IpAddr>)>> {
        let routes = self.routes(ipv6, None).await?;
        Ok(routes.into_iter().find_map(|(dest, oif, gw)| {
            oif.filter(|_| dest.prefix_len() == 0).map(|oif| (oif, gw))
        }))
    }

    /// Routes of one table (`None`: main) and family, as (destination,
    /// ifindex, gateway).
    pub async fn routes(
        &self,
        ipv6: bool,
        table: Option<u32>,
    ) -> Result<Vec<(IpNet, Option<u32>, Option<IpAddr>)>> {
        let table = table.unwrap_or(MAIN_TABLE);
        let filter = if ipv6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .table_id(table)
                .build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .table_id(table)
                .build()
        };
        let mut found = self.handle.route().get(filter).execute();
        let mut out = Vec::new();
        while let Some(msg) = found
            .try_next()
            .await
            .map_err(|e| NetlinkError::new(format!("listing routes of table {table}"), e))?
        {
            if route_table(&msg) != table {
                continue;
            }
            let mut dest = None;
            let mut oif = None;
            let mut gateway = None;
            for a in &msg.attributes {
                match a {
                    RouteAttribute::Destination(d) => dest = route_address(d),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(g) => gateway = route_address(g),
                    _ => {}
                }
            }
            let dest = dest.unwrap_or(if ipv6 {
                IpAddr::from([0u16; 8])
            } else {
                IpAddr::from([0u8; 4])
            });
            if let Ok(net) = IpNet::new(dest, msg.header.destination_prefix_length) {
                out.push((net, oif, gateway));
            }
        }
        Ok(out)
    }

    pub async fn add_rule(&self, rule: IpRule) -> Result<()> {
        let mut request = self.handle.rule().add();
        *request.message_mut() = rule_message(rule);
        tolerate(request.execute().await, Errno::EEXIST, || {
            format!("adding rule {rule}")
        })
    }

    pub async fn delete_rule(&self, rule: IpRule) -> Result<()> {
        let result = self.handle.rule().del(rule_message(rule)).execute().await;
        tolerate(result, Errno::ENOENT, || format!("removing rule {rule}"))
    }
}

/// Treats `ok_errno` (EEXIST for adds, ENOENT-like for deletes and look-ups)
/// as success, answering `T::default()` for it.
fn tolerate<T: Default>(
    result: std::result::Result<T, rtnetlink::Error>,
    ok_errno: Errno,
    what: impl FnOnce() -> String,
) -> Result<T> {
    match result {
        Ok(value) => Ok(value),
        Err(e) => {
            let e = NetlinkError::new(what(), e);
            if e.errno == Some(ok_errno) {
                Ok(T::default())
            } else {
                Err(e)
            }
        }
    }
}

fn route_message(route: DeviceRoute) -> RouteMessage {
    let table = route.table.unwrap_or(MAIN_TABLE);
    match route.destination {
        IpNet::V4(net) => {
            let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .output_interface(route.ifindex)
                .table_id(table);
            if let Some(IpAddr::V4(gw)) = route.gateway {
                b = b.gateway(gw);
            }
            b.build()
        }
        IpNet::V6(net) => {
            let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .output_interface(route.ifindex)
                .table_id(table);
            if let Some(IpAddr::V6(gw)) = route.gateway {
                b = b.gateway(gw);
            }
            b.build()
        }
    }
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn neighbour_address(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })
}

fn route_address(a: &netlink_packet_route::route::RouteAddress) -> Option<IpAddr> {
    match a {
        netlink_packet_route::route::RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        netlink_packet_route::route::RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn rule_message(rule: IpRule) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = if rule.ipv6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.action = RuleAction::ToTable;
    // Tables above 255 only fit the attribute; the header byte says "see it".
    msg.header.table = if rule.table < 256 {
        rule.table as u8
    } else {
        0
    };
    if rule.invert {
        msg.header.flags |= RuleFlags::Invert;
    }
    msg.attributes.push(RuleAttribute::Table(rule.table));
    msg.attributes.push(RuleAttribute::Priority(rule.priority));
    if let Some(mark) = rule.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(mark));
        msg.attributes.push(RuleAttribute::FwMask(u32::MAX));
    }
    if let Some(len) = rule.suppress_prefixlength {
        msg.attributes.push(RuleAttribute::SuppressPrefixLen(len));
    }
    if let Some(to) = rule.destination {
        msg.header.dst_len = to.prefix_len();
        msg.attributes
            .push(RuleAttribute::Destination(to.network()));
    }
    msg
}
