//! `--numerics reference` against DeepSeek's own inference/model.py run on CPU in fp32 with its
//! QAT roundings (goldens by scripts/make_reference_goldens.py).
//!
//! The established tolerance: QAT numerics are discontinuous (FP8/FP4 rounding), so float-order
//! noise flips single roundings and the flip propagates. Measured on the official code itself:
//! computing only its GEMM accumulations in f64 instead of f32 moves its own 500-token logits by
//! median 2.9e-2, max 0.65 (first position beyond 1e-4: 25). So we require
//! (a) agreement to 1e-5 before any rounding can have flipped: the first 24 positions of every
//!     prompt (all of the 1- to 6-token ones). Every QAT site but the indexer's FP4 (which only
//!     matters once selection bites) is exercised there: FP8 GEMM inputs, FP8 window KV, FP8
//!     CSA rows. Measured: the first position beyond 1e-5 is 53 for the 131-token prompt and 25
//!     for the 500-token one, the very position where the official code diverges from itself
//!     under the f64 perturbation above;
//! (b) over whole prompts, a median per-position error <= 0.1, at least 4x below the ideal
//!     numerics' distance to the same reference, and argmax agreement >= 80 %.
//!
//! (a) holds for one order of the fp32 sums (the fp32 kernels'), so that check pins it: the
//! bf16 dot-product kernels sum in another order (products exact, sums within an ulp), which
//! on the 500-token prompt flips a rounding at position 7 instead of 25 — the same noise the
//! official code shows under its own perturbation. (b) runs on whatever kernels the CPU picks.

mod common;
use common::*;
use dsflash::backend::cpu::Kernels;
use dsflash::engine::{Engine, Numerics, Session, Want};

struct Stats {
    errs: Vec<f32>,
    agree: f32,
}

fn compare(num: Numerics, k: Kernels, gold: &str, qat: &str) -> Vec<(String, Stats)> {
    let off = read_safetensors(&fixture(qat));
    let mut e = Engine::open(&fixture("tiny"), num).unwrap();
    e.set_kernels(k);
    let v = e.cfg.vocab_size;
    goldens(&fixture(gold))
        .into_iter()
        .map(|g| {
            let want = as_f32(&off[&format!("{}.prefill_logits", g.name)].2);
            let mut s = Session::new(&e, 1 << 20, 64);
            let l = s.prefill(&g.input_ids, Want::All).unwrap();
            let errs: Vec<f32> = l
                .chunks(v)
                .zip(want.chunks(v))
                .map(|(a, b)| max_rel_err(a, b, v).0)
                .collect();
            let agree = l
                .chunks(v)
                .zip(want.chunks(v))
                .filter(|(a, b)| argmax(a) == argmax(b))
                .count() as f32
                / errs.len() as f32;
            (g.name, Stats { errs, agree })
        })
        .collect()
}

fn median(v: &[f32]) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

#[test]
fn reference_matches_official_code_until_a_rounding_flips() {
    for (gold, qat) in [
        (
            "tiny/goldens.safetensors",
            "goldens/tiny-official-qat.safetensors",
        ),
        (
            "goldens/tiny-a.safetensors",
            "goldens/tiny-a-official-qat.safetensors",
        ),
    ] {
        // The fp32 kernels: one summation order, as the official code's CPU run has.
        for (name, st) in compare(Numerics::Reference, Kernels::Fp32, gold, qat) {
            let n = st.errs.len().min(24);
            let worst = st.errs[..n].iter().fold(0f32, |m, &e| m.max(e));
            assert!(
                worst <= 1e-5,
                "{gold} {name}: first {n} positions rel err {worst:.2e}"
            );
        }
    }
}

#[test]
fn reference_is_much_closer_to_official_than_ideal() {
    let gold = "goldens/tiny-a.safetensors";
    let qat = "goldens/tiny-a-official-qat.safetensors";
    let r = compare(Numerics::Reference, Kernels::Any, gold, qat);
    let i = compare(Numerics::Ideal, Kernels::Any, gold, qat);
    for ((name, rs), (_, is)) in r.iter().zip(&i) {
        if rs.errs.len() < 100 {
            continue;
        }
        let (mr, mi) = (median(&rs.errs), median(&is.errs));
        assert!(mr <= 0.1, "{name}: reference median {mr:.2e}");
        assert!(
            mr * 4.0 <= mi,
            "{name}: reference median {mr:.2e} vs ideal {mi:.2e}"
        );
        assert!(rs.agree >= 0.8, "{name}: argmax agreement {:.2}", rs.agree);
    }
}
