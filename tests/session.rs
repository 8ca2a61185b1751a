//! The Session API: reset, truncate-to-N, the context cap, and a KV state that grows in
//! blocks with the sequence.

mod common;
use common::*;
use dsflash::engine::{Engine, Numerics, Session, SessionError, Want};

fn long() -> Golden {
    goldens(&fixture("tiny/goldens.safetensors"))
        .into_iter()
        .find(|g| g.name == "long")
        .unwrap()
}

#[test]
fn truncate_then_continue_matches_the_oracle() {
    let e = Engine::open(&fixture("tiny"), Numerics::Ideal).unwrap();
    let g = long();
    let v = e.cfg.vocab_size;
    let mut s = Session::new(&e, 4096, 64);
    // Feed a wrong tail, cut it off, then feed the real rest.
    s.prefill(&g.input_ids[..300], Want::None).unwrap();
    s.prefill(&[7, 7, 7, 7, 7, 7, 7], Want::None).unwrap();
    s.truncate(300);
    assert_eq!(s.len(), 300);
    assert_eq!(s.tokens(), &g.input_ids[..300]);
    let l = s.prefill(&g.input_ids[300..], Want::All).unwrap();
    let (err, _) = max_rel_err(&l, &g.prefill_logits[300 * v..], v);
    assert!(err <= 1e-4, "{err:.2e}");
}

#[test]
fn reset_starts_over() {
    let e = Engine::open(&fixture("tiny"), Numerics::Ideal).unwrap();
    let g = long();
    let v = e.cfg.vocab_size;
    let mut s = Session::new(&e, 4096, 128);
    s.prefill(&g.input_ids[..200], Want::None).unwrap();
    s.reset();
    assert!(s.is_empty());
    let l = s.prefill(&g.input_ids[..10], Want::All).unwrap();
    assert!(max_rel_err(&l, &g.prefill_logits[..10 * v], v).0 <= 1e-4);
}

#[test]
fn context_cap_refuses_before_compute_and_keeps_state() {
    let e = Engine::open(&fixture("tiny"), Numerics::Ideal).unwrap();
    let mut s = Session::new(&e, 8, 4);
    s.prefill(&[0, 5, 9, 11, 3], Want::None).unwrap();
    let err = s.prefill(&[1, 2, 3, 4], Want::Last).unwrap_err();
    assert_eq!(
        err,
        SessionError::ContextFull {
            needed: 9,
            used: 5,
            ctx: 8
        }
    );
    assert_eq!(s.len(), 5, "nothing was consumed");
    assert_eq!(
        s.decode_step(2000).unwrap_err(),
        SessionError::BadToken {
            id: 2000,
            vocab: 1024
        }
    );
    assert!(s.decode_step(4).is_ok());
}

#[test]
fn kv_state_grows_in_blocks_not_up_front() {
    let e = Engine::open(&fixture("tiny"), Numerics::Ideal).unwrap();
    let g = long();
    // A session capped at the model's full context allocates only what it holds.
    let mut s = Session::new(&e, e.cfg.max_position_embeddings, 2048);
    let empty = s.state_bytes();
    s.prefill(&g.input_ids[..8], Want::None).unwrap();
    let small = s.state_bytes();
    s.prefill(&g.input_ids[8..], Want::None).unwrap();
    let big = s.state_bytes();
    // Fixed part: 5 window rings of 128 x 512 f32 plus compressor carry-over; the growing part
    // comes in blocks of 256 rows (500 tokens: one block per compressor), far below what a
    // 1M-token allocation would take (~280 MB on this model).
    assert!(small > empty, "first rows allocate a block");
    assert!(big < 8 << 20, "state for 500 tokens is {big} bytes");
    assert!(big >= small);
}

#[test]
fn rewind_to_a_mark_matches_the_oracle() {
    // Mark mid-window (position 301: a partly filled ratio-4 window, HCA carry-over of 45
    // tokens), wander off for 150 tokens (new compressed rows, the ring overwritten), rewind,
    // continue with the real prompt.
    let e = Engine::open(&fixture("tiny"), Numerics::Ideal).unwrap();
    let g = long();
    let v = e.cfg.vocab_size;
    let mut s = Session::new(&e, 4096, 64);
    s.prefill(&g.input_ids[..301], Want::None).unwrap();
    let m = s.mark();
    assert_eq!(m.len(), 301);
    let detour: Vec<u32> = (0..150).map(|i| (i * 37 % 1000) as u32).collect();
    s.prefill(&detour, Want::None).unwrap();
    assert!(s.rewind(&m));
    assert_eq!(s.len(), 301);
    let l = s.prefill(&g.input_ids[301..], Want::All).unwrap();
    let (err, _) = max_rel_err(&l, &g.prefill_logits[301 * v..], v);
    assert!(err <= 1e-4, "{err:.2e}");
    // A mark from beyond the current position is refused.
    let mut t = Session::new(&e, 4096, 64);
    assert!(!t.rewind(&m));
}
