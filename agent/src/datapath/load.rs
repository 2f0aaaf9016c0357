//! Loading the object (its programs on first use) and holding typed map handles; attaching
//! is attach.rs, and what only tests use is test_support.rs.

use std::path::{Path, PathBuf};

use agent_common::{
    Contract, EventBudget, Fingerprint, GlobalConfig, ListenerConfig, ListenerKey, Scope,
    TokenInfo, TokenState, TokenStats, DEFAULT_MAX_TOKENS,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
    programs::{SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};

use super::{
    error::{map_err, prog_err, DatapathError},
    migrate,
    slots::Slots,
    sys::{MappedArray, MappedWords},
};
use crate::EBPF_OBJECT;

/// The object's programs: an entry and a request judge per hook (the test and bench
/// programs are in a test object of their own, `TestPrograms`).
pub const XDP_PROGRAM: &str = "rampart_xdp";
pub const TC_PROGRAM: &str = "rampart_tc";
/// The request judges each hook's program tail-calls (never attached).
pub const XDP_REQUEST_PROGRAM: &str = "rampart_xdp_request";
pub const TC_REQUEST_PROGRAM: &str = "rampart_tc_request";

/// The maps pinned under the bpffs dir (as `migrate::pin_file` of these names):
/// everything a restarted daemon adopts (policy, runtime state, counters, the event ring).
pub const MAP_NAMES: [&str; 16] = [
    "CONFIG",
    "PORTS",
    "LISTENERS",
    "TOKENS",
    "GENERATION",
    "NEXT_TOKENS",
    "REVOKED",
    "CONTRACTS",
    "SCOPES",
    "TOKEN_STATE",
    "VERDICT_STATS",
    "TOKEN_STATS",
    "EVENTS",
    "EVENT_BUDGET",
    "RESET_FLOWS",
    "FLOWS",
];

/// Maps of earlier versions' pins that are no longer pinned: removed at load, so an
/// upgraded daemon does not adopt a map whose layout changed. SCRATCH is the parser's
/// per-run working memory; each loaded program set has its own. PORTS was a bitmap
/// before it held listener words (now pinned as PORTS_V2); it is derived from LISTENERS
/// at every load, so nothing in it needs moving.
const UNPINNED: [&str; 2] = ["SCRATCH", "PORTS"];

/// Default capacity of REVOKED: half of TOKENS. The map is not preallocated, so its
/// capacity costs only the hash buckets (16 bytes each: 8 MB here, 16 at a million),
/// which brings the kernel memory of the per-token maps to 200 bytes per token of
/// capacity. Revocations are kept for good: when it is full, `rampart token revoke`
/// fails with the kernel's error (the store keeps the revocation).
pub const DEFAULT_MAX_REVOKED: u32 = DEFAULT_MAX_TOKENS / 2;

/// Capacity of NEXT_TOKENS, the entries a generation switch changes or removes
/// (`switch.rs`): a quarter of TOKENS. The map is not preallocated, so its capacity costs
/// its hash buckets (16 bytes each: 4 bytes per token of capacity) and it holds entries
/// only during a switch; a generation that changes more tokens is switched to in steps.
pub fn next_tokens_capacity(max_tokens: u32) -> u32 {
    (max_tokens / 4).max(1)
}

/// Map sizes and pinning, from the daemon's configuration.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Capacity of TOKENS and TOKEN_STATE.
    pub max_tokens: u32,
    pub max_revoked: u32,
    /// LRU capacity of the per-token statistics.
    pub token_stats: u32,
    /// Ring buffer size (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Connections tracked at once (`FLOWS`).
    pub max_flows: u32,
    /// Pin (and on restart, adopt) maps under this bpffs directory.
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_tokens: DEFAULT_MAX_TOKENS,
            max_revoked: DEFAULT_MAX_REVOKED,
            token_stats: 65536,
            ring_bytes: 1 << 20,
            max_flows: agent_common::DEFAULT_MAX_FLOWS,
            pin_dir: None,
        }
    }
}

pub struct Datapath {
    pub(super) ebpf: Ebpf,
    pub(super) config: Array<MapData, GlobalConfig>,
    /// `PORTS`, mmapped (see `agent_common::ports`).
    pub(super) ports: MappedWords,
    pub(super) listeners: HashMap<MapData, ListenerKey, ListenerConfig>,
    pub(super) tokens: HashMap<MapData, Fingerprint, TokenInfo>,
    /// `GENERATION`, mmapped: the generation the programs judge by (`switch.rs`).
    pub(super) generation: MappedWords,
    pub(super) next_tokens: HashMap<MapData, Fingerprint, TokenInfo>,
    /// A write outside a switch freed a TOKENS element that a program may still read:
    /// the next write waits a grace period first (`Datapath::settle`).
    pub(super) unsettled: bool,
    pub(super) revoked: HashMap<MapData, Fingerprint, u64>,
    pub(super) contracts: Array<MapData, Contract>,
    pub(super) scopes: Array<MapData, Scope>,
    /// `TOKEN_STATE`, mmapped, and who owns which of its slots.
    pub(super) token_state: MappedArray<TokenState>,
    pub(super) slots: Slots,
    /// TOKENS as read at load (adopted pins), while nothing has written it since: the
    /// first batched install compares with it instead of reading a million entries again.
    pub(super) tokens_at_load: Option<std::collections::HashMap<Fingerprint, TokenInfo>>,
    pub(super) verdict_stats: PerCpuArray<MapData, u64>,
    pub(super) token_stats: PerCpuHashMap<MapData, Fingerprint, TokenStats>,
    pub(super) event_budget: PerCpuArray<MapData, EventBudget>,
    pub(super) events: Option<RingBuf<MapData>>,
    pub(super) options: LoadOptions,
}

pub(super) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// Starts the programs' `LAST_RESET` at now: flows reset by an earlier program set (whose
/// RESET_FLOWS entries are adopted) stay recognised for as long as they are remembered.
fn set_last_reset(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    write_last_reset(ebpf, coarse_now()?)
}

pub(super) fn write_last_reset(ebpf: &mut Ebpf, ns: u64) -> Result<(), DatapathError> {
    let map = ebpf
        .map_mut("LAST_RESET")
        .ok_or(DatapathError::MissingMap("LAST_RESET"))?;
    let mut last: Array<&mut MapData, u64> = Array::try_from(map).map_err(map_err("LAST_RESET"))?;
    last.set(0, ns, 0).map_err(map_err("LAST_RESET"))
}

/// CLOCK_MONOTONIC_COARSE, the clock of the programs' `bpf_ktime_get_coarse_ns`.
pub(super) fn coarse_now() -> Result<u64, DatapathError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
        return Err(DatapathError::Io {
            path: "CLOCK_MONOTONIC_COARSE".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

impl Datapath {
    /// Loads the object, creating its maps (or adopting pinned ones). Programs are
    /// loaded into the kernel when first used; nothing is attached yet.
    pub fn load(options: LoadOptions) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries("TOKENS", options.max_tokens)
            .map_max_entries("TOKEN_STATE", options.max_tokens)
            .map_max_entries("NEXT_TOKENS", next_tokens_capacity(options.max_tokens))
            .map_max_entries("REVOKED", options.max_revoked)
            .map_max_entries("TOKEN_STATS", options.token_stats)
            .map_max_entries("EVENTS", options.ring_bytes)
            .map_max_entries("FLOWS", options.max_flows);
        let pins: Vec<(&'static str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| DatapathError::Io {
                    path: dir.clone(),
                    source,
                })?;
                for name in UNPINNED {
                    let path = dir.join(name);
                    match std::fs::remove_file(&path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(DatapathError::Io { path, source: e });
                        }
                        _ => {}
                    }
                }
                MAP_NAMES
                    .iter()
                    .map(|n| (*n, dir.join(migrate::pin_file(n))))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        // Statements below the daemon's log level are skipped in the kernel, not filtered
        // after crossing the ring. Absent until the programs log anything: not an error.
        let log_level = ebpf_log_level();
        loader.override_global(aya_log::LEVEL, &log_level, false);
        // Programs are verified when first used (see `xdp_program`), not here.
        let began = std::time::Instant::now();
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let object_secs = began.elapsed().as_secs_f64();
        set_last_reset(&mut ebpf)?;
        let ports =
            MappedWords::new(take(&mut ebpf, "PORTS")?).map_err(|source| DatapathError::Mmap {
                name: "PORTS",
                source,
            })?;
        let token_state = MappedArray::new(take(&mut ebpf, "TOKEN_STATE")?).map_err(|source| {
            DatapathError::Mmap {
                name: "TOKEN_STATE",
                source,
            }
        })?;
        let generation = MappedWords::new(take(&mut ebpf, "GENERATION")?).map_err(|source| {
            DatapathError::Mmap {
                name: "GENERATION",
                source,
            }
        })?;
        let mut dp = Datapath {
            config: take(&mut ebpf, "CONFIG")?,
            generation,
            next_tokens: take(&mut ebpf, "NEXT_TOKENS")?,
            unsettled: false,
            ports,
            listeners: take(&mut ebpf, "LISTENERS")?,
            tokens: take(&mut ebpf, "TOKENS")?,
            revoked: take(&mut ebpf, "REVOKED")?,
            contracts: take(&mut ebpf, "CONTRACTS")?,
            scopes: take(&mut ebpf, "SCOPES")?,
            token_state,
            slots: Slots::default(),
            tokens_at_load: None,
            verdict_stats: take(&mut ebpf, "VERDICT_STATS")?,
            token_stats: take(&mut ebpf, "TOKEN_STATS")?,
            event_budget: take(&mut ebpf, "EVENT_BUDGET")?,
            events: Some(take(&mut ebpf, "EVENTS")?),
            ebpf,
            options,
        };
        // Adopted listeners (or a pin dir from before PORTS existed) must be judged by
        // the new programs from their first packet.
        dp.sync_ports();
        dp.adopt_generation()?;
        dp.adopt_token_slots()?;
        let tokens_secs = began.elapsed().as_secs_f64() - object_secs;
        if let Some(dir) = dp.options.pin_dir.clone() {
            dp.migrate_tokens(&dir)?;
            dp.migrate_verdict_stats(&dir)?;
        }
        let flagged = dp.flag_all_revoked()?;
        if flagged > 0 {
            tracing::info!(
                flagged,
                "marked revoked tokens in adopted maps for the revocation flag"
            );
        }
        tracing::info!(
            object_secs,
            tokens_secs,
            secs = began.elapsed().as_secs_f64(),
            "datapath loaded (object and maps; TOKENS read and slots rebuilt)"
        );
        Ok(dp)
    }

    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// The enforcing XDP program, loaded into the kernel on first use. Each program is
    /// verified only when something needs it: a daemon with XDP listeners only never
    /// pays for the TC program's verification (about 0.4 s on this class of machine,
    /// several seconds on a small or emulated one).
    pub fn xdp_program(&mut self) -> Result<&mut Xdp, DatapathError> {
        if loaded_xdp(&mut self.ebpf, XDP_PROGRAM)?.fd().is_ok()
            && loaded_xdp(&mut self.ebpf, XDP_REQUEST_PROGRAM)?
                .fd()
                .is_ok()
        {
            fill_jumps(
                &mut self.ebpf,
                "JUMP_XDP",
                [XDP_PROGRAM, XDP_REQUEST_PROGRAM],
            )?;
        }
        loaded_xdp(&mut self.ebpf, XDP_PROGRAM)
    }

    /// The enforcing TC program, loaded on first use (see `xdp_program`).
    pub fn tc_program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        for name in [TC_PROGRAM, TC_REQUEST_PROGRAM] {
            let p: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            if p.fd().is_err() {
                p.load().map_err(prog_err(name))?;
            }
        }
        fill_jumps(&mut self.ebpf, "JUMP_TC", [TC_PROGRAM, TC_REQUEST_PROGRAM])?;
        program(&mut self.ebpf, TC_PROGRAM)
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.options.pin_dir.as_deref()
    }

    /// Starts forwarding the programs' aya-log records into tracing (target
    /// `rampart::ebpf`). `None` when the object logs nothing (it has no log ring) or the
    /// ring cannot be opened (said at warn level: enforcement does not depend on it). The
    /// returned logger must be flushed when its fd is readable.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<EbpfLogForwarder>> {
        match aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, EbpfLogForwarder) {
            Ok(l) => Some(l),
            Err(aya_log::Error::MapNotFound) => {
                tracing::debug!("the eBPF programs have no log ring; nothing to forward");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the eBPF programs' log ring; their log records are lost");
                None
            }
        }
    }
}

/// Passes the eBPF programs' `log` records to tracing under one target, so
/// `RUST_LOG=rampart::ebpf=debug` selects them; the program module that logged is a field.
#[derive(Clone, Copy, Debug, Default)]
pub struct EbpfLogForwarder;

/// The target eBPF records appear under.
pub const EBPF_LOG_TARGET: &str = "rampart::ebpf";

impl log::Log for EbpfLogForwarder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let module = r.target();
        let msg = r.args();
        // tracing needs the level and target as constants.
        match r.level() {
            log::Level::Error => tracing::error!(target: "rampart::ebpf", module, "{msg}"),
            log::Level::Warn => tracing::warn!(target: "rampart::ebpf", module, "{msg}"),
            log::Level::Info => tracing::info!(target: "rampart::ebpf", module, "{msg}"),
            log::Level::Debug => tracing::debug!(target: "rampart::ebpf", module, "{msg}"),
            log::Level::Trace => tracing::trace!(target: "rampart::ebpf", module, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// aya-log's level number for the most verbose level tracing will show (0: none).
fn ebpf_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => aya_log::Level::Error as u8,
        LevelFilter::WARN => aya_log::Level::Warn as u8,
        LevelFilter::INFO => aya_log::Level::Info as u8,
        LevelFilter::DEBUG => aya_log::Level::Debug as u8,
        _ => aya_log::Level::Trace as u8,
    }
}

/// The jump maps, pinned under their own names by `Datapath::pin_jumps`.
pub const JUMP_MAPS: [&str; 2] = ["JUMP_XDP", "JUMP_TC"];

impl Datapath {
    /// Pins this program set's jump maps under `dir`, replacing an earlier set's pins
    /// (whose programs the caller has just replaced on their hooks). The kernel empties a
    /// program array once no file or descriptor refers to it, so without a pin the
    /// attached entry programs would lose their request judge when the daemon exits, and
    /// drop every request. Never adopted at load: each program set has its own.
    pub fn pin_jumps(&self, dir: &Path) -> Result<(), DatapathError> {
        for name in JUMP_MAPS {
            let Some(aya::maps::Map::ProgramArray(data)) = self.ebpf.map(name) else {
                return Err(DatapathError::MissingMap(name));
            };
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DatapathError::Io { path, source: e });
                }
                _ => {}
            }
            data.pin(&path)
                .map_err(|source| DatapathError::Pin { path, source })?;
        }
        Ok(())
    }
}

/// Puts the loaded programs `names` in the slots of jump map `map` (`stream::ENTRY`,
/// `stream::REQUEST` in the eBPF crate): the entry program tail-calls the request program
/// for each request of a segment, and it the entry program for the rest. Each loaded
/// program set has its own (unpinned) jump maps.
fn fill_jumps(
    ebpf: &mut Ebpf,
    map: &'static str,
    names: [&'static str; 2],
) -> Result<(), DatapathError> {
    let mut fds = Vec::new();
    for name in names {
        let fd = ebpf
            .program(name)
            .ok_or(DatapathError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?
            .fd()
            .map_err(prog_err(name))?
            .try_clone()
            .map_err(|source| DatapathError::Io {
                path: name.into(),
                source,
            })?;
        fds.push(fd);
    }
    let m = ebpf.map_mut(map).ok_or(DatapathError::MissingMap(map))?;
    let mut jumps: ProgramArray<&mut MapData> = ProgramArray::try_from(m).map_err(map_err(map))?;
    for (slot, fd) in fds.iter().enumerate() {
        jumps.set(slot as u32, fd, 0).map_err(map_err(map))?;
    }
    Ok(())
}

/// The XDP program `name`, loaded into the kernel on first use.
pub(super) fn loaded_xdp<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, DatapathError> {
    let p: &mut Xdp = program(ebpf, name)?;
    if p.fd().is_err() {
        p.load().map_err(prog_err(name))?;
    }
    Ok(p)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    p.try_into().map_err(prog_err(name))
}

/// The programs an embedded object holds, sorted.
#[cfg(test)]
pub(super) fn program_names(object: &[u8]) -> Vec<String> {
    let obj = aya_obj::Object::parse(object).expect("parse the eBPF object");
    let mut names: Vec<String> = obj.programs.into_keys().collect();
    names.sort_unstable();
    names
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use log::Log as _;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The product's object holds the enforcing programs and nothing else: test and bench
    /// programs are in the test object (`TestPrograms`). A new production program is
    /// named here on purpose.
    #[test]
    fn the_product_object_holds_only_the_enforcing_programs() {
        assert_eq!(
            program_names(EBPF_OBJECT),
            [
                TC_PROGRAM,
                TC_REQUEST_PROGRAM,
                XDP_PROGRAM,
                XDP_REQUEST_PROGRAM
            ]
        );
    }

    #[test]
    fn ebpf_records_become_tracing_events_under_one_target() {
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for (level, text) in [
                (log::Level::Warn, "event cap reached on cpu 1"),
                (log::Level::Error, "TOKEN_STATE full"),
                (log::Level::Debug, "below the level"),
            ] {
                EbpfLogForwarder.log(
                    &log::Record::builder()
                        .args(format_args!("{text}"))
                        .target("rampart::events")
                        .level(level)
                        .build(),
                );
            }
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[0].contains(" WARN rampart::ebpf: event cap reached on cpu 1")
                && lines[0].contains("module=\"rampart::events\""),
            "{out}"
        );
        assert!(
            lines[1].contains("ERROR rampart::ebpf: TOKEN_STATE full"),
            "{out}"
        );
    }
}
