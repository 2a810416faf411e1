//! TailGuard's LocalAPI client against the Tailscale stand-in (which serves
//! tailscaled's JSON shapes on a unix socket).

use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use futures_util::StreamExt as _;
use serde_json::json;
use tailguard::{
    config::extra_args::MaskedPrefs,
    tailscale::{
        localapi::{LocalApi, LocalApiError, watch},
        prefs::start_body,
    },
};
use tailguard_tests::standin::{StandIn, State};

use tailguard_tests::topology::*;

fn addresses() -> Vec<IpAddr> {
    vec![NODE_TS.parse().unwrap(), NODE_TS_V6.parse().unwrap()]
}

/// A stand-in serving on a fresh socket, and a client for it.
async fn serve(name: &str) -> (Arc<StandIn>, LocalApi, PathBuf) {
    let dir = std::env::temp_dir().join(format!("tg-localapi-{name}-{}", std::process::id()));
    let socket = dir.join("tailscaled.sock");
    let standin = Arc::new(StandIn::new(State::new(addresses())));
    let server = standin.clone();
    let path = socket.clone();
    tokio::spawn(async move { server.serve(&path).await });
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (standin, LocalApi::new(&socket), dir)
}

#[tokio::test]
async fn login_with_an_auth_key_then_preferences() {
    let (standin, api, dir) = serve("key").await;
    let status = api.status(true).await.unwrap();
    assert_eq!(status.backend_state, "NeedsLogin");
    assert!(status.tailscale_ips.is_empty());

    api.start(start_body(
        Some("tskey-auth-secret"),
        &MaskedPrefs::default(),
    ))
    .await
    .unwrap();
    let status = api.status(false).await.unwrap();
    assert_eq!(status.backend_state, "Running");
    assert_eq!(status.tailscale_ips, addresses());
    assert_eq!(status.ready(), Ok(()));

    let prefs = MaskedPrefs {
        route_all: Some(true),
        corp_dns: Some(false),
        advertise_routes: Some(vec![LAN_NET.parse().unwrap()]),
        ..MaskedPrefs::default()
    };
    let after = api.edit_prefs(&prefs).await.unwrap();
    assert_eq!(after["RouteAll"], json!(true));
    assert_eq!(after["CorpDNS"], json!(false));
    assert_eq!(after["AdvertiseRoutes"], json!([LAN_NET]));
    assert_eq!(
        api.prefs().await.unwrap()["AdvertiseRoutes"],
        json!([LAN_NET])
    );
    let log = standin.state().log;
    assert_eq!(log[0]["start"]["AuthKey"], json!("<given>"));
    assert_eq!(log[1]["PATCH prefs"]["AdvertiseRoutesSet"], json!(true));
    assert_eq!(
        api.whois(&endpoint(NODE_TS, 80)).await.unwrap()["Node"]["ID"],
        json!("nStandin1CNTRL")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn interactive_login_offers_a_url_and_the_bus_tells_the_outcome() {
    let (standin, api, dir) = serve("interactive").await;
    let mut bus = Box::pin(
        api.watch(watch::INITIAL_STATE | watch::INITIAL_PREFS)
            .await
            .unwrap(),
    );
    let first = bus.next().await.unwrap().unwrap();
    assert_eq!(first["State"], json!(1), "NeedsLogin");

    api.login_interactive().await.unwrap();
    let offered = bus.next().await.unwrap().unwrap();
    assert_eq!(
        offered["BrowseToURL"],
        json!("https://login.standin.invalid/a/0123456789")
    );
    assert_eq!(
        api.status(false).await.unwrap().auth_url,
        "https://login.standin.invalid/a/0123456789"
    );

    standin.update(|s| s.backend_state = "Running".into());
    let running = bus.next().await.unwrap().unwrap();
    assert_eq!(running["State"], json!(5));
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn errors_say_what_failed() {
    let missing = LocalApi::new("/nonexistent/tailscaled.sock");
    let e = missing.status(false).await.unwrap_err();
    assert!(matches!(e, LocalApiError::Connect { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("cannot reach tailscaled at /nonexistent/tailscaled.sock"),
        "{e}"
    );

    let (_standin, api, dir) = serve("errors").await;
    let e = api.whois("100.99.0.1").await.unwrap_err();
    assert!(
        e.to_string().contains("whois?addr=100.99.0.1 answered 404"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A tailscaled that has stopped (SIGSTOP, a deadlock): the kernel still
/// accepts connections into the socket's backlog, and nothing answers.
/// Every request gives up at the client's timeout with an error that says
/// so, and the bus's start is timed too; a bus that has started may stay
/// quiet as long as it likes.
#[tokio::test]
async fn a_tailscaled_that_does_not_answer_times_out_every_request() {
    let dir = std::env::temp_dir().join(format!("tg-localapi-hung-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("tailscaled.sock");
    let _ = std::fs::remove_file(&socket);
    // Accepted (so connecting succeeds) and never read or answered.
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.push(stream);
        }
    });
    let timeout = Duration::from_millis(300);
    let api = LocalApi::with_timeout(&socket, timeout);
    // Bounded here too, so that a client without a timeout fails the test
    // rather than hanging it.
    async fn by_itself<T>(request: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), request)
            .await
            .expect("the client gives up by itself")
    }
    for (what, request) in [
        (
            "status?peers=false",
            by_itself(api.status(false)).await.map(drop),
        ),
        ("prefs", by_itself(api.prefs()).await.map(drop)),
        ("start", by_itself(api.start(json!({}))).await),
        (
            "watch-ipn-bus?mask=6",
            by_itself(api.watch(watch::INITIAL_STATE | watch::INITIAL_PREFS))
                .await
                .map(drop),
        ),
    ] {
        let e = request.expect_err(what);
        assert!(matches!(e, LocalApiError::TimedOut { .. }), "{what}: {e}");
        assert_eq!(
            e.to_string(),
            format!("LocalAPI {what}: no answer within 0.3 s")
        );
    }
    // Each gave up at its own timeout, not later.
    let started = std::time::Instant::now();
    let _ = by_itself(api.status(true)).await;
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout * 10,
        "gave up after {took:?}"
    );

    let (_standin, _, standin_dir) = serve("answers-in-time").await;
    // Long enough for a loaded machine to answer in.
    let quick_timeout = Duration::from_secs(2);
    let quick = LocalApi::with_timeout(standin_dir.join("tailscaled.sock"), quick_timeout);
    assert!(
        quick.status(false).await.is_ok(),
        "an answering one is unaffected"
    );
    let mut bus = std::pin::pin!(quick.watch(watch::INITIAL_STATE).await.unwrap());
    assert!(bus.next().await.is_some(), "the first notification");
    // The bus stays open past the timeout while nothing happens.
    let quiet = tokio::time::timeout(quick_timeout * 3 / 2, bus.next()).await;
    assert!(quiet.is_err(), "a quiet bus is not cut off: {quiet:?}");
    held.abort();
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(standin_dir).unwrap();
}
