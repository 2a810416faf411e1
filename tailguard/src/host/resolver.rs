//! Name resolution while TailGuard runs: the WireGuard config's `DNS =`
//! servers and search domains, then the fallback servers (`TG_NAMESERVERS`),
//! written to the resolver file (`/etc/resolv.conf` in the container), as
//! wg-quick does through resolvconf. Each fallback server also gets a host
//! route via the uplink's gateway, so it stays reachable when a default
//! route through WireGuard takes everything else.
//!
//! The original file is kept beside it (`<file>.tailguard`) until TailGuard
//! stops, so even a start after a crash restores the right one. The file is
//! rewritten in place, not replaced: Docker bind-mounts it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use tracing::info;

use crate::{
    config::plan::ResolverPlan,
    host::netlink::{DeviceRoute, Netlink, NetlinkError},
};

#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
}

/// What [`ResolverSetup::apply`] changed.
pub struct ResolverSetup {
    file: Option<(PathBuf, String)>,
    routes: Vec<DeviceRoute>,
}

impl ResolverSetup {
    pub async fn apply(nl: &Netlink, plan: &ResolverPlan) -> Result<Self, ResolverError> {
        let mut setup = Self {
            file: None,
            routes: Vec::new(),
        };
        if let Err(e) = setup.steps(nl, plan).await {
            let _ = setup.teardown(nl).await;
            return Err(e);
        }
        Ok(setup)
    }

    async fn steps(&mut self, nl: &Netlink, plan: &ResolverPlan) -> Result<(), ResolverError> {
        for server in &plan.fallback {
            let Some((ifindex, gateway)) = nl.default_route(server.is_ipv6()).await? else {
                info!(%server, "no default route for its family: the fallback name server gets no host route");
                continue;
            };
            let route = DeviceRoute {
                destination: IpNet::from(*server),
                ifindex,
                table: None,
                gateway,
            };
            self.routes.push(route);
            nl.add_route(route).await?;
        }
        if let Some(path) = &plan.file {
            let original = take_original(path)?;
            write(path, &render(plan, &original))?;
            info!(file = %path.display(), servers = ?plan.servers, "resolver configured");
            self.file = Some((path.clone(), original));
        }
        Ok(())
    }

    /// Restores the original file and removes the host routes, collecting
    /// every error.
    pub async fn teardown(mut self, nl: &Netlink) -> Result<(), Vec<ResolverError>> {
        let mut errors = Vec::new();
        if let Some((path, original)) = self.file.take() {
            match write(&path, &original) {
                Ok(()) => {
                    let _ = fs::remove_file(backup_path(&path));
                }
                Err(e) => errors.push(e),
            }
        }
        for route in self.routes.drain(..) {
            if let Err(e) = nl.delete_route(route).await {
                errors.push(e.into());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tailguard");
    PathBuf::from(name)
}

/// The file as it was before TailGuard: from the backup when an earlier run
/// did not get to restore it, else the file itself (saved as the backup).
fn take_original(path: &Path) -> Result<String, ResolverError> {
    let backup = backup_path(path);
    if let Ok(saved) = fs::read_to_string(&backup) {
        return Ok(saved);
    }
    let original = fs::read_to_string(path).unwrap_or_default();
    write(&backup, &original)?;
    Ok(original)
}

fn write(path: &Path, text: &str) -> Result<(), ResolverError> {
    fs::write(path, text).map_err(|e| ResolverError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The resolver file: our servers and search domains, and the original's
/// `options` lines (timeouts, ndots...) which still apply.
pub fn render(plan: &ResolverPlan, original: &str) -> String {
    let mut out = String::from(
        "# Written by TailGuard: the WireGuard config's DNS, then TG_NAMESERVERS.\n\
         # The original file comes back when TailGuard stops.\n",
    );
    for server in &plan.servers {
        out.push_str(&format!("nameserver {server}\n"));
    }
    if !plan.search.is_empty() {
        out.push_str(&format!("search {}\n", plan.search.join(" ")));
    }
    for line in original
        .lines()
        .filter(|l| l.trim_start().starts_with("options"))
    {
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn addrs(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn rendered_file_keeps_the_original_options() {
        let plan = ResolverPlan {
            file: None,
            servers: addrs(&["10.1.0.1", "9.9.9.9"]),
            search: vec!["corp.example".into(), "lan".into()],
            fallback: vec![],
        };
        let text = render(
            &plan,
            "nameserver 127.0.0.11\noptions ndots:0\nsearch docker\n",
        );
        assert!(text.starts_with("# Written by TailGuard"));
        assert!(text.ends_with("nameserver 10.1.0.1\nnameserver 9.9.9.9\nsearch corp.example lan\noptions ndots:0\n"), "{text}");
        assert!(
            !text.contains("127.0.0.11") && !text.contains("docker"),
            "{text}"
        );
    }
}
