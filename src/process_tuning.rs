//! Process-wide settings made once at start-up, before any thread exists: the rayon pool size
//! and glibc's malloc thresholds. Both change speed only, never results.

/// Applies every setting; `main` calls this first.
pub fn apply() {
    fix_thread_count();
    keep_large_buffers_in_heap();
}

/// candle sizes its thread pools from RAYON_NUM_THREADS, and without it re-counts physical
/// cores from /proc/cpuinfo on every dense matmul (tens of microseconds each, hundreds of
/// times per decoded token). Fixing the count once avoids that.
fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// A forward pass allocates and frees megabyte-sized activations (a 512-token prompt's
/// attention scores, the MLP's hidden rows) dozens of times per layer. glibc serves those with
/// fresh `mmap`s and gives them back on free, so every one costs page faults and zeroing: a
/// fifth of a prompt's time here. Serving them from the heap, and not trimming the heap after
/// each free, reuses the same pages (pp512 of an int8 SmolLM2: 193 → 238 tok/s).
fn keep_large_buffers_in_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit; the trim threshold
        // bounds how much freed memory the heap keeps.
        const MMAP_THRESHOLD: i32 = 32 << 20;
        const TRIM_THRESHOLD: i32 = 512 << 20;
        // SAFETY: mallopt only changes allocator parameters; it is called before any other
        // thread exists, and glibc ignores values it does not accept (returning 0).
        unsafe {
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}
