//! int8 × int8 → int32 matrix products, the core of the `int8-dynamic` and `llm-int8` kernels:
//! out[i][j] = Σₖ a[i][k] · w[j][k], exact in int32, with both operands row-major along k.
//!
//! Three implementations compute the same integers, and [`Isa::detect`] picks one at run time:
//! - **AVX-512 VNNI** (`vpdpbusd`, 64 multiply-adds per instruction). It multiplies unsigned by
//!   signed bytes, so activations are shifted to a + 128 (one xor per loaded vector) and the
//!   surplus 128·Σw of each weight row is taken off at the end, from sums computed once when
//!   the weights load.
//! - **AVX2** (`vpmaddubsw`). Its pairwise i16 sums saturate for 255 · 127 · 2, so the shift
//!   trick is not exact here; instead |a| is multiplied by w carrying a's sign (`vpsignb`),
//!   which keeps every pair within ±127 · 127 · 2.
//! - a plain reference loop, which the tests compare the others against.
//!
//! Values must lie in [−127, 127] (−128 would overflow the sign trick), and rows are padded
//! with zeros to a multiple of [`K_ALIGN`] bytes so the vector loops need no tails. Each
//! implementation works on tiles of up to 4 activation rows × 4 weight rows so every loaded
//! vector is reused across the tile.

use std::sync::OnceLock;

/// Row length granularity: one AVX-512 vector.
pub const K_ALIGN: usize = 64;

/// Rows padded to [`K_ALIGN`].
pub fn padded_len(k: usize) -> usize {
    k.div_ceil(K_ALIGN) * K_ALIGN
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Reference,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    /// The fastest implementation this CPU runs. `QUANTD_INT8_ISA=avx2|reference` forces a
    /// slower one (for benchmarks that compare them).
    pub fn detect() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::available()
                .into_iter()
                .last()
                .unwrap_or(Self::Reference);
            match std::env::var("QUANTD_INT8_ISA").as_deref() {
                Ok("reference") => Self::Reference,
                Ok("avx2") if Self::available().contains(&Self::Avx2) => Self::Avx2,
                _ => best,
            }
        })
    }

    /// Every implementation this CPU can run, slowest first.
    pub fn available() -> Vec<Self> {
        let mut out = vec![Self::Reference];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                out.push(Self::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                out.push(Self::Avx512Vnni);
            }
        }
        out
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Reference => "reference",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// `out[i·n + j] = Σₖ a[i·kp + k] · w[j·kp + k]` for `m` activation rows and `n` weight rows
/// of `kp` bytes each (`kp` a multiple of [`K_ALIGN`]). `w_sums[j]` = Σₖ w[j][k] (used by the
/// VNNI path).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    isa: Isa,
    a: &[i8],
    m: usize,
    w: &[i8],
    w_sums: &[i32],
    n: usize,
    kp: usize,
    out: &mut [i32],
) {
    assert!(kp.is_multiple_of(K_ALIGN), "rows padded to {K_ALIGN}");
    assert!(a.len() >= m * kp && w.len() >= n * kp && w_sums.len() >= n);
    assert!(out.len() >= m * n);
    match isa {
        Isa::Reference => gemm_reference(a, m, w, n, kp, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(is_x86_feature_detected!("avx2"));
            // SAFETY: the CPU has AVX2 and the slices hold m·kp / n·kp / m·n values (asserted).
            unsafe { x86::gemm_avx2(a, m, w, n, kp, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            assert!(Isa::available().contains(&Isa::Avx512Vnni));
            // SAFETY: as above, for AVX-512 F/BW/VNNI.
            unsafe { x86::gemm_vnni(a, m, w, w_sums, n, kp, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => gemm_reference(a, m, w, n, kp, out),
    }
}

/// The CPU's int8 multiply-add rate with `isa`'s instructions, measured: independent chains of
/// the shortest exact sequence (AVX2: `vpmaddubsw`, `vpmaddwd`, `vpaddd`, 32 multiply-adds;
/// VNNI: `vpdpbusd`, 64) on registers only, so nothing but the arithmetic units limits it.
/// Benchmarks quote GEMM throughput as a share of this.
pub fn peak_macs_per_second(isa: Isa, seconds: f64) -> f64 {
    let iters: u64 = 1 << 20;
    let start = std::time::Instant::now();
    let mut rounds = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        match isa {
            Isa::Reference => {
                let mut acc = 0i32;
                for i in 0..iters {
                    acc = acc.wrapping_add(std::hint::black_box(i as i8) as i32 * 3);
                }
                std::hint::black_box(acc);
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only called for an ISA from `Isa::available`.
            Isa::Avx2 => {
                std::hint::black_box(unsafe { x86::peak_avx2(iters) });
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx512Vnni => {
                std::hint::black_box(unsafe { x86::peak_vnni(iters) });
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => {}
        };
        rounds += 1;
    }
    let per_iter = match isa {
        Isa::Reference => 1.0,
        Isa::Avx2 => (PEAK_CHAINS_AVX2 * 32) as f64,
        Isa::Avx512Vnni => (PEAK_CHAINS_VNNI * 64) as f64,
    };
    (rounds * iters) as f64 * per_iter / start.elapsed().as_secs_f64()
}

/// Independent chains in the peak loops, enough to cover the instructions' latency within
/// the register file (16 ymm for AVX2, 32 zmm for AVX-512).
const PEAK_CHAINS_AVX2: usize = 6;
const PEAK_CHAINS_VNNI: usize = 12;

fn gemm_reference(a: &[i8], m: usize, w: &[i8], n: usize, kp: usize, out: &mut [i32]) {
    for i in 0..m {
        let ar = &a[i * kp..(i + 1) * kp];
        for j in 0..n {
            let wr = &w[j * kp..(j + 1) * kp];
            out[i * n + j] = ar.iter().zip(wr).map(|(&x, &y)| x as i32 * y as i32).sum();
        }
    }
}

/// Walks the output in tiles of up to `MR × NR` and calls `tile` for each with the tile's
/// first activation row, first weight row and its size; `tile` writes its `mr × nr` results.
/// Activation rows go in panels of `MB`, small enough to stay in L1 (32 rows of 1,536 bytes)
/// while every weight row passes by once per panel: without the panels a long prompt would
/// stream all activations from L2 once per four weight rows.
fn for_each_tile(m: usize, n: usize, mut tile: impl FnMut(usize, usize, usize, usize)) {
    const MR: usize = 4;
    const NR: usize = 4;
    const MB: usize = 32;
    for p0 in (0..m).step_by(MB) {
        let p1 = (p0 + MB).min(m);
        for j0 in (0..n).step_by(NR) {
            let nr = NR.min(n - j0);
            for i0 in (p0..p1).step_by(MR) {
                tile(i0, MR.min(p1 - i0), j0, nr);
            }
        }
    }
}

// Tiles index accumulators by (row, column) as the maths reads; iterator chains would hide it.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::for_each_tile;

    /// Sum of the eight i32 lanes.
    #[target_feature(enable = "avx2")]
    fn hsum_avx2(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// One `MR × NR` tile with AVX2: 32 bytes of k at a time, |a| · sign(w, a).
    #[target_feature(enable = "avx2")]
    unsafe fn tile_avx2<const MR: usize, const NR: usize>(
        a: *const i8,
        w: *const i8,
        kp: usize,
        out: *mut i32,
        n: usize,
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); NR]; MR];
        for k in (0..kp).step_by(32) {
            let mut av = [_mm256_setzero_si256(); MR];
            let mut aa = [_mm256_setzero_si256(); MR];
            for i in 0..MR {
                av[i] = _mm256_loadu_si256(a.add(i * kp + k) as *const __m256i);
                aa[i] = _mm256_abs_epi8(av[i]);
            }
            for j in 0..NR {
                let wv = _mm256_loadu_si256(w.add(j * kp + k) as *const __m256i);
                for i in 0..MR {
                    let signed = _mm256_sign_epi8(wv, av[i]);
                    let pairs = _mm256_maddubs_epi16(aa[i], signed);
                    acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for i in 0..MR {
            for j in 0..NR {
                *out.add(i * n + j) = hsum_avx2(acc[i][j]);
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2; `a`, `w`, `out` hold `m·kp`, `n·kp`, `m·n` values; `kp % 32 == 0`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemm_avx2(a: &[i8], m: usize, w: &[i8], n: usize, kp: usize, out: &mut [i32]) {
        for_each_tile(m, n, |i0, mr, j0, nr| {
            let (ap, wp) = (a[i0 * kp..].as_ptr(), w[j0 * kp..].as_ptr());
            let op = out[i0 * n + j0..].as_mut_ptr();
            // SAFETY: the tile lies inside the slices (for_each_tile bounds mr, nr).
            unsafe {
                // Two activation rows at a time: 8 accumulators, the rows and their absolute
                // values, a weight vector and the constant fit AVX2's 16 registers.
                match nr {
                    4 => {
                        let mut i = 0;
                        while i + 2 <= mr {
                            tile_avx2::<2, 4>(ap.add(i * kp), wp, kp, op.add(i * n), n);
                            i += 2;
                        }
                        if i < mr {
                            tile_avx2::<1, 4>(ap.add(i * kp), wp, kp, op.add(i * n), n);
                        }
                    }
                    _ => {
                        for i in 0..mr {
                            for j in 0..nr {
                                let o = op.add(i * n + j);
                                tile_avx2::<1, 1>(ap.add(i * kp), wp.add(j * kp), kp, o, n)
                            }
                        }
                    }
                }
            }
        });
    }

    /// `iters` rounds of independent maddubs/madd/add chains. Each chain's input passes
    /// through an empty `asm!` every round so the compiler cannot hoist the products.
    #[target_feature(enable = "avx2")]
    pub unsafe fn peak_avx2(iters: u64) -> i32 {
        const C: usize = super::PEAK_CHAINS_AVX2;
        let b = _mm256_set1_epi8(-2);
        let ones = _mm256_set1_epi16(1);
        let mut a = [_mm256_set1_epi8(3); C];
        let mut acc = [_mm256_setzero_si256(); C];
        for _ in 0..iters {
            for (v, x) in acc.iter_mut().zip(a.iter_mut()) {
                std::arch::asm!(
                    "/* {0} */",
                    inout(ymm_reg) * x,
                    options(pure, nomem, nostack)
                );
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(*x, b), ones);
                *v = _mm256_add_epi32(*v, p);
            }
        }
        acc.iter().fold(0, |s, &v| s ^ hsum_avx2(v))
    }

    /// `iters` rounds of independent `vpdpbusd` chains (each accumulates into itself, so
    /// nothing can be hoisted).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn peak_vnni(iters: u64) -> i32 {
        const C: usize = super::PEAK_CHAINS_VNNI;
        let a = _mm512_set1_epi8(3);
        let b = _mm512_set1_epi8(-2);
        let mut acc = [_mm512_setzero_si512(); C];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbusd_epi32(*v, a, b);
            }
        }
        acc.iter().fold(0, |s, &v| s ^ _mm512_reduce_add_epi32(v))
    }

    /// One `MR × NR` tile with AVX-512 VNNI: 64 bytes of k at a time, (a + 128) · w, then the
    /// surplus 128 · Σw taken off.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_vnni<const MR: usize, const NR: usize>(
        a: *const i8,
        w: *const i8,
        w_sums: *const i32,
        kp: usize,
        out: *mut i32,
        n: usize,
    ) {
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [[_mm512_setzero_si512(); NR]; MR];
        for k in (0..kp).step_by(64) {
            let mut au = [_mm512_setzero_si512(); MR];
            for i in 0..MR {
                let v = _mm512_loadu_si512(a.add(i * kp + k) as *const __m512i);
                au[i] = _mm512_xor_si512(v, flip);
            }
            for j in 0..NR {
                let wv = _mm512_loadu_si512(w.add(j * kp + k) as *const __m512i);
                for i in 0..MR {
                    acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], au[i], wv);
                }
            }
        }
        for i in 0..MR {
            for j in 0..NR {
                let surplus = 128 * *w_sums.add(j);
                *out.add(i * n + j) = _mm512_reduce_add_epi32(acc[i][j]) - surplus;
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VNNI; slices as for [`gemm_avx2`]; `kp % 64 == 0`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn gemm_vnni(
        a: &[i8],
        m: usize,
        w: &[i8],
        w_sums: &[i32],
        n: usize,
        kp: usize,
        out: &mut [i32],
    ) {
        for_each_tile(m, n, |i0, mr, j0, nr| {
            let (ap, wp) = (a[i0 * kp..].as_ptr(), w[j0 * kp..].as_ptr());
            let sp = w_sums[j0..].as_ptr();
            let op = out[i0 * n + j0..].as_mut_ptr();
            // SAFETY: the tile lies inside the slices (for_each_tile bounds mr, nr).
            unsafe {
                match (mr, nr) {
                    (4, 4) => tile_vnni::<4, 4>(ap, wp, sp, kp, op, n),
                    (_, 4) => {
                        for i in 0..mr {
                            tile_vnni::<1, 4>(ap.add(i * kp), wp, sp, kp, op.add(i * n), n)
                        }
                    }
                    _ => {
                        for i in 0..mr {
                            for j in 0..nr {
                                let o = op.add(i * n + j);
                                tile_vnni::<1, 1>(
                                    ap.add(i * kp),
                                    wp.add(j * kp),
                                    sp.add(j),
                                    kp,
                                    o,
                                    n,
                                )
                            }
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes in [−127, 127] from a fixed sequence, zero-padded to `kp` per row.
    fn rows(count: usize, k: usize, kp: usize, seed: u64, extremes: bool) -> Vec<i8> {
        let mut s = seed;
        let mut out = vec![0i8; count * kp];
        for r in 0..count {
            for c in 0..k {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((s >> 33) % 255) as i32 - 127;
                // Rows of ±127 exercise the saturation limits of vpmaddubsw.
                out[r * kp + c] = if extremes && r % 3 == 0 {
                    if v < 0 {
                        -127
                    } else {
                        127
                    }
                } else {
                    v as i8
                };
            }
        }
        out
    }

    #[test]
    fn every_implementation_equals_the_reference_exactly() {
        let isas = Isa::available();
        let batches = (1..=64).map(|m| (m, 13, 100));
        for (m, n, k) in [
            (1, 1, 1),
            (1, 7, 63),
            (3, 5, 64),
            (4, 4, 576),
            (17, 13, 1536),
        ]
        .into_iter()
        .chain(batches)
        {
            let kp = padded_len(k);
            let a = rows(m, k, kp, 1 + m as u64, true);
            let w = rows(n, k, kp, 99 + n as u64, true);
            let sums: Vec<i32> = w
                .chunks(kp)
                .map(|r| r.iter().map(|&v| v as i32).sum())
                .collect();
            let mut want = vec![0; m * n];
            gemm(Isa::Reference, &a, m, &w, &sums, n, kp, &mut want);
            for &isa in &isas {
                let mut got = vec![0; m * n];
                gemm(isa, &a, m, &w, &sums, n, kp, &mut got);
                assert_eq!(got, want, "{} m {m} n {n} k {k}", isa.name());
            }
        }
    }

    #[test]
    fn extreme_values_do_not_saturate() {
        let kp = 128;
        let a = vec![-127i8; kp];
        let w = vec![-127i8; 2 * kp];
        let sums = vec![-127 * kp as i32; 2];
        for isa in Isa::available() {
            let mut out = vec![0; 2];
            gemm(isa, &a, 1, &w, &sums, 2, kp, &mut out);
            assert_eq!(out, vec![127 * 127 * kp as i32; 2], "{}", isa.name());
        }
    }
}
