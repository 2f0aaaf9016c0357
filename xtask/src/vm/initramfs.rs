//! The guest's initramfs: an uncompressed cpio (newc) archive the kernel unpacks into
//! its rootfs. Written here rather than with cpio(1) because it needs a /dev/console
//! node, which cpio(1) can only archive from a real device file.

use std::fs;

use anyhow::{Context, Result};

use super::kernel::Module;

/// PID 1 of the guest.
const INIT: &str = include_str!("../../vm/init.sh");

/// Where the static busybox of Debian's `busybox-static` lives on the host.
const BUSYBOX: &str = "/bin/busybox";

/// Builds the archive: busybox, /init, the modules with their load order, and the
/// per-run command script.
pub fn build(modules: &[Module], run_script: &str) -> Result<Vec<u8>> {
    let busybox = fs::read(BUSYBOX).with_context(|| {
        format!("reading {BUSYBOX}; install busybox-static (see vm::HOST_PACKAGES)")
    })?;
    check_static(&busybox)?;

    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "modules", "rampart"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before init can mount devtmpfs;
    // without this node init runs with no output at all.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("bin/debug-exit", 0o755, &super::debug_exit::program());
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut order = String::new();
    for module in modules {
        let file = format!("{}.ko", module.name);
        cpio.file(&format!("modules/{file}"), 0o644, &module.contents);
        order.push_str(&file);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    cpio.file("rampart/run.sh", 0o755, run_script.as_bytes());
    Ok(cpio.finish())
}

/// A dynamically linked busybox would find no libc in the initramfs and the guest
/// would panic with a cryptic "init failed"; say so on the host instead.
fn check_static(elf: &[u8]) -> Result<()> {
    // PT_INTERP names the dynamic loader; a static binary has none. Looking for the
    // loader path string is a cheap stand-in for walking the program headers.
    let dynamic = elf.windows(14).any(|w| w == b"/lib64/ld-linu");
    anyhow::ensure!(
        !dynamic,
        "{BUSYBOX} is dynamically linked; install busybox-static"
    );
    Ok(())
}

/// Minimal writer for the "newc" cpio format the kernel understands.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn dir(&mut self, path: &str) {
        self.entry(path, S_IFDIR | 0o755, 2, (0, 0), &[]);
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, S_IFREG | perm, 1, (0, 0), data);
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | 0o600, 1, (major, minor), &[]);
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let size = u32::try_from(data.len()).expect("initramfs member over 4 GiB");
        let name_len = u32::try_from(path.len() + 1).expect("path length fits u32");
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name_len,
            0, // checksum, unused by newc
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// Header+name and data are each padded to 4 bytes.
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!x");
        let out = cpio.finish();
        assert_eq!(&out[..6], b"070701");
        // 110-byte header + "init\0" = 115, padded to 116; 3 data bytes padded to 4.
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..119], b"#!x");
        assert_eq!(&out[120..126], b"070701");
        // File size field (7th) of the first entry.
        assert_eq!(&out[6 + 6 * 8..6 + 7 * 8], b"00000003");
        assert_eq!(out.len() % 4, 0);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
