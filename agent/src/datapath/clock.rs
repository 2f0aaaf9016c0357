//! The datapath judges validity windows and ramps on CLOCK_TAI (`bpf_ktime_get_tai_ns`),
//! so expiry times are wall-clock instants that NTP slewing cannot move.

/// Now, in CLOCK_TAI nanoseconds.
pub fn tai_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_TAI, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_TAI is always available on Linux");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_TAI − CLOCK_REALTIME, to turn a wall-clock (Unix) time into datapath time.
pub fn tai_offset_ns() -> i64 {
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    tai_now_ns() as i64 - real
}

/// A Unix time (seconds) as datapath time.
pub fn unix_to_tai_ns(unix_secs: i64) -> u64 {
    (unix_secs.saturating_mul(1_000_000_000) + tai_offset_ns()).max(0) as u64
}
