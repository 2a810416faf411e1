//! Attaching the programs to devices: TCX where the kernel has it (6.6+),
//! else a classic `clsact` qdisc with direct-action filters.
//!
//! Links are owned by the loaded programs, so dropping the [`aya::Ebpf`]
//! detaches them. A clsact qdisc is not: the kernel keeps it until someone
//! deletes it, so we remember which qdiscs we created and delete exactly
//! those on [`Attachments::detach`].

use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramError, TcAttach, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcError},
    },
};
use netlink_packet_route::tc::TcHandle;
use nix::errno::Errno;
use tailguard_common::{Device, Direction};
use tracing::{info, warn};

use crate::config::settings::AttachMode;

use super::{
    Error,
    object::{Program, program_error, program_mut},
};

/// How the programs ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Tcx,
    Clsact,
}

const HOOKS: [(Direction, TcAttachType); 2] = [
    (Direction::Ingress, TcAttachType::Ingress),
    (Direction::Egress, TcAttachType::Egress),
];

struct Attached {
    device: Device,
    ifname: String,
    ifindex: u32,
    backend: Backend,
    links: Vec<(Program, SchedClassifierLinkId)>,
    /// We added the clsact qdisc (it was not there before), so we remove it.
    created_qdisc: bool,
}

#[derive(Default)]
pub(super) struct Attachments(Vec<Attached>);

impl Attachments {
    pub(super) async fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        device: Device,
        ifname: &str,
        mode: AttachMode,
    ) -> Result<Backend, Error> {
        let ifindex = ifindex(ifname)?;
        // Attaching twice is harmless: the same device keeps its programs.
        if let Some(at) = self.0.iter().position(|a| a.device == device) {
            let existing = &self.0[at];
            if existing.ifindex == ifindex {
                return Ok(existing.backend);
            }
            if existing.ifname == ifname {
                // The device was deleted and made again (tailscaled does
                // that when it restarts); its programs went with it.
                let gone = self.0.remove(at);
                let _ = detach_links(ebpf, gone.links);
                info!(ifname, "device re-created: attaching again");
                return Box::pin(self.attach(ebpf, device, ifname, mode)).await;
            }
            return Err(device_error(
                ifname,
                format!(
                    "the {} programs are already attached to {}",
                    device.name(),
                    existing.ifname
                ),
            ));
        }
        let attached = match mode {
            AttachMode::Tcx => attach_tcx(ebpf, device, ifname, ifindex)?,
            AttachMode::Clsact => attach_clsact(ebpf, device, ifname, ifindex).await?,
            AttachMode::Auto => match attach_tcx(ebpf, device, ifname, ifindex) {
                Ok(attached) => attached,
                Err(e) => {
                    warn!("TCX attach on {ifname} failed ({e}); falling back to a clsact qdisc");
                    attach_clsact(ebpf, device, ifname, ifindex).await?
                }
            },
        };
        info!(device = device.name(), ifname, backend = ?attached.backend, "programs attached");
        let backend = attached.backend;
        self.0.push(attached);
        Ok(backend)
    }

    pub(super) async fn detach(&mut self, ebpf: &mut Ebpf) -> Result<(), Vec<Error>> {
        let mut errors = Vec::new();
        for attached in self.0.drain(..) {
            // A device deleted while we ran (tailscaled removes its TUN as it
            // stops) took its qdisc and filters with it: nothing is left to
            // remove, and asking the kernel to is an error. TCX links go
            // with it too; they are only forgotten.
            let gone = ifindex(&attached.ifname).ok() != Some(attached.ifindex);
            match detach_links(ebpf, attached.links) {
                Err(e) if !gone => errors.push(e),
                _ => {}
            }
            if gone {
                info!(
                    device = attached.device.name(),
                    ifname = attached.ifname,
                    "programs went with their device"
                );
                continue;
            }
            if attached.created_qdisc
                && let Err(e) = delete_clsact(attached.ifindex).await
            {
                errors.push(device_error(
                    &attached.ifname,
                    format!("removing the clsact qdisc: {e}"),
                ));
            }
            info!(
                device = attached.device.name(),
                ifname = attached.ifname,
                "programs detached"
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

fn attach_tcx(
    ebpf: &mut Ebpf,
    device: Device,
    ifname: &str,
    ifindex: u32,
) -> Result<Attached, Error> {
    let links = attach_both(ebpf, device, ifindex, |hook| TcAttach::Tcx {
        attach_type: hook,
        order: LinkOrder::default(),
    })?;
    Ok(Attached {
        device,
        ifname: ifname.to_string(),
        ifindex,
        backend: Backend::Tcx,
        links,
        created_qdisc: false,
    })
}

async fn attach_clsact(
    ebpf: &mut Ebpf,
    device: Device,
    ifname: &str,
    ifindex: u32,
) -> Result<Attached, Error> {
    let created_qdisc = match tc::qdisc_add_clsact(ifindex) {
        Ok(()) => true,
        // Someone (perhaps an earlier run of ours) already added it: use it,
        // and leave it in place when we go.
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(Errno::EEXIST as i32) => false,
        Err(e) => return Err(device_error(ifname, format!("adding a clsact qdisc: {e}"))),
    };
    remove_stale_filters(device, ifname, ifindex);
    let links = attach_both(ebpf, device, ifindex, |hook| TcAttach::Netlink {
        parent: hook.into(),
        options: NlOptions::default(),
    });
    match links {
        Ok(links) => Ok(Attached {
            device,
            ifname: ifname.to_string(),
            ifindex,
            backend: Backend::Clsact,
            links,
            created_qdisc,
        }),
        Err(e) => {
            // Leave nothing half-applied.
            if created_qdisc && let Err(del) = delete_clsact(ifindex).await {
                warn!("removing the clsact qdisc of {ifname} after a failed attach: {del}");
            }
            Err(e)
        }
    }
}

/// Unlike TCX links, clsact filters outlive the process that added them: a
/// TailGuard that was killed leaves its filters behind. Remove any filter
/// carrying one of our program names, so a restart does not stack a second
/// set on top of the first.
fn remove_stale_filters(device: Device, ifname: &str, ifindex: u32) {
    for (direction, hook) in HOOKS {
        let name = Program::new(device, direction).name();
        match tc::qdisc_detach_program(ifindex, hook.into(), name) {
            Ok(()) => warn!("removed a stale {name} filter from {ifname} (left by an earlier run)"),
            Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("looking for stale {name} filters on {ifname}: {e}"),
        }
    }
}

/// Attaches the ingress and then the egress program; if the second fails,
/// the first is detached again.
fn attach_both(
    ebpf: &mut Ebpf,
    device: Device,
    ifindex: u32,
    how: impl Fn(TcAttachType) -> TcAttach,
) -> Result<Vec<(Program, SchedClassifierLinkId)>, Error> {
    let mut links = Vec::new();
    for (direction, hook) in HOOKS {
        let program = Program::new(device, direction);
        match program_mut(ebpf, program)?.attach(ifindex, how(hook)) {
            Ok(link) => links.push((program, link)),
            Err(e) => {
                let _ = detach_links(ebpf, links);
                return Err(program_error(program.name(), e));
            }
        }
    }
    Ok(links)
}

fn detach_links(
    ebpf: &mut Ebpf,
    links: Vec<(Program, SchedClassifierLinkId)>,
) -> Result<(), Error> {
    let mut first_error = None;
    for (program, link) in links {
        let result = program_mut(ebpf, program).and_then(|p| {
            p.detach(link)
                .map_err(|e: ProgramError| program_error(program.name(), e))
        });
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Why the clsact qdisc could not be removed, as rtnetlink said it.
#[derive(Debug, thiserror::Error)]
enum QdiscError {
    #[error(transparent)]
    Socket(#[from] std::io::Error),
    #[error(transparent)]
    Netlink(#[from] rtnetlink::Error),
}

/// `tc qdisc del dev IFINDEX clsact`, over rtnetlink.
async fn delete_clsact(ifindex: u32) -> Result<(), QdiscError> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let connection = tokio::spawn(connection);
    let mut request = handle.qdisc().del(ifindex as i32);
    let header = &mut request.message_mut().header;
    header.parent = TcHandle::CLSACT;
    header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    let result = request.execute().await.map_err(QdiscError::from);
    connection.abort();
    result
}

fn ifindex(ifname: &str) -> Result<u32, Error> {
    nix::net::if_::if_nametoindex(ifname)
        .map_err(|e| device_error(ifname, format!("no such interface ({e})")))
}

fn device_error(ifname: &str, message: String) -> Error {
    Error::Device {
        device: ifname.to_string(),
        message,
    }
}
