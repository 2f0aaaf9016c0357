//! What only tests and the bench use (the `test-support` feature): attaching the
//! enforcing programs directly (the daemon attaches through pinned links,
//! `attach_pinned`), BPF_PROG_TEST_RUN, and the test object (`TestPrograms`: the
//! pass-through and floor programs, which the product's object does not carry).

use agent_common::{Fingerprint, GlobalConfig, TokenInfo};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{
        tc::{self, SchedClassifierLinkId, TcAttachType},
        xdp::XdpLinkId,
        TestRun, TestRunOptions, TestRunResult, XdpMode,
    },
    Ebpf, EbpfLoader,
};

use super::{
    error::{map_err, prog_err, DatapathError},
    load::{
        loaded_xdp, take, LoadOptions, TC_PROGRAM, TC_REQUEST_PROGRAM, XDP_PROGRAM,
        XDP_REQUEST_PROGRAM,
    },
    Datapath,
};
use crate::TEST_EBPF_OBJECT;

/// The test object's pass-through XDP program: the bench's baseline, and the peer of a
/// veth whose other end answers with XDP_TX (a veth delivers XDP_TX frames only to a peer
/// running XDP).
pub const PASS_PROGRAM: &str = "rampart_pass";
/// The test object's bench floor (agent-ebpf's `test/floor.rs`): never attached. Linux
/// 6.1's verifier rejects it; the bench runs on the host only.
pub const FLOOR_PROGRAM: &str = "rampart_floor";

impl Datapath {
    /// The kernel's view of each enforcing program (entry and request judge, both hooks),
    /// loading them first.
    pub fn enforcing_program_infos(
        &mut self,
    ) -> Result<Vec<(&'static str, aya::programs::ProgramInfo)>, DatapathError> {
        self.xdp_program()?;
        self.tc_program()?;
        let mut out = Vec::new();
        for name in [
            XDP_PROGRAM,
            XDP_REQUEST_PROGRAM,
            TC_PROGRAM,
            TC_REQUEST_PROGRAM,
        ] {
            let p = self.ebpf.program(name).ok_or(DatapathError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?;
            out.push((name, p.info().map_err(prog_err(name))?));
        }
        Ok(out)
    }

    /// Attaches the enforcing XDP program to `iface`.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<XdpLinkId, DatapathError> {
        self.xdp_program()?
            .attach(iface, mode)
            .map_err(prog_err(XDP_PROGRAM))
    }

    /// Attaches the enforcing TC program to `iface` ingress (adding the clsact qdisc).
    pub fn attach_tc(&mut self, iface: &str) -> Result<SchedClassifierLinkId, DatapathError> {
        // EEXIST: the qdisc is already there, which is what we want.
        let _ = tc::qdisc_add_clsact(iface);
        self.tc_program()?
            .attach(iface, TcAttachType::Ingress)
            .map_err(prog_err(TC_PROGRAM))
    }

    /// Runs the XDP program once over `frame` (BPF_PROG_TEST_RUN); `out` gets the frame
    /// as the program left it.
    pub fn test_run_xdp(
        &mut self,
        frame: &[u8],
        out: &mut [u8],
        repeat: u32,
    ) -> Result<TestRunResult, DatapathError> {
        test_run(self.xdp_program()?, XDP_PROGRAM, frame, out, repeat)
    }

    pub fn test_run_tc(
        &mut self,
        frame: &[u8],
        out: &mut [u8],
        repeat: u32,
    ) -> Result<TestRunResult, DatapathError> {
        test_run(self.tc_program()?, TC_PROGRAM, frame, out, repeat)
    }
}

impl Datapath {
    /// The enforcing XDP program's BPF_PROG_TEST_RUN for another thread than the one that
    /// holds this `Datapath` (which writes its maps meanwhile).
    pub fn xdp_test_runner(&mut self) -> Result<TestRunner, DatapathError> {
        let prog = self.xdp_program()?;
        let fd = prog
            .fd()
            .map_err(prog_err(XDP_PROGRAM))?
            .try_clone()
            .map_err(|source| DatapathError::Program {
                name: XDP_PROGRAM,
                source: aya::programs::ProgramError::IOError(source),
            })?;
        Ok(TestRunner { fd })
    }
}

/// A loaded program's BPF_PROG_TEST_RUN through its own fd: usable from any thread.
pub struct TestRunner {
    fd: aya::programs::ProgramFd,
}

impl TestRunner {
    /// Runs the program once over `frame`; its return code.
    pub fn run(&self, frame: &[u8]) -> std::io::Result<u32> {
        use std::os::fd::AsFd as _;
        super::sys::test_run(self.fd.as_fd(), frame)
    }
}

/// The test object (agent-ebpf's `rampart-test` bin), loaded apart from any `Datapath`:
/// its programs are loaded into the kernel on first use, and detached when this is
/// dropped. The floor reads maps of its own (`CONFIG`'s key, `TOKENS`) shaped like the
/// product's, which the bench fills as it fills the `Datapath` it compares with.
pub struct TestPrograms {
    ebpf: Ebpf,
    config: Array<MapData, GlobalConfig>,
    tokens: HashMap<MapData, Fingerprint, TokenInfo>,
}

impl TestPrograms {
    /// Loads the test object. Of `options` only `max_tokens` applies: the floor's TOKENS
    /// is as large as a `Datapath`'s loaded with the same options. Nothing is pinned.
    pub fn load(options: &LoadOptions) -> Result<Self, DatapathError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("TOKENS", options.max_tokens)
            .load(TEST_EBPF_OBJECT)?;
        Ok(TestPrograms {
            config: take(&mut ebpf, "CONFIG")?,
            tokens: take(&mut ebpf, "TOKENS")?,
            ebpf,
        })
    }

    /// Attaches the pass-through XDP program to `iface` (the peer of a veth answering
    /// with XDP_TX).
    pub fn attach_pass(&mut self, iface: &str, mode: XdpMode) -> Result<XdpLinkId, DatapathError> {
        loaded_xdp(&mut self.ebpf, PASS_PROGRAM)?
            .attach(iface, mode)
            .map_err(prog_err(PASS_PROGRAM))
    }

    /// Runs the pass-through program over `frame` (the bench's baseline).
    pub fn test_run_pass(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunResult, DatapathError> {
        self.test_run(PASS_PROGRAM, frame, repeat)
    }

    /// The floor's fingerprint key (`config.key`; the rest of it is not read).
    pub fn set_floor_config(&mut self, config: &GlobalConfig) -> Result<(), DatapathError> {
        self.config.set(0, *config, 0).map_err(map_err("CONFIG"))
    }

    /// A token the floor finds (its `info` is not read).
    pub fn install_floor_token(
        &mut self,
        fingerprint: Fingerprint,
        info: TokenInfo,
    ) -> Result<(), DatapathError> {
        self.tokens
            .insert(fingerprint, info, 0)
            .map_err(map_err("TOKENS"))
    }

    /// Runs the benchmark's floor program (the least work any implementation of an
    /// allowed request must do; see agent-ebpf's `test/floor.rs`) over `frame`.
    pub fn test_run_floor(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunResult, DatapathError> {
        self.test_run(FLOOR_PROGRAM, frame, repeat)
    }

    fn test_run(
        &mut self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunResult, DatapathError> {
        let mut out = vec![0u8; frame.len() + 256];
        test_run(
            loaded_xdp(&mut self.ebpf, name)?,
            name,
            frame,
            &mut out,
            repeat,
        )
    }
}

fn test_run<P>(
    prog: &mut P,
    name: &'static str,
    frame: &[u8],
    out: &mut [u8],
    repeat: u32,
) -> Result<TestRunResult, DatapathError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        repeat,
        ..Default::default()
    })
    .map_err(prog_err(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::load::program_names;

    #[test]
    fn the_test_object_holds_the_pass_and_floor_programs() {
        assert_eq!(
            program_names(TEST_EBPF_OBJECT),
            [FLOOR_PROGRAM, PASS_PROGRAM]
        );
    }
}
