//! Every map of the datapath, in one place. Sizes marked "set at load" are overridden by
//! userspace (`EbpfLoader::set_max_entries`); the values here are the defaults.

use agent_common::{
    Contract, EventBudget, Fingerprint, FlowId, FlowState, GlobalConfig, ListenerConfig,
    ListenerKey, Scope, TokenInfo, TokenState, TokenStats, DEFAULT_MAX_FLOWS, DEFAULT_MAX_PARTIAL,
    DEFAULT_MAX_TOKENS, GENERATION_SWITCHING, MAX_CONTRACTS, MAX_LISTENERS, MAX_SCOPES, SCAN_BYTES,
    TOKEN_ABSENT, VERDICT_COUNT,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, ProgramArray, RingBuf},
};

use crate::scratch::Scratch;

/// Global settings (fingerprint key, event cap, clock). Written by userspace.
#[map]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// TCP port → how it is judged (`agent_common::ports`): 0 sends the segment on its way
/// before any hash lookup; a lone listener is read whole from here. Written by userspace
/// with atomic stores into its mmap, derived from LISTENERS.
#[map]
pub static PORTS: Array<u64> = Array::with_max_entries(1 << 16, BPF_F_MMAPABLE);
/// linux/bpf.h: the array can be mmapped.
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// (ifindex, TCP port) → how that listener judges, for ports whose `PORTS` word does not
/// settle it. Written by userspace.
#[map]
pub static LISTENERS: HashMap<ListenerKey, ListenerConfig> = HashMap::with_max_entries(256, 0);

/// Fingerprint → what the token may do. Written by userspace (policy, issue, rotate). Set at load.
#[map]
pub static TOKENS: HashMap<Fingerprint, TokenInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_TOKENS, 0);

/// The token generation the programs judge by, and whether a switch to it is under way
/// (`agent_common::GENERATION_SWITCHING`). Written by userspace with one atomic store
/// through its mmap.
#[map]
pub static GENERATION: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The entries the generation being switched to changes or removes (`TOKEN_ABSENT`), read
/// before TOKENS while the switch is under way: userspace fills it, flips `GENERATION`,
/// brings TOKENS up to it and empties it again. Not preallocated: it holds entries only
/// during a switch, and its capacity costs only its buckets. Written by userspace. Set at
/// load.
#[map]
pub static NEXT_TOKENS: HashMap<Fingerprint, TokenInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_TOKENS / 4, BPF_F_NO_PREALLOC);

/// A token's entry in the generation the programs judge by: its `NEXT_TOKENS` entry while a
/// switch is under way, else its `TOKENS` entry unless that belongs to a later generation.
/// Copied out at once: a program never reads an element after userspace may replace it.
#[inline(always)]
pub fn token(fp: &Fingerprint) -> Option<TokenInfo> {
    let word = match GENERATION.get_ptr(0) {
        // SAFETY: an aligned u64 in the map value, written by userspace with atomic stores.
        Some(w) => unsafe { core::ptr::read_volatile(w) },
        None => 0,
    };
    if word & GENERATION_SWITCHING != 0 {
        if let Some(next) = NEXT_TOKENS.get_ptr(fp) {
            // SAFETY: map value pointer valid for this run.
            let info = unsafe { *next };
            return if info.flags & TOKEN_ABSENT != 0 {
                None
            } else {
                Some(info)
            };
        }
    }
    // SAFETY: map value pointer valid for this run.
    let info = unsafe { *TOKENS.get_ptr(fp)? };
    if info.generation > word as u32 {
        return None;
    }
    Some(info)
}

/// Revoked fingerprints → revocation time. Written by userspace; never cleared by a reload.
/// The programs read a known token's revocation from its `TOKEN_REVOKED` flag, which
/// userspace derives from this map. Not preallocated: no program reads it, and the kernel
/// holds memory for the revocations there are, not for the capacity (92 MB at 1 M).
#[map]
pub static REVOKED: HashMap<Fingerprint, u64> =
    HashMap::with_max_entries(DEFAULT_MAX_TOKENS, BPF_F_NO_PREALLOC);
/// linux/bpf.h: hash map elements are allocated on update, not when the map is created.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Ramp contracts by index. Written by userspace.
#[map]
pub static CONTRACTS: Array<Contract> = Array::with_max_entries(MAX_CONTRACTS, 0);

/// Scopes by index; a token's scope set is a bitmask over these. Written by userspace.
#[map]
pub static SCOPES: Array<Scope> = Array::with_max_entries(MAX_SCOPES as u32, 0);

/// Ramp position and GCRA state by `TokenInfo::state_slot`: an array, so the admission
/// reaches it with an inlined load instead of a second hash lookup. Written by the
/// datapath (CAS); userspace assigns and zeroes slots, through its mmap. Set at load.
#[map]
pub static TOKEN_STATE: Array<TokenState> =
    Array::with_max_entries(DEFAULT_MAX_TOKENS, BPF_F_MMAPABLE);

/// Per-CPU requests by verdict, row per listener (row MAX_LISTENERS: unattributed). Datapath.
#[map]
pub static VERDICT_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries((MAX_LISTENERS + 1) * VERDICT_COUNT as u32, 0);

/// Per-CPU requests by verdict for known tokens (LRU: the busiest stay), but for allow,
/// which `TokenState::allowed` counts. Datapath. Set at load.
#[map]
pub static TOKEN_STATS: LruPerCpuHashMap<Fingerprint, TokenStats> =
    LruPerCpuHashMap::with_max_entries(65536, 0);

/// Decision events for userspace (every verdict but allow and pass).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU event budget window (the flood cap) and the count of events it dropped. Datapath.
#[map]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

/// Denied segments whose flow's server side was reset (a retransmission of one is answered
/// with an RST). Datapath.
#[map]
pub static RESET_FLOWS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// When the programs last reset a server side (CLOCK_MONOTONIC_COARSE ns; set to the load
/// time by userspace). While that is longer ago than RESET_FLOWS remembers a flow, no
/// segment can be a reset flow's retransmission, and a `reset` listener's requests skip
/// the RESET_FLOWS lookup. Datapath. Not pinned: each loaded program set has its own.
#[map]
pub static LAST_RESET: Array<u64> = Array::with_max_entries(1, 0);

/// Where each connection to an inspected port stands in its byte stream (see `stream`).
/// LRU: a flood of connections evicts the idlest, whose next data is then `untracked`
/// (denied), never picked up mid-stream. Datapath (created by the client's SYN); userspace
/// only pins it, so a restarted daemon's programs carry on every connection. Set at load.
#[map]
pub static FLOWS: LruHashMap<FlowId, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// The bytes of each request line and header block that spans segments, held until the
/// block ends (see `stream`). A connection whose entry was evicted is `untracked`.
/// Datapath. Set at load.
#[map]
pub static PARTIAL: LruHashMap<FlowId, Partial> =
    LruHashMap::with_max_entries(DEFAULT_MAX_PARTIAL, 0);

/// The XDP programs a segment goes through (`stream::ENTRY`, `stream::REQUEST`): the
/// entry walks the stream to each request, the request program judges it. Two programs,
/// each within the verifier's budget on Linux 6.1. Written by userspace at load.
#[map]
pub static JUMP_XDP: ProgramArray = ProgramArray::with_max_entries(2, 0);
/// The same for the TC programs.
#[map]
pub static JUMP_TC: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Per-CPU copy of the request bytes the parser works on. Datapath.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// A `PARTIAL` value: the first bytes of a request, as the client sent them.
#[repr(C)]
pub struct Partial {
    pub bytes: [u8; SCAN_BYTES],
}

/// A segment of a TCP connection as the client sent it (addresses IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    pub id: FlowId,
    /// The segment's sequence number (network order). A retransmission of the denied
    /// request repeats it; a new connection that reuses the 4-tuple (a reset connection
    /// leaves no TIME_WAIT, so the client may pick the same port at once) starts from a
    /// fresh ISN, and a later request of the same connection from a later sequence
    /// number: neither is taken for the retransmission.
    pub seq: u32,
}
