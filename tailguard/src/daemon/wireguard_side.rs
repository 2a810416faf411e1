//! The WireGuard side as the tailnet sees it: alive while its device is up
//! (or comes back at the first attempt), the peers this node connects to
//! answer, and `TG_HEALTH_PROBE` accepts a connection. While it is down the
//! node is not ready, and the routes and exit node it advertises are
//! withdrawn (docs/architecture.md, "Health and recovery").

use std::time::{Instant, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::plan::WireGuardPlan,
    config::wg_quick::PublicKey,
    http::health::{Health, RoutesOffer},
    tailscale::prefs::Offer,
    wireguard::device::WgDevice,
    wireguard::handshakes::{HANDSHAKE_WINDOW, Handshakes, PeerSample},
};

/// While a peer without a `PersistentKeepalive` of its own is silent, it
/// gets this one: once the routes are withdrawn nothing else would be sent
/// to it, and WireGuard gives up a handshake after 90 s, so its return
/// would never be seen. (The seed README's client config has 25 s.)
pub const SILENT_KEEPALIVE: u16 = 25;

/// One peer whose handshakes are judged.
struct Judged {
    key: PublicKey,
    /// How messages name it (its key and endpoint are not for every page).
    name: String,
    /// It has no keepalive of its own.
    without_keepalive: bool,
    /// It has [`SILENT_KEEPALIVE`] for now.
    given_keepalive: bool,
}

/// The peers whose handshakes are judged, and what is known of them.
pub struct PeerWatch {
    /// Those with an `Endpoint` (this node connects to them). The others
    /// connect to us: a server config's clients come and go, and only the
    /// device's being up is judged.
    judged: Vec<Judged>,
    handshakes: Handshakes,
}

impl PeerWatch {
    pub fn new(plan: &WireGuardPlan) -> Self {
        let judged = plan
            .peers
            .iter()
            .filter(|p| p.endpoint.is_some())
            .map(|p| Judged {
                key: p.public_key,
                name: format!(
                    "the WireGuard peer of line {} of {}",
                    p.line,
                    plan.config.display()
                ),
                without_keepalive: p.persistent_keepalive.is_none_or(|k| k == 0),
                given_keepalive: false,
            })
            .collect();
        Self {
            judged,
            handshakes: Handshakes::new(Instant::now()),
        }
    }

    /// Whether any peer is judged (a client config): if not, no reading.
    pub fn judges_any(&self) -> bool {
        !self.judged.is_empty()
    }

    /// The device was made anew: its peers start over, silent or not (a
    /// new device's peers are judged from when it was made).
    pub fn device_made(&mut self, health: &watch::Sender<Health>) {
        self.handshakes.device_made(Instant::now());
        // Made from the plan: the keepalives are the config's again.
        for peer in &mut self.judged {
            peer.given_keepalive = false;
        }
        health.send_if_modified(|h| {
            let had = !h.silent_peers.is_empty();
            h.silent_peers.clear();
            had
        });
    }

    /// Reads the peers from the device and puts the silent ones in
    /// `health`, saying each change once.
    pub async fn check(&mut self, device: &WgDevice, health: &watch::Sender<Health>) {
        // A device that does not answer is the refresh's to notice.
        let Ok(reported) = device.reported().await else {
            return;
        };
        let samples: Vec<PeerSample> = reported
            .peers
            .iter()
            .filter(|p| self.judged.iter().any(|j| j.key.0 == p.config.public_key.0))
            .map(|p| PeerSample {
                public_key: PublicKey(p.config.public_key.0),
                last_handshake: p.stats.last_handshake_time,
                tx_bytes: p.stats.tx_bytes,
            })
            .collect();
        let silent = self
            .handshakes
            .observe(Instant::now(), SystemTime::now(), &samples);
        for peer in &mut self.judged {
            let give = peer.without_keepalive && silent.contains(&peer.key);
            if give != peer.given_keepalive {
                let seconds = if give { SILENT_KEEPALIVE } else { 0 };
                match device.set_keepalive(&peer.key, seconds).await {
                    Ok(()) => peer.given_keepalive = give,
                    // Tried again at the next reading.
                    Err(e) => warn!("setting a keepalive for {}: {e}", peer.name),
                }
            }
        }
        let said: Vec<String> = self
            .judged
            .iter()
            .filter(|j| silent.contains(&j.key))
            .map(|j| {
                format!(
                    "{} has not answered: no handshake for over {} s",
                    j.name,
                    HANDSHAKE_WINDOW.as_secs()
                )
            })
            .collect();
        health.send_if_modified(|h| {
            if h.silent_peers == said {
                return false;
            }
            for why in said.iter().filter(|s| !h.silent_peers.contains(s)) {
                warn!("{why}");
            }
            for name in self.judged.iter().map(|j| &j.name) {
                let was = h.silent_peers.iter().any(|s| s.starts_with(name.as_str()));
                let is = said.iter().any(|s| s.starts_with(name.as_str()));
                if was && !is {
                    info!("{name} answers again");
                }
            }
            h.silent_peers = said;
            true
        });
    }
}

/// Offers the routes to the tailnet, or withdraws them, as the health of
/// the WireGuard side says; each change said once, with its reason, and
/// shown in `/status`.
pub fn follow_offer(health: &watch::Sender<Health>, offer: &watch::Sender<Offer>) {
    let mut wanted = Offer::Routes;
    health.send_if_modified(|h| {
        let down = h.wireguard_side_down();
        wanted = if down.is_some() {
            Offer::Withdrawn
        } else {
            Offer::Routes
        };
        let routes = &mut h.routes;
        match down {
            None if routes.advertised => false,
            None => {
                info!("the WireGuard side is back: advertising the routes and exit node again");
                *routes = RoutesOffer {
                    advertised: true,
                    withdrawals: routes.withdrawals,
                    ..RoutesOffer::default()
                };
                true
            }
            Some(why) if routes.advertised => {
                warn!("the WireGuard side is down ({why}): withdrawing the routes and exit node from the tailnet");
                *routes = RoutesOffer {
                    advertised: false,
                    withdrawn_because: Some(why),
                    withdrawn_at: Some(crate::http::health::unix_seconds(SystemTime::now())),
                    withdrawals: routes.withdrawals + 1,
                };
                true
            }
            // Still down; perhaps for another reason now.
            Some(why) => {
                let changed = routes.withdrawn_because.as_ref() != Some(&why);
                routes.withdrawn_because = Some(why);
                changed
            }
        }
    });
    offer.send_if_modified(|o| {
        let changed = *o != wanted;
        *o = wanted;
        changed
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the peers this node connects to are judged, each named by its
    /// line, not by its key or endpoint.
    #[test]
    fn judged_are_the_peers_with_an_endpoint() {
        let text = "[Interface]\nPrivateKey=yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\
             [Peer]\nPublicKey=xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nAllowedIPs=10.1.0.1/32\n\
             Endpoint=192.0.2.1:51820\nPersistentKeepalive=25\n\
             [Peer]\nPublicKey=TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=\nAllowedIPs=10.1.0.2/32\n\
             Endpoint=192.0.2.2:51820\n\
             [Peer]\nPublicKey=gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdyYBz6EA=\nAllowedIPs=10.1.0.3/32\n\
             PersistentKeepalive=25\n";
        let config =
            crate::config::wg_quick::parse(text, std::path::Path::new("/etc/wireguard/wg0.conf"))
                .unwrap();
        let (settings, _) = crate::config::settings::parse_args(&[]).unwrap();
        let plan = crate::config::plan::Plan::new(&settings, &config);
        let watch = PeerWatch::new(&plan.wireguard);
        let judged: Vec<(&str, bool)> = watch
            .judged
            .iter()
            .map(|j| (j.name.as_str(), j.without_keepalive))
            .collect();
        assert_eq!(
            judged,
            [
                (
                    "the WireGuard peer of line 3 of /etc/wireguard/wg0.conf",
                    false
                ),
                (
                    "the WireGuard peer of line 8 of /etc/wireguard/wg0.conf",
                    true
                )
            ]
        );
    }

    #[test]
    fn the_routes_are_withdrawn_while_the_side_is_down_and_offered_again() {
        let (health, _) = watch::channel(Health::new());
        let (offer, offered) = watch::channel(Offer::Routes);
        follow_offer(&health, &offer);
        assert_eq!(*offered.borrow(), Offer::Routes);
        assert!(health.borrow().routes.advertised);

        // A device gone for a moment is not a reason: only one that could
        // not be brought back.
        health.send_modify(|h| h.wireguard_up = false);
        follow_offer(&health, &offer);
        assert_eq!(*offered.borrow(), Offer::Routes);

        health.send_modify(|h| h.probe_failure = Some("TG_HEALTH_PROBE=x refuses".into()));
        follow_offer(&health, &offer);
        assert_eq!(*offered.borrow(), Offer::Withdrawn);
        let routes = health.borrow().routes.clone();
        assert!(!routes.advertised);
        assert_eq!(
            routes.withdrawn_because.as_deref(),
            Some("TG_HEALTH_PROBE=x refuses")
        );
        assert_eq!(routes.withdrawals, 1);

        // Still down, for one more reason: one withdrawal, both reasons.
        health.send_modify(|h| h.wireguard_not_brought_back = true);
        follow_offer(&health, &offer);
        let routes = health.borrow().routes.clone();
        assert_eq!(routes.withdrawals, 1);
        assert_eq!(
            routes.withdrawn_because.as_deref(),
            Some(
                "the WireGuard device is gone and could not be brought back; \
                 TG_HEALTH_PROBE=x refuses"
            )
        );

        health.send_modify(|h| {
            h.wireguard_not_brought_back = false;
            h.probe_failure = None;
        });
        follow_offer(&health, &offer);
        assert_eq!(*offered.borrow(), Offer::Routes);
        let routes = health.borrow().routes.clone();
        assert!(routes.advertised && routes.withdrawn_because.is_none());
        assert_eq!(routes.withdrawals, 1, "kept");
    }
}
