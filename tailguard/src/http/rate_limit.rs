//! Per-client limits of the status page: requests a second (governor's
//! keyed GCRA limiter) and connections held at once. Both are keyed by the
//! client's address and keep nothing for a client that has gone quiet.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::NoOpMiddleware,
    state::keyed::HashMapStateStore,
};

/// `per_second` requests a second for each client address, none saved up.
pub struct RateLimit<C: Clock = DefaultClock> {
    limiter: RateLimiter<IpAddr, HashMapStateStore<IpAddr>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
    per_second: NonZeroU32,
}

impl RateLimit {
    pub fn new(per_second: NonZeroU32) -> Self {
        Self::with_clock(per_second, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimit<C> {
    fn with_clock(per_second: NonZeroU32, clock: C) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::hashmap_with_clock(quota, clock.clone()),
            clock,
            per_second,
        }
    }

    /// `Ok` if `client` may have a request now, else how long it must wait.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    pub fn per_second(&self) -> NonZeroU32 {
        self.per_second
    }

    /// Drops the clients whose next request would pass anyway (their state
    /// is that of a new client), so the table holds only recent clients.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Clients remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.limiter.len()
    }
}

/// Connections held per client address, at most `per_client` each.
#[derive(Debug)]
pub struct ClientSlots {
    per_client: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One held connection's place; given back on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ClientSlots>,
    client: IpAddr,
}

impl ClientSlots {
    pub fn new(per_client: usize) -> Self {
        Self {
            per_client,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more connection of `client`, unless it holds its
    /// share already.
    pub fn take(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        let mut held = self.held.lock().expect("never poisoned");
        let count = held.entry(client).or_default();
        if *count >= self.per_client {
            return None;
        }
        *count += 1;
        Some(Slot {
            slots: self.clone(),
            client,
        })
    }

    /// Clients holding a connection now.
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.held.lock().expect("never poisoned").len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().expect("never poisoned");
        if let Some(count) = held.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    const ONE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 66, 0, 1));
    const TWO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 66, 0, 3));

    #[test]
    fn one_request_a_second_per_client_and_the_wait_is_told() {
        let clock = FakeRelativeClock::default();
        let rate = RateLimit::with_clock(NonZeroU32::MIN, clock.clone());
        let passed = (0..30).filter(|_| rate.check(ONE).is_ok()).count();
        assert_eq!(passed, 1, "30 requests in the same instant");
        assert_eq!(rate.check(ONE), Err(Duration::from_secs(1)));
        // Another client has its own allowance.
        assert_eq!(rate.check(TWO), Ok(()));
        clock.advance(Duration::from_millis(400));
        assert_eq!(rate.check(ONE), Err(Duration::from_millis(600)));
        clock.advance(Duration::from_millis(600));
        assert_eq!(rate.check(ONE), Ok(()));
        assert!(rate.check(ONE).is_err());
    }

    #[test]
    fn quiet_clients_are_forgotten() {
        let clock = FakeRelativeClock::default();
        let rate = RateLimit::with_clock(NonZeroU32::MIN, clock.clone());
        for last in 0..200u8 {
            let _ = rate.check(IpAddr::from([10, 66, 1, last]));
        }
        assert_eq!(rate.len(), 200);
        rate.forget_idle();
        assert_eq!(rate.len(), 200, "all still within their second");
        clock.advance(Duration::from_secs(2));
        let _ = rate.check(ONE);
        rate.forget_idle();
        assert_eq!(rate.len(), 1, "only the client that just asked");
    }

    #[test]
    fn a_client_holds_at_most_its_share_of_connections() {
        let slots = Arc::new(ClientSlots::new(2));
        let a = slots.take(ONE).expect("first");
        let b = slots.take(ONE).expect("second");
        assert!(slots.take(ONE).is_none(), "third refused");
        let c = slots.take(TWO).expect("another client");
        drop(a);
        let a = slots.take(ONE).expect("a place given back");
        assert_eq!(slots.clients(), 2);
        drop((a, b, c));
        assert_eq!(slots.clients(), 0, "nothing kept for gone clients");
    }
}
