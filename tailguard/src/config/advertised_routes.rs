//! What TailGuard advertises to the tailnet, derived from the WireGuard
//! peers' AllowedIPs as the original does with `wg show allowed-ips`.

use ipnet::IpNet;

use crate::{config::settings::Settings, config::wg_quick::Peer};

/// Routes and exit node to advertise to the tailnet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advertisement {
    pub routes: Vec<IpNet>,
    pub exit_node: bool,
}

/// What the peers' AllowedIPs say, before settings are applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovered {
    /// Every prefix except the two default routes, each once, in file order.
    pub routes: Vec<IpNet>,
    /// Some peer carries `0.0.0.0/0` or `::/0`: the WireGuard side is a way
    /// to the internet, so this node can be an exit node.
    pub default_route: bool,
}

pub fn is_default_route(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

pub fn discover(peers: &[Peer]) -> Discovered {
    let mut found = Discovered::default();
    for net in peers.iter().flat_map(|p| &p.allowed_ips) {
        if is_default_route(net) {
            found.default_route = true;
        } else if !found.routes.contains(net) {
            found.routes.push(*net);
        }
    }
    found
}

/// What is advertised (README.md, settings): outside client mode, the
/// discovered routes (or `TS_ROUTES` when set, even empty) and the exit node
/// when a peer has a default route. In client mode nothing is discovered or offered as exit
/// node, but an explicit `TS_ROUTES` is still advertised (on purpose).
pub fn advertisement(settings: &Settings, peers: &[Peer]) -> Advertisement {
    let discovered = discover(peers);
    if settings.client_mode {
        return Advertisement {
            routes: settings.ts_routes.clone().unwrap_or_default(),
            exit_node: false,
        };
    }
    Advertisement {
        routes: settings.ts_routes.clone().unwrap_or(discovered.routes),
        exit_node: discovered.default_route,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::settings::parse_args, config::wg_quick};

    fn settings(args: &[&str]) -> Settings {
        parse_args(args).unwrap().0
    }

    fn peers(allowed: &[&str]) -> Vec<Peer> {
        let keys = [
            "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
            "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=",
            "gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdyYBz6EA=",
        ];
        let mut text =
            "[Interface]\nPrivateKey=yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n".to_string();
        for (key, ips) in keys.iter().zip(allowed) {
            text.push_str(&format!("[Peer]\nPublicKey={key}\nAllowedIPs={ips}\n"));
        }
        wg_quick::parse(&text, Path::new("wg0.conf")).unwrap().peers
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn seed_example_advertises_the_lan_and_an_exit_node() {
        // README: AllowedIPs = 0.0.0.0/0,::/0,192.168.8.0/24
        let a = advertisement(&settings(&[]), &peers(&["0.0.0.0/0,::/0,192.168.8.0/24"]));
        assert_eq!(
            a,
            Advertisement {
                routes: nets(&["192.168.8.0/24"]),
                exit_node: true
            }
        );
    }

    #[test]
    fn two_way_routing_example_advertises_everything_but_defaults() {
        // README, "Two-way routing": the server's peer entry for TailGuard.
        let p =
            peers(&["10.1.0.2/32,fd00:ed7c:a960:6e9b::2/128,100.64.0.0/10,fd7a:115c:a1e0::/48"]);
        let a = advertisement(&settings(&[]), &p);
        assert_eq!(
            a.routes,
            nets(&[
                "10.1.0.2/32",
                "fd00:ed7c:a960:6e9b::2/128",
                "100.64.0.0/10",
                "fd7a:115c:a1e0::/48"
            ])
        );
        assert!(!a.exit_node);
    }

    #[test]
    fn server_with_several_clients_advertises_each_once() {
        let p = peers(&[
            "10.8.0.2/32",
            "10.8.0.3/32,192.168.50.0/24",
            "192.168.50.0/24,::/0",
        ]);
        let d = discover(&p);
        assert_eq!(
            d.routes,
            nets(&["10.8.0.2/32", "10.8.0.3/32", "192.168.50.0/24"])
        );
        assert!(d.default_route, "only ::/0 is enough for an exit node");
    }

    #[test]
    fn ts_routes_override_discovery_and_empty_means_none() {
        let p = peers(&["0.0.0.0/0,192.168.8.0/24"]);
        let a = advertisement(&settings(&["--ts-routes=10.99.0.0/16"]), &p);
        assert_eq!(
            a,
            Advertisement {
                routes: nets(&["10.99.0.0/16"]),
                exit_node: true
            }
        );
        let a = advertisement(&settings(&["--ts-routes="]), &p);
        assert_eq!(
            a,
            Advertisement {
                routes: vec![],
                exit_node: true
            }
        );
    }

    #[test]
    fn client_mode_advertises_only_explicit_routes_and_no_exit_node() {
        let p = peers(&["0.0.0.0/0,192.168.8.0/24"]);
        assert_eq!(
            advertisement(&settings(&["--client-mode=1"]), &p),
            Advertisement::default()
        );
        let a = advertisement(
            &settings(&["--client-mode=1", "--ts-routes=10.99.0.0/16"]),
            &p,
        );
        assert_eq!(
            a,
            Advertisement {
                routes: nets(&["10.99.0.0/16"]),
                exit_node: false
            }
        );
    }
}
