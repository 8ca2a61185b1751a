//! The forward pass against the oracle (transformers, fp32, dequantized weights): every
//! position of every prompt, greedy continuations, and chunked prefill at chunk sizes 1
//! (pure token-by-token decode), 3, 64 and 128, on four fixtures:
//!
//! | fixture | shape | prompts (greedy) |
//! |---|---|---|
//! | tiny   | D 256, 4 heads, 8 experts top-2, [sliding, CSA, HCA, CSA, HCA], topk 16 | 6, 131, 500 (16) |
//! | tiny + goldens/tiny-a | same weights | 1, 5, 131, 640 (32) |
//! | tiny-b | D 384, 6 heads / 3 groups, 16 experts top-4, [CSA, sliding, HCA, CSA, CSA, HCA], 1 hash layer, topk 8 | 1, 5, 131, 700 (32) |
//! | tiny-c | head_dim 256, 8 heads / 4 groups, window 64, 12 experts top-3, 3 hash layers, index_head_dim 64, topk 24 | 1, 5, 131, 600 (32) |
//!
//! Error measure (per position): max_j |Δlogit_j| / max_j |golden_j| <= 1e-4 ("ideal" numerics).
//! The long prompts have more compressed rows than index_topk, so the indexer really selects.

mod common;
use common::*;
use dsflash::engine::{Engine, Numerics, Session, Want};
use std::path::Path;

const TOL: f32 = 1e-4;

fn engine(dir: &str) -> Engine {
    Engine::open(&fixture(dir), Numerics::Ideal).expect("open fixture")
}

/// Prefill `g` with `chunk`, compare every position, then decode greedily and compare the
/// tokens and step logits.
fn check(e: &Engine, g: &Golden, chunk: usize, what: &str) {
    let v = e.cfg.vocab_size;
    let mut s = Session::new(e, 1 << 20, chunk);
    let logits = s.prefill(&g.input_ids, Want::All).unwrap();
    let (err, at) = max_rel_err(&logits, &g.prefill_logits, v);
    assert!(
        err <= TOL,
        "{what} {} chunk {chunk}: prefill logits rel err {err:.2e} at position {at}",
        g.name
    );
    let n = g.greedy_tokens.len();
    let mut last = logits[logits.len() - v..].to_vec();
    let mut toks = Vec::new();
    for k in 0..n {
        let (err, _) = max_rel_err(&last, &g.greedy_step_logits[k * v..(k + 1) * v], v);
        assert!(
            err <= TOL,
            "{what} {} chunk {chunk}: step {k} logits rel err {err:.2e}",
            g.name
        );
        let tok = argmax(&last);
        toks.push(tok);
        if k + 1 < n {
            last = s.decode_step(tok).unwrap();
        }
    }
    assert_eq!(
        toks, g.greedy_tokens,
        "{what} {} chunk {chunk}: greedy continuation",
        g.name
    );
}

fn check_all(dir: &str, goldens_file: &Path, chunks: &[usize]) {
    let e = engine(dir);
    for g in goldens(goldens_file) {
        for &c in chunks {
            check(&e, &g, c, dir);
        }
    }
}

const ONE_SHOT: usize = 1 << 20;

#[test]
fn tiny_one_shot_prefill_and_greedy() {
    check_all("tiny", &fixture("tiny/goldens.safetensors"), &[ONE_SHOT]);
}

#[test]
fn tiny_a_one_shot_prefill_and_greedy_32() {
    check_all("tiny", &fixture("goldens/tiny-a.safetensors"), &[ONE_SHOT]);
}

#[test]
fn tiny_a_chunked_prefill_1_3_64_128() {
    check_all(
        "tiny",
        &fixture("goldens/tiny-a.safetensors"),
        &[1, 3, 64, 128],
    );
}

#[test]
fn tiny_b_one_shot_prefill_and_greedy_32() {
    check_all(
        "tiny-b",
        &fixture("tiny-b/goldens.safetensors"),
        &[ONE_SHOT],
    );
}

#[test]
fn tiny_b_chunked_prefill_1_3_64_128() {
    check_all(
        "tiny-b",
        &fixture("tiny-b/goldens.safetensors"),
        &[1, 3, 64, 128],
    );
}

#[test]
fn tiny_c_one_shot_prefill_and_greedy_32() {
    check_all(
        "tiny-c",
        &fixture("tiny-c/goldens.safetensors"),
        &[ONE_SHOT],
    );
}

#[test]
fn tiny_c_chunked_prefill_1_3_64_128() {
    check_all(
        "tiny-c",
        &fixture("tiny-c/goldens.safetensors"),
        &[1, 3, 64, 128],
    );
}

#[test]
fn tiny_chunked_prefill_odd_sizes() {
    // Chunk boundaries that split ratio-4 windows and the 128-window in every way.
    check_all("tiny", &fixture("tiny/goldens.safetensors"), &[5, 37, 129]);
}
