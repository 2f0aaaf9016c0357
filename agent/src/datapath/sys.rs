//! The few bpf(2) commands aya does not wrap: batched map reads and writes, BPF_OBJ_GET
//! and BPF_LINK_DETACH.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
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

/// Writes `keys[i]` → `values[i]` through BPF_MAP_UPDATE_BATCH (aya 0.14 has no batch
/// API), `BATCH` entries per syscall: one syscall per 4096 entries where
/// BPF_MAP_UPDATE_ELEM takes one per entry. Each entry is written as an update of its own
/// would write it; the batch is not atomic. `K` and `V` must be the map's key and value
/// types (plain old data). On an error, the entries before the one that failed are written.
pub(super) fn update_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "a value per key");
    for (ks, vs) in keys.chunks(BATCH).zip(values.chunks(BATCH)) {
        let mut attr = [0u64; 16];
        // { u64 in_batch; u64 out_batch; u64 keys; u64 values; u32 count; u32 map_fd;
        //   u64 elem_flags; u64 flags; }
        attr[2] = ks.as_ptr() as u64;
        attr[3] = vs.as_ptr() as u64;
        attr[4] = ks.len() as u64 | (u64::from(map.as_raw_fd() as u32) << 32);
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// Deletes `keys` through BPF_MAP_DELETE_BATCH, `BATCH` keys per syscall. A key the map
/// does not hold stops a batch with ENOENT: the keys after it are deleted one by one.
/// `K` must be the map's key type (plain old data). Returns how many were deleted.
pub(super) fn delete_batch<K: Copy>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let ks = &rest[..rest.len().min(BATCH)];
        let mut attr = [0u64; 16];
        // { u64 in_batch; u64 out_batch; u64 keys; u64 values; u32 count; u32 map_fd;
        //   u64 elem_flags; u64 flags; }
        attr[2] = ks.as_ptr() as u64;
        attr[4] = ks.len() as u64 | (u64::from(map.as_raw_fd() as u32) << 32);
        let r = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // The kernel writes back how many keys it deleted, also on an error.
        let done = (attr[4] as u32 as usize).min(ks.len());
        deleted += done;
        match r {
            Ok(_) => rest = &rest[ks.len()..],
            // Key `done` is absent: skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// BPF_PROG_TEST_RUN of `prog` over `frame` once (aya's needs the `&mut` program); the
/// program's return code.
#[cfg(feature = "test-support")]
pub(super) fn test_run(prog: BorrowedFd<'_>, frame: &[u8]) -> io::Result<u32> {
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut out = vec![0u8; frame.len() + 512];
    let mut attr = [0u64; 16];
    // { u32 prog_fd; u32 retval; u32 data_size_in; u32 data_size_out; u64 data_in;
    //   u64 data_out; u32 repeat; u32 duration; ... }
    attr[0] = u64::from(prog.as_raw_fd() as u32);
    attr[1] = frame.len() as u64 | ((out.len() as u64) << 32);
    attr[2] = frame.as_ptr() as u64;
    attr[3] = out.as_mut_ptr() as u64;
    attr[4] = 1;
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr[0] >> 32) as u32)
}

/// Waits until every program run that may have started before the call has ended.
/// Programs run inside RCU read-side critical sections (XDP and TC in softirq context,
/// BPF_PROG_TEST_RUN under rcu_read_lock), and MEMBARRIER_CMD_GLOBAL is the kernel's
/// synchronize_rcu(): after it, no program still holds a map element it looked up
/// before. A few milliseconds. Kernels that refuse it (nohz_full CPUs) get a sleep far
/// longer than any program run instead.
pub(super) fn grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier(2) takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A BPF array mapped into this process (the map was created with BPF_F_MMAPABLE), read
/// and written a u64 word at a time with atomic loads and stores, which
/// `bpf(BPF_MAP_UPDATE_ELEM)` (a byte copy in the kernel) does not promise. `V` is the
/// map's value type: plain old data, 8-aligned, a whole number of words.
pub struct MappedArray<V: aya::Pod> {
    words: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
    /// Keeps the map's fd open: programs loaded later were relocated against it.
    _map: aya::maps::Array<aya::maps::MapData, V>,
}

/// The PORTS words.
pub type MappedWords = MappedArray<u64>;

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl<V: aya::Pod> Send for MappedArray<V> {}
// SAFETY: as above.
unsafe impl<V: aya::Pod> Sync for MappedArray<V> {}

impl<V: aya::Pod> MappedArray<V> {
    const WORDS: usize = {
        assert!(std::mem::size_of::<V>().is_multiple_of(8) && std::mem::align_of::<V>() == 8);
        std::mem::size_of::<V>() / 8
    };

    /// Maps every value of `map`.
    pub fn new(map: aya::maps::Array<aya::maps::MapData, V>) -> io::Result<Self> {
        use aya::maps::IterableMap as _;
        let len = map.len() as usize;
        // SAFETY: a fresh shared mapping of the map's value area; the kernel checks the
        // length and the map's BPF_F_MMAPABLE flag.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * Self::WORDS * 8,
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
        Ok(MappedArray {
            words,
            len,
            _map: map,
        })
    }

    /// The map this mapping is of.
    #[cfg(feature = "test-support")]
    pub(super) fn map_data(&self) -> &aya::maps::MapData {
        use aya::maps::IterableMap as _;
        self._map.map()
    }

    /// Entries (the map's max_entries).
    pub fn len(&self) -> usize {
        self.len
    }

    fn word(&self, i: usize, w: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(i < self.len, "entry {i} of {}", self.len);
        // SAFETY: inside the mapping, which lives as long as `self`; page-aligned, and
        // values are whole words, so every word is 8-aligned.
        unsafe { self.words.add(i * Self::WORDS + w).as_ref() }
    }

    /// Value `i`, each word read atomically (a value other words of which change
    /// meanwhile may mix old and new words, as a program's own reads would).
    pub fn read(&self, i: usize) -> V {
        let mut v = std::mem::MaybeUninit::<V>::uninit();
        let dst = v.as_mut_ptr().cast::<u64>();
        for w in 0..Self::WORDS {
            let x = self.word(i, w).load(std::sync::atomic::Ordering::Acquire);
            // SAFETY: inside `v`, which is 8-aligned and WORDS words long.
            unsafe { dst.add(w).write(x) };
        }
        // SAFETY: every word written; V is plain old data, valid for any bytes.
        unsafe { v.assume_init() }
    }

    /// Writes value `i` a word at a time, in order.
    pub fn write(&self, i: usize, v: &V) {
        let src = (v as *const V).cast::<u64>();
        for w in 0..Self::WORDS {
            // SAFETY: inside `v`, 8-aligned and WORDS words long.
            let x = unsafe { src.add(w).read() };
            self.word(i, w)
                .store(x, std::sync::atomic::Ordering::Release);
        }
    }
}

impl MappedArray<u64> {
    pub fn load(&self, i: usize) -> u64 {
        self.read(i)
    }

    pub fn store(&self, i: usize, v: u64) {
        self.write(i, &v)
    }
}

impl<V: aya::Pod> Drop for MappedArray<V> {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len * Self::WORDS * 8) };
    }
}

#[cfg(feature = "test-support")]
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
#[cfg(feature = "test-support")]
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

#[cfg(feature = "test-support")]
/// Deletes every entry of a hash map (any hash kind) whose keys are `key_size` bytes:
/// the first key, again and again, until there is none.
pub(super) fn delete_all(map: BorrowedFd<'_>, key_size: usize) -> io::Result<usize> {
    let mut key = vec![0u8; key_size];
    let mut deleted = 0;
    loop {
        let mut attr = [0u64; 16];
        // { u32 map_fd; u64 key (NULL: the first); u64 next_key; }
        attr[0] = u64::from(map.as_raw_fd() as u32);
        attr[2] = key.as_mut_ptr() as u64;
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(deleted),
            Err(e) => return Err(e),
        }
        let mut attr = [0u64; 16];
        // { u32 map_fd; u64 key; }
        attr[0] = u64::from(map.as_raw_fd() as u32);
        attr[1] = key.as_ptr() as u64;
        bpf(BPF_MAP_DELETE_ELEM, &mut attr)?;
        deleted += 1;
    }
}

#[cfg(feature = "test-support")]
/// Sets every value of an array map (plain or per-CPU) to zero bytes, in one
/// BPF_MAP_UPDATE_BATCH. `value_bytes` is what one key's value takes in the syscall's
/// buffer: the value size, or for a per-CPU map the value size rounded up to 8 times the
/// number of possible CPUs.
pub(super) fn zero_array(
    map: BorrowedFd<'_>,
    max_entries: u32,
    value_bytes: usize,
) -> io::Result<()> {
    let keys: Vec<u32> = (0..max_entries).collect();
    let values = vec![0u8; max_entries as usize * value_bytes];
    let mut attr = [0u64; 16];
    // { u64 in_batch; u64 out_batch; u64 keys; u64 values; u32 count; u32 map_fd;
    //   u64 elem_flags; u64 flags; }
    attr[2] = keys.as_ptr() as u64;
    attr[3] = values.as_ptr() as u64;
    attr[4] = u64::from(max_entries) | (u64::from(map.as_raw_fd() as u32) << 32);
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr).map(|_| ())
}
