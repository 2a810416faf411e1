//! The status page (`TG_WEBUI_PORT`) in a real browser: headless Chromium
//! loads it from a WireGuard peer's namespace and from a tailnet peer's,
//! and the test reads the DOM the browser built: a row for each WireGuard
//! peer the device has, each advertised route marked approved or waiting as
//! the (stand-in) control server answers, and counters that move between
//! two loads with traffic between them. A screenshot is left in `target/`.

use std::{process::Command, time::Duration};

use hyper::Method;
use scraper::{Html, Selector};
use serde_json::json;
use tailguard_tests::{
    bridge::Bridge,
    browser,
    daemon::{DaemonUnderTest, health, status},
    netns::{NetNs, run},
    standin,
    topology::*,
    traffic::{WhoAmI, who_am_i},
};

const PAGE: u16 = 8088;
/// Advertised by the node: one the test approves, one it leaves waiting.
const APPROVED: &str = "192.168.8.0/24";
const WAITING: &str = "10.66.0.3/32";

/// The page as the browser built it, loaded from `ns`.
fn load(ns: &NetNs, from: &str, address: &str) -> Html {
    let url = format!("http://{}/", endpoint(address, PAGE));
    let dom = ns.run(|| browser::dom(&url));
    assert!(
        dom.contains("<main"),
        "no page loaded from {from}'s side:\n{dom}"
    );
    Html::parse_document(&dom)
}

fn select<'a>(page: &'a Html, css: &str) -> Vec<scraper::ElementRef<'a>> {
    let selector = Selector::parse(css).unwrap_or_else(|e| panic!("{css}: {e}"));
    page.select(&selector).collect()
}

/// An attribute of the one element `css` selects.
fn attribute(page: &Html, css: &str, name: &str) -> Option<String> {
    let found = select(page, css);
    found.first()?.value().attr(name).map(str::to_string)
}

fn text(page: &Html, css: &str) -> String {
    select(page, css)
        .iter()
        .map(|e| e.text().collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The WireGuard peers' public keys, as the node's device has them.
fn device_peers(b: &Bridge) -> Vec<String> {
    let mut keys: Vec<String> = b
        .bed
        .ours
        .run(|| run(Command::new("wg").args(["show", &b.bed.device, "peers"])))
        .split_whitespace()
        .map(str::to_string)
        .collect();
    keys.sort();
    keys
}

fn peer_rows(page: &Html) -> Vec<String> {
    let mut keys: Vec<String> = select(page, "table#peers tr[data-peer]")
        .iter()
        .filter_map(|row| row.value().attr("data-peer").map(str::to_string))
        .collect();
    keys.sort();
    keys
}

fn number(value: Option<String>) -> u64 {
    value.and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[test]
fn the_status_page_renders_peers_routes_and_moving_counters_in_a_browser() {
    let b = Bridge::new("page");
    let routes = format!("{APPROVED},{WAITING}");
    let mut node = b.bed.ours.run(|| {
        let mut node = DaemonUnderTest::builder(&b)
            .envs(&[("TG_WEBUI_PORT", "8088"), ("TS_ROUTES", &routes)])
            .start();
        node.wait_for("health", |_| health().0);
        node
    });
    node.wait_for("the second WireGuard peer's handshake", |_| {
        b.client_connected()
    });
    // The tailnet's admin approves one of the two routes.
    standin::ask(
        &node.standin().socket,
        Method::POST,
        "/standin/set",
        json!({ "approved_routes": [APPROVED] }),
    );
    b.bed.ours.run(|| {
        node.wait_for("the approval in the report", |_| {
            status().tailscale.is_some_and(|t| {
                t.advertised_routes
                    .iter()
                    .any(|r| r.route.to_string() == APPROVED && r.approved)
            })
        });
        node.wait_for("both peers in the report", |_| {
            status().wireguard.is_some_and(|w| w.peers.len() == 2)
        });
    });
    let ctx = |what: &str| format!("{what}\n{}", node.log());
    let peers = device_peers(&b);
    assert_eq!(peers.len(), 2, "{}", ctx("the device's peers"));

    // From the WireGuard server's namespace (a WireGuard peer).
    let first = load(&b.bed.theirs, "the WireGuard server", NODE_WG);
    assert_eq!(text(&first, "#health"), "healthy", "{}", ctx("the badge"));
    assert_eq!(peer_rows(&first), peers, "{}", ctx("a row per peer"));
    let approval = |page: &Html, route: &str| {
        attribute(
            page,
            &format!("table#advertised tr[data-route=\"{route}\"] td[data-approval]"),
            "data-approval",
        )
    };
    assert_eq!(approval(&first, APPROVED).as_deref(), Some("approved"));
    assert_eq!(approval(&first, WAITING).as_deref(), Some("waiting"));
    assert!(
        text(&first, "#datapath").starts_with("ebpf"),
        "{}",
        text(&first, "#datapath")
    );

    // Traffic from the WireGuard server to the tailnet, through the fast
    // path; the device is read every 5 s, the counters every second.
    let server_key = b.bed.peer_public.clone();
    let received = |page: &Html| {
        number(attribute(
            page,
            &format!("tr[data-peer=\"{server_key}\"] td[data-received]"),
            "data-received",
        ))
    };
    let redirected = |page: &Html| {
        number(attribute(
            page,
            "tr[data-outcome=\"wireguard/redirected\"] td[data-packets]",
            "data-packets",
        ))
    };
    let listener = b.tailnet.run(|| WhoAmI::listen(false));
    for _ in 0..5 {
        let seen = b.bed.theirs.run(|| who_am_i(TAILNET_PEER, listener.port));
        assert!(
            seen.is_ok(),
            "{}",
            ctx(&format!("through the bridge: {seen:?}"))
        );
    }
    std::thread::sleep(tailguard_tests::patience(Duration::from_secs(6)));
    let second = load(&b.bed.theirs, "the WireGuard server", NODE_WG);
    assert!(
        received(&second) > received(&first),
        "{}",
        ctx(&format!(
            "the server peer's received bytes did not move: {} then {}",
            received(&first),
            received(&second)
        ))
    );
    assert!(
        redirected(&second) > redirected(&first),
        "{}",
        ctx(&format!(
            "redirected packets did not move: {} then {}",
            redirected(&first),
            redirected(&second)
        ))
    );
    let sparkline = attribute(
        &second,
        &format!("tr[data-peer=\"{server_key}\"] svg.spark"),
        "data-points",
    );
    assert!(
        number(sparkline) >= 1,
        "{}",
        ctx("the sparkline has points")
    );

    // From the tailnet peer's namespace: the same page, by the node's
    // tailnet address; and the screenshot README shows.
    let from_tailnet = load(&b.tailnet, "the tailnet peer", NODE_TS);
    assert_eq!(
        peer_rows(&from_tailnet),
        peers,
        "{}",
        ctx("from the tailnet")
    );
    let shot = browser::target_dir().join("status-page.png");
    std::thread::sleep(Duration::from_millis(1100)); // one request a second
    b.tailnet.run(|| {
        browser::screenshot(
            &format!("http://{}/", endpoint(NODE_TS, PAGE)),
            &shot,
            1100,
            1500,
        )
    });
    println!("status page screenshot: {}", shot.display());
    b.bed.ours.run(|| node.stop());
}
