//! Attaching the enforcing program through pinned links, so enforcement outlives the daemon.
//!
//! Each listener's link is pinned under the bpffs dir (`link_<listener id>`). A restarted
//! daemon finds the pin and swaps its freshly loaded program into the existing link with
//! `bpf_link_update`: the interface is never without a program, not even for one packet.
//! `detach_pinned` is the only way enforcement stops.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        LinkOrder, TcAttachType, XdpMode,
    },
    sys::SyscallError,
};

use super::{error::prog_err, Datapath, DatapathError, TC_PROGRAM, XDP_PROGRAM};

/// Why attaching through, or removing, pinned links failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("the datapath was loaded without a pin directory; links could not outlive the daemon")]
    NoPinDir,
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pinning link {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where a listener's program hooks in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachHook {
    Xdp(XdpMode),
    /// TC ingress, through a TCX link (kernel >= 6.6: no qdisc or filter to manage).
    TcIngress,
}

/// What `attach_pinned` did.
#[derive(Debug)]
pub struct Attached {
    /// The pinned link, held so the daemon can report on it; dropping it keeps the pin.
    pub link: FdLink,
    pub pin: PathBuf,
    /// True when an existing pinned link was taken over (program swapped in place).
    pub adopted: bool,
    /// Kernel id of the program now running in the link.
    pub program_id: u32,
}

impl AttachHook {
    /// Short tag for pin names; a link can only be taken over by the same kind of hook.
    fn tag(self) -> &'static str {
        match self {
            AttachHook::Xdp(XdpMode::Skb) => "xdpskb",
            AttachHook::Xdp(XdpMode::Hardware) => "xdphw",
            AttachHook::Xdp(_) => "xdpdrv",
            AttachHook::TcIngress => "tc",
        }
    }
}

/// The pin file of listener `id`'s link. The interface index and hook are part of the
/// name so a restart adopts a link only where the configuration still wants it (bpffs
/// refuses dots in names, so no interface names here).
pub fn link_pin_path(dir: &Path, id: u32, ifindex: u32, hook: AttachHook) -> PathBuf {
    dir.join(format!("link_{id}_if{ifindex}_{}", hook.tag()))
}

fn is_link_pin(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("link_"))
}

fn not_found(e: &LinkError) -> bool {
    matches!(e, LinkError::SyscallError(SyscallError { io_error, .. })
        if io_error.kind() == io::ErrorKind::NotFound)
}

fn link_err(path: &Path) -> impl FnOnce(LinkError) -> AttachError + '_ {
    move |source| AttachError::Link {
        path: path.to_path_buf(),
        source,
    }
}

fn pin_err(path: &Path) -> impl FnOnce(aya::pin::PinError) -> AttachError + '_ {
    move |source| AttachError::Pin {
        path: path.to_path_buf(),
        source,
    }
}

impl Datapath {
    /// Attaches the enforcing program for listener `id` on `iface`, replacing the program of
    /// an already pinned link atomically, or creating and pinning a new link.
    pub fn attach_pinned(
        &mut self,
        id: u32,
        iface: &str,
        ifindex: u32,
        hook: AttachHook,
    ) -> Result<Attached, AttachError> {
        let dir = self.pin_dir().ok_or(AttachError::NoPinDir)?.to_path_buf();
        let pin = link_pin_path(&dir, id, ifindex, hook);
        let existing = match PinnedLink::from_pin(&pin) {
            Ok(p) => Some(FdLink::from(p)),
            Err(e) if not_found(&e) => None,
            Err(e) => return Err(link_err(&pin)(e)),
        };
        let adopted = existing.is_some();
        let link: FdLink = match hook {
            AttachHook::Xdp(mode) => {
                let prog = self.xdp_program()?;
                let id = match existing {
                    Some(fd) => {
                        let link = XdpLink::try_from(fd).map_err(link_err(&pin))?;
                        prog.attach_to_link(link)
                    }
                    None => prog.attach(iface, mode),
                }
                .map_err(prog_err(XDP_PROGRAM))
                .map_err(AttachError::from)?;
                let link = prog
                    .take_link(id)
                    .map_err(prog_err(XDP_PROGRAM))
                    .map_err(AttachError::from)?;
                FdLink::try_from(link).map_err(link_err(&pin))?
            }
            AttachHook::TcIngress => {
                let prog = self.tc_program()?;
                let id = match existing {
                    Some(fd) => {
                        let link = SchedClassifierLink::try_from(fd).map_err(link_err(&pin))?;
                        prog.attach_to_link(link)
                    }
                    None => prog.attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    ),
                }
                .map_err(prog_err(TC_PROGRAM))
                .map_err(AttachError::from)?;
                let link = prog
                    .take_link(id)
                    .map_err(prog_err(TC_PROGRAM))
                    .map_err(AttachError::from)?;
                FdLink::try_from(link).map_err(link_err(&pin))?
            }
        };
        let link = if adopted {
            link
        } else {
            // Pinning consumes the handle; re-open it so the daemon still holds one.
            link.pin(&pin).map_err(pin_err(&pin))?;
            FdLink::from(PinnedLink::from_pin(&pin).map_err(link_err(&pin))?)
        };
        let program_id = link.info().map_err(link_err(&pin))?.program_id();
        Ok(Attached {
            link,
            pin,
            adopted,
            program_id,
        })
    }

    /// Starts forwarding the object's `aya_log` records to `log` (and so to tracing), if
    /// the object has any. The logger must be flushed when its fd is readable.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }
}

/// Removes the pinned links under `dir` that are not in `keep`: listeners an earlier
/// configuration had. Call after the current ones are attached. Returns the pins removed.
pub fn prune_links(dir: &Path, keep: &[PathBuf]) -> Result<Vec<PathBuf>, AttachError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AttachError::Io { path, source }
    };
    let mut removed = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let p = e.map_err(io_err(dir))?.path();
        if is_link_pin(&p) && !keep.contains(&p) {
            std::fs::remove_file(&p).map_err(io_err(&p))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

/// Removes every pinned link (which detaches its program: the pin was its last reference
/// once the daemon is gone) and every pinned map under `dir`, then `dir` itself.
/// Returns the pins removed.
pub fn detach_pinned(dir: &Path) -> Result<Vec<PathBuf>, AttachError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AttachError::Io { path, source }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()).map_err(io_err(dir)))
        .collect::<Result<_, _>>()?;
    // Links first: the programs stop judging before their maps disappear.
    paths.sort_by_key(|p| !is_link_pin(p));
    for p in &paths {
        std::fs::remove_file(p).map_err(io_err(p))?;
    }
    std::fs::remove_dir(dir).map_err(io_err(dir))?;
    Ok(paths)
}
