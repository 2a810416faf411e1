//! The connection table under churn (`BPF_PROG_TEST_RUN`, no clock
//! involved): answered flows of many WireGuard clients, then one client's
//! flood of new flows, then every earlier flow's answer sent again and
//! other clients' new flows tried; once with the per-source budget of
//! unreplied flows and once without it, side by side. Nothing is evicted
//! either way (the table is a plain hash map); what the budget buys is
//! room for everyone else's new flows.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, ensure};
use etherparse::{PacketHeaders, TransportHeader};
use tailguard::datapath::Datapath;
use tailguard_common::{
    Device,
    nat::{NAT_MIN_FLOWS, TableEvent, TableSize},
};

use crate::per_packet::{loaded, run_verdict, udp};

const REDIRECT: u32 = 7;
/// Flows the table holds (IPv4), as `TG_NAT_FLOWS`'s default gives it.
const TABLE_FLOWS: u32 = 49_152;
const CLIENTS: u8 = 200;
const FLOWS_PER_CLIENT: u16 = 5;
const FLOOD: u32 = 200_000;
const NEWCOMERS: u16 = 100;
const PEER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);
const NODE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const FLOODER: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 250);

/// One run's figures.
pub struct Churn {
    /// Unreplied flows per source (0: no budget).
    pub budget: u32,
    pub flows: usize,
    /// Of `flows`, those whose answer still reached their client after the
    /// flood.
    pub survived: usize,
    pub flood_taken: u64,
    pub over_budget: u64,
    pub table_full: u64,
    pub ended: u64,
    /// Other clients' new flows tried after the flood, and taken.
    pub newcomers: usize,
    pub newcomers_taken: usize,
}

impl Churn {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "budget": self.budget, "flows": self.flows, "survived": self.survived,
            "flood": FLOOD, "flood_taken": self.flood_taken, "over_budget": self.over_budget,
            "table_full": self.table_full, "flows_ended_broken": self.ended,
            "newcomers": self.newcomers, "newcomers_taken": self.newcomers_taken,
        })
    }
}

pub fn markdown(runs: &[Churn]) -> String {
    let mut out = format!(
        "| unreplied per source | answered flows survived | flood of {FLOOD} new flows: taken | refused over budget | refused, table full | flows ended broken | other clients' new flows taken |\n|---|---|---|---|---|---|---|\n"
    );
    for c in runs {
        let budget = if c.budget == 0 {
            "no budget".to_string()
        } else {
            c.budget.to_string()
        };
        out.push_str(&format!(
            "| {budget} | {} of {} | {} | {} | {} | {} | {} of {} |\n",
            c.survived,
            c.flows,
            c.flood_taken,
            c.over_budget,
            c.table_full,
            c.ended,
            c.newcomers_taken,
            c.newcomers
        ));
    }
    out
}

/// Runs `frame` through `device`'s ingress program: if it was redirected,
/// its UDP ports as it left.
fn send(dp: &Datapath, device: Device, frame: &[u8]) -> Result<Option<(u16, u16)>> {
    let (verdict, out) = run_verdict(dp, device, frame)?;
    if verdict != REDIRECT {
        return Ok(None);
    }
    let h = PacketHeaders::from_ethernet_slice(&out).context("a redirected frame")?;
    match h.transport {
        Some(TransportHeader::Udp(u)) => Ok(Some((u.source_port, u.destination_port))),
        other => anyhow::bail!("not UDP: {other:?}"),
    }
}

/// The client port the tailnet peer's answer to a flow translated to
/// `port` reaches, if it is forwarded.
fn answered_by(dp: &Datapath, port: u16, service: u16) -> Result<Option<u16>> {
    let answer = udp(PEER.into(), NODE.into(), service, port);
    Ok(send(dp, Device::Tailscale, &answer)?.map(|(_, to)| to))
}

/// The translated source port of a new flow's first datagram, if taken.
fn opened(dp: &Datapath, frame: &[u8]) -> Result<Option<u16>> {
    Ok(send(dp, Device::WireGuard, frame)?.map(|(from, _)| from))
}

fn client(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 66, 0, 10 + i)
}

pub fn run(budget: u32) -> Result<Churn> {
    let size = TableSize {
        v4_flows: TABLE_FLOWS,
        v6_flows: NAT_MIN_FLOWS,
        unreplied_per_source: budget,
    };
    let mut dp = loaded(size, 0)?;
    let mut cfg = dp.config()?;
    cfg.unreplied_per_source = budget;
    dp.write_config(&cfg)?;
    // Answered flows of many clients: (client, its port, service, translated port).
    let mut flows = Vec::new();
    for c in 0..CLIENTS {
        for f in 0..FLOWS_PER_CLIENT {
            let (sport, service) = (30000 + f, 5000 + u16::from(c));
            let port = opened(&dp, &udp(client(c).into(), PEER.into(), sport, service))?
                .context("an answered flow before the flood")?;
            ensure!(
                answered_by(&dp, port, service)? == Some(sport),
                "the first answer"
            );
            flows.push((c, sport, service, port));
        }
    }
    let events = |dp: &Datapath, e| dp.table_events().map(|t| t.get(e));
    let before = (
        events(&dp, TableEvent::OverBudget)?,
        events(&dp, TableEvent::TableFull)?,
        events(&dp, TableEvent::Created)?,
    );
    for i in 0..FLOOD {
        // A thousand services, so that the flood is not cut short by the
        // 4536 translation ports each service's replies can tell apart.
        let (sport, service) = (1024 + (i / 1000) as u16, 10000 + (i % 1000) as u16);
        opened(&dp, &udp(FLOODER.into(), PEER.into(), sport, service))?;
    }
    let flood_taken = events(&dp, TableEvent::Created)? - before.2;
    let mut survived = 0;
    for &(_, sport, service, port) in &flows {
        if answered_by(&dp, port, service)? == Some(sport) {
            survived += 1;
        }
    }
    let mut newcomers_taken = 0;
    for n in 0..NEWCOMERS {
        let c = (n % u16::from(CLIENTS)) as u8;
        let frame = udp(client(c).into(), PEER.into(), 40000 + n, 7000);
        if opened(&dp, &frame)?.is_some() {
            newcomers_taken += 1;
        }
    }
    Ok(Churn {
        budget,
        flows: flows.len(),
        survived,
        flood_taken,
        over_budget: events(&dp, TableEvent::OverBudget)? - before.0,
        table_full: events(&dp, TableEvent::TableFull)? - before.1,
        ended: events(&dp, TableEvent::Ended)?,
        newcomers: usize::from(NEWCOMERS),
        newcomers_taken,
    })
}
