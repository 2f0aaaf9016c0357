use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading or writing eBPF map {name} in batches: {source}")]
    Batch {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping eBPF map {name} into memory: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("interface {0} does not exist")]
    NoInterface(String),
    #[error("index {index} is beyond the {what} table ({max} entries)")]
    Capacity {
        what: &'static str,
        index: u32,
        max: u32,
    },
    #[error("the {what} table is full ({max} entries)")]
    Full { what: &'static str, max: u32 },
    #[error("no installed token has this fingerprint")]
    NotInstalled,
    #[cfg(feature = "test-support")]
    #[error("resetting eBPF map {name}: {source}")]
    Reset {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[cfg(feature = "test-support")]
    #[error("eBPF map {0} has no reset rule (say in datapath/reuse.rs how it is emptied)")]
    NoResetRule(String),
    #[cfg(feature = "test-support")]
    #[error("the event ring was taken: its records cannot be drained by a reset")]
    EventsTaken,
    #[cfg(feature = "test-support")]
    #[error("a datapath with pinned maps is not reset: its pins are shared state")]
    ResetPinned,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

pub(crate) fn prog_err(
    name: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}
