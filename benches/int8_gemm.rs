//! int8 GEMM throughput as a share of the machine's int8 peak (issue: ≥ 50 % for m ≥ 64), with
//! candle's f32 matmul on the same shapes beside it, in one run.
//!
//!     cargo bench --bench int8_gemm [-- --seconds 0.5]
//!
//! Shapes are SmolLM2-135M's linears (k × n: 576 × 576, 576 × 1536, 1536 × 576) at m = 1 (decode)
//! to 512 (a prompt). Each cell is the median of 7 timed runs; the peak is measured first with
//! `int8_gemm::peak_macs_per_second` on the same ISA.

use std::time::Instant;

use candle_core::{Device, Tensor};
use quantd::kernels::int8_gemm::{gemm, padded_len, peak_macs_per_second, Isa};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds per call of `f`, median of 7 runs of enough calls to last ~`budget` seconds.
fn time(budget: f64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let calls = ((budget / 7.0 / once) as usize).clamp(1, 100_000);
    let runs = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls {
                f();
            }
            t.elapsed().as_secs_f64() / calls as f64
        })
        .collect();
    median(runs)
}

fn smoke() {
    let (m, n, kp) = (5, 3, padded_len(70));
    let (a, w) = (bytes(m * kp, 1), bytes(n * kp, 2));
    let sums: Vec<i32> = w
        .chunks(kp)
        .map(|r| r.iter().map(|&v| v as i32).sum())
        .collect();
    let mut want = vec![0; m * n];
    gemm(Isa::Reference, &a, m, &w, &sums, n, kp, &mut want);
    for isa in Isa::available() {
        let mut got = vec![0; m * n];
        gemm(isa, &a, m, &w, &sums, n, kp, &mut got);
        assert_eq!(got, want, "{}", isa.name());
        assert!(peak_macs_per_second(isa, 0.01) > 0.0);
    }
}

fn bytes(len: usize, seed: u64) -> Vec<i8> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // In [−127, 127]: the kernels' contract.
            (((s >> 33) % 255) as i32 - 127) as i8
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs this without `--bench`: check it works and stop.
    if !args.iter().any(|a| a == "--bench") {
        smoke();
        return;
    }
    // candle's matmul, the f32 column, on one thread like the int8 kernel.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let budget = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.5);
    let isas: Vec<Isa> = Isa::available()
        .into_iter()
        .filter(|&i| i != Isa::Reference)
        .collect();
    println!("int8 GEMM vs the machine's int8 peak (1 thread, f32 column: candle matmul on 1 thread; median of 7)");
    for &isa in &isas {
        let peak = median((0..5).map(|_| peak_macs_per_second(isa, 0.2)).collect());
        println!(
            "\n{}: peak {:.1} GMAC/s (register-only multiply-add chains)",
            isa.name(),
            peak / 1e9
        );
        println!(
            "{:>5} {:>5} {:>5} {:>10} {:>7} {:>12}",
            "m", "k", "n", "GMAC/s", "% peak", "f32 GMAC/s"
        );
        for (k, n) in [(576, 576), (576, 1536), (1536, 576)] {
            let kp = padded_len(k);
            let w = bytes(n * kp, 7);
            let sums: Vec<i32> = w
                .chunks(kp)
                .map(|r| r.iter().map(|&v| v as i32).sum())
                .collect();
            let wf = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            for m in [1, 8, 64, 128, 512] {
                let a = bytes(m * kp, 3);
                let mut out = vec![0i32; m * n];
                let secs = time(budget, || gemm(isa, &a, m, &w, &sums, n, kp, &mut out));
                let xf = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let wt = wf.t().unwrap();
                let f32_secs = time(budget, || {
                    std::hint::black_box(xf.matmul(&wt).unwrap());
                });
                let macs = (m * n * k) as f64;
                println!(
                    "{m:>5} {k:>5} {n:>5} {:>10.1} {:>6.0}% {:>12.1}",
                    macs / secs / 1e9,
                    100.0 * macs / secs / peak,
                    macs / f32_secs / 1e9
                );
            }
        }
    }
}
