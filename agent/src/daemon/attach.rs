//! Attaching the listeners: the step that makes this daemon's program judge traffic, so it
//! runs only after the policy and every revocation are in the maps (`daemon::start`).
//!
//! Order within it is the safety argument too: every listener's ports are configured
//! before any program is attached or swapped in, so a program finds all of its interface's
//! ports from its first packet on; what an earlier configuration attached and this one does
//! not is let go only after the current listeners are in place.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
};

use agent_common::ListenerKey;

use super::{DaemonError, DatapathEnforcer};
use crate::{
    config::{self, Config, Hook, TcAttach, XdpMode},
    datapath::{prune_links, tcx_available, AttachHook, Attached},
};

/// A listener as attached by this daemon.
pub struct AttachedListener {
    pub id: u32,
    pub config: config::Listener,
    /// Shared by the listeners of one interface.
    pub attached: Arc<Attached>,
}

/// Configures every listener's ports, attaches (or adopts) one program per interface, then
/// removes what the configuration no longer has.
pub(super) fn attach_listeners(
    enforcer: &DatapathEnforcer,
    config: &Config,
) -> Result<Vec<AttachedListener>, DaemonError> {
    let mut dp = enforcer.lock();
    let mut listeners = Vec::new();
    // Every listener's ports first: a program attached (or swapped in) below finds all
    // of its interface's ports configured from its first packet on.
    let mut keys = HashSet::new();
    let mut ifindexes = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let id = i as u32;
        let ifindex = interface_index(&l.interface).ok_or_else(|| DaemonError::NoInterface {
            listener: l.name.clone(),
            interface: l.interface.clone(),
        })?;
        for &port in &l.ports {
            let key = ListenerKey {
                ifindex,
                port,
                _pad: 0,
            };
            dp.set_listener(key, l.datapath_config(id))?;
            keys.insert(key);
        }
        dp.set_responses(id, &l.response)?;
        ifindexes.push(ifindex);
    }
    // One program per interface (the configuration gives all listeners on an interface
    // the same hook); the first listener on it owns the link.
    let mut by_interface: HashMap<u32, Arc<Attached>> = HashMap::new();
    for (i, (l, &ifindex)) in config.listeners.iter().zip(&ifindexes).enumerate() {
        let id = i as u32;
        if let Some(a) = by_interface.get(&ifindex) {
            listeners.push(AttachedListener {
                id,
                config: l.clone(),
                attached: a.clone(),
            });
            continue;
        }
        let hook = match l.hook {
            Hook::Xdp(XdpMode::Native) if answers_on_veth(config, &l.interface) => {
                tracing::info!(
                    interface = %l.interface,
                    "a veth delivers XDP_TX frames (resets, responses) only to a peer that \
                     runs XDP itself: this interface's listeners attach in generic mode, \
                     where they leave through the veth's own transmit"
                );
                AttachHook::Xdp(aya::programs::XdpMode::Skb)
            }
            Hook::Xdp(XdpMode::Native) => AttachHook::Xdp(aya::programs::XdpMode::Driver),
            Hook::Xdp(XdpMode::Generic) => AttachHook::Xdp(aya::programs::XdpMode::Skb),
            Hook::Tc => match l.tc_attach {
                TcAttach::Tcx => AttachHook::TcIngress,
                TcAttach::Netlink => AttachHook::TcNetlink,
                TcAttach::Auto if tcx_available() => AttachHook::TcIngress,
                TcAttach::Auto => AttachHook::TcNetlink,
            },
        };
        let attached = dp
            .attach_pinned(id, &l.interface, ifindex, hook)
            .map_err(|source| DaemonError::Attach {
                listener: l.name.clone(),
                interface: l.interface.clone(),
                source: Box::new(source),
            })?;
        for pin in &attached.displaced {
            tracing::warn!(
                listener = %l.name,
                interface = %l.interface,
                old = %pin.display(),
                "XDP mode changed: the old mode's link was detached just before the new one \
                 attached (the kernel allows one XDP mode per interface), so requests in \
                 that instant were not judged"
            );
        }
        if let Some(old) = &attached.moved_from {
            tracing::info!(old = %old.display(), "took over the link of a renumbered listener");
        }
        tracing::info!(
            listener = %l.name,
            interface = %l.interface,
            hook = %l.hook,
            attach = ?hook,
            program_id = attached.program_id,
            adopted = attached.adopted,
            pin = %attached.pin.display(),
            "listener attached"
        );
        let attached = Arc::new(attached);
        by_interface.insert(ifindex, attached.clone());
        listeners.push(AttachedListener {
            id,
            config: l.clone(),
            attached,
        });
    }
    // What an earlier configuration attached or judged and this one does not: only now,
    // with the current listeners in place, is it let go.
    for (key, _) in dp.listeners() {
        if !keys.contains(&key) {
            dp.remove_listener(&key)?;
        }
    }
    let keep: Vec<PathBuf> = listeners.iter().map(|l| l.attached.pin.clone()).collect();
    let pruned = prune_links(&config.bpffs_dir, &keep).map_err(|source| DaemonError::Attach {
        listener: "(removed listeners)".to_owned(),
        interface: String::new(),
        source: Box::new(source),
    })?;
    for p in pruned {
        tracing::info!(pin = %p.display(), "detached a listener the configuration no longer has");
    }
    Ok(listeners)
}

/// Whether a listener on `interface` sends packets back out of it (`reset`, `respond`) and
/// the interface is a veth.
fn answers_on_veth(config: &Config, interface: &str) -> bool {
    let answers = config.listeners.iter().any(|l| {
        l.interface == interface
            && matches!(
                l.action,
                config::DenyAction::Reset | config::DenyAction::Respond
            )
    });
    answers && driver(interface).as_deref() == Some("veth")
}

/// The interface's driver name (ETHTOOL_GDRVINFO), in the daemon's network namespace.
fn driver(interface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 140],
        counts: [u32; 5],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 140],
        counts: [0; 5],
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    let name = interface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    req.name[..name.len()].copy_from_slice(name);
    // SAFETY: a plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `req` names the interface and points at `info`, both live for the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

fn interface_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
