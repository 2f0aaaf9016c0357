//! Attaching the enforcing program through pinned links, so enforcement outlives the daemon.
//!
//! Each interface's link is pinned under the bpffs dir (`link_<listener id>_if<ifindex>_<hook>`).
//! A restarted daemon finds the pin and swaps its freshly loaded program into the existing
//! link with `bpf_link_update`: the interface is never without a program, not even for one
//! packet. `detach_pinned` is the only way enforcement stops.
//!
//! TC on kernels without TCX (< 6.6), or when a listener asks for it (`tc_attach =
//! "netlink"`), goes through netlink instead: a `cls_bpf` filter on the interface's `clsact`
//! ingress at a fixed priority and handle (`TC_NL_PRIORITY`, `TC_NL_HANDLE`). A filter is
//! no bpf link and has no pin, and it holds its program itself, so it outlives the daemon
//! as it is. What is pinned, under the same link-shaped name (hook tag `tcnl`), is the
//! program judging in it: the record that the interface is ours. A restarted daemon
//! replaces the filter's program in place (RTM_NEWTFILTER without NLM_F_CREATE: cls_bpf
//! swaps it atomically, no gap) and creates the filter only when it is missing, so a crash
//! between steps or a filter deleted by hand heals itself. Removing a `tcnl` pin deletes
//! the filter first. Netlink speaks to the caller's network namespace: `rampart detach`
//! must run in the daemon's.
//!
//! When the configuration changed between runs:
//! - same interface and hook under another listener id (listeners reordered): the old link
//!   is taken over and re-pinned under the new name — no gap;
//! - xdp ↔ tc: the new hook attaches next to the old one, and the old link is pruned once
//!   every listener is attached — no gap (for that instant a request may be judged by both);
//! - XDP native ↔ generic on one interface: the kernel refuses a second XDP mode while one
//!   is attached and a link cannot change mode, so the old link is detached just before the
//!   new one attaches. Requests arriving in between (microseconds) are not judged: the one
//!   gap the kernel leaves no way around. `Attached::displaced` reports it.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{
            qdisc_add_clsact, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle,
        },
        xdp::XdpLink,
        Link as _, LinkOrder, ProgramError, TcAttachType, XdpMode,
    },
    sys::SyscallError,
    util::KernelVersion,
};

use super::{error::prog_err, sys, Datapath, DatapathError, TC_PROGRAM, XDP_PROGRAM};

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
    #[error(
        "tc_attach = \"tcx\" needs Linux 6.6 or later (this kernel is {kernel}); use \
         tc_attach = \"auto\" or \"netlink\""
    )]
    NoTcx { kernel: KernelVersion },
    #[error("adding the clsact qdisc to {interface}: {source}")]
    Clsact {
        interface: String,
        #[source]
        source: TcError,
    },
    #[error("deleting rampart's tc filter on interface {interface} (pin {pin}): {source}")]
    Filter {
        interface: String,
        pin: PathBuf,
        #[source]
        source: Box<ProgramError>,
    },
}

/// Our `cls_bpf` filter's place on an interface's clsact ingress: one per interface. tc
/// picks priorities from 49152 down and handle 1 when not told, so these are found again
/// without a record and never meet a filter someone else added by default. A priority
/// below 49152 also runs ours before such filters. 0x7261 6d70 is "ramp" in ASCII.
pub const TC_NL_PRIORITY: u16 = 0x7261;
pub const TC_NL_HANDLE: TcHandle = TcHandle::new(0x7261, 0x6d70);
// Ahead of (and apart from) tc's own picks, 49152 down.
const _: () = assert!(TC_NL_PRIORITY < 0xC000 - 0x1000);

/// The hook tag of netlink-attached TC filters in pin names.
const TCNL_TAG: &str = "tcnl";

/// Whether this kernel has TCX links (when it cannot be told, assume a current kernel).
pub fn tcx_available() -> bool {
    KernelVersion::current().map_or(true, |k| k >= TCX_SINCE)
}

/// The first kernel with TCX (`BPF_TCX_INGRESS` links).
const TCX_SINCE: KernelVersion = KernelVersion::new(6, 6, 0);

/// Where a listener's program hooks in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachHook {
    Xdp(XdpMode),
    /// TC ingress, through a TCX link (kernel >= 6.6: no qdisc or filter to manage).
    TcIngress,
    /// TC ingress, through a netlink `cls_bpf` filter on a `clsact` qdisc (any kernel).
    TcNetlink,
}

/// What `attach_pinned` did.
#[derive(Debug)]
pub struct Attached {
    /// The pinned link, held so the daemon can report on it; dropping it keeps the pin.
    /// `None` for a netlink filter, which is no link (its program is pinned instead).
    pub link: Option<FdLink>,
    pub pin: PathBuf,
    /// True when an existing pinned link was taken over (program swapped in place).
    pub adopted: bool,
    /// Kernel id of the program now running in the link.
    pub program_id: u32,
    /// Pins of links in the other XDP mode on this interface, detached just before this one
    /// attached: the interface was unguarded for that instant.
    pub displaced: Vec<PathBuf>,
    /// The pin of another listener id's link that was taken over and re-pinned here.
    pub moved_from: Option<PathBuf>,
}

impl AttachHook {
    /// Short tag for pin names; a link can only be taken over by the same kind of hook.
    fn tag(self) -> &'static str {
        match self {
            AttachHook::Xdp(XdpMode::Skb) => "xdpskb",
            AttachHook::Xdp(XdpMode::Hardware) => "xdphw",
            AttachHook::Xdp(_) => "xdpdrv",
            AttachHook::TcIngress => "tc",
            AttachHook::TcNetlink => TCNL_TAG,
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

/// The interface index and hook tag a link pin's name records (see `link_pin_path`).
fn pin_target(p: &Path) -> Option<(u32, &str)> {
    let name = p.file_name()?.to_str()?.strip_prefix("link_")?;
    let (_id, rest) = name.split_once("_if")?;
    let (ifindex, tag) = rest.split_once('_')?;
    Some((ifindex.parse().ok()?, tag))
}

/// Link pins under `dir` other than `except` on interface `ifindex`, with their hook tags.
fn pins_on(dir: &Path, ifindex: u32, except: &Path) -> Result<Vec<(PathBuf, String)>, AttachError> {
    let io_err = |source| AttachError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err)? {
        let p = e.map_err(io_err)?.path();
        if p == except {
            continue;
        }
        if let Some((idx, tag)) = pin_target(&p) {
            if idx == ifindex {
                let tag = tag.to_owned();
                out.push((p, tag));
            }
        }
    }
    out.sort();
    Ok(out)
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

/// Detaches a pinned link from its hook (even if another process still holds it open) and
/// removes the pin.
fn detach_and_unpin(pin: &Path) -> Result<(), AttachError> {
    let io_err = |source| AttachError::Io {
        path: pin.to_path_buf(),
        source,
    };
    match sys::obj_get(pin) {
        Ok(fd) => sys::link_detach(std::os::fd::AsFd::as_fd(&fd)).map_err(io_err)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(e)),
    }
    std::fs::remove_file(pin).map_err(io_err)
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
        if hook == AttachHook::TcNetlink {
            return self.attach_tc_netlink(&dir, pin, iface, ifindex);
        }
        let open = |pin: &Path| match PinnedLink::from_pin(pin) {
            Ok(p) => Ok(Some(FdLink::from(p))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(link_err(pin)(e)),
        };
        let mut existing = open(&pin)?;
        let mut moved_from = None;
        let mut displaced = Vec::new();
        if existing.is_none() {
            for (other, tag) in pins_on(&dir, ifindex, &pin)? {
                if tag == hook.tag() && existing.is_none() {
                    // The same hook under another listener id: take it over, gap-free.
                    existing = open(&other)?;
                    moved_from = existing.is_some().then_some(other);
                } else if matches!(hook, AttachHook::Xdp(_)) && tag.starts_with("xdp") {
                    // One XDP mode per interface, and a link cannot change mode: the old
                    // one must go first. Everything the new program needs is in the maps
                    // already, so the gap is this syscall and the attach below.
                    detach_and_unpin(&other)?;
                    displaced.push(other);
                }
            }
        }
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
                // Say why up front: without TCX the attach fails with a bare EINVAL.
                if let Ok(kernel) = KernelVersion::current() {
                    if kernel < TCX_SINCE {
                        return Err(AttachError::NoTcx { kernel });
                    }
                }
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
            AttachHook::TcNetlink => unreachable!("handled by attach_tc_netlink above"),
        };
        let link = if adopted && moved_from.is_none() {
            link
        } else {
            // Pinning consumes the handle; re-open it so the daemon still holds one. A link
            // taken over from another name is pinned here before that name goes, so it has
            // a pin at every moment.
            link.pin(&pin).map_err(pin_err(&pin))?;
            if let Some(old) = &moved_from {
                std::fs::remove_file(old).map_err(|source| AttachError::Io {
                    path: old.clone(),
                    source,
                })?;
            }
            FdLink::from(PinnedLink::from_pin(&pin).map_err(link_err(&pin))?)
        };
        let program_id = link.info().map_err(link_err(&pin))?.program_id();
        self.pin_jumps(&dir)?;
        Ok(Attached {
            link: Some(link),
            pin,
            adopted,
            program_id,
            displaced,
            moved_from,
        })
    }

    /// `attach_pinned` for `AttachHook::TcNetlink`: replace the program of our filter in
    /// place, create the filter if it is missing, then (re)pin the program now judging.
    fn attach_tc_netlink(
        &mut self,
        dir: &Path,
        pin: PathBuf,
        iface: &str,
        ifindex: u32,
    ) -> Result<Attached, AttachError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AttachError::Io { path, source }
        };
        // The filter is per interface: a pin of another listener id on it is this one's,
        // renamed (listeners reordered).
        let mut moved_from = None;
        if !pin.exists() {
            moved_from = pins_on(dir, ifindex, &pin)?
                .into_iter()
                .find(|(_, tag)| tag == TCNL_TAG)
                .map(|(p, _)| p);
        }
        match qdisc_add_clsact(iface) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(AttachError::Clsact {
                    interface: iface.to_owned(),
                    source,
                })
            }
        }
        let prog = self.tc_program()?;
        let ours = SchedClassifierLink::attached(
            iface,
            TcAttachType::Ingress,
            TC_NL_PRIORITY,
            TC_NL_HANDLE,
            None,
        )
        .map_err(|_| DatapathError::NoInterface(iface.to_owned()))?;
        let (link_id, adopted) = match prog.attach_to_link(ours) {
            Ok(id) => (id, true),
            Err(e) if netlink_errno(&e) == Some(libc::ENOENT) => {
                let id = prog
                    .attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: TC_NL_PRIORITY,
                            handle: TC_NL_HANDLE,
                            classid: None,
                        }),
                    )
                    .map_err(prog_err(TC_PROGRAM))?;
                (id, false)
            }
            Err(e) => return Err(prog_err(TC_PROGRAM)(e).into()),
        };
        let link = prog.take_link(link_id).map_err(prog_err(TC_PROGRAM))?;
        // Dropping a netlink link deletes the filter, and the filter must outlive this
        // daemon. The link holds no fd or memory worth freeing.
        std::mem::forget(link);
        let program_id = prog.info().map_err(prog_err(TC_PROGRAM))?.id();
        // Pinned under a temporary name and renamed over the old pin, so the pin always
        // names a program (bpffs refuses dots; the name is no link pin for `prune_links`).
        let name = pin.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let tmp = dir.join(format!("new_{name}"));
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
            _ => {}
        }
        prog.pin(&tmp).map_err(pin_err(&tmp))?;
        std::fs::rename(&tmp, &pin).map_err(io_err(&pin))?;
        if let Some(old) = &moved_from {
            std::fs::remove_file(old).map_err(io_err(old))?;
        }
        self.pin_jumps(dir)?;
        Ok(Attached {
            link: None,
            pin,
            adopted,
            program_id,
            displaced: Vec::new(),
            moved_from,
        })
    }
}

/// The errno of a failed netlink request, if that is what `e` is.
fn netlink_errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::TcError(TcError::NetlinkError(e)) | ProgramError::NetlinkError(e) => {
            e.raw_os_error()
        }
        _ => None,
    }
}

/// The name of interface `ifindex` in this network namespace; `None` if there is none.
fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Deletes our netlink filter on interface `ifindex` (the one `pin` records). A filter, a
/// clsact qdisc or an interface that is gone is already detached.
fn delete_tc_filter(pin: &Path, ifindex: u32) -> Result<(), AttachError> {
    let Some(iface) = interface_name(ifindex) else {
        return Ok(());
    };
    let Ok(ours) = SchedClassifierLink::attached(
        &iface,
        TcAttachType::Ingress,
        TC_NL_PRIORITY,
        TC_NL_HANDLE,
        None,
    ) else {
        // The interface went in between.
        return Ok(());
    };
    match ours.detach() {
        Ok(()) => Ok(()),
        // ENOENT: no filter there; EINVAL: no clsact qdisc (so no filter either).
        Err(e) if matches!(netlink_errno(&e), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        Err(source) => Err(AttachError::Filter {
            interface: iface,
            pin: pin.to_path_buf(),
            source: Box::new(source),
        }),
    }
}

/// Removes the pinned links under `dir` that are not in `keep`: listeners an earlier
/// configuration had. Call after the current ones are attached. Returns the pins removed.
pub fn prune_links(dir: &Path, keep: &[PathBuf]) -> Result<Vec<PathBuf>, AttachError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AttachError::Io { path, source }
    };
    // A netlink filter belongs to the interface, not the pin: one still kept keeps it.
    let kept_filters: Vec<u32> = keep
        .iter()
        .filter_map(|p| pin_target(p))
        .filter(|(_, tag)| *tag == TCNL_TAG)
        .map(|(ifindex, _)| ifindex)
        .collect();
    let mut removed = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let p = e.map_err(io_err(dir))?.path();
        if is_link_pin(&p) && !keep.contains(&p) {
            if let Some((ifindex, TCNL_TAG)) = pin_target(&p) {
                if !kept_filters.contains(&ifindex) {
                    delete_tc_filter(&p, ifindex)?;
                }
            }
            std::fs::remove_file(&p).map_err(io_err(&p))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

/// Removes every pinned link (which detaches its program: the pin was its last reference
/// once the daemon is gone; a netlink filter is deleted first) and every pinned map under
/// `dir`, then `dir` itself.
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
        if let Some((ifindex, TCNL_TAG)) = pin_target(p) {
            delete_tc_filter(p, ifindex)?;
        }
        std::fs::remove_file(p).map_err(io_err(p))?;
    }
    std::fs::remove_dir(dir).map_err(io_err(dir))?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_say_interface_and_hook() {
        let dir = Path::new("/sys/fs/bpf/rampart");
        for (hook, tag) in [
            (AttachHook::Xdp(XdpMode::Skb), "xdpskb"),
            (AttachHook::Xdp(XdpMode::Driver), "xdpdrv"),
            (AttachHook::TcIngress, "tc"),
            (AttachHook::TcNetlink, "tcnl"),
        ] {
            let p = link_pin_path(dir, 12, 345, hook);
            assert_eq!(pin_target(&p), Some((345, tag)), "{}", p.display());
        }
        assert_eq!(pin_target(Path::new("/x/TOKENS")), None);
        assert_eq!(pin_target(Path::new("/x/link_0_ifzz_tc")), None);
        // The temporary name a program is pinned under before the rename is no link pin.
        assert!(!is_link_pin(Path::new("/x/new_link_0_if1_tcnl")));
        assert_eq!(pin_target(Path::new("/x/new_link_0_if1_tcnl")), None);
    }

    #[test]
    fn a_missing_interface_has_no_name() {
        assert_eq!(interface_name(1).as_deref(), Some("lo"));
        assert_eq!(interface_name(u32::MAX), None);
    }
}
