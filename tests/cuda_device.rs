//! The CUDA device against the CPU device, op by op, on random inputs at real V4-Flash
//! shapes; and the tiny oracle checkpoints with every matrix on the GPU against their
//! goldens. Needs an NVIDIA GPU: without one each test says so and passes, unless
//! DSFLASH_REQUIRE_GPU=1 (scripts/gpu_check.sh sets it), which turns a missing GPU into a
//! failure.

mod common;
use common::*;
use dsflash::backend::cpu::CpuDevice;
use dsflash::backend::cuda::CudaDevice;
use dsflash::backend::device::{
    Buf, DevWeight, Device, Op, Stream, bytes_f32, bytes_i32, f32_bytes,
};
use dsflash::engine::{Engine, Numerics, Session, Want};
use dsflash::model::synth::{SplitMix64, random_weight};
use std::sync::{Arc, OnceLock};

fn gpu() -> Option<Arc<CudaDevice>> {
    static DEV: OnceLock<Result<Arc<CudaDevice>, String>> = OnceLock::new();
    let d = DEV.get_or_init(|| CudaDevice::open(0).map(Arc::new).map_err(|e| e.to_string()));
    match d {
        Ok(d) => Some(d.clone()),
        Err(e) => {
            assert!(
                std::env::var_os("DSFLASH_REQUIRE_GPU").is_none(),
                "DSFLASH_REQUIRE_GPU is set but the CUDA device does not open: {e}"
            );
            eprintln!("no usable GPU ({e}): CUDA tests not exercised");
            None
        }
    }
}

/// The same buffers on both devices.
struct Pair<'a> {
    cpu: CpuDevice,
    gpu: &'a CudaDevice,
}

impl Pair<'_> {
    fn f32(&self, v: &[f32]) -> (Buf, Buf) {
        self.bytes(f32_bytes(v))
    }

    fn bytes(&self, b: &[u8]) -> (Buf, Buf) {
        let c = self.cpu.alloc(b.len()).expect("cpu alloc");
        self.cpu.write(c, b, Stream::COMPUTE).expect("cpu write");
        let g = self.gpu.alloc(b.len()).expect("gpu alloc");
        self.gpu.write(g, b, Stream::COMPUTE).expect("gpu write");
        (c, g)
    }

    fn zeros(&self, bytes: usize) -> (Buf, Buf) {
        self.bytes(&vec![0u8; bytes])
    }

    /// Run the op on both; return (cpu bytes, gpu bytes) of `out`.
    fn run(&self, op: impl Fn(bool) -> Op, out: (Buf, Buf), bytes: usize) -> (Vec<u8>, Vec<u8>) {
        self.cpu
            .launch(&op(false), Stream::COMPUTE)
            .expect("cpu op");
        self.gpu.launch(&op(true), Stream::COMPUTE).expect("gpu op");
        let mut a = vec![0u8; bytes];
        let mut b = vec![0u8; bytes];
        self.cpu
            .read(out.0, &mut a, Stream::COMPUTE)
            .expect("cpu read");
        self.gpu
            .read(out.1, &mut b, Stream::COMPUTE)
            .expect("gpu read");
        (a, b)
    }

    fn free(&self, bufs: &[(Buf, Buf)]) {
        for &(c, g) in bufs {
            self.cpu.free(c);
            self.gpu.free(g);
        }
    }
}

fn i32b(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn pick<T: Copy>(gpu: bool, p: (T, T)) -> T {
    if gpu { p.1 } else { p.0 }
}

/// |a - b| <= tol · scale element-wise.
fn close(a: &[f32], b: &[f32], tol: f32, scale: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for i in 0..a.len() {
        assert!(
            (a[i] - b[i]).abs() <= tol * scale[i].max(1e-30),
            "{what}[{i}]: cpu {} gpu {}",
            a[i],
            b[i]
        );
    }
}

#[test]
fn linear_kernels_match_the_cpu_at_real_shapes() {
    let Some(g) = gpu() else { return };
    let p = Pair {
        cpu: CpuDevice::new(),
        gpu: &g,
    };
    let mut r = SplitMix64::new(77);
    for (kind, rows, cols) in [
        ("fp4", 2048, 4096),    // expert w1/w3
        ("fp4", 4096, 2048),    // expert w2
        ("fp8", 32768, 1024),   // wq_b
        ("fp8", 4096, 8192),    // wo_b
        ("bf16", 129280, 4096), // head
    ] {
        let w = random_weight(kind, rows, cols, &mut r);
        let dw: (DevWeight, DevWeight) = (
            p.cpu.upload_weight(&w, Stream::COPY).expect("cpu upload"),
            g.upload_weight(&w, Stream::COPY).expect("gpu upload"),
        );
        for t in [1usize, 3, 64, 300] {
            if kind == "bf16" && t > 3 {
                continue; // the head runs at decode batch
            }
            let x: Vec<f32> = (0..t * cols).map(|_| r.uniform()).collect();
            let xb = p.f32(&x);
            let yb = p.zeros(4 * t * rows);
            let (a, b) = p.run(
                |gp| Op::Linear {
                    w: pick(gp, dw),
                    rows: 0..rows,
                    x: pick(gp, xb),
                    y: pick(gp, yb),
                    t,
                },
                yb,
                4 * t * rows,
            );
            let (a, b) = (bytes_f32(&a), bytes_f32(&b));
            // Scale: Σ|W·x| per output, from the CPU's own dequantization.
            let wabs = {
                let mut deq = vec![0f32; cols];
                let mut s = vec![0f32; t * rows];
                for row in 0..rows {
                    dsflash::backend::cpu::dequant_row(&w, row, &mut deq);
                    for tt in 0..t {
                        s[tt * rows + row] = deq
                            .iter()
                            .zip(&x[tt * cols..])
                            .map(|(u, v)| (u * v).abs())
                            .sum();
                    }
                }
                s
            };
            close(&a, &b, 1e-5, &wabs, &format!("{kind} {rows}x{cols} t={t}"));
            p.free(&[xb, yb]);
        }
        // A row range (as the grouped output projection uses).
        let x: Vec<f32> = (0..cols).map(|_| r.uniform()).collect();
        let xb = p.f32(&x);
        let yb = p.zeros(4 * 1024);
        let (a, b) = p.run(
            |gp| Op::Linear {
                w: pick(gp, dw),
                rows: 1024..2048,
                x: pick(gp, xb),
                y: pick(gp, yb),
                t: 1,
            },
            yb,
            4 * 1024,
        );
        let (a, b) = (bytes_f32(&a), bytes_f32(&b));
        let scale: Vec<f32> = a
            .iter()
            .map(|v| v.abs().max(1.0) * cols as f32 * 0.01)
            .collect();
        close(&a, &b, 1e-4, &scale, &format!("{kind} rows 1024..2048"));
        p.free(&[xb, yb]);
        p.cpu.free_weight(dw.0);
        g.free_weight(dw.1);
    }
}

#[test]
fn small_kernels_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let p = Pair {
        cpu: CpuDevice::new(),
        gpu: &g,
    };
    let mut r = SplitMix64::new(78);
    let rnd = |r: &mut SplitMix64, n: usize, s: f32| -> Vec<f32> {
        (0..n).map(|_| r.normal() * s).collect()
    };
    // RMSNorm over 64 rows of 4096, weighted and not.
    let (rows, n) = (64usize, 4096usize);
    let x = p.f32(&rnd(&mut r, rows * n, 3.0));
    let w = p.f32(&rnd(&mut r, n, 1.0));
    let y = p.zeros(4 * rows * n);
    for wopt in [Some(w), None] {
        let (a, b) = p.run(
            |gp| Op::RmsNorm {
                x: pick(gp, x),
                w: wopt.map(|w| pick(gp, w)),
                y: pick(gp, y),
                rows,
                n,
                eps: 1e-6,
            },
            y,
            4 * rows * n,
        );
        let (a, b) = (bytes_f32(&a), bytes_f32(&b));
        let s: Vec<f32> = a.iter().map(|v| v.abs().max(1e-3)).collect();
        close(&a, &b, 1e-5, &s, "rms_norm");
    }
    // SwiGLU with clamps (values past the limit on both sides) and per-row weights.
    let n = 4 * 2048;
    let (gv, uv) = (rnd(&mut r, n, 12.0), rnd(&mut r, n, 12.0));
    let (gb, ub) = (p.f32(&gv), p.f32(&uv));
    let rw = p.f32(&rnd(&mut r, 4, 1.0));
    let out = p.zeros(4 * n);
    let (a, b) = p.run(
        |gp| Op::Swiglu {
            g: pick(gp, gb),
            u: pick(gp, ub),
            row_w: Some(pick(gp, rw)),
            row_w_off: 0,
            out: pick(gp, out),
            n,
            width: 2048,
            limit: 10.0,
        },
        out,
        4 * n,
    );
    let (a, b) = (bytes_f32(&a), bytes_f32(&b));
    let s: Vec<f32> = a.iter().map(|v| v.abs().max(1e-3)).collect();
    close(&a, &b, 1e-5, &s, "swiglu");
    // RoPE: 64 heads of 512 with 64 rope dims at position 70000, forward and inverse.
    let (rows, width, rd) = (64usize, 512usize, 64usize);
    let inv: Vec<f32> = (0..rd / 2)
        .map(|j| 1.0 / 10000f32.powf(2.0 * j as f32 / rd as f32))
        .collect();
    let fb = p.f32(&inv);
    let xv = rnd(&mut r, rows * width, 1.0);
    for inverse in [false, true] {
        let xb = p.f32(&xv);
        let (a, b) = p.run(
            |gp| Op::Rope {
                x: pick(gp, xb),
                inv_freq: pick(gp, fb),
                rows,
                width,
                rope_dim: rd,
                pos: 70000,
                rows_per_pos: 16, // 4 tokens of 16 heads
                inverse,
            },
            xb,
            4 * rows * width,
        );
        let (a, b) = (bytes_f32(&a), bytes_f32(&b));
        close(&a, &b, 1e-5, &vec![4.0; a.len()], "rope");
        p.free(&[xb]);
    }
    // Routing: 256 experts, top 6, 5 tokens; by score + bias, and hash-routed.
    let (tokens, ne, k) = (5usize, 256usize, 6usize);
    let lb = p.f32(&rnd(&mut r, tokens * ne, 2.0));
    let bb = p.f32(&rnd(&mut r, ne, 0.1));
    let hashed: Vec<i32> = (0..tokens * k).map(|i| ((i * 37) % ne) as i32).collect();
    let hb = p.bytes(&i32b(&hashed));
    let (eb, wb) = (p.zeros(4 * tokens * k), p.zeros(4 * tokens * k));
    for hash in [false, true] {
        let op = |gp: bool| Op::RouteTopk {
            logits: pick(gp, lb),
            bias: Some(pick(gp, bb)),
            hashed: hash.then(|| pick(gp, hb)),
            tokens,
            n_experts: ne,
            k,
            scale: 1.5,
            experts: pick(gp, eb),
            weights: pick(gp, wb),
        };
        let (a, b) = p.run(op, eb, 4 * tokens * k);
        assert_eq!(
            bytes_i32(&a),
            bytes_i32(&b),
            "route_topk experts (hash {hash})"
        );
        if hash {
            assert_eq!(
                bytes_i32(&b),
                hashed,
                "hash routing keeps the given experts"
            );
        }
        let (mut c, mut d) = (vec![0u8; 4 * tokens * k], vec![0u8; 4 * tokens * k]);
        p.cpu.read(wb.0, &mut c, Stream::COMPUTE).expect("read");
        g.read(wb.1, &mut d, Stream::COMPUTE).expect("read");
        close(
            &bytes_f32(&c),
            &bytes_f32(&d),
            1e-6,
            &vec![1.0; tokens * k],
            "route_topk weights",
        );
    }
    // axpy: y += a x.
    let n = 4096usize;
    let (xa, ya) = (p.f32(&rnd(&mut r, n, 1.0)), p.f32(&rnd(&mut r, n, 1.0)));
    let (a, b) = p.run(
        |gp| Op::Axpy {
            y: pick(gp, ya),
            x: pick(gp, xa),
            a: 0.37,
            n,
        },
        ya,
        4 * n,
    );
    close(&bytes_f32(&a), &bytes_f32(&b), 1e-6, &vec![4.0; n], "axpy");
    // Argmax and softmax over the vocabulary.
    let v = 129280usize;
    let lv = rnd(&mut r, 2 * v, 5.0);
    let xb = p.f32(&lv);
    let ob = p.zeros(8);
    let (a, b) = p.run(
        |gp| Op::Argmax {
            x: pick(gp, xb),
            rows: 2,
            n: v,
            out: pick(gp, ob),
        },
        ob,
        8,
    );
    assert_eq!(bytes_i32(&a), bytes_i32(&b), "argmax");
    let (a, b) = p.run(
        |gp| Op::SoftmaxTemp {
            x: pick(gp, xb),
            rows: 2,
            n: v,
            temperature: 0.7,
        },
        xb,
        8 * v,
    );
    let (a, b) = (bytes_f32(&a), bytes_f32(&b));
    let s: Vec<f32> = a.iter().map(|v| v.max(1e-12)).collect();
    close(&a, &b, 1e-4, &s, "softmax_temp");
}

#[test]
fn attention_hyper_and_indexer_kernels_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let p = Pair {
        cpu: CpuDevice::new(),
        gpu: &g,
    };
    let mut r = SplitMix64::new(79);
    let rnd = |r: &mut SplitMix64, n: usize, s: f32| -> Vec<f32> {
        (0..n).map(|_| r.normal() * s).collect()
    };
    // Attention: 3 queries, 64 heads of 512, over subsets of a 640-row key table (128 window
    // + 512 compressed rows), different counts per query.
    let (t, heads, hd, table, max_keys) = (3usize, 64usize, 512usize, 640usize, 640usize);
    let q = p.f32(&rnd(&mut r, t * heads * hd, 1.0));
    let keys = p.f32(&rnd(&mut r, table * hd, 1.0));
    let sink = p.f32(&rnd(&mut r, heads, 1.0));
    let counts = [1i32, 200, 640];
    let mut idx = vec![0i32; t * max_keys];
    for (j, &c) in counts.iter().enumerate() {
        for i in 0..c as usize {
            idx[j * max_keys + i] = ((i * 7 + j * 13) % table) as i32;
        }
    }
    let (ib, nb) = (p.bytes(&i32b(&idx)), p.bytes(&i32b(&counts)));
    let out = p.zeros(4 * t * heads * hd);
    let (a, b) = p.run(
        |gp| Op::AttendSink {
            q: pick(gp, q),
            keys: pick(gp, keys),
            idx: pick(gp, ib),
            n_keys: pick(gp, nb),
            max_keys,
            sink: pick(gp, sink),
            scale: 1.0 / (hd as f32).sqrt(),
            out: pick(gp, out),
            t,
            heads,
            hd,
        },
        out,
        4 * t * heads * hd,
    );
    let (a, b) = (bytes_f32(&a), bytes_f32(&b));
    close(&a, &b, 1e-4, &vec![1.0; a.len()], "attend_sink");
    // mHC: hc 4, D 4096, 3 tokens, 20 Sinkhorn iterations; then collapse and expand with the
    // coefficients, and the head weights.
    let (t, hc, d) = (3usize, 4usize, 4096usize);
    let mix = 2 * hc + hc * hc;
    let x = p.f32(&rnd(&mut r, t * hc * d, 1.0));
    let fnb = p.f32(&rnd(&mut r, mix * hc * d, 0.01));
    let base = p.f32(&rnd(&mut r, mix, 0.5));
    let coef = p.zeros(4 * t * mix);
    let (a, b) = p.run(
        |gp| Op::HcMix {
            x: pick(gp, x),
            fn_: pick(gp, fnb),
            base: pick(gp, base),
            scale: [0.5, 0.7, 1.3],
            out: pick(gp, coef),
            t,
            hc,
            d,
            iters: 20,
            norm_eps: 1e-6,
            hc_eps: 1e-6,
        },
        coef,
        4 * t * mix,
    );
    close(
        &bytes_f32(&a),
        &bytes_f32(&b),
        1e-4,
        &vec![1.0; t * mix],
        "hc_mix",
    );
    let u = p.zeros(4 * t * d);
    let (a, b) = p.run(
        |gp| Op::HcCollapse {
            x: pick(gp, x),
            coef: pick(gp, coef),
            stride: mix,
            u: pick(gp, u),
            t,
            hc,
            d,
        },
        u,
        4 * t * d,
    );
    close(
        &bytes_f32(&a),
        &bytes_f32(&b),
        1e-4,
        &vec![4.0; t * d],
        "hc_collapse",
    );
    let f = p.f32(&rnd(&mut r, t * d, 1.0));
    let (a, b) = p.run(
        |gp| Op::HcExpand {
            x: pick(gp, x),
            f: pick(gp, f),
            coef: pick(gp, coef),
            t,
            hc,
            d,
        },
        x,
        4 * t * hc * d,
    );
    close(
        &bytes_f32(&a),
        &bytes_f32(&b),
        1e-4,
        &vec![4.0; t * hc * d],
        "hc_expand",
    );
    let hfn = p.f32(&rnd(&mut r, hc * hc * d, 0.01));
    let hbase = p.f32(&rnd(&mut r, hc, 0.5));
    let hw = p.zeros(4 * t * hc);
    let (a, b) = p.run(
        |gp| Op::HcHead {
            x: pick(gp, x),
            fn_: pick(gp, hfn),
            base: pick(gp, hbase),
            scale: 0.9,
            out: pick(gp, hw),
            t,
            hc,
            d,
            norm_eps: 1e-6,
            hc_eps: 1e-6,
        },
        hw,
        4 * t * hc,
    );
    close(
        &bytes_f32(&a),
        &bytes_f32(&b),
        1e-5,
        &vec![1.0; t * hc],
        "hc_head",
    );
    // Indexer: 8192 compressed rows, 64 heads of 128; then the top 512 (with ties planted).
    let (n, ih, ihd, k) = (8192usize, 64usize, 128usize, 512usize);
    let iq = p.f32(&rnd(&mut r, ih * ihd, 1.0));
    let iw = p.f32(&rnd(&mut r, ih, 0.1));
    let ik = p.f32(&rnd(&mut r, n * ihd, 1.0));
    let sc = p.zeros(4 * n);
    let (a, b) = p.run(
        |gp| Op::IndexerScores {
            q: pick(gp, iq),
            w: pick(gp, iw),
            keys: pick(gp, ik),
            out: pick(gp, sc),
            n,
            ih,
            ihd,
        },
        sc,
        4 * n,
    );
    let (a, b) = (bytes_f32(&a), bytes_f32(&b));
    let scale: Vec<f32> = a.iter().map(|v| v.abs().max(1.0) * 10.0).collect();
    close(&a, &b, 1e-5, &scale, "indexer_scores");
    // Compressor pooling: 5 windows of ratio 4, 512 channels of a 1024-wide (overlapping) row.
    let (windows, rr, dd, cd) = (5usize, 4usize, 512usize, 1024usize);
    let kv = p.f32(&rnd(&mut r, windows * rr * cd, 1.0));
    let gate = p.f32(&rnd(&mut r, windows * rr * cd, 2.0));
    let pkv = p.f32(&rnd(&mut r, windows * rr * dd, 1.0));
    let pg = p.f32(&rnd(&mut r, windows * rr * dd, 2.0));
    let po = p.zeros(4 * windows * dd);
    for with_prev in [true, false] {
        let (a, b) = p.run(
            |gp| Op::CompressPool {
                kv: pick(gp, kv),
                gate: pick(gp, gate),
                prev_kv: with_prev.then(|| pick(gp, pkv)),
                prev_gate: with_prev.then(|| pick(gp, pg)),
                out: pick(gp, po),
                windows,
                r: rr,
                d: dd,
                cd,
                off: dd,
            },
            po,
            4 * windows * dd,
        );
        close(
            &bytes_f32(&a),
            &bytes_f32(&b),
            1e-5,
            &vec![4.0; windows * dd],
            "compress_pool",
        );
    }
    // The reference numerics' roundings: E4M3 per 128 (GEMM inputs) and per 64 over the
    // first 448 of 512 values (KV rows); Hadamard + E2M1 over 128-wide indexer rows.
    let xs = rnd(&mut r, 64 * 512, 3.0);
    for (len, block) in [(512usize, 128usize), (448, 64)] {
        let xb = p.f32(&xs);
        let (a, b) = p.run(
            |gp| Op::QuantE4m3 {
                x: pick(gp, xb),
                rows: 64,
                width: 512,
                len,
                block,
            },
            xb,
            4 * 64 * 512,
        );
        close(
            &bytes_f32(&a),
            &bytes_f32(&b),
            1e-6,
            &vec![448.0; 64 * 512],
            "quant_e4m3",
        );
    }
    // The fast numerics' int8 grid per 32 values (with tiny and huge blocks): bit for bit.
    let mut xi = xs.clone();
    xi[..32].iter_mut().for_each(|v| *v *= 1e-39); // subnormal block
    xi[32..64].iter_mut().for_each(|v| *v *= 1e30);
    let xb = p.f32(&xi);
    let (qa, qb) = p.run(
        |gp| Op::QuantI8 {
            x: pick(gp, xb),
            rows: 64,
            width: 512,
            len: 512,
            block: 32,
        },
        xb,
        4 * 64 * 512,
    );
    assert_eq!(qa, qb, "quant_i8");
    let hb = p.f32(&xs[..64 * 128]);
    let (ha, hb2) = p.run(
        |gp| Op::HadamardE2m1 {
            x: pick(gp, hb),
            rows: 64,
            n: 128,
        },
        hb,
        4 * 64 * 128,
    );
    close(
        &bytes_f32(&ha),
        &bytes_f32(&hb2),
        1e-5,
        &vec![6.0; 64 * 128],
        "hadamard_e2m1",
    );
    let mut tied = a.clone();
    for i in (0..n).step_by(3) {
        tied[i] = tied[0]; // many equal scores around the boundary
    }
    tied[5] = f32::NAN;
    let tb = p.f32(&tied);
    let ob = p.zeros(4 * k);
    let (a, b) = p.run(
        |gp| Op::TopkSelect {
            scores: pick(gp, tb),
            n,
            k,
            out: pick(gp, ob),
        },
        ob,
        4 * k,
    );
    assert_eq!(bytes_i32(&a), bytes_i32(&b), "topk_select");
}

#[test]
fn row_copy_gather_and_add_kernels_match_the_cpu_exactly() {
    let Some(g) = gpu() else { return };
    let p = Pair {
        cpu: CpuDevice::new(),
        gpu: &g,
    };
    let mut r = SplitMix64::new(91);
    let (t, groups, w) = (5usize, 8usize, 2048usize);
    let x = p.f32(&(0..t * groups * w).map(|_| r.normal()).collect::<Vec<_>>());
    // Group 3's columns of [t, groups·w] into columns 3w.. of a second [t, groups·w].
    let out = p.zeros(4 * t * groups * w);
    let (a, b) = p.run(
        |gp| Op::CopyRows {
            src: pick(gp, x),
            src_off: 3 * w,
            src_stride: groups * w,
            dst: pick(gp, out),
            dst_off: 3 * w,
            dst_stride: groups * w,
            rows: t,
            width: w,
        },
        out,
        4 * t * groups * w,
    );
    assert_eq!(a, b, "copy_rows");
    // Rows 4, 0, 4, 2 of [t·groups, w]; then added back with weights, repeats in order.
    let ids = [4i32, 0, 4, 2];
    let ib = p.bytes(&i32b(&ids));
    let gath = p.zeros(4 * ids.len() * w);
    let (a, b) = p.run(
        |gp| Op::GatherRows {
            x: pick(gp, x),
            idx: pick(gp, ib),
            out: pick(gp, gath),
            n: ids.len(),
            width: w,
        },
        gath,
        4 * ids.len() * w,
    );
    assert_eq!(a, b, "gather_rows");
    let wts = p.f32(&[9.0, 0.25, -1.5, 3.0, 0.75]);
    let y = p.f32(&(0..t * w).map(|_| r.normal()).collect::<Vec<_>>());
    let (a, b) = p.run(
        |gp| Op::AddRows {
            y: pick(gp, y),
            x: pick(gp, x),
            x_off: w,
            idx: Some(pick(gp, ib)),
            weights: Some(pick(gp, wts)),
            w_off: 1,
            n: ids.len(),
            width: w,
        },
        y,
        4 * t * w,
    );
    assert_eq!(a, b, "add_rows: the same adds in the same order");
}

#[test]
fn tiny_checkpoints_fully_on_the_gpu_match_the_goldens() {
    let Some(g) = gpu() else { return };
    for (dir, goldens_file) in [
        ("tiny", "tiny/goldens.safetensors"),
        ("tiny-b", "tiny-b/goldens.safetensors"),
        ("tiny-c", "tiny-c/goldens.safetensors"),
    ] {
        let mut e = Engine::open(&fixture(dir), Numerics::Ideal).expect("open");
        let p = e.use_device(g.clone()).expect("placement");
        assert_eq!(
            p.resident, p.total,
            "{dir}: the whole model fits on the card"
        );
        let v = e.cfg.vocab_size;
        for gd in goldens(&fixture(goldens_file)) {
            for chunk in [1usize << 20, 64] {
                let mut s = Session::new(&e, 1 << 20, chunk);
                let logits = s.prefill(&gd.input_ids, Want::All).expect("prefill");
                let (err, at) = max_rel_err(&logits, &gd.prefill_logits, v);
                assert!(
                    err <= 1e-4,
                    "{dir} {} chunk {chunk}: {err:.2e} at {at}",
                    gd.name
                );
                let mut last = logits[logits.len() - v..].to_vec();
                let mut toks = Vec::new();
                for k in 0..gd.greedy_tokens.len() {
                    let tok = argmax(&last);
                    toks.push(tok);
                    if k + 1 < gd.greedy_tokens.len() {
                        last = s.decode_step(tok).expect("decode");
                    }
                }
                assert_eq!(
                    toks, gd.greedy_tokens,
                    "{dir} {} greedy on the GPU",
                    gd.name
                );
            }
        }
        let st = g.stats();
        assert!(st.launches > 0, "{dir}: kernels ran on the GPU");
    }
}

/// Hybrid placement on the GPU: dense part resident (attention over the device's KV
/// tables), routed experts through the adaptive cache at 0, 2 and all slots; the goldens
/// hold, decode included, and a rewind is followed correctly.
#[test]
fn tiny_hybrid_on_the_gpu_matches_the_goldens() {
    use dsflash::engine::{ExpertPolicy, HybridOptions};
    let Some(g) = gpu() else { return };
    let gd = goldens(&fixture("tiny/goldens.safetensors"))
        .into_iter()
        .max_by_key(|gd| gd.input_ids.len())
        .expect("a golden prompt");
    for slots in [0usize, 2, 8] {
        let mut e = Engine::open(&fixture("tiny"), Numerics::Ideal).expect("open");
        e.use_device_hybrid(
            g.clone(),
            HybridOptions {
                policy: ExpertPolicy::Adaptive(None),
                slots: Some(slots),
                budget: None,
                ctx: Some(4096),
                chunk: 64,
            },
        )
        .expect("placement");
        assert!(e.exec.whole_model(), "dense part resident");
        let v = e.cfg.vocab_size;
        let mut s = Session::new(&e, 1 << 20, 64);
        let logits = s.prefill(&gd.input_ids, Want::All).expect("prefill");
        let (err, at) = max_rel_err(&logits, &gd.prefill_logits, v);
        assert!(err <= 1e-4, "{slots} slots: {err:.2e} at {at}");
        let mark = s.mark();
        let mut last = logits[logits.len() - v..].to_vec();
        let mut toks = Vec::new();
        for k in 0..gd.greedy_tokens.len() {
            toks.push(argmax(&last));
            if k + 1 < gd.greedy_tokens.len() {
                last = s.decode_step(toks[k]).expect("decode");
            }
        }
        assert_eq!(toks, gd.greedy_tokens, "{slots} slots: greedy");
        // Rewind and decode the same tokens again: the same logits.
        assert!(s.rewind(&mark));
        let again = s.decode_step(toks[0]).expect("decode");
        let mut s2 = Session::new(&e, 1 << 20, 64);
        s2.prefill(&gd.input_ids, Want::None).expect("prefill");
        let want = s2.decode_step(toks[0]).expect("decode");
        let (err, _) = max_rel_err(&again, &want, v);
        assert!(err <= 1e-5, "{slots} slots: after a rewind {err:.2e}");
        // Every step ran on the GPU (none given up to the host), and its copy and kernel
        // time was measured with events.
        assert_eq!(e.exec.timing.redone_steps(), 0, "{slots} slots");
        let st = g.stats();
        assert!(st.copy_s > 0.0 && st.kernel_s > 0.0, "{st:?}");
    }
}
