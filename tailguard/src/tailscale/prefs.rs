//! The preferences TailGuard asks of tailscaled, those a `tailscale up`
//! would set (docs/architecture.md, "Tailscale's preferences"): always
//! accept routes; outside client mode no tailnet DNS and the discovered
//! routes (plus both default routes when offering an exit node); in client
//! mode tailnet DNS, nothing advertised but explicit routes, and the chosen
//! exit node with LAN access.
//!
//! They go to tailscaled as *masked* preferences (`PATCH /localapi/v0/prefs`):
//! each field set is accompanied by `<Field>Set: true`, and fields not set
//! are left as they are.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value, json};

use super::status::Status;
use crate::config::{
    extra_args::{ExitNode, MaskedPrefs},
    plan::TailscalePlan,
};

impl MaskedPrefs {
    /// The JSON body, in tailscaled's field names.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        // A field that is set goes with its `…Set: true`; others are left out.
        let mut put = |name: &str, value: Option<Value>| {
            if let Some(value) = value {
                map.insert(name.to_string(), value);
                map.insert(format!("{name}Set"), Value::Bool(true));
            }
        };
        let routes =
            |routes: &Vec<IpNet>| json!(routes.iter().map(ToString::to_string).collect::<Vec<_>>());
        put("ControlURL", self.control_url.as_ref().map(|v| json!(v)));
        put("WantRunning", self.want_running.map(|v| json!(v)));
        put("RouteAll", self.route_all.map(|v| json!(v)));
        put("CorpDNS", self.corp_dns.map(|v| json!(v)));
        put("Hostname", self.hostname.as_ref().map(|v| json!(v)));
        put(
            "AdvertiseRoutes",
            self.advertise_routes.as_ref().map(routes),
        );
        if let Some(node) = &self.exit_node {
            // Naming the node one way clears the other two, as the CLI does.
            let (id, ip, auto) = match node {
                ExitNode::Id(id) => (id.clone(), String::new(), String::new()),
                ExitNode::Ip(ip) => (String::new(), ip.to_string(), String::new()),
                ExitNode::Auto(expr) => (String::new(), String::new(), expr.clone()),
            };
            put("ExitNodeID", Some(json!(id)));
            put("ExitNodeIP", Some(json!(ip)));
            put("AutoExitNode", Some(json!(auto)));
        }
        put(
            "ExitNodeAllowLANAccess",
            self.exit_node_allow_lan_access.map(|v| json!(v)),
        );
        put("RunWebClient", self.run_web_client.map(|v| json!(v)));
        put(
            "AdvertiseTags",
            self.advertise_tags.as_ref().map(|v| json!(v)),
        );
        put("ShieldsUp", self.shields_up.map(|v| json!(v)));
        put("RunSSH", self.run_ssh.map(|v| json!(v)));
        put("NoSNAT", self.no_snat.map(|v| json!(v)));
        put(
            "OperatorUser",
            self.operator_user.as_ref().map(|v| json!(v)),
        );
        Value::Object(map)
    }
}

const DEFAULT_ROUTES: [IpNet; 2] = [
    IpNet::V4(ipnet::Ipv4Net::new_assert(
        std::net::Ipv4Addr::UNSPECIFIED,
        0,
    )),
    IpNet::V6(ipnet::Ipv6Net::new_assert(
        std::net::Ipv6Addr::UNSPECIFIED,
        0,
    )),
];

/// Whether the node offers its routes (and itself as exit node) to the
/// tailnet: not while the WireGuard side is down, so that the tailnet's
/// peers fail over to another router that advertises them, as they do
/// between Tailscale's HA subnet routers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Offer {
    #[default]
    Routes,
    Withdrawn,
}

/// The preferences set at start. The exit node is left to
/// [`exit_node`], which may need the tailnet's peers to resolve a name.
pub fn at_start(plan: &TailscalePlan, offer: Offer) -> MaskedPrefs {
    let mut routes = plan.advertise.routes.clone();
    if plan.advertise.exit_node {
        routes.extend(DEFAULT_ROUTES);
    }
    let mut prefs = MaskedPrefs {
        control_url: plan.login_server.clone(),
        want_running: Some(true),
        route_all: Some(plan.accept_routes),
        corp_dns: Some(plan.accept_dns),
        hostname: plan.hostname.clone(),
        advertise_routes: Some(routes),
        ..MaskedPrefs::default()
    };
    prefs.overlay(&plan.extra_prefs);
    if offer == Offer::Withdrawn {
        // Whatever set them (the plan, or `TS_EXTRA_ARGS`): none, the
        // default routes of an exit node included.
        prefs.advertise_routes = Some(Vec::new());
    }
    prefs
}

/// Only the advertised routes, as [`at_start`] sets them for `offer`: what
/// changes when the WireGuard side goes down or comes back.
pub fn advertised(plan: &TailscalePlan, offer: Offer) -> MaskedPrefs {
    MaskedPrefs {
        advertise_routes: at_start(plan, offer).advertise_routes,
        ..MaskedPrefs::default()
    }
}

/// A `TS_EXIT_NODE` name that cannot be turned into a peer (yet).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExitNodeError {
    #[error("TS_EXIT_NODE={0}: the tailnet's peers are not known yet")]
    PeersUnknown(String),
    #[error("TS_EXIT_NODE={0}: no peer of that name in the tailnet")]
    NoSuchPeer(String),
}

/// The exit node to use (client mode), with LAN access kept, as
/// `tailscale up --exit-node-allow-lan-access` keeps it. `auto:EXPR` becomes
/// tailscaled's `AutoExitNode`; an IP is passed as is; a name is looked up
/// among the tailnet's peers, which needs `status`.
pub fn exit_node(selector: &str, status: Option<&Status>) -> Result<MaskedPrefs, ExitNodeError> {
    let node = if let Some(expr) = selector.strip_prefix("auto:") {
        ExitNode::Auto(expr.to_string())
    } else if let Ok(ip) = selector.parse::<IpAddr>() {
        ExitNode::Ip(ip)
    } else {
        let status = status.ok_or_else(|| ExitNodeError::PeersUnknown(selector.to_string()))?;
        let peer = status
            .find_peer(selector)
            .ok_or_else(|| ExitNodeError::NoSuchPeer(selector.to_string()))?;
        ExitNode::Id(peer.id.clone())
    };
    Ok(MaskedPrefs {
        exit_node: Some(node),
        exit_node_allow_lan_access: Some(true),
        ..MaskedPrefs::default()
    })
}

/// What is set once the node is healthy: set the exit node
/// again (so `auto:any` and names resolve against a full netmap) and start
/// the web client.
pub fn once_healthy(
    plan: &TailscalePlan,
    status: &Status,
) -> Result<Option<MaskedPrefs>, ExitNodeError> {
    let mut prefs = match &plan.exit_node {
        Some(selector) => exit_node(selector, Some(status))?,
        None => MaskedPrefs::default(),
    };
    if plan.web_client {
        prefs.run_web_client = Some(true);
    }
    Ok((prefs != MaskedPrefs::default()).then_some(prefs))
}

/// The body of `POST /localapi/v0/start`, used when the node must log in:
/// the auth key (if any) and the initial preferences, as `tailscale up`
/// sends them. tailscaled takes the control server only here, at start.
/// Netfilter stays on (`NetfilterMode` 2), as for `tailscale up`.
pub fn start_body(auth_key: Option<&str>, prefs: &MaskedPrefs) -> Value {
    let mut update = prefs.to_json();
    if let Some(map) = update.as_object_mut() {
        map.retain(|key, _| !key.ends_with("Set"));
        map.entry("ControlURL")
            .or_insert(json!(DEFAULT_CONTROL_URL));
        map.insert("NetfilterMode".into(), json!(2));
        map.insert("WantRunning".into(), json!(true));
    }
    let mut body = json!({ "UpdatePrefs": update });
    if let Some(key) = auth_key {
        body["AuthKey"] = json!(key);
    }
    body
}

/// Tailscale's own control server.
pub const DEFAULT_CONTROL_URL: &str = "https://controlplane.tailscale.com";

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{extra_args::parse_extra_args, secrets::Secret};
    use crate::{config::plan::Plan, config::settings::parse_args, config::wg_quick};

    fn plan(args: &[&str], allowed: &str) -> TailscalePlan {
        let text = format!(
            "[Interface]\nPrivateKey=yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\
             [Peer]\nPublicKey=xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nAllowedIPs={allowed}\n"
        );
        let config = wg_quick::parse(&text, Path::new("wg0.conf")).unwrap();
        Plan::new(&parse_args(args).unwrap().0, &config).tailscale
    }

    fn status() -> Status {
        serde_json::from_value(json!({
            "BackendState": "Running",
            "Peer": {"nodekey:cccc": {"ID": "nExit3CNTRL", "HostName": "exit-fra",
                     "DNSName": "exit-fra.tail1234.ts.net.", "TailscaleIPs": ["100.64.0.9"]}}
        }))
        .unwrap()
    }

    #[test]
    fn pattern_1_wireguard_as_exit_node() {
        // Peer with 0.0.0.0/0, ::/0 and a LAN; not client mode.
        let json = at_start(
            &plan(&["--ts-hostname=bridge"], "0.0.0.0/0,::/0,192.168.8.0/24"),
            Offer::Routes,
        )
        .to_json();
        assert_eq!(
            json,
            json!({
                "WantRunning": true, "WantRunningSet": true,
                "RouteAll": true, "RouteAllSet": true,
                "CorpDNS": false, "CorpDNSSet": true,
                "Hostname": "bridge", "HostnameSet": true,
                "AdvertiseRoutes": ["192.168.8.0/24", "0.0.0.0/0", "::/0"], "AdvertiseRoutesSet": true,
            })
        );
    }

    #[test]
    fn withdrawn_routes_are_none_at_all() {
        let p = plan(
            &["--ts-extra-args=--advertise-routes=10.9.0.0/24"],
            "0.0.0.0/0,::/0,192.168.8.0/24",
        );
        let withdrawn = json!({"AdvertiseRoutes": [], "AdvertiseRoutesSet": true});
        assert_eq!(advertised(&p, Offer::Withdrawn).to_json(), withdrawn);
        let start = at_start(&p, Offer::Withdrawn).to_json();
        assert_eq!(start["AdvertiseRoutes"], json!([]));
        assert_eq!(start["WantRunning"], json!(true), "the rest as ever");
        assert_eq!(
            advertised(&p, Offer::Routes).to_json(),
            json!({"AdvertiseRoutes": ["10.9.0.0/24"], "AdvertiseRoutesSet": true}),
            "offered again as TS_EXTRA_ARGS says"
        );
    }

    #[test]
    fn pattern_2_simple_server_in_client_mode_advertises_nothing() {
        let p = plan(
            &["--client-mode=1", "--expose-host=1", "--wg-isolate-peers=1"],
            "10.8.0.2/32",
        );
        let json = at_start(&p, Offer::Routes).to_json();
        assert_eq!(json["AdvertiseRoutes"], json!([]));
        assert_eq!(
            json["AdvertiseRoutesSet"],
            json!(true),
            "an empty list withdraws earlier routes"
        );
        assert_eq!(json["CorpDNS"], json!(true));
        assert_eq!(once_healthy(&p, &status()), Ok(None));
    }

    #[test]
    fn pattern_3_simple_bridge_advertises_the_wireguard_subnets() {
        let json = at_start(&plan(&[], "10.8.0.0/24,fd00:8::/64"), Offer::Routes).to_json();
        assert_eq!(
            json["AdvertiseRoutes"],
            json!(["10.8.0.0/24", "fd00:8::/64"])
        );
        assert_eq!(json["CorpDNS"], json!(false));
    }

    #[test]
    fn pattern_4_tailscale_exit_node_for_wireguard_clients() {
        let p = plan(
            &["--client-mode=1", "--ts-exit-node=auto:any"],
            "10.8.0.2/32",
        );
        let prefs = once_healthy(&p, &status()).unwrap().unwrap();
        assert_eq!(
            prefs.to_json(),
            json!({
                "AutoExitNode": "any", "AutoExitNodeSet": true,
                "ExitNodeID": "", "ExitNodeIDSet": true,
                "ExitNodeIP": "", "ExitNodeIPSet": true,
                "ExitNodeAllowLANAccess": true, "ExitNodeAllowLANAccessSet": true,
            })
        );
    }

    #[test]
    fn exit_node_by_ip_or_by_name() {
        let by_ip = exit_node("100.64.0.9", None).unwrap();
        assert_eq!(
            by_ip.exit_node,
            Some(ExitNode::Ip("100.64.0.9".parse().unwrap()))
        );
        let by_name = exit_node("exit-fra.tail1234.ts.net", Some(&status())).unwrap();
        assert_eq!(by_name.exit_node, Some(ExitNode::Id("nExit3CNTRL".into())));
        assert_eq!(by_name.to_json()["ExitNodeID"], json!("nExit3CNTRL"));
        assert!(
            exit_node("exit-fra", None)
                .unwrap_err()
                .to_string()
                .contains("not known yet")
        );
        assert!(
            exit_node("nowhere", Some(&status()))
                .unwrap_err()
                .to_string()
                .contains("TS_EXIT_NODE=nowhere: no peer")
        );
    }

    #[test]
    fn login_server_web_client_and_explicit_routes() {
        let p = plan(
            &[
                "--ts-login-server=https://hs.example.com",
                "--ts-webclient=1",
                "--ts-routes=10.9.0.0/16",
            ],
            "0.0.0.0/0,192.168.8.0/24",
        );
        let json = at_start(&p, Offer::Routes).to_json();
        assert_eq!(json["ControlURL"], json!("https://hs.example.com"));
        assert_eq!(
            json["AdvertiseRoutes"],
            json!(["10.9.0.0/16", "0.0.0.0/0", "::/0"])
        );
        let later = once_healthy(&p, &status()).unwrap().unwrap().to_json();
        assert_eq!(
            later,
            json!({"RunWebClient": true, "RunWebClientSet": true})
        );
    }

    #[test]
    fn extra_args_that_are_preferences_are_applied_and_the_rest_named() {
        let mut prefs = at_start(&plan(&[], "10.8.0.0/24"), Offer::Routes);
        let (extra, warnings) = parse_extra_args(
            "--advertise-tags=tag:bridge,tag:vps --shields-up --ssh=false \
             --snat-subnet-routes=false --accept-dns=true -operator alice \
             --auth-key=tskey-SECRET --reset --ssh=maybe --timeout 30s stray",
        );
        prefs.overlay(&extra.prefs);
        let json = prefs.to_json();
        assert_eq!(json["AdvertiseTags"], json!(["tag:bridge", "tag:vps"]));
        assert_eq!(
            (&json["ShieldsUp"], &json["RunSSH"], &json["NoSNAT"]),
            (&json!(true), &json!(false), &json!(true))
        );
        assert_eq!(
            json["CorpDNS"],
            json!(true),
            "the extra args win over the mode's default"
        );
        assert_eq!(
            json["OperatorUser"],
            json!("alice"),
            "a value in the next argument"
        );
        assert_eq!(json["OperatorUserSet"], json!(true));
        assert_eq!(extra.auth_key, Some(Secret::new("tskey-SECRET")));
        assert_eq!(
            warnings,
            [
                "TS_EXTRA_ARGS: --reset is not a preference TailGuard can set; ignored",
                "TS_EXTRA_ARGS: --ssh has a value TailGuard cannot read; ignored",
                "TS_EXTRA_ARGS: --timeout is not a preference TailGuard can set; ignored",
                "TS_EXTRA_ARGS: an argument that is not a flag is ignored (not shown)",
            ]
        );
        assert!(!warnings.concat().contains("SECRET") && !warnings.concat().contains("30s"));
    }

    #[test]
    fn start_body_carries_the_key_and_the_initial_prefs() {
        let p = plan(&["--ts-login-server=https://hs.example.com"], "10.8.0.0/24");
        let body = start_body(Some("tskey-abc"), &at_start(&p, Offer::Routes));
        assert_eq!(body["AuthKey"], json!("tskey-abc"));
        let update = &body["UpdatePrefs"];
        assert_eq!(update["ControlURL"], json!("https://hs.example.com"));
        assert_eq!(update["AdvertiseRoutes"], json!(["10.8.0.0/24"]));
        assert_eq!(update["WantRunning"], json!(true));
        assert_eq!(update["NetfilterMode"], json!(2));
        assert!(
            update.get("RouteAllSet").is_none(),
            "UpdatePrefs is a whole Prefs, not a masked one"
        );
        let interactive = start_body(None, &at_start(&plan(&[], "10.8.0.0/24"), Offer::Routes));
        assert!(interactive.get("AuthKey").is_none());
        assert_eq!(
            interactive["UpdatePrefs"]["ControlURL"],
            json!(DEFAULT_CONTROL_URL)
        );
    }
}
