//! `dsflash bench`'s prefill at long contexts: a session stands for n tokens of context by
//! rows of random values (`Session::fill_context_for_bench`). It must hold what n computed
//! tokens leave (so a following chunk does the same work), and the section clock must count
//! that chunk.

mod common;
use common::*;
use dsflash::engine::{Engine, Numerics, Session, Want};

#[test]
fn a_filled_context_holds_what_a_prefilled_one_does_and_takes_a_chunk() {
    let mut e = Engine::open(&fixture("tiny"), Numerics::Reference).unwrap();
    let vocab = e.cfg.vocab_size as u32;
    let n = 512; // a multiple of every compression ratio of the tiny model (4 and 128)
    let ids: Vec<u32> = (0..n as u32 + 16)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let mut computed = Session::new(&e, 1024, 128);
    computed.prefill(&ids[..n], Want::None).unwrap();
    let mut filled = Session::new(&e, 1024, 128);
    filled.fill_context_for_bench(n, 5);
    assert_eq!(filled.len(), n);
    assert_eq!(filled.state_bytes(), computed.state_bytes());
    drop((computed, filled));

    e.time_sections(true);
    let mut filled = Session::new(&e, 1024, 128);
    filled.fill_context_for_bench(n, 5);
    let logits = filled.prefill(&ids[n..], Want::Last).unwrap();
    assert_eq!(logits.len(), vocab as usize);
    assert!(logits.iter().all(|v| v.is_finite()));
    let t = e.section_times();
    let secs: std::collections::HashMap<_, _> = t.secs.into_iter().collect();
    for s in ["mhc", "attention core", "moe", "head"] {
        assert!(secs[s] > 0.0, "{s}: {secs:?}");
    }
    // 16 tokens, k routed experts each, per MoE layer: 16·k selections on at most all n
    // experts and at least k of them, so between 16·k/n and 16 tokens per expert.
    let (k, ne) = (
        e.cfg.num_experts_per_tok as f64,
        e.cfg.n_routed_experts as f64,
    );
    let tpe = t.tokens_per_expert;
    assert!(16.0 * k / ne <= tpe && tpe <= 16.0, "{tpe}");
}
