//! One core, the decode kernels alone (no thread pool, no input preparation in the timing):
//! each kernel over a slice that stays in L2 (what its instructions allow) and streaming
//! 512 MB of distinct weights from memory, next to the read-bandwidth loop on the same core.
//! `dsflash bench` reports the whole machine; this shows where a kernel loses against it:
//! its instructions (in-L2 rate below the per-core memory rate) or the overlap of its
//! arithmetic with the memory stream (streaming well below its in-L2 rate).
//!
//!     cargo bench --bench kernels

use dsflash::backend::cpu::{bf16dot, probe, q8dot, rowdot};
use dsflash::model::formats::{fake_quant_e4m3_blocks, fake_quant_i8_blocks};
use dsflash::model::synth::{SplitMix64, random_weight};
use dsflash::model::weights::Weight;
use std::time::Instant;

/// Bytes of weights kept in L2 for the in-cache rate, and streamed for the memory rate.
const IN_L2: usize = 192 << 10;
const STREAM: usize = 512 << 20;
/// Rows per call when streaming: the engine's fused tasks are ~128 KB.
const TASK: usize = 128 << 10;

/// A kernel over `rows` consecutive rows from `r0` of a weight (output one f32 per row).
type Kernel<'a> = Box<dyn Fn(&Weight, usize, usize, &mut [f32]) + Sync + 'a>;

fn best_gbs(bytes: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

/// The read-bandwidth loop and the two pools it is measured on: one thread, and all cores.
struct Bound {
    read: probe::ReadProbe,
    one: rayon::ThreadPool,
    all: rayon::ThreadPool,
}

impl Bound {
    /// One pass of the loop on `pool` (GB/s).
    fn pass(&self, pool: &rayon::ThreadPool) -> f64 {
        pool.install(|| self.read.pass())
    }
}

/// `k` over every row of `ws` in task-sized calls.
fn stream(ws: &[Weight], rows: usize, per_task: usize, k: &Kernel, out: &mut [f32]) {
    for w in ws {
        for r0 in (0..rows).step_by(per_task) {
            let m = per_task.min(rows - r0);
            k(w, r0, m, &mut out[..m]);
        }
    }
    std::hint::black_box(&out);
}

/// A loop pass runs before each streaming pass, so both see the same neighbours.
fn measure(name: &str, kind: &str, rows: usize, cols: usize, k: &Kernel, b: &Bound) {
    let mut rng = SplitMix64::new(7);
    let one = random_weight(kind, rows, cols, &mut rng);
    let row_bytes = one.stored_bytes() / rows;
    let mut out = vec![0f32; rows];
    // In L2: the first rows, many times over.
    let n = (IN_L2 / row_bytes).clamp(1, rows);
    let l2 = best_gbs(64 * n * row_bytes, 9, || {
        for _ in 0..64 {
            k(&one, 0, n, &mut out[..n]);
        }
        std::hint::black_box(&out);
    });
    // Streaming: distinct copies, in task-sized calls.
    let copies = STREAM.div_ceil(one.stored_bytes());
    let ws: Vec<Weight> = (0..copies)
        .map(|_| random_weight(kind, rows, cols, &mut rng))
        .collect();
    let bytes = copies * one.stored_bytes();
    let per_task = (TASK / row_bytes).clamp(1, rows);
    stream(&ws, rows, per_task, k, &mut out);
    let (mut single, mut bound) = (0f64, 0f64);
    for _ in 0..5 {
        bound = bound.max(b.pass(&b.one));
        single = single.max(best_gbs(bytes, 1, || {
            stream(&ws, rows, per_task, k, &mut out)
        }));
    }
    // All cores: each thread streams its own share of the copies (no shared dispatch).
    let share = copies.div_ceil(b.all.current_num_threads());
    let (mut all_gbs, mut all_bound) = (0f64, 0f64);
    for _ in 0..5 {
        all_bound = all_bound.max(b.pass(&b.all));
        all_gbs = all_gbs.max(best_gbs(bytes, 1, || {
            b.all.scope(|sc| {
                for part in ws.chunks(share) {
                    sc.spawn(move |_| stream(part, rows, per_task, k, &mut vec![0f32; per_task]));
                }
            })
        }));
    }
    println!(
        "{name:<28} {l2:>7.1} {single:>9.1} {bound:>7.1} {:>9.0}% {:>8.0}%   {all_gbs:>7.1} {all_bound:>7.1} {:>6.0}%",
        100.0 * single / l2,
        100.0 * single / bound,
        100.0 * all_gbs / all_bound
    );
}

fn fp4_parts(w: &Weight, r0: usize, n: usize) -> (&[u8], &[u8], usize) {
    let Weight::Fp4 {
        cols,
        packed,
        scales,
        ..
    } = w
    else {
        unreachable!("an FP4 weight")
    };
    let c = *cols;
    (
        &packed[r0 * c / 2..(r0 + n) * c / 2],
        &scales[r0 * c / 32..(r0 + n) * c / 32],
        c,
    )
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let bound = Bound {
        read: probe::ReadProbe::new(STREAM),
        one: rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool"),
        all: rayon::ThreadPoolBuilder::new()
            .build()
            .expect("a thread pool"),
    };
    println!(
        "GB/s on one core, then on all cores; `loop`: the read-bandwidth loop, a pass before \
         each streaming one"
    );
    println!(
        "{:<28} {:>7} {:>9} {:>7} {:>10} {:>9}   {:>7} {:>7} {:>7}",
        "kernel", "in L2", "streaming", "loop", "of in L2", "of loop", "all", "loop", "of loop"
    );
    let mut rng = SplitMix64::new(1);
    let input = |cols: usize, rng: &mut SplitMix64| -> Vec<f32> {
        (0..cols).map(|_| rng.uniform() - 0.5).collect()
    };
    if bf16dot::available() {
        let mut x = input(4096, &mut rng);
        fake_quant_e4m3_blocks(&mut x, 128);
        let xp = bf16dot::prepare_fp4(&x).expect("E4M3 values are bf16");
        let k: Kernel = Box::new(|w, r0, n, out| {
            let (p, s, c) = fp4_parts(w, r0, n);
            bf16dot::fp4_block(p, s, c, &[&xp], out)
        });
        measure("fp4 2048x4096 (bf16 dot)", "fp4", 2048, 4096, &k, &bound);
        let mut x8 = input(1024, &mut rng);
        fake_quant_e4m3_blocks(&mut x8, 128);
        let xp8 = bf16dot::prepare_fp8(&x8).expect("E4M3 values are bf16");
        let k: Kernel = Box::new(|w, r0, n, out| {
            let Weight::Fp8 {
                cols,
                codes,
                scales,
                ..
            } = w
            else {
                unreachable!("an FP8 weight")
            };
            let c = *cols;
            bf16dot::fp8_block(&codes[r0 * c..(r0 + n) * c], scales, r0, c, &[&xp8], out)
        });
        measure("fp8 32768x1024 (bf16 dot)", "fp8", 32768, 1024, &k, &bound);
    }
    if q8dot::available() {
        let mut x = input(4096, &mut rng);
        fake_quant_i8_blocks(&mut x, 32);
        let xq = q8dot::prepare(&x).expect("on the int8 grid");
        let k: Kernel = Box::new(|w, r0, n, out| {
            let (p, s, c) = fp4_parts(w, r0, n);
            q8dot::fp4_block(p, s, c, &[&xq], out)
        });
        measure("fp4 2048x4096 (int8 dot)", "fp4", 2048, 4096, &k, &bound);
    }
    let xh = input(4096, &mut rng);
    let k: Kernel = Box::new(|w, r0, _, out| {
        let Weight::Bf16 { cols, data, .. } = w else {
            unreachable!("a BF16 weight")
        };
        let rb = 2 * *cols;
        for (i, o) in out.iter_mut().enumerate() {
            let r = r0 + i;
            *o = rowdot::bf16_row_dot(&data[r * rb..(r + 1) * rb], &xh);
        }
    });
    measure("bf16 16384x4096 (head)", "bf16", 16384, 4096, &k, &bound);
}
