//! What the forwarding plane's maps should hold, computed from the plan and
//! what the kernel and Tailscale report; no side effects, so every case is a
//! unit test. The daemon writes the result with [`crate::datapath`].

use ipnet::IpNet;
use tailguard_common::{Config, Route, config::flag};

use crate::{
    config::{plan::Plan, tailnet::TAILNET_RANGES},
    datapath::Routes,
    host::observed::Observed,
    report::ForwardingReport,
};

/// The configuration entry for `observed`.
pub fn config(plan: &Plan, observed: &Observed) -> Config {
    let mut config = Config {
        wg_ifindex: observed.wg_ifindex,
        wg_mtu: clamp_mtu(observed.wg_mtu),
        unreplied_per_source: plan.forwarding.nat.unreplied_per_source,
        ..Config::default()
    };
    if let Some((index, mtu)) = observed.ts_device {
        config.ts_ifindex = index;
        config.ts_mtu = clamp_mtu(mtu);
    }
    config.set_ts(observed.ts_v4, observed.ts_v6);
    let (wg_v4, wg_v6) =
        crate::config::family::first_of_each(plan.wireguard.addresses.iter().map(IpNet::addr));
    config.set_wg(wg_v4, wg_v6);
    let dest = plan.forwarding.dest_ip;
    config.set_dest(dest.v4, dest.v6);
    config.set(flag::ISOLATE_PEERS, plan.forwarding.isolate_peers);
    config.set(flag::SNAT_TO_WG, plan.forwarding.snat_to_wg);
    config.set(flag::FORWARD_V4, observed.forwarding.ipv4);
    config.set(flag::FORWARD_V6, observed.forwarding.ipv6);
    config
}

/// The route tries for `table52` and `main` (the main table's routes that
/// are not default routes and leave through neither device): first those
/// main routes as the kernel's, then the WireGuard side's routes (the plan's
/// routes and the networks of the device's own addresses, as the kernel's
/// connected routes), then the tailnet ranges and table 52. Ties go to the
/// later ones; the longest prefix wins otherwise, as in the kernel, where a
/// main route beats the WireGuard default route (wg-quick's
/// `suppress_prefixlength 0` rule consults the main table first) and the
/// plan's other routes compete with it in the main table itself. Table 52
/// comes first of all (tailscaled's rule 5270), so a main route inside a
/// tailnet prefix is left out: the tailnet takes it whatever its length.
pub fn routes(plan: &Plan, table52: &[IpNet], main: &[IpNet]) -> Routes {
    let mut routes = Routes::new();
    let tailnet: Vec<IpNet> = TAILNET_RANGES
        .into_iter()
        .chain(table52.iter().copied())
        .map(|net| net.trunc())
        .collect();
    let kernel_routes = main
        .iter()
        .map(IpNet::trunc)
        .filter(|net| !tailnet.iter().any(|t| t.contains(net)));
    for net in kernel_routes {
        routes.insert(net, Route::KERNEL);
    }
    let wireguard = plan
        .wireguard
        .routes
        .iter()
        .map(|r| r.destination)
        .chain(plan.wireguard.addresses.iter().map(IpNet::trunc));
    for net in wireguard {
        routes.insert(net.trunc(), Route::WIREGUARD);
    }
    for net in tailnet {
        routes.insert(net, Route::TAILSCALE);
    }
    routes
}

/// The maps' contents, for `/status`.
pub fn describe(config: &Config, routes: &Routes) -> ForwardingReport {
    let egress = |r: &Route| match r.device() {
        Some(device) => device.name(),
        None if *r == Route::KERNEL => "kernel",
        None => "unknown",
    };
    ForwardingReport {
        wg_ifindex: config.wg_ifindex,
        ts_ifindex: config.ts_ifindex,
        wg_mtu: config.wg_mtu,
        ts_mtu: config.ts_mtu,
        ts_v4: config.ts_v4(),
        ts_v6: config.ts_v6(),
        wg_v4: config.wg_v4(),
        wg_v6: config.wg_v6(),
        dest_v4: config.dest_v4(),
        dest_v6: config.dest_v6(),
        isolate_peers: config.has(flag::ISOLATE_PEERS),
        snat_to_wg: config.has(flag::SNAT_TO_WG),
        forward_v4: config.has(flag::FORWARD_V4),
        forward_v6: config.has(flag::FORWARD_V6),
        routes: routes
            .iter()
            .map(|(net, r)| (net.to_string(), egress(r).to_string()))
            .collect(),
    }
}

fn clamp_mtu(mtu: u32) -> u16 {
    u16::try_from(mtu).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::host::sysctls::Forwarding;
    use crate::{config::settings::parse_args, config::wg_quick};

    const CONF: &str = "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\
        Address = 10.8.0.1/24, fd00:8::1/64\n\
        [Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n\
        AllowedIPs = 10.8.0.2/32, 192.168.8.0/24\n";

    fn plan(args: &[&str]) -> Plan {
        let config = wg_quick::parse(CONF, "wg0.conf".as_ref()).unwrap();
        Plan::new(&parse_args(args).unwrap().0, &config)
    }

    #[test]
    fn config_carries_devices_addresses_and_switches() {
        let plan = plan(&["--ts-dest-ip=10.8.0.2", "--wg-isolate-peers=1"]);
        let observed = Observed {
            wg_ifindex: 7,
            wg_mtu: 1420,
            ts_device: Some((9, 1280)),
            ts_v4: Some(Ipv4Addr::new(100, 64, 0, 5)),
            ..Observed::default()
        };
        let c = config(&plan, &observed);
        assert_eq!(
            (c.wg_ifindex, c.wg_mtu, c.ts_ifindex, c.ts_mtu),
            (7, 1420, 9, 1280)
        );
        assert_eq!(c.ts_v4(), Some(Ipv4Addr::new(100, 64, 0, 5)));
        assert_eq!(c.ts_v6(), None);
        assert_eq!(c.wg_v4(), Some(Ipv4Addr::new(10, 8, 0, 1)));
        assert_eq!(c.wg_v6(), Some("fd00:8::1".parse().unwrap()));
        assert_eq!(c.dest_v4(), Some(Ipv4Addr::new(10, 8, 0, 2)));
        assert_eq!(c.dest_v6(), None);
        assert!(c.has(flag::ISOLATE_PEERS) && c.has(flag::SNAT_TO_WG));
    }

    #[test]
    fn tailscales_snat_switch_also_turns_off_ours() {
        let observed = Observed::default();
        assert!(config(&plan(&[]), &observed).has(flag::SNAT_TO_WG));
        let off = plan(&["--ts-extra-args=--snat-subnet-routes=false"]);
        assert!(!config(&off, &observed).has(flag::SNAT_TO_WG));
        let on = plan(&["--ts-extra-args=--snat-subnet-routes=true"]);
        assert!(config(&on, &observed).has(flag::SNAT_TO_WG));
    }

    #[test]
    fn each_familys_forwarding_is_the_users_switch() {
        let with = |ipv4, ipv6| {
            let observed = Observed {
                forwarding: Forwarding { ipv4, ipv6 },
                ..Observed::default()
            };
            let c = config(&plan(&[]), &observed);
            (c.has(flag::FORWARD_V4), c.has(flag::FORWARD_V6))
        };
        for (ipv4, ipv6) in [(false, false), (true, false), (false, true), (true, true)] {
            assert_eq!(with(ipv4, ipv6), (ipv4, ipv6));
        }
    }

    #[test]
    fn before_tailscale_answers_its_side_is_empty() {
        let c = config(
            &plan(&[]),
            &Observed {
                wg_ifindex: 3,
                wg_mtu: 1420,
                ..Observed::default()
            },
        );
        assert_eq!((c.ts_ifindex, c.ts_v4(), c.ts_v6()), (0, None, None));
        assert!(!c.has(flag::ISOLATE_PEERS));
    }

    #[test]
    fn routes_join_both_sides_and_table_52_wins_a_tie() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let table52 = [
            net("100.101.102.103/32"),
            net("192.168.8.0/24"),
            net("0.0.0.0/0"),
        ];
        let r = routes(&plan(&[]), &table52, &[]);
        let expect = [
            ("10.8.0.0/24", Route::WIREGUARD),
            ("fd00:8::/64", Route::WIREGUARD),
            ("10.8.0.2/32", Route::WIREGUARD),
            ("100.64.0.0/10", Route::TAILSCALE),
            ("fd7a:115c:a1e0::/48", Route::TAILSCALE),
            ("100.101.102.103/32", Route::TAILSCALE),
            ("192.168.8.0/24", Route::TAILSCALE),
            ("0.0.0.0/0", Route::TAILSCALE),
        ];
        assert_eq!(r.len(), expect.len(), "{r:?}");
        for (prefix, route) in expect {
            assert_eq!(r.get(&net(prefix)), Some(&route), "{prefix}");
        }
    }

    #[test]
    fn main_routes_shadow_the_wireguard_default_but_not_the_tailnet() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        // Pattern 1: a client of a server that takes everything.
        let conf = CONF.replace("10.8.0.2/32, 192.168.8.0/24", "0.0.0.0/0, 192.168.8.0/24");
        let config = wg_quick::parse(&conf, "wg0.conf".as_ref()).unwrap();
        let everything = Plan::new(&parse_args(&[]).unwrap().0, &config);
        let main = [
            net("10.201.0.7/24"),
            net("203.0.113.0/24"),
            net("10.8.0.0/16"),
            net("192.168.8.0/24"),
            net("100.101.0.0/16"),
            net("0.0.0.0/0"),
            net("fe80::/64"),
        ];
        let table52 = [net("100.101.102.103/32")];
        let r = routes(&everything, &table52, &main);
        let expect = [
            // The uplink's network (host bits dropped) and a static route.
            ("10.201.0.0/24", Route::KERNEL),
            ("203.0.113.0/24", Route::KERNEL),
            ("10.8.0.0/16", Route::KERNEL),
            ("fe80::/64", Route::KERNEL),
            // A tie with the plan (a default route too): the plan's.
            ("192.168.8.0/24", Route::WIREGUARD),
            ("10.8.0.0/24", Route::WIREGUARD),
            ("0.0.0.0/0", Route::WIREGUARD),
            ("100.64.0.0/10", Route::TAILSCALE),
            ("100.101.102.103/32", Route::TAILSCALE),
        ];
        for (prefix, route) in expect {
            assert_eq!(r.get(&net(prefix)), Some(&route), "{prefix}: {r:?}");
        }
        // Inside the tailnet's ranges, left to the tailnet.
        assert_eq!(r.get(&net("100.101.0.0/16")), None, "{r:?}");
        // Besides: fd00:8::/64 (the device's) and fd7a:115c:a1e0::/48.
        assert_eq!(r.len(), expect.len() + 2, "{r:?}");
    }
}
