//! The status page (`/` on `TG_WEBUI_PORT` and the health address): the
//! [`StatusReport`] rendered on the server as HTML that needs no script.
//! A small one only refreshes the page in place. Everything shown comes
//! from the report, so the page and `/status` never disagree. maud escapes
//! every value: a peer's name or a tailscaled warning cannot inject markup.

use std::time::SystemTime;

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::health::unix_seconds;
use crate::config::plan::list;
use crate::report::{
    AdvertisedRoute, ConnectionTableReport, Occupancy, Rates, StatusReport, TailscaleReport,
    WireGuardPeerReport, WireGuardReport,
};

/// How often the page refreshes itself (the status page allows a request a
/// second per client).
const REFRESH_SECONDS: u32 = 10;

const STYLE: &str = "
:root { color-scheme: light dark; --ok: #1a7f37; --bad: #cf222e; --wait: #9a6700; --muted: #6e7781; }
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; padding: 0 1rem 2rem; max-width: 72rem; margin-inline: auto; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .5rem 1rem; padding: 1rem 0 .5rem; }
h1 { font-size: 1.4rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .4rem; border-bottom: 1px solid #8884; }
.badge { padding: .1rem .6rem; border-radius: 1rem; color: #fff; font-weight: 600; }
.healthy { background: var(--ok); } .unhealthy { background: var(--bad); }
.muted { color: var(--muted); }
.approved { color: var(--ok); } .waiting { color: var(--wait); } .withdrawn { color: var(--bad); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25rem .6rem .25rem 0; vertical-align: top; }
th { font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: 0; }
dt { font-weight: 600; } dd { margin: 0; overflow-wrap: anywhere; }
code { font-size: .9em; overflow-wrap: anywhere; }
svg.spark { width: 8rem; height: 1.5rem; stroke: currentColor; fill: none; }
ul.reasons { margin: .3rem 0; padding-left: 1.2rem; color: var(--bad); }
@media (max-width: 40rem) { body { font-size: 14px; } th, td { padding-right: .3rem; } }
";

/// Fetches the page again and swaps its `main` in: no flicker, no lost
/// scroll position; without scripts the page is simply not refreshed.
const REFRESH_SCRIPT: &str = "
setInterval(async () => {
  try {
    const r = await fetch(location.pathname, { cache: 'no-store' });
    if (!r.ok) return;
    const next = new DOMParser().parseFromString(await r.text(), 'text/html');
    const main = next.querySelector('main');
    if (main) document.querySelector('main').replaceWith(main);
  } catch (e) {}
}, REFRESH_MS);
";

/// The page for `report`, now.
pub fn render(report: &StatusReport) -> String {
    page(report, unix_seconds(SystemTime::now())).into_string()
}

fn page(r: &StatusReport, now: u64) -> Markup {
    // The machine name, else the MagicDNS name's first label.
    let name = r
        .tailscale
        .as_ref()
        .and_then(|t| {
            [
                t.machine_name.as_str(),
                t.dns_name.split('.').next().unwrap_or(""),
            ]
            .into_iter()
            .find(|n| !n.is_empty())
        })
        .unwrap_or("TailGuard");
    let script = REFRESH_SCRIPT.replace("REFRESH_MS", &(REFRESH_SECONDS * 1000).to_string());
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "TailGuard · " (name) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                main data-generated=(now) {
                    (summary(r, name, now))
                    (tailscale(r, now))
                    (wireguard(r, now))
                    (fast_path(r))
                    (settings(r))
                }
                script { (PreEscaped(script)) }
            }
        }
    }
}

fn summary(r: &StatusReport, name: &str, now: u64) -> Markup {
    html! {
        header {
            h1 { "TailGuard · " (name) }
            @if r.healthy {
                span.badge.healthy #health { "healthy" }
            } @else {
                span.badge.unhealthy #health { "not ready" }
            }
            span.muted { "version " (r.version) }
        }
        @if !r.reasons.is_empty() {
            ul.reasons #reasons { @for reason in &r.reasons { li { (reason) } } }
        }
        dl {
            dt { "Running since" } dd { (moment(r.started_at, now)) }
            dt { "Healthy since" }
            dd { @match r.first_healthy_at { Some(t) => (moment(t, now)), None => "never" } }
            dt { "Datapath" }
            dd #datapath {
                (r.datapath)
                @if let Some(fallback) = &r.datapath_fallback {
                    " (eBPF wanted; kernel " (fallback.kernel) ": " (fallback.reason) ")"
                } @else if r.datapath == "ebpf" {
                    " (TC programs on both devices)"
                }
            }
            dt { "Routes" }
            dd #routes-offer {
                @if r.routes.advertised {
                    span.approved { "advertised" }
                } @else {
                    span.withdrawn { "withdrawn" }
                    @if let Some(why) = &r.routes.withdrawn_because { ": " (why) }
                    @if let Some(at) = r.routes.withdrawn_at { " (" (moment(at, now)) ")" }
                }
                @if r.routes.withdrawals > 0 {
                    span.muted { " · withdrawn " (r.routes.withdrawals) " times since start" }
                }
            }
            dt { "Recoveries" }
            dd #recoveries {
                "tailscaled restarted " (r.recoveries.tailscaled.restarts_after_exit)
                " after exits, " (r.recoveries.tailscaled.restarts_after_hang) " after hangs; logged in again "
                (r.recoveries.tailscaled.logins_again) "; WireGuard brought back "
                (r.recoveries.wireguard_brought_back)
            }
        }
    }
}

fn tailscale(r: &StatusReport, now: u64) -> Markup {
    let Some(ts) = &r.tailscale else {
        return html! { h2 { "Tailscale" } p.muted { "tailscaled has not answered yet" } };
    };
    html! {
        h2 { "Tailscale" }
        dl #tailscale {
            dt { "State" } dd { (ts.backend_state) @if !ts.online { " (offline)" } }
            dt { "Machine name" } dd { (ts.machine_name) }
            dt { "Node ID" } dd { code { (ts.node_id) } }
            dt { "MagicDNS name" } dd { (ts.dns_name) }
            @if let Some(tailnet) = &ts.tailnet { dt { "Tailnet" } dd { (tailnet) } }
            dt { "Addresses" } dd { (list(&ts.addresses)) }
            dt { "Version" } dd { (ts.version) }
            dt { "Key expiry" } dd { (key_expiry(ts)) }
            dt { "Exit node in use" }
            dd #exit-node {
                @match &ts.exit_node {
                    Some(exit) => {
                        (exit.name.as_deref().unwrap_or(&exit.id))
                        @if !exit.addresses.is_empty() { " (" (list(&exit.addresses)) ")" }
                        @if !exit.online { span.withdrawn { " offline" } }
                    }
                    None => "none",
                }
            }
            dt { "Tailnet peers" } dd { (ts.peers_online) " online of " (ts.peers) }
        }
        @if !ts.warnings.is_empty() {
            ul.reasons { @for w in &ts.warnings { li { (w) } } }
        }
        h2 { "Advertised routes" }
        (advertised_routes(&ts.advertised_routes, r, now))
    }
}

fn key_expiry(ts: &TailscaleReport) -> String {
    match &ts.key_expiry {
        Some(expiry) if expiry.starts_with("0001-") || expiry.is_empty() => "never".into(),
        Some(expiry) => expiry.clone(),
        None => "never (tagged or disabled)".into(),
    }
}

fn advertised_routes(routes: &[AdvertisedRoute], r: &StatusReport, now: u64) -> Markup {
    html! {
        @if !r.routes.advertised {
            p.withdrawn #routes-withdrawn {
                "Withdrawn while the WireGuard side is down"
                @if let Some(why) = &r.routes.withdrawn_because { ": " (why) }
                @if let Some(at) = r.routes.withdrawn_at { " (" (moment(at, now)) ")" }
            }
        }
        @if routes.is_empty() {
            p.muted { "none" }
        } @else {
            div.scroll {
                table #advertised {
                    thead { tr { th { "Route" } th { "Approval" } th { "Primary" } } }
                    tbody {
                        @for route in routes {
                            tr data-route=(route.route) {
                                td { code { (route.route) } }
                                @if route.approved {
                                    td.approved data-approval="approved" { "✓ approved" }
                                } @else {
                                    td.waiting data-approval="waiting" { "… waiting for approval" }
                                }
                                td { @if route.primary { "yes" } @else { span.muted { "no" } } }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn wireguard(r: &StatusReport, now: u64) -> Markup {
    let Some(wg) = &r.wireguard else {
        return html! { h2 { "WireGuard" } p.muted { "the device has not been read yet" } };
    };
    html! {
        h2 { "WireGuard" }
        dl #wireguard {
            dt { "Interface" } dd { (wg.interface) " (" (wg.implementation) ")" }
            dt { "Public key" } dd { code { (wg.public_key.as_deref().unwrap_or("none")) } }
            dt { "Listen port" } dd { (wg.listen_port) }
            dt { "Fwmark" } dd { @match wg.fwmark { Some(m) => (format!("{m:#x}")), None => "off" } }
        }
        @if r.wireguard_peers_hidden {
            p.muted #peers-hidden { "Peers hidden from WireGuard peers (WG_ISOLATE_PEERS=1)." }
        } @else {
            (peers(wg, now))
        }
    }
}

fn peers(wg: &WireGuardReport, now: u64) -> Markup {
    html! {
        div.scroll {
            table #peers {
                thead {
                    tr {
                        th { "Peer" } th { "Endpoint" } th { "Allowed IPs" } th { "Last handshake" }
                        th { "Received" } th { "Sent" } th { "Keepalive" } th { "Last 10 min" }
                    }
                }
                tbody { @for peer in &wg.peers { (peer_row(peer, now)) } }
            }
        }
    }
}

fn peer_row(p: &WireGuardPeerReport, now: u64) -> Markup {
    html! {
        tr data-peer=(p.public_key) {
            td { code title=(p.public_key) { (short_key(&p.public_key)) } }
            td { @match p.endpoint { Some(e) => (e), None => span.muted { "none" } } }
            td { (list(&p.allowed_ips)) }
            td { @match p.last_handshake { Some(t) => (moment(t, now)), None => span.muted { "never" } } }
            td.num data-received=(p.received_bytes) { (bytes(p.received_bytes)) }
            td.num data-sent=(p.sent_bytes) { (bytes(p.sent_bytes)) }
            td { @match p.persistent_keepalive { Some(s) => { "every " (s) " s" }, None => span.muted { "off" } } }
            td { (sparkline(&p.traffic)) }
        }
    }
}

fn fast_path(r: &StatusReport) -> Markup {
    html! {
        h2 { "Fast path" }
        @match (&r.counters, &r.rates) {
            (Some(counters), rates) => {
                div.scroll {
                    table #outcomes {
                        thead {
                            tr {
                                th { "Device" } th { "Outcome" } th { "Packets/s" } th { "Bytes/s" }
                                th { "Packets" } th { "Bytes" }
                            }
                        }
                        tbody {
                            @for (device, outcomes) in counters {
                                @for (outcome, count) in outcomes {
                                    @let rate = rate_of(rates.as_ref(), device, outcome);
                                    tr data-outcome=(format!("{device}/{outcome}")) {
                                        td { (device) } td { (outcome_label(outcome)) }
                                        td.num { (format!("{:.1}", rate.0)) }
                                        td.num { (bytes(rate.1 as u64)) "/s" }
                                        td.num data-packets=(count.packets) { (count.packets) }
                                        td.num { (bytes(count.bytes)) }
                                    }
                                }
                            }
                        }
                    }
                }
                @if let Some(rates) = rates {
                    p.muted { "Rates over the last " (format!("{:.0}", rates.over_seconds)) " s." }
                }
            }
            (None, _) => p.muted { "The netfilter datapath forwards: the kernel counts." },
        }
        @if let Some(table) = &r.connection_table { (connection_table(table)) }
    }
}

/// What an outcome's name means, for a reader who has not read the
/// programs: `kernel:*` left to the kernel, `drop:*` dropped.
fn outcome_label(outcome: &str) -> String {
    if let Some(why) = outcome.strip_prefix("kernel:") {
        format!("to the kernel: {why}")
    } else if let Some(why) = outcome.strip_prefix("drop:") {
        format!("dropped: {why}")
    } else {
        outcome.to_string()
    }
}

fn rate_of(rates: Option<&Rates>, device: &str, outcome: &str) -> (f64, f64) {
    rates
        .and_then(|r| r.outcomes.get(device)?.get(outcome))
        .map_or((0.0, 0.0), |r| (r.packets, r.bytes))
}

fn connection_table(t: &ConnectionTableReport) -> Markup {
    let occupancy = |o: &Occupancy| {
        let percent = if o.capacity == 0 {
            0.0
        } else {
            o.flows as f64 * 100.0 / f64::from(o.capacity)
        };
        format!("{} of {} ({percent:.1} %)", o.flows, o.capacity)
    };
    let named = |counts: &std::collections::BTreeMap<String, u64>| {
        if counts.is_empty() {
            "none".to_string()
        } else {
            counts
                .iter()
                .map(|(name, n)| format!("{name} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    html! {
        h2 { "Connection table" }
        dl #connection-table {
            dt { "IPv4 flows" } dd data-flows=(t.ipv4.flows) { (occupancy(&t.ipv4)) }
            dt { "IPv6 flows" } dd { (occupancy(&t.ipv6)) }
            dt { "Live by state" } dd { (named(&t.live)) }
            dt { "Expired by state" } dd { (named(&t.expired)) }
            dt { "Events" } dd { (named(&t.events)) }
            dt { "Unreplied per source" } dd { "at most " (t.unreplied_per_source) }
        }
    }
}

fn settings(r: &StatusReport) -> Markup {
    html! {
        h2 { "Settings" }
        div.scroll {
            table #settings {
                tbody {
                    @for s in &r.settings {
                        tr { th { (s.name) } td { code { (s.value) } } }
                    }
                }
            }
        }
    }
}

/// Traffic in each interval, as a line scaled to its largest.
fn sparkline(traffic: &[u64]) -> Markup {
    const WIDTH: f64 = 120.0;
    const HEIGHT: f64 = 24.0;
    let most = traffic.iter().copied().max().unwrap_or(0).max(1) as f64;
    let step = WIDTH / (traffic.len().max(2) - 1) as f64;
    let points: Vec<String> = traffic
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let y = HEIGHT - 1.0 - (b as f64 / most) * (HEIGHT - 2.0);
            format!("{:.1},{y:.1}", i as f64 * step)
        })
        .collect();
    let total: u64 = traffic.iter().sum();
    html! {
        svg.spark viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
            aria-label=(format!("{} in the last 10 minutes", bytes(total))) data-points=(traffic.len()) {
            title { (bytes(total)) " in the last 10 minutes" }
            polyline points=(points.join(" ")) stroke-width="1.5" {}
        }
    }
}

/// A key as `wg` abbreviates it in narrow places: its first 8 characters.
fn short_key(key: &str) -> String {
    let short: String = key.chars().take(8).collect();
    format!("{short}…")
}

/// A byte count in the units `wg show` uses.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// A moment (Unix seconds) as how long ago it was.
fn moment(at: u64, now: u64) -> String {
    let ago = now.saturating_sub(at);
    let (value, unit) = match ago {
        0..60 => (ago, "s"),
        60..3600 => (ago / 60, "min"),
        3600..86400 => (ago / 3600, "h"),
        _ => (ago / 86400, "d"),
    };
    format!("{value} {unit} ago")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Count, ExitNodeInUse};

    fn report() -> StatusReport {
        StatusReport {
            version: "0.1.0".into(),
            healthy: false,
            reasons: vec!["the WireGuard peer of line 7 of wg0.conf is silent".into()],
            started_at: 1000,
            tailscale: Some(TailscaleReport {
                backend_state: "Running".into(),
                machine_name: "bridge<script>".into(),
                online: true,
                exit_node: Some(ExitNodeInUse {
                    id: "n1".into(),
                    name: Some("exit-a".into()),
                    online: true,
                    addresses: vec![],
                }),
                advertised_routes: vec![
                    AdvertisedRoute {
                        route: "192.168.8.0/24".parse().unwrap(),
                        approved: true,
                        primary: true,
                    },
                    AdvertisedRoute {
                        route: "0.0.0.0/0".parse().unwrap(),
                        approved: false,
                        primary: false,
                    },
                ],
                ..TailscaleReport::default()
            }),
            wireguard: Some(WireGuardReport {
                interface: "wg0".into(),
                peers: vec![WireGuardPeerReport {
                    public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
                    received_bytes: 3 * 1024 * 1024,
                    last_handshake: Some(1990),
                    traffic: vec![0, 10, 40, 5],
                    ..WireGuardPeerReport::default()
                }],
                ..WireGuardReport::default()
            }),
            counters: Some(
                [(
                    "wireguard".to_string(),
                    [(
                        "drop:isolated".to_string(),
                        Count {
                            packets: 7,
                            bytes: 700,
                        },
                    )]
                    .into(),
                )]
                .into(),
            ),
            ..StatusReport::default()
        }
    }

    #[test]
    fn the_page_shows_the_report_escaped() {
        let html = page(&report(), 2000).into_string();
        assert!(html.contains("bridge&lt;script&gt;"), "{html}");
        assert!(!html.contains("bridge<script>"));
        assert!(html.contains(r#"data-route="192.168.8.0/24""#));
        assert!(html.contains(r#"data-approval="approved""#));
        assert!(html.contains(r#"data-approval="waiting""#));
        assert!(html.contains("10 s ago"), "the handshake, 10 s before");
        assert!(html.contains("3.00 MiB"));
        assert!(html.contains("dropped: isolated"));
        assert!(html.contains("exit-a"));
        assert!(html.contains("is silent"));
        assert!(html.contains(r#"data-points="4""#));
    }

    #[test]
    fn hidden_peers_are_not_rendered() {
        let mut r = report();
        r.hide_wireguard_peers();
        let html = page(&r, 2000).into_string();
        assert!(!html.contains("xTIBA5rb"), "{html}");
        assert!(html.contains("peers-hidden"));
    }

    #[test]
    fn sizes_and_moments_read_as_wg_says_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(moment(100, 100), "0 s ago");
        assert_eq!(moment(0, 7200), "2 h ago");
        assert_eq!(moment(0, 3 * 86400), "3 d ago");
    }
}
