//! The few bpf(2) commands aya does not wrap: batched map reads, BPF_OBJ_GET and
//! BPF_LINK_DETACH.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `bpf(cmd, attr)` with a zero-padded `union bpf_attr` (the kernel may write results back
/// into it); the result is an fd or 0.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) reads and writes at most `size_of_val(attr)` bytes of a valid buffer;
    // any pointer inside points to memory the caller keeps alive across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// BPF_OBJ_GET: an fd of the pinned object (aya hands out no raw fd of a link).
pub(super) fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    // { u64 pathname; u32 bpf_fd; u32 file_flags; }
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just returned this fd to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_DETACH: the link leaves its hook now, whoever still holds it.
pub(super) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 16];
    // { u32 link_fd; }
    attr[0] = u64::from(link.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// Entries per BPF_MAP_LOOKUP_BATCH call: 4096 × (16-byte key + value) stays well under a
/// megabyte, and a hash bucket never holds that many (the kernel's ENOSPC case).
const BATCH: usize = 4096;

/// Every entry of a (non-per-CPU) hash map through BPF_MAP_LOOKUP_BATCH: a few syscalls
/// for a hundred thousand entries, where aya's iterator makes two per entry. `K` and `V`
/// must be the map's key and value types (plain old data). Returns the number of entries.
/// Entries changing during the walk may or may not be seen, as with any map iteration.
pub(super) fn for_each_entry<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    mut f: impl FnMut(&K, &V),
) -> io::Result<usize> {
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let mut keys = vec![0u8; BATCH * ks];
    let mut values = vec![0u8; BATCH * vs];
    // The hash map's batch cursor is a u32; room for more costs nothing.
    let mut cursor_in = [0u64; 2];
    let mut cursor_out = [0u64; 2];
    let mut first = true;
    let mut total = 0;
    loop {
        let mut attr = [0u64; 16];
        // { u64 in_batch; u64 out_batch; u64 keys; u64 values; u32 count; u32 map_fd;
        //   u64 elem_flags; u64 flags; }
        attr[0] = if first { 0 } else { cursor_in.as_ptr() as u64 };
        attr[1] = cursor_out.as_mut_ptr() as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = BATCH as u64 | (u64::from(map.as_raw_fd() as u32) << 32);
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        // The kernel writes back how many entries it copied, also with the final ENOENT.
        let count = (attr[4] as u32 as usize).min(BATCH);
        for i in 0..count {
            // SAFETY: the kernel filled `count` keys and values of exactly these sizes;
            // K and V are plain old data, read unaligned from the byte buffers.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * ks) as *const K),
                    std::ptr::read_unaligned(values.as_ptr().add(i * vs) as *const V),
                )
            };
            f(&k, &v);
        }
        total += count;
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            Err(e) => return Err(e),
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// A BPF array of u64 words mapped into this process (the map was created with
/// BPF_F_MMAPABLE): single-word atomic loads and stores, which `bpf(BPF_MAP_UPDATE_ELEM)`
/// (a byte copy in the kernel) does not promise.
pub struct MappedWords {
    words: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
    /// Keeps the map's fd open: programs loaded later were relocated against it.
    _map: aya::maps::Array<aya::maps::MapData, u64>,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for MappedWords {}
// SAFETY: as above.
unsafe impl Sync for MappedWords {}

impl MappedWords {
    /// Maps every word of `map`.
    pub fn new(map: aya::maps::Array<aya::maps::MapData, u64>) -> io::Result<Self> {
        use aya::maps::IterableMap as _;
        let len = map.len() as usize;
        // SAFETY: a fresh shared mapping of the map's value area; the kernel checks the
        // length and the map's BPF_F_MMAPABLE flag.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.map().fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let words = std::ptr::NonNull::new(p.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(MappedWords {
            words,
            len,
            _map: map,
        })
    }

    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(i < self.len, "word {i} of {}", self.len);
        // SAFETY: inside the mapping, which lives as long as `self`; page-aligned, so
        // every word is 8-aligned.
        unsafe { self.words.add(i).as_ref() }
    }

    pub fn load(&self, i: usize) -> u64 {
        self.word(i).load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn store(&self, i: usize, v: u64) {
        self.word(i).store(v, std::sync::atomic::Ordering::Release)
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len * 8) };
    }
}
