//! The plan: everything the daemon will set up, computed from the settings
//! and the WireGuard configuration without touching the system. Later steps
//! derive from it; `tailguard check` prints it.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use tailguard_common::nat::NAT_PORT_FIRST;

use crate::{
    config::advertised_routes::{self, Advertisement},
    config::extra_args::MaskedPrefs,
    config::settings::{AttachMode, DatapathMode, DestIps, Secret, Settings},
    config::wg_quick::{Endpoint, PublicKey, SecretKey, Table, WgConfig},
};

/// The table wg-quick starts from when a default route needs a table of its
/// own (and the fwmark that keeps WireGuard's own packets out of it).
pub const WG_QUICK_FIRST_TABLE: u32 = 51820;
/// The MTU wg-quick falls back to when the uplink's cannot be found.
pub const WG_QUICK_DEFAULT_MTU: u32 = 1420;

/// Priority of our rule that sends packets carrying WireGuard's fwmark to the
/// main table before tailscaled's rules (5210-5270) can send them into its
/// table 52 — where a tailnet exit node would swallow the tunnel itself.
pub const WG_MARK_RULE_PRIORITY: u32 = 5200;
/// Priority of our rules that send traffic for the WireGuard side's routes
/// (and its own network) to their table after tailscaled's mark rules
/// (5210-5250) but before its table 52 (5270): with an exit node in use,
/// table 52's default route would otherwise take the WireGuard side's
/// traffic (forwarded replies among it) into the tailnet.
pub const WG_ROUTES_RULE_PRIORITY: u32 = 5260;
/// wg-quick's two rules for a default route end up just before main (32766).
pub const SUPPRESS_RULE_PRIORITY: u32 = 32764;
pub const NOT_FWMARK_RULE_PRIORITY: u32 = 32765;
/// The kernel's main routing table.
pub const MAIN_TABLE: u32 = 254;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub wireguard: WireGuardPlan,
    pub tailscale: TailscalePlan,
    pub forwarding: ForwardingPlan,
    pub resolver: ResolverPlan,
    pub switches: SwitchesPlan,
    /// `TG_HEALTH_ADDR`: `/healthz` and `/status` for the host.
    pub health_addr: SocketAddr,
    /// `TG_HEALTH_PROBE`: a TCP service behind WireGuard that must answer.
    pub health_probe: Option<SocketAddr>,
}

/// The kernel switches the daemon writes while it runs (and puts back at
/// its stop): the fast path's translation ports always join
/// `ip_local_reserved_ports`, whichever datapath runs, and `src_valid_mark`
/// when asked. Forwarding is not among them: it is the user's, only read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchesPlan {
    /// `net.ipv4.conf.all.src_valid_mark=1`, as wg-quick sets it for an
    /// IPv4 default route through WireGuard: replies to marked packets then
    /// pass the reverse-path check.
    pub src_valid_mark: bool,
}

/// Name resolution while TailGuard runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverPlan {
    /// The resolver file to write; `None`: leave it alone.
    pub file: Option<PathBuf>,
    /// The config's `DNS =` servers, then `TG_NAMESERVERS`, each once.
    pub servers: Vec<IpAddr>,
    pub search: Vec<String>,
    /// `TG_NAMESERVERS`: each gets a host route via the uplink's gateway.
    pub fallback: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireGuardPlan {
    pub device: String,
    /// Shown nowhere (its `Debug` is hidden); handed to the device only.
    pub private_key: SecretKey,
    pub config: PathBuf,
    pub addresses: Vec<IpNet>,
    pub mtu: Mtu,
    pub listen_port: Option<u16>,
    pub fwmark: FwMark,
    pub peers: Vec<PeerPlan>,
    /// One route per AllowedIPs prefix (longest first, as wg-quick adds them).
    pub routes: Vec<WireGuardRoute>,
    /// wg-quick's policy routing, for configurations with a default route.
    pub policy_routing: Option<PolicyRouting>,
    /// Hook commands with `%i` replaced by the device name.
    pub hooks: Hooks,
    /// The ip rules to add, in order, apart from [`Self::mark_rules`].
    pub rules: Vec<IpRule>,
    /// `WG_USERSPACE`: the program that makes a userspace device.
    pub userspace_program: String,
    /// How often peers' host-name endpoints are looked up again.
    pub endpoint_refresh: Duration,
}

impl WireGuardPlan {
    /// The rules for WireGuard's own packets once the device's mark is
    /// known (it may be the listen port the kernel picks): to the main
    /// table, ahead of tailscaled's rules, in both families.
    pub fn mark_rules(mark: u32) -> [IpRule; 2] {
        [false, true].map(|ipv6| IpRule {
            ipv6,
            priority: WG_MARK_RULE_PRIORITY,
            fwmark: Some(mark),
            invert: false,
            table: MAIN_TABLE,
            suppress_prefixlength: None,
            destination: None,
        })
    }
}

/// A policy-routing rule, as `ip rule` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpRule {
    pub ipv6: bool,
    pub priority: u32,
    /// Match packets with this mark (all 32 bits)...
    pub fwmark: Option<u32>,
    /// ...or, inverted, packets without it (`not fwmark`).
    pub invert: bool,
    pub table: u32,
    /// Ignore routes with a prefix this short or shorter (`suppress_prefixlength`).
    pub suppress_prefixlength: Option<u32>,
    /// Match only packets to this prefix (`to`).
    pub destination: Option<IpNet>,
}

impl fmt::Display for IpRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: ",
            if self.ipv6 { "-6" } else { "-4" },
            self.priority
        )?;
        if let Some(mark) = self.fwmark {
            write!(
                f,
                "{}fwmark {mark:#x} ",
                if self.invert { "not " } else { "" }
            )?;
        }
        if let Some(to) = self.destination {
            write!(f, "to {to} ")?;
        }
        write!(f, "lookup {}", self.table)?;
        if let Some(len) = self.suppress_prefixlength {
            write!(f, " suppress_prefixlength {len}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mtu {
    Fixed(u32),
    /// wg-quick's rule at bring-up: the uplink's MTU minus 80 (the largest
    /// WireGuard overhead, IPv6 outer header), else 1420.
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwMark {
    /// `FwMark =` in the file.
    Config(u32),
    /// The policy-routing table number, as wg-quick sets it.
    PolicyTable(u32),
    /// No mark given: the listen port, as the original does.
    ListenPort(u16),
    /// No mark and no fixed port: the port the device ends up with.
    ActualListenPort,
}

impl FwMark {
    /// The mark, when the plan knows it (not the port a device ends up with).
    pub fn known(self) -> Option<u32> {
        match self {
            Self::Config(mark) | Self::PolicyTable(mark) => Some(mark),
            Self::ListenPort(port) => Some(u32::from(port)),
            Self::ActualListenPort => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPlan {
    pub public_key: PublicKey,
    pub preshared_key: Option<SecretKey>,
    pub endpoint: Option<Endpoint>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// Line of its `[Peer]` header in the config: how messages name it
    /// (its key and endpoint are not for every page).
    pub line: usize,
}

/// A route the bring-up adds through the WireGuard device (one per
/// AllowedIPs prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireGuardRoute {
    pub destination: IpNet,
    /// `None`: the main table.
    pub table: Option<u32>,
}

/// wg-quick's trick for default routes: the default route goes into a table
/// of its own, used by every packet *without* WireGuard's fwmark, while the
/// main table's own default route (suppressed for everyone else) still
/// carries WireGuard's encrypted packets to the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRouting {
    /// The table holding the default route, and also the fwmark on
    /// WireGuard's own packets (wg-quick uses one number for both).
    pub table: u32,
    pub ipv4: bool,
    pub ipv6: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    pub pre_up: Vec<String>,
    pub post_up: Vec<String>,
    pub pre_down: Vec<String>,
    pub post_down: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailscalePlan {
    pub device: String,
    pub port: u16,
    pub login_server: Option<String>,
    pub hostname: Option<String>,
    pub login: Login,
    /// `--accept-dns`: only in client mode.
    pub accept_dns: bool,
    /// `--accept-routes`: always.
    pub accept_routes: bool,
    pub advertise: Advertisement,
    pub exit_node: Option<String>,
    pub web_client: bool,
    /// `TS_EXTRA_ARGS`'s preferences, applied over the ones above.
    pub extra_prefs: MaskedPrefs,
    /// `TS_SOCKET`: where tailscaled's LocalAPI answers (ours, or one
    /// already running there, which is then used as it is).
    pub socket: PathBuf,
    /// The tailscaled to start when none answers on the socket.
    pub tailscaled: TailscaledPlan,
}

/// How tailscaled is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailscaledPlan {
    /// `TS_TAILSCALED`: a path, or a name found on PATH.
    pub program: String,
    /// Its arguments: the device, port, state and socket, then
    /// `TS_TAILSCALED_EXTRA_ARGS`.
    pub args: Vec<String>,
}

/// How the node logs in to the tailnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// `TS_AUTHKEY` (never shown: a [`Secret`]).
    AuthKey(Secret),
    /// `TS_AUTHKEY=file:PATH`, read when it is needed.
    AuthKeyFile(PathBuf),
    /// Print the login URL and wait.
    Interactive,
}

/// The auth key file could not be read (the message names the file, never
/// the key).
#[derive(Debug, thiserror::Error)]
#[error("TS_AUTHKEY=file:{}: cannot read the key: {source}", path.display())]
pub struct AuthKeyFileError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl Login {
    /// The auth key to log in with; `None` for an interactive login.
    pub fn key(&self) -> Result<Option<String>, AuthKeyFileError> {
        match self {
            Self::AuthKey(key) => Ok(Some(key.expose().to_string())),
            Self::AuthKeyFile(path) => std::fs::read_to_string(path)
                .map(|k| Some(k.trim().to_string()))
                .map_err(|source| AuthKeyFileError {
                    path: path.clone(),
                    source,
                }),
            Self::Interactive => Ok(None),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardingPlan {
    pub dest_ip: DestIps,
    pub isolate_peers: bool,
    /// Source-NAT tailnet traffic towards wg to the node's WireGuard address
    /// (off with `--snat-subnet-routes=false` in `TS_EXTRA_ARGS`, the same
    /// switch that turns off tailscaled's own).
    pub snat_to_wg: bool,
    pub expose_host: bool,
    pub status_page_port: Option<u16>,
    pub attach: AttachMode,
    pub datapath: DatapathMode,
    /// Where the fast path's connection state is pinned (`TG_BPF_DIR` and
    /// the WireGuard device's name), so flows survive a restart.
    pub pin_dir: PathBuf,
    /// `TG_NAT_FLOWS` (split by `TG_NAT_V6_SHARE`) and
    /// `TG_NAT_UNREPLIED_PER_SOURCE`: the connection table's size.
    pub nat: tailguard_common::nat::TableSize,
}

/// Settings that do not fit the WireGuard configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MismatchError {
    #[error(
        "TS_DEST_IP={0}: not behind WireGuard (inside no peer's AllowedIPs and no network of \
         the device's Address): traffic for it would never reach a host there"
    )]
    DestNotBehindWireGuard(IpAddr),
    #[error(
        "TG_HEALTH_PROBE={0}: not behind WireGuard (inside no peer's AllowedIPs and no network \
         of the device's Address): it cannot tell whether the WireGuard side is alive"
    )]
    ProbeNotBehindWireGuard(SocketAddr),
    #[error(
        "TG_HEALTH_PROBE={0}: this node's own WireGuard address, which always answers; name a \
         host behind WireGuard"
    )]
    ProbeIsOwnAddress(SocketAddr),
    #[error("TS_DEST_IP={0}: this node's own WireGuard address; name a host behind WireGuard")]
    DestIsOwnAddress(IpAddr),
    #[error("TG_WEBUI_PORT={0}: the same port as ListenPort in {1}; choose another")]
    WebuiIsListenPort(u16, String),
}

/// Whether `addr` is reached through WireGuard: inside a peer's
/// AllowedIPs or a network of the device's own addresses.
fn behind_wireguard(config: &WgConfig, addr: IpAddr) -> bool {
    config
        .peers
        .iter()
        .flat_map(|p| &p.allowed_ips)
        .chain(&config.interface.addresses)
        .any(|net| net.contains(&addr))
}

impl Plan {
    /// Checks what the settings and the configuration say together, then
    /// makes the plan. The second value holds warnings.
    pub fn checked(
        settings: &Settings,
        config: &WgConfig,
    ) -> Result<(Self, Vec<String>), MismatchError> {
        let interface = &config.interface;
        for dest in [
            settings.ts_dest_ip.v4.map(IpAddr::V4),
            settings.ts_dest_ip.v6.map(IpAddr::V6),
        ]
        .into_iter()
        .flatten()
        {
            if interface.addresses.iter().any(|a| a.addr() == dest) {
                return Err(MismatchError::DestIsOwnAddress(dest));
            }
            if !behind_wireguard(config, dest) {
                return Err(MismatchError::DestNotBehindWireGuard(dest));
            }
        }
        if let Some(probe) = settings.health_probe {
            if interface.addresses.iter().any(|a| a.addr() == probe.ip()) {
                return Err(MismatchError::ProbeIsOwnAddress(probe));
            }
            if !behind_wireguard(config, probe.ip()) {
                return Err(MismatchError::ProbeNotBehindWireGuard(probe));
            }
        }
        if let Some(port) = settings.webui_port
            && interface.listen_port == Some(port)
        {
            return Err(MismatchError::WebuiIsListenPort(
                port,
                settings.wg_config_path().display().to_string(),
            ));
        }
        let mut warnings = Vec::new();
        if settings.nameservers.is_empty()
            && interface.dns_servers.is_empty()
            && settings.resolv_conf.is_some()
        {
            warnings.push(format!(
                "TG_NAMESERVERS is empty and {} has no DNS =: the node will have no resolver \
                 (host-name endpoints and tailscaled's control server cannot be found)",
                settings.wg_config_path().display()
            ));
        }
        Ok((Self::new(settings, config), warnings))
    }

    pub fn new(settings: &Settings, config: &WgConfig) -> Self {
        let wireguard = wireguard(settings, config);
        Self {
            tailscale: tailscale(settings, config),
            forwarding: ForwardingPlan {
                dest_ip: settings.ts_dest_ip,
                isolate_peers: settings.wg_isolate_peers,
                // `--snat-subnet-routes`, on unless TS_EXTRA_ARGS turns it off.
                snat_to_wg: settings.ts_extra_args.prefs.no_snat != Some(true),
                expose_host: settings.expose_host,
                status_page_port: settings.webui_port,
                attach: settings.tc_attach,
                datapath: settings.datapath,
                pin_dir: pin_dir(settings),
                nat: settings.nat,
            },
            resolver: ResolverPlan {
                file: settings.resolv_conf.clone(),
                servers: resolver_servers(&config.interface.dns_servers, &settings.nameservers),
                search: config.interface.dns_search.clone(),
                fallback: settings.nameservers.clone(),
            },
            switches: SwitchesPlan {
                src_valid_mark: wireguard.policy_routing.is_some_and(|p| p.ipv4),
            },
            health_addr: settings.health_addr,
            health_probe: settings.health_probe,
            wireguard,
        }
    }
}

fn wireguard(settings: &Settings, config: &WgConfig) -> WireGuardPlan {
    let i = &config.interface;
    let device = settings.wg_device.clone();
    let mut prefixes: Vec<IpNet> = Vec::new();
    for net in config.peers.iter().flat_map(|p| &p.allowed_ips) {
        if !prefixes.contains(net) {
            prefixes.push(*net);
        }
    }
    // Longest prefix first, as wg-quick sorts them.
    prefixes.sort_by_key(|n| std::cmp::Reverse(n.prefix_len()));

    let mut routes = Vec::new();
    let mut policy_routing = None;
    let policy_table = i.fwmark.unwrap_or(WG_QUICK_FIRST_TABLE);
    for destination in prefixes {
        match i.table {
            Table::Off => {}
            Table::Id(table) => routes.push(WireGuardRoute {
                destination,
                table: Some(table),
            }),
            Table::Auto if advertised_routes::is_default_route(&destination) => {
                let p = policy_routing.get_or_insert(PolicyRouting {
                    table: policy_table,
                    ipv4: false,
                    ipv6: false,
                });
                match destination {
                    IpNet::V4(_) => p.ipv4 = true,
                    IpNet::V6(_) => p.ipv6 = true,
                }
                routes.push(WireGuardRoute {
                    destination,
                    table: Some(policy_table),
                });
            }
            Table::Auto => routes.push(WireGuardRoute {
                destination,
                table: None,
            }),
        }
    }
    let fwmark = match (i.fwmark, policy_routing, i.listen_port) {
        (Some(mark), _, _) => FwMark::Config(mark),
        (None, Some(p), _) => FwMark::PolicyTable(p.table),
        (None, None, Some(port)) if port != 0 => FwMark::ListenPort(port),
        (None, None, _) => FwMark::ActualListenPort,
    };
    let expand = |hooks: &[String]| hooks.iter().map(|h| h.replace("%i", &device)).collect();
    let rules = ip_rules(&routes, &i.addresses, policy_routing);
    WireGuardPlan {
        private_key: i.private_key.clone(),
        config: settings.wg_config_path(),
        addresses: i.addresses.clone(),
        mtu: i.mtu.map_or(Mtu::Auto, Mtu::Fixed),
        listen_port: i.listen_port,
        fwmark,
        peers: config
            .peers
            .iter()
            .map(|p| PeerPlan {
                public_key: p.public_key,
                preshared_key: p.preshared_key.clone(),
                endpoint: p.endpoint.clone(),
                line: p.line,
                allowed_ips: p.allowed_ips.clone(),
                persistent_keepalive: p.persistent_keepalive,
            })
            .collect(),
        routes,
        policy_routing,
        rules,
        userspace_program: settings.wg_userspace.clone(),
        endpoint_refresh: settings.endpoint_refresh,
        hooks: Hooks {
            pre_up: expand(&i.pre_up),
            post_up: expand(&i.post_up),
            pre_down: expand(&i.pre_down),
            post_down: expand(&i.post_down),
        },
        device,
    }
}

/// The ip rules besides the mark rules, in the order they are added: the
/// WireGuard side's destinations to their tables (default routes aside:
/// wg-quick's policy routing has them), then wg-quick's two rules per
/// family for a default route.
fn ip_rules(
    routes: &[WireGuardRoute],
    addresses: &[IpNet],
    policy_routing: Option<PolicyRouting>,
) -> Vec<IpRule> {
    let mut side: Vec<(IpNet, u32)> = Vec::new();
    let routed = routes
        .iter()
        .filter(|r| r.destination.prefix_len() > 0)
        .map(|r| (r.destination.trunc(), r.table.unwrap_or(MAIN_TABLE)));
    let own = addresses.iter().map(|a| (a.trunc(), MAIN_TABLE));
    for entry in routed.chain(own) {
        if !side.contains(&entry) {
            side.push(entry);
        }
    }
    let mut rules: Vec<IpRule> = side
        .into_iter()
        .map(|(destination, table)| IpRule {
            ipv6: destination.addr().is_ipv6(),
            priority: WG_ROUTES_RULE_PRIORITY,
            fwmark: None,
            invert: false,
            table,
            suppress_prefixlength: None,
            destination: Some(destination),
        })
        .collect();
    if let Some(policy) = policy_routing {
        for (ipv6, wanted) in [(false, policy.ipv4), (true, policy.ipv6)] {
            if !wanted {
                continue;
            }
            rules.push(IpRule {
                ipv6,
                priority: NOT_FWMARK_RULE_PRIORITY,
                fwmark: Some(policy.table),
                invert: true,
                table: policy.table,
                suppress_prefixlength: None,
                destination: None,
            });
            rules.push(IpRule {
                ipv6,
                priority: SUPPRESS_RULE_PRIORITY,
                fwmark: None,
                invert: false,
                table: MAIN_TABLE,
                suppress_prefixlength: Some(0),
                destination: None,
            });
        }
    }
    rules
}

/// Where the connection state is pinned: one directory per WireGuard
/// device, so two daemons on one host keep their flows apart. The helper
/// commands (`stats`, `cleanup`) find it from the settings alone.
pub fn pin_dir(settings: &Settings) -> PathBuf {
    settings.bpf_dir.join(&settings.wg_device)
}

/// tailscaled's arguments: TailGuard's own flags first, then the user's
/// (which the settings check keeps from repeating ours).
fn tailscaled_args(settings: &Settings) -> Vec<String> {
    let own = [
        format!("--tun={}", settings.ts_device),
        format!("--port={}", settings.ts_port),
        format!("--statedir={}", settings.ts_state_dir.display()),
        format!("--socket={}", settings.ts_socket.display()),
    ];
    own.into_iter()
        .chain(settings.ts_tailscaled_extra_args.iter().cloned())
        .collect()
}

fn tailscale(settings: &Settings, config: &WgConfig) -> TailscalePlan {
    let login = match &settings.ts_authkey {
        None => Login::Interactive,
        Some(key) => match key.expose().strip_prefix("file:") {
            Some(path) => Login::AuthKeyFile(PathBuf::from(path)),
            None => Login::AuthKey(key.clone()),
        },
    };
    TailscalePlan {
        device: settings.ts_device.clone(),
        port: settings.ts_port,
        login_server: settings.ts_login_server.clone(),
        hostname: settings.ts_hostname.clone(),
        login,
        accept_dns: settings.client_mode,
        accept_routes: true,
        advertise: advertised_routes::advertisement(settings, &config.peers),
        exit_node: settings.ts_exit_node.clone(),
        web_client: settings.ts_webclient,
        extra_prefs: settings.ts_extra_args.prefs.clone(),
        socket: settings.ts_socket.clone(),
        tailscaled: TailscaledPlan {
            program: settings.ts_tailscaled.clone(),
            args: tailscaled_args(settings),
        },
    }
}

/// Items joined with commas, or "none" (the plan's text, the status page).
pub(crate) fn list<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

/// Servers in order — the config's first — each once.
fn resolver_servers(config: &[IpAddr], fallback: &[IpAddr]) -> Vec<IpAddr> {
    let mut all: Vec<IpAddr> = Vec::new();
    for server in config.iter().chain(fallback) {
        if !all.contains(server) {
            all.push(*server);
        }
    }
    all
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wg = &self.wireguard;
        writeln!(
            f,
            "WireGuard device {} (from {})",
            wg.device,
            wg.config.display()
        )?;
        writeln!(f, "  addresses:      {}", list(&wg.addresses))?;
        match wg.mtu {
            Mtu::Fixed(m) => writeln!(f, "  MTU:            {m}")?,
            Mtu::Auto => writeln!(
                f,
                "  MTU:            uplink MTU - 80 (else {WG_QUICK_DEFAULT_MTU}), found at start"
            )?,
        }
        match wg.listen_port {
            Some(p) => writeln!(f, "  listen port:    {p}")?,
            None => writeln!(f, "  listen port:    chosen by the kernel")?,
        }
        match wg.fwmark {
            FwMark::Config(m) => writeln!(f, "  fwmark:         {m:#x} (FwMark)")?,
            FwMark::PolicyTable(m) => {
                writeln!(f, "  fwmark:         {m:#x} (policy-routing table)")?
            }
            FwMark::ListenPort(p) => writeln!(f, "  fwmark:         {p:#x} (the listen port)")?,
            FwMark::ActualListenPort => {
                writeln!(f, "  fwmark:         the listen port, once known")?
            }
        }
        for p in &wg.peers {
            let endpoint = p
                .endpoint
                .as_ref()
                .map_or("none".into(), ToString::to_string);
            writeln!(f, "  peer {}", p.public_key)?;
            writeln!(f, "    endpoint:     {endpoint}")?;
            writeln!(f, "    allowed IPs:  {}", list(&p.allowed_ips))?;
        }
        for r in &wg.routes {
            match r.table {
                None => writeln!(f, "  route:          {} dev {}", r.destination, wg.device)?,
                Some(t) => writeln!(
                    f,
                    "  route:          {} dev {} table {t}",
                    r.destination, wg.device
                )?,
            }
        }
        if let Some(p) = wg.policy_routing {
            let families = match (p.ipv4, p.ipv6) {
                (true, true) => "IPv4 and IPv6",
                (true, false) => "IPv4",
                _ => "IPv6",
            };
            writeln!(
                f,
                "  policy routing: {families}: not fwmark {:#x} -> table {}; main with suppress_prefixlength 0",
                p.table, p.table
            )?;
        }
        for rule in &wg.rules {
            writeln!(f, "  ip rule:        {rule}")?;
        }
        match wg.fwmark.known() {
            Some(mark) => {
                for rule in WireGuardPlan::mark_rules(mark) {
                    writeln!(f, "  ip rule:        {rule}")?;
                }
            }
            None => writeln!(
                f,
                "  ip rule:        -4 and -6 {WG_MARK_RULE_PRIORITY}: fwmark <the listen port> \
                 lookup {MAIN_TABLE}"
            )?,
        }
        writeln!(
            f,
            "  userspace:      {} (when the kernel has no WireGuard)",
            wg.userspace_program
        )?;
        writeln!(
            f,
            "  endpoint names: looked up again every {} s",
            wg.endpoint_refresh.as_secs()
        )?;
        let r = &self.resolver;
        match &r.file {
            Some(file) => writeln!(
                f,
                "  resolver:       {} in {} (search: {})",
                list(&r.servers),
                file.display(),
                list(&r.search)
            )?,
            None => writeln!(f, "  resolver:       left alone (TG_RESOLV_CONF is empty)")?,
        }
        writeln!(
            f,
            "  fallback DNS:   {} (host routes via the uplink)",
            list(&r.fallback)
        )?;
        let hooks = &wg.hooks;
        for (stage, commands) in [
            ("PreUp", &hooks.pre_up),
            ("PostUp", &hooks.post_up),
            ("PreDown", &hooks.pre_down),
            ("PostDown", &hooks.post_down),
        ] {
            for c in commands {
                writeln!(f, "  {stage:<8}        {c}")?;
            }
        }

        let ts = &self.tailscale;
        writeln!(f, "Tailscale device {} (UDP port {})", ts.device, ts.port)?;
        writeln!(
            f,
            "  control server: {}",
            ts.login_server.as_deref().unwrap_or("Tailscale's")
        )?;
        writeln!(
            f,
            "  host name:      {}",
            ts.hostname.as_deref().unwrap_or("the system's")
        )?;
        match &ts.login {
            Login::AuthKey(_) => writeln!(f, "  login:          auth key (TS_AUTHKEY)")?,
            Login::AuthKeyFile(p) => {
                writeln!(f, "  login:          auth key from {}", p.display())?
            }
            Login::Interactive => {
                writeln!(f, "  login:          interactive (a login URL is printed)")?
            }
        }
        writeln!(f, "  accept DNS:     {}", yes_no(ts.accept_dns))?;
        writeln!(f, "  accept routes:  {}", yes_no(ts.accept_routes))?;
        writeln!(f, "  advertise:      routes {}", list(&ts.advertise.routes))?;
        writeln!(
            f,
            "  exit node:      {}",
            if ts.advertise.exit_node {
                "advertised"
            } else {
                "not advertised"
            }
        )?;
        writeln!(
            f,
            "  use exit node:  {}",
            ts.exit_node.as_deref().unwrap_or("none")
        )?;
        writeln!(f, "  web client:     {}", yes_no(ts.web_client))?;
        let extra = ts.extra_prefs.flags();
        if !extra.is_empty() {
            writeln!(f, "  TS_EXTRA_ARGS:  {}", extra.join(" "))?;
        }
        writeln!(f, "  LocalAPI:       {}", ts.socket.display())?;
        writeln!(
            f,
            "  tailscaled:     {} {} (unless one already answers there)",
            ts.tailscaled.program,
            ts.tailscaled.args.join(" ")
        )?;

        let fw = &self.forwarding;
        writeln!(f, "Forwarding")?;
        let dest = [fw.dest_ip.v4.map(IpAddr::V4), fw.dest_ip.v6.map(IpAddr::V6)];
        let dest: Vec<IpAddr> = dest.into_iter().flatten().collect();
        writeln!(f, "  own tailnet address forwarded to: {}", list(&dest))?;
        if fw.snat_to_wg {
            writeln!(
                f,
                "  tailnet -> WireGuard: masqueraded to this node's WireGuard address"
            )?;
        } else {
            writeln!(
                f,
                "  tailnet -> WireGuard: tailnet source addresses kept (--snat-subnet-routes=false)"
            )?;
        }
        writeln!(
            f,
            "  WireGuard -> tailnet: masqueraded to this node's tailnet address"
        )?;
        writeln!(
            f,
            "  WireGuard peers isolated: {}",
            yes_no(fw.isolate_peers)
        )?;
        writeln!(f, "  host exposed to peers:    {}", yes_no(fw.expose_host))?;
        match fw.status_page_port {
            Some(p) => writeln!(f, "  status page:              port {p}")?,
            None => writeln!(f, "  status page:              off")?,
        }
        match fw.datapath {
            DatapathMode::Ebpf => {
                writeln!(
                    f,
                    "  datapath:                 eBPF fast path (TC attach {:?}), nftables for the rest",
                    fw.attach
                )?;
                writeln!(
                    f,
                    "  connection table:         {} IPv4 and {} IPv6 flows, {} unreplied per source, pinned in {}",
                    fw.nat.v4_flows,
                    fw.nat.v6_flows,
                    fw.nat.unreplied_per_source,
                    fw.pin_dir.display()
                )?;
            }
            DatapathMode::Netfilter => writeln!(
                f,
                "  datapath:                 the kernel with nftables alone"
            )?,
        }
        let sw = &self.switches;
        writeln!(f, "Kernel switches (put back at the stop)")?;
        writeln!(
            f,
            "  net.ipv4.ip_local_reserved_ports: + {NAT_PORT_FIRST}-65535 (the fast path's translation ports)"
        )?;
        if sw.src_valid_mark {
            writeln!(
                f,
                "  net.ipv4.conf.all.src_valid_mark: 1 (IPv4 policy routing)"
            )?;
        }
        writeln!(f, "Health: http://{}/healthz", self.health_addr)?;
        if let Some(probe) = self.health_probe {
            writeln!(
                f,
                "  probe: TCP {probe} must accept a connection (else not ready, routes withdrawn)"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::settings::parse_args, config::wg_quick};

    const KEYS: &str = "PrivateKey=yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PEER: &str = "PublicKey=xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn plan(args: &[&str], interface: &str, allowed: &str) -> Plan {
        let settings = parse_args(args).unwrap().0;
        let text =
            format!("[Interface]\n{KEYS}\n{interface}\n[Peer]\n{PEER}\nAllowedIPs={allowed}\n");
        Plan::new(
            &settings,
            &wg_quick::parse(&text, Path::new("wg0.conf")).unwrap(),
        )
    }

    fn route(dest: &str, table: Option<u32>) -> WireGuardRoute {
        WireGuardRoute {
            destination: dest.parse().unwrap(),
            table,
        }
    }

    #[test]
    fn config_servers_come_first_and_each_once() {
        let addrs =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|a| a.parse().unwrap()).collect() };
        let s = resolver_servers(
            &addrs(&["10.1.0.1", "1.1.1.1"]),
            &addrs(&["1.1.1.1", "2606:4700:4700::1111"]),
        );
        assert_eq!(s, addrs(&["10.1.0.1", "1.1.1.1", "2606:4700:4700::1111"]));
    }

    #[test]
    fn default_routes_get_wg_quick_policy_routing() {
        let p = plan(&[], "Address=10.1.0.2/24", "192.168.8.0/24,0.0.0.0/0,::/0");
        let wg = &p.wireguard;
        assert_eq!(
            wg.routes,
            [
                route("192.168.8.0/24", None),
                route("0.0.0.0/0", Some(51820)),
                route("::/0", Some(51820))
            ]
        );
        assert_eq!(
            wg.policy_routing,
            Some(PolicyRouting {
                table: 51820,
                ipv4: true,
                ipv6: true
            })
        );
        assert_eq!(wg.fwmark, FwMark::PolicyTable(51820));
        assert_eq!(wg.mtu, Mtu::Auto);
    }

    /// The rules as `ip rule` lists them, in the order they are added.
    fn rules(p: &Plan) -> Vec<String> {
        p.wireguard.rules.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn the_rules_and_their_priorities_are_planned() {
        let p = plan(&[], "Address=10.1.0.2/24", "192.168.8.0/24,0.0.0.0/0");
        assert_eq!(
            rules(&p),
            [
                "-4 5260: to 192.168.8.0/24 lookup 254",
                "-4 5260: to 10.1.0.0/24 lookup 254",
                "-4 32765: not fwmark 0xca6c lookup 51820",
                "-4 32764: lookup 254 suppress_prefixlength 0",
            ],
            "the WireGuard side's networks before tailscaled's table 52 (5270), wg-quick's pair \
             for the IPv4 default route only"
        );
        assert_eq!(
            WireGuardPlan::mark_rules(0xca6c).map(|r| r.to_string()),
            [
                "-4 5200: fwmark 0xca6c lookup 254",
                "-6 5200: fwmark 0xca6c lookup 254"
            ]
        );
        assert!(p.switches.src_valid_mark, "IPv4 policy routing");
        let table = plan(&[], "Address=10.1.0.2/24\nTable=1234", "10.9.0.0/16");
        assert_eq!(
            rules(&table),
            [
                "-4 5260: to 10.9.0.0/16 lookup 1234",
                "-4 5260: to 10.1.0.0/24 lookup 254"
            ]
        );
        assert!(!table.switches.src_valid_mark);
        let v6_default = plan(&[], "Address=fd00::2/64", "::/0");
        assert!(
            !v6_default.switches.src_valid_mark,
            "an IPv6 default route needs no IPv4 switch"
        );
    }

    #[test]
    fn tailscaleds_arguments_are_planned_ours_first() {
        let p = plan(
            &[
                "--ts-device=ts1",
                "--ts-port=4242",
                "--ts-state-dir=/st",
                "--ts-socket=/run/ts.sock",
                "--ts-tailscaled-extra-args=--verbose=1 --no-logs-no-support",
            ],
            "Address=10.1.0.2/24",
            "10.9.0.0/16",
        );
        let ts = &p.tailscale;
        assert_eq!(ts.socket, PathBuf::from("/run/ts.sock"));
        assert_eq!(
            ts.tailscaled.args,
            [
                "--tun=ts1",
                "--port=4242",
                "--statedir=/st",
                "--socket=/run/ts.sock",
                "--verbose=1",
                "--no-logs-no-support"
            ]
        );
        assert_eq!(ts.tailscaled.program, "tailscaled");
        assert_eq!(
            p.forwarding.pin_dir,
            PathBuf::from("/sys/fs/bpf/tailguard/wg0")
        );
    }

    #[test]
    fn fwmark_from_the_file_names_the_policy_table() {
        let p = plan(&[], "FwMark=0x1234", "0.0.0.0/0");
        assert_eq!(
            p.wireguard
                .policy_routing
                .map(|r| (r.table, r.ipv4, r.ipv6)),
            Some((0x1234, true, false))
        );
        assert_eq!(p.wireguard.fwmark, FwMark::Config(0x1234));
    }

    #[test]
    fn without_default_route_the_fwmark_is_the_listen_port() {
        let p = plan(&[], "ListenPort=51820\nMTU=1380", "10.8.0.2/32,10.8.0.0/24");
        assert_eq!(p.wireguard.fwmark, FwMark::ListenPort(51820));
        assert_eq!(p.wireguard.policy_routing, None);
        assert_eq!(p.wireguard.mtu, Mtu::Fixed(1380));
        // Longest prefix first.
        assert_eq!(
            p.wireguard.routes,
            [route("10.8.0.2/32", None), route("10.8.0.0/24", None)]
        );
        assert_eq!(
            plan(&[], "", "10.8.0.2/32").wireguard.fwmark,
            FwMark::ActualListenPort
        );
    }

    #[test]
    fn table_off_and_fixed_tables() {
        let p = plan(&[], "Table=off", "0.0.0.0/0,10.0.0.0/8");
        assert!(p.wireguard.routes.is_empty() && p.wireguard.policy_routing.is_none());
        let p = plan(&[], "Table=1234", "0.0.0.0/0,10.0.0.0/8");
        assert_eq!(
            p.wireguard.routes,
            [
                route("10.0.0.0/8", Some(1234)),
                route("0.0.0.0/0", Some(1234))
            ]
        );
        assert!(
            p.wireguard.policy_routing.is_none(),
            "a fixed table gets plain routes"
        );
    }

    #[test]
    fn hooks_have_the_device_name() {
        let p = plan(
            &["--wg-device=wg7"],
            "PostUp=echo up %i\nPreDown=echo %i %i",
            "10.0.0.0/8",
        );
        assert_eq!(p.wireguard.hooks.post_up, ["echo up wg7"]);
        assert_eq!(p.wireguard.hooks.pre_down, ["echo wg7 wg7"]);
    }

    #[test]
    fn tailscale_side_follows_the_mode() {
        let p = plan(&["--ts-authkey=tskey-abc"], "", "0.0.0.0/0,192.168.8.0/24");
        let ts = &p.tailscale;
        assert_eq!(ts.login, Login::AuthKey(Secret::new("tskey-abc")));
        assert!(!ts.accept_dns && ts.accept_routes);
        assert_eq!(
            ts.advertise.routes,
            vec!["192.168.8.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(ts.advertise.exit_node);

        let p = plan(
            &[
                "--client-mode=1",
                "--ts-exit-node=auto:any",
                "--ts-authkey=file:/run/secrets/ts",
            ],
            "",
            "0.0.0.0/0",
        );
        let ts = &p.tailscale;
        assert_eq!(ts.login, Login::AuthKeyFile("/run/secrets/ts".into()));
        assert!(ts.accept_dns && !ts.advertise.exit_node && ts.advertise.routes.is_empty());
        assert_eq!(ts.exit_node.as_deref(), Some("auto:any"));
        assert_eq!(
            plan(&[], "", "10.0.0.0/8").tailscale.login,
            Login::Interactive
        );
    }

    #[test]
    fn printed_plan_names_the_essentials_and_no_secret() {
        let p = plan(
            &["--ts-authkey=tskey-SECRET", "--ts-dest-ip=10.1.0.1"],
            "Address=10.1.0.2/24",
            "0.0.0.0/0,192.168.8.0/24",
        );
        // Its Debug form (a log line or a panic may show it) too.
        let text = format!("{p}\n{p:?}");
        for expected in [
            "WireGuard device wg0",
            "route:          192.168.8.0/24 dev wg0",
            "route:          0.0.0.0/0 dev wg0 table 51820",
            "policy routing: IPv4: not fwmark 0xca6c -> table 51820",
            "advertise:      routes 192.168.8.0/24",
            "exit node:      advertised",
            "own tailnet address forwarded to: 10.1.0.1",
            "login:          auth key (TS_AUTHKEY)",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(
            !text.contains("SECRET") && !text.contains("yAnz5TF"),
            "{text}"
        );
    }

    #[test]
    fn auth_key_from_a_file_is_trimmed_and_a_missing_file_is_named() {
        let path = std::env::temp_dir().join(format!("tg-authkey-{}", std::process::id()));
        std::fs::write(&path, "tskey-auth-123\n").unwrap();
        let from_file = Login::AuthKeyFile(path.clone());
        assert_eq!(from_file.key().unwrap(), Some("tskey-auth-123".into()));
        assert_eq!(
            Login::AuthKey(Secret::new("tskey-direct")).key().unwrap(),
            Some("tskey-direct".into())
        );
        assert_eq!(Login::Interactive.key().unwrap(), None);
        std::fs::remove_file(&path).unwrap();
        let e = from_file.key().unwrap_err().to_string();
        assert!(
            e.starts_with("TS_AUTHKEY=file:") && e.contains("cannot read the key"),
            "{e}"
        );
        assert!(!e.contains("tskey"), "{e}");
    }

    fn checked(args: &[&str], interface: &str, allowed: &str) -> Result<Vec<String>, String> {
        let settings = parse_args(args).unwrap().0;
        let text =
            format!("[Interface]\n{KEYS}\n{interface}\n[Peer]\n{PEER}\nAllowedIPs={allowed}\n");
        let config = wg_quick::parse(&text, Path::new("wg0.conf")).unwrap();
        Plan::checked(&settings, &config)
            .map(|(_, warnings)| warnings)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn settings_that_do_not_fit_the_wireguard_file_are_refused() {
        let interface = "Address = 10.1.0.2/24\nListenPort = 51820";
        let ok = |args: &[&str], allowed| checked(args, interface, allowed).unwrap();
        assert!(ok(&["--ts-dest-ip=10.1.0.1"], "10.1.0.1/32").is_empty());
        assert!(ok(&["--ts-dest-ip=192.168.8.1"], "192.168.8.0/24").is_empty());
        assert!(
            ok(&["--ts-dest-ip=10.1.0.9"], "192.168.8.0/24").is_empty(),
            "on the device's network"
        );
        assert!(ok(&["--health-probe=192.168.8.1:80"], "192.168.8.0/24").is_empty());
        for (args, allowed, expected) in [
            (
                &["--ts-dest-ip=192.168.9.1"][..],
                "192.168.8.0/24",
                "TS_DEST_IP=192.168.9.1: not behind WireGuard",
            ),
            (
                &["--ts-dest-ip=fd00::1"],
                "0.0.0.0/0",
                "TS_DEST_IP=fd00::1: not behind WireGuard",
            ),
            (
                &["--health-probe=192.168.9.1:80"],
                "192.168.8.0/24",
                "TG_HEALTH_PROBE=192.168.9.1:80: not behind WireGuard",
            ),
            (
                &["--health-probe=10.1.0.2:80"],
                "192.168.8.0/24",
                "TG_HEALTH_PROBE=10.1.0.2:80: this node's own WireGuard address",
            ),
            (
                &["--ts-dest-ip=10.1.0.2"],
                "0.0.0.0/0",
                "TS_DEST_IP=10.1.0.2: this node's own WireGuard address",
            ),
            (
                &["--webui-port=51820"],
                "10.1.0.1/32",
                "TG_WEBUI_PORT=51820: the same port as ListenPort in /etc/wireguard/wg0.conf",
            ),
        ] {
            let e = checked(args, interface, allowed).unwrap_err();
            assert!(
                e.contains(expected),
                "{args:?}: expected {expected:?} in {e:?}"
            );
        }
    }

    #[test]
    fn no_name_server_at_all_is_warned_about() {
        let w = checked(&["--nameservers="], "Address = 10.1.0.2/24", "10.1.0.1/32").unwrap();
        assert!(
            w.len() == 1 && w[0].contains("TG_NAMESERVERS is empty and /etc/wireguard/wg0.conf has no DNS =: the node will have no resolver"),
            "{w:?}"
        );
        let with_dns = "Address = 10.1.0.2/24\nDNS = 10.1.0.1";
        assert!(
            checked(&["--nameservers="], with_dns, "10.1.0.1/32")
                .unwrap()
                .is_empty()
        );
        assert!(
            checked(
                &["--nameservers=", "--resolv-conf="],
                "Address = 10.1.0.2/24",
                "10.1.0.1/32"
            )
            .unwrap()
            .is_empty(),
            "resolution left alone: not ours to warn about"
        );
    }
}
