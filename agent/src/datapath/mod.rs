//! The one facade over the eBPF object: load, typed maps, attach, pins.
//!
//! Call sites speak in domain terms (`revoke`, `install_token`, `verdict_counts`); map
//! names appear only in this module.

mod attach;
pub mod clock;
mod error;
mod load;
mod migrate;
#[cfg(feature = "test-support")]
mod reuse;
mod slots;
mod switch;
mod sys;
mod tables;
#[cfg(feature = "test-support")]
mod test_support;

pub use attach::{
    detach_pinned, link_pin_path, prune_links, tcx_available, AttachError, AttachHook, Attached,
    TC_NL_HANDLE, TC_NL_PRIORITY,
};
pub use error::DatapathError;
pub use load::{
    next_tokens_capacity, Datapath, EbpfLogForwarder, LoadOptions, DEFAULT_MAX_REVOKED,
    EBPF_LOG_TARGET, MAP_NAMES, TC_PROGRAM, XDP_PROGRAM,
};
pub use tables::{parse_event, RuntimeTotals};
#[cfg(feature = "test-support")]
pub use test_support::{TestPrograms, TestRunner, FLOOR_PROGRAM, PASS_PROGRAM};
