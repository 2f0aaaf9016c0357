//! `/bin/debug-exit <digit>`: writes the digit's value to I/O port 0xf4, where qemu's
//! isa-debug-exit device turns it into qemu's exit status.
//!
//! The Debian cloud kernel has no /dev/port (CONFIG_DEVPORT is off) and busybox has no
//! outb, so the guest needs its own tiny program. It is a hand-made static ELF rather
//! than something compiled at run time, to need no cross toolchain.

/// Machine code, loaded at [`BASE`] + [`CODE_OFFSET`]:
///
/// ```text
///   mov edi, 0xf4 ; mov esi, 4 ; mov edx, 1 ; mov eax, 173   ; ioperm(0xf4, 4, 1)
///   syscall
///   test rax, rax ; jnz out
///   mov rsi, [rsp+16]                                      ; argv[1]
///   movzx eax, byte ptr [rsi] ; sub eax, '0'
///   mov edx, 0xf4 ; out dx, al                            ; qemu exits here
/// out:
///   mov edi, 1 ; mov eax, 60 ; syscall                      ; exit(1) if it did not
/// ```
const CODE: [u8; 56] = [
    0xbf, 0xf4, 0x00, 0x00, 0x00, 0xbe, 0x04, 0x00, 0x00, 0x00, 0xba, 0x01, 0x00, 0x00, 0x00, 0xb8,
    0xad, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x85, 0xc0, 0x75, 0x11, 0x48, 0x8b, 0x74, 0x24, 0x10,
    0x0f, 0xb6, 0x06, 0x83, 0xe8, 0x30, 0xba, 0xf4, 0x00, 0x00, 0x00, 0xee, 0xbf, 0x01, 0x00, 0x00,
    0x00, 0xb8, 0x3c, 0x00, 0x00, 0x00, 0x0f, 0x05,
];

const BASE: u64 = 0x40_0000;
const EHDR_SIZE: u16 = 64;
const PHDR_SIZE: u16 = 56;
const CODE_OFFSET: u64 = (EHDR_SIZE + PHDR_SIZE) as u64;

/// The executable: ELF header, one PT_LOAD program header mapping the whole file
/// read+execute, then [`CODE`].
pub fn program() -> Vec<u8> {
    let file_size = CODE_OFFSET + CODE.len() as u64;
    let mut elf = Vec::with_capacity(file_size as usize);
    // e_ident: ELF, 64-bit, little endian, version 1, System V ABI.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(BASE + CODE_OFFSET).to_le_bytes()); // e_entry
    elf.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&EHDR_SIZE.to_le_bytes());
    elf.extend_from_slice(&PHDR_SIZE.to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    debug_assert_eq!(elf.len(), usize::from(EHDR_SIZE));

    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R + X
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&file_size.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&file_size.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    debug_assert_eq!(elf.len() as u64, CODE_OFFSET);

    elf.extend_from_slice(&CODE);
    elf
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, process::Command};

    use super::*;

    /// Without the isa-debug-exit device (as on the host, where ioperm needs
    /// privileges it may lack or the port is simply unused), the program must get to
    /// its fallback exit(1) rather than crash: that proves the ELF loads and the code
    /// runs.
    #[test]
    fn program_runs_and_falls_back_to_exit_1() {
        let dir = std::env::temp_dir().join(format!("debug-exit-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("debug-exit");
        std::fs::write(&path, program()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Give ioperm no chance to succeed: port 0xf4 must not be poked on the host.
        let status = Command::new("setpriv")
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(&path)
            .arg("1")
            .status()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(status.code(), Some(1));
    }
}
