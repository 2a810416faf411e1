//! `GET /localapi/v0/status` (`ipnstate.Status`). Only the fields TailGuard
//! reads are declared; tailscaled adds fields often, and unknown ones are
//! ignored. Missing ones take their zero value, as Go's encoder omits none
//! of these but older versions may lack some.

use std::{collections::HashMap, net::IpAddr};

use ipnet::IpNet;
use serde::Deserialize;

use crate::report::{AdvertisedRoute, ExitNodeInUse, TailscaleReport};

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct Status {
    pub version: String,
    /// `NoState`, `NeedsLogin`, `NeedsMachineAuth`, `Stopped`, `Starting`, `Running`.
    pub backend_state: String,
    #[serde(rename = "AuthURL")]
    pub auth_url: String,
    #[serde(rename = "TailscaleIPs", deserialize_with = "null_as_default")]
    pub tailscale_ips: Vec<IpAddr>,
    #[serde(rename = "Self")]
    pub self_node: Option<PeerStatus>,
    pub exit_node_status: Option<ExitNodeStatus>,
    #[serde(deserialize_with = "null_as_default")]
    pub health: Vec<String>,
    pub current_tailnet: Option<Tailnet>,
    /// Keyed by node public key (`nodekey:…`).
    #[serde(deserialize_with = "null_as_default")]
    pub peer: HashMap<String, PeerStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct PeerStatus {
    #[serde(rename = "ID")]
    pub id: String,
    pub public_key: String,
    pub host_name: String,
    #[serde(rename = "DNSName")]
    pub dns_name: String,
    #[serde(rename = "OS")]
    pub os: String,
    #[serde(rename = "TailscaleIPs", deserialize_with = "null_as_default")]
    pub tailscale_ips: Vec<IpAddr>,
    /// Routes this node may use through the peer (its addresses, subnets
    /// approved for it, and default routes if it is an exit node).
    #[serde(rename = "AllowedIPs", deserialize_with = "null_as_default")]
    pub allowed_ips: Vec<IpNet>,
    #[serde(deserialize_with = "null_as_default")]
    pub primary_routes: Vec<IpNet>,
    pub online: bool,
    pub exit_node: bool,
    pub exit_node_option: bool,
    pub key_expiry: Option<String>,
    pub expired: bool,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct ExitNodeStatus {
    #[serde(rename = "ID")]
    pub id: String,
    pub online: bool,
    /// Prefixes, unlike `Status.TailscaleIPs`.
    #[serde(rename = "TailscaleIPs", deserialize_with = "null_as_default")]
    pub tailscale_ips: Vec<IpNet>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct Tailnet {
    pub name: String,
    #[serde(rename = "MagicDNSSuffix")]
    pub magic_dns_suffix: String,
    #[serde(rename = "MagicDNSEnabled")]
    pub magic_dns_enabled: bool,
}

/// Go encodes empty slices and maps as `null`.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Why Tailscale is not ready for TailGuard's purposes. Kept (and compared)
/// as the daemon's state, so what came from elsewhere is kept as its text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("tailscaled has not answered yet")]
    NotAnsweredYet,
    /// The LocalAPI stopped answering: its error.
    #[error("tailscaled does not answer: {0}")]
    NoAnswer(String),
    /// The socket did not open in time (seconds) after a start.
    #[error("tailscaled did not answer within {seconds} s: {error}")]
    NeverAnswered { seconds: u64, error: String },
    /// tailscaled exited: its exit status (or why it could not be read).
    #[error("tailscaled exited ({0})")]
    Exited(String),
    /// Ours stopped answering (stopped, deadlocked, its socket gone) after
    /// it had answered: the last error. It is killed and started again.
    #[error("tailscaled stopped answering ({0}): killed")]
    Hung(String),
    /// The backend state, when it is not `Running`.
    #[error("tailscaled is {0}, not Running")]
    NotRunning(String),
    #[error("the node has no tailnet address yet")]
    NoAddress,
    #[error("the control server does not see the node online")]
    Offline,
}

impl Status {
    /// What the status page shows: this node as the control server sees
    /// it, and each of `advertised` (the routes this node advertises) with
    /// its approval (in `Self.AllowedIPs`) and whether this node is its
    /// primary router (`Self.PrimaryRoutes`).
    pub fn report(&self, advertised: &[IpNet]) -> TailscaleReport {
        let me = self.self_node.clone().unwrap_or_default();
        let exit_node = self.exit_node_status.as_ref().map(|exit| ExitNodeInUse {
            id: exit.id.clone(),
            name: self
                .peer
                .values()
                .find(|p| p.id == exit.id)
                .map(|p| p.host_name.clone()),
            online: exit.online,
            addresses: exit.tailscale_ips.clone(),
        });
        TailscaleReport {
            backend_state: self.backend_state.clone(),
            version: self.version.clone(),
            machine_name: me.host_name.clone(),
            node_id: me.id.clone(),
            dns_name: me.dns_name.trim_end_matches('.').to_string(),
            addresses: self.tailscale_ips.clone(),
            online: me.online,
            key_expiry: me.key_expiry.clone(),
            tailnet: self.current_tailnet.as_ref().map(|t| t.name.clone()),
            exit_node,
            advertised_routes: advertised
                .iter()
                .map(|route| AdvertisedRoute {
                    route: *route,
                    approved: me.allowed_ips.contains(route),
                    primary: me.primary_routes.contains(route),
                })
                .collect(),
            warnings: self.health.clone(),
            peers: self.peer.len(),
            peers_online: self.peer.values().filter(|p| p.online).count(),
        }
    }

    /// The node's own tailnet addresses, one per family at most.
    pub fn own_addresses(&self) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
        crate::config::family::first_of_each(self.tailscale_ips.iter().copied())
    }

    /// Healthy for TailGuard's purposes: running, with addresses, and online
    /// (an address stays after the node is removed from the tailnet, so it
    /// alone proves nothing). `Err` says what is missing.
    pub fn ready(&self) -> Result<(), NotReady> {
        if self.backend_state != "Running" {
            return Err(NotReady::NotRunning(
                or_unknown(&self.backend_state).to_string(),
            ));
        }
        if self.tailscale_ips.is_empty() {
            return Err(NotReady::NoAddress);
        }
        match &self.self_node {
            Some(node) if node.online => Ok(()),
            _ => Err(NotReady::Offline),
        }
    }

    /// Finds a peer by what a user may write in TS_EXIT_NODE: a tailnet IP,
    /// a host name or a MagicDNS name (with or without the final dot).
    pub fn find_peer(&self, name_or_ip: &str) -> Option<&PeerStatus> {
        let wanted = name_or_ip.trim_end_matches('.').to_ascii_lowercase();
        let ip = name_or_ip.parse::<IpAddr>().ok();
        self.peer.values().find(|p| {
            ip.is_some_and(|ip| p.tailscale_ips.contains(&ip))
                || p.host_name.eq_ignore_ascii_case(&wanted)
                || p.dns_name
                    .trim_end_matches('.')
                    .eq_ignore_ascii_case(&wanted)
                || p.dns_name
                    .split('.')
                    .next()
                    .is_some_and(|short| short.eq_ignore_ascii_case(&wanted))
        })
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "in an unknown state"
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like tailscaled 1.8x's answer, trimmed, with fields we do not
    /// declare (they must be ignored) and Go's `null`s.
    const RUNNING: &str = r#"{
      "Version": "1.84.0-t0123456789",
      "TUN": true,
      "BackendState": "Running",
      "HaveNodeKey": true,
      "AuthURL": "",
      "TailscaleIPs": ["100.101.102.103", "fd7a:115c:a1e0::9f01:6667"],
      "Self": {
        "ID": "nSelf1CNTRL", "PublicKey": "nodekey:aaaa", "HostName": "tailguard",
        "DNSName": "tailguard.tail1234.ts.net.", "OS": "linux", "UserID": 123,
        "TailscaleIPs": ["100.101.102.103", "fd7a:115c:a1e0::9f01:6667"],
        "AllowedIPs": ["100.101.102.103/32", "fd7a:115c:a1e0::9f01:6667/128"],
        "PrimaryRoutes": ["192.168.8.0/24"],
        "Addrs": ["203.0.113.7:41641"], "CurAddr": "", "Relay": "fra",
        "RxBytes": 0, "TxBytes": 0, "Created": "2026-01-01T00:00:00Z",
        "LastWrite": "0001-01-01T00:00:00Z", "LastSeen": "0001-01-01T00:00:00Z",
        "LastHandshake": "0001-01-01T00:00:00Z", "Online": true, "ExitNode": false,
        "ExitNodeOption": true, "Active": false, "InNetworkMap": true, "InMagicSock": false,
        "InEngine": false, "KeyExpiry": "2027-05-01T00:00:00Z", "Tags": null, "CapMap": {}
      },
      "Health": null,
      "MagicDNSSuffix": "tail1234.ts.net",
      "CurrentTailnet": {"Name": "example.org", "MagicDNSSuffix": "tail1234.ts.net", "MagicDNSEnabled": true},
      "CertDomains": null,
      "Peer": {
        "nodekey:bbbb": {
          "ID": "nPeer2CNTRL", "PublicKey": "nodekey:bbbb", "HostName": "laptop",
          "DNSName": "laptop.tail1234.ts.net.", "OS": "macOS",
          "TailscaleIPs": ["100.64.0.7", "fd7a:115c:a1e0::7"],
          "AllowedIPs": ["100.64.0.7/32", "fd7a:115c:a1e0::7/128"],
          "PrimaryRoutes": null, "Online": true, "ExitNode": false, "ExitNodeOption": false,
          "RxBytes": 1024, "TxBytes": 2048, "SomethingNew": {"x": 1}
        },
        "nodekey:cccc": {
          "ID": "nExit3CNTRL", "PublicKey": "nodekey:cccc", "HostName": "exit-fra",
          "DNSName": "exit-fra.tail1234.ts.net.", "OS": "linux",
          "TailscaleIPs": ["100.64.0.9"],
          "AllowedIPs": ["100.64.0.9/32", "0.0.0.0/0", "::/0"],
          "Online": true, "ExitNode": true, "ExitNodeOption": true
        }
      },
      "User": {"123": {"ID": 123, "LoginName": "someone@example.org"}},
      "ClientVersion": null,
      "ExitNodeStatus": {"ID": "nExit3CNTRL", "Online": true, "TailscaleIPs": ["100.64.0.9/32"]}
    }"#;

    #[test]
    fn decodes_the_real_field_names_and_ignores_the_rest() {
        let s: Status = serde_json::from_str(RUNNING).unwrap();
        assert_eq!(s.backend_state, "Running");
        assert_eq!(
            s.tailscale_ips,
            [
                "100.101.102.103".parse::<IpAddr>().unwrap(),
                "fd7a:115c:a1e0::9f01:6667".parse().unwrap()
            ]
        );
        let me = s.self_node.as_ref().unwrap();
        assert!(me.online && me.exit_node_option);
        assert_eq!(
            me.primary_routes,
            vec!["192.168.8.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(me.key_expiry.as_deref(), Some("2027-05-01T00:00:00Z"));
        assert_eq!(s.peer.len(), 2);
        assert_eq!(
            s.peer["nodekey:bbbb"].primary_routes,
            vec![],
            "null is empty"
        );
        assert_eq!(
            s.exit_node_status.as_ref().unwrap().tailscale_ips,
            vec!["100.64.0.9/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            s.current_tailnet.as_ref().unwrap().magic_dns_suffix,
            "tail1234.ts.net"
        );
        assert!(s.health.is_empty());
        assert_eq!(
            s.own_addresses().0,
            Some("100.101.102.103".parse().unwrap())
        );
        assert_eq!(s.ready(), Ok(()));
    }

    #[test]
    fn needs_login_carries_the_auth_url_and_is_not_ready() {
        let s: Status = serde_json::from_str(
            r#"{"BackendState":"NeedsLogin","AuthURL":"https://login.tailscale.com/a/0123abcd","TailscaleIPs":null,"Self":null,"Peer":null}"#,
        )
        .unwrap();
        assert_eq!(s.auth_url, "https://login.tailscale.com/a/0123abcd");
        assert_eq!(
            s.ready().unwrap_err().to_string(),
            "tailscaled is NeedsLogin, not Running"
        );
    }

    #[test]
    fn running_but_offline_or_without_address_is_not_ready() {
        let mut s: Status = serde_json::from_str(RUNNING).unwrap();
        s.self_node.as_mut().unwrap().online = false;
        assert_eq!(
            s.ready().unwrap_err().to_string(),
            "the control server does not see the node online"
        );
        s.tailscale_ips.clear();
        assert_eq!(
            s.ready().unwrap_err().to_string(),
            "the node has no tailnet address yet"
        );
    }

    #[test]
    fn peers_are_found_by_ip_host_name_or_magic_dns_name() {
        let s: Status = serde_json::from_str(RUNNING).unwrap();
        for name in [
            "100.64.0.9",
            "exit-fra",
            "EXIT-FRA",
            "exit-fra.tail1234.ts.net",
            "exit-fra.tail1234.ts.net.",
        ] {
            assert_eq!(
                s.find_peer(name).map(|p| p.id.as_str()),
                Some("nExit3CNTRL"),
                "{name}"
            );
        }
        assert!(s.find_peer("nowhere").is_none());
    }
}
