//! The expert cache's policies by hand and on synthetic traces (`backend::expert_cache`):
//! hit rates against hand-counted sequences and against Belady's offline optimum.

mod common;
use common::traces::{belady, hit_rate, skewed_trace};
use dsflash::backend::expert_cache::{
    Access, Adaptive, Lru, Policy, StaticFrequency, Trace, expert_popularity,
};

fn trace(layer_experts: &[(u16, u16)]) -> Trace {
    Trace {
        layers: 2,
        experts: 8,
        accesses: layer_experts
            .iter()
            .map(|&(layer, expert)| Access { layer, expert })
            .collect(),
    }
}

#[test]
fn policies_by_hand() {
    // Layer 0 only: A B C A B D A with 2 slots.
    let t = trace(&[(0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 3), (0, 0)]);
    // LRU: every access misses except none: A B C(evict A) A(evict B) B(evict C) D(evict A)
    // A(evict B) -> 0 hits.
    assert_eq!(hit_rate(&mut Lru::new(2, 2), &t), 0.0);
    // Belady: A B, C is used never again -> not admitted; A hit, B hit; D never again ->
    // not admitted; A hit: 3 hits.
    assert_eq!(belady(&t, 2), 3);
    // Static from the trace's own counts: A (3) and B (2) resident -> every A and B hits.
    let mut s = StaticFrequency::from_counts(&t.counts(), 2);
    assert_eq!(hit_rate(&mut s, &t), 5.0 / 7.0);
    assert_eq!(s.resident(0), vec![0, 1]);
    // Adaptive, where counts differ: A A B B C A B D A with 2 slots. A and B fill the
    // slots and reach count 2; C and D (count 1) are not admitted: hits at A2 B2 A B A.
    let t3 = trace(&[
        (0, 0),
        (0, 0),
        (0, 1),
        (0, 1),
        (0, 2),
        (0, 0),
        (0, 1),
        (0, 3),
        (0, 0),
    ]);
    assert_eq!(hit_rate(&mut Adaptive::new(2, 8, 2, 1e9), &t3), 5.0 / 9.0);
    // LRU lets C and D flush the hot pair: only A2 and B2 hit.
    assert_eq!(hit_rate(&mut Lru::new(2, 2), &t3), 2.0 / 9.0);
    assert_eq!(belady(&t3, 2), 5);
    // Layers are independent: the same expert id on another layer is another slot.
    let t2 = trace(&[(0, 5), (1, 5), (0, 5), (1, 5)]);
    assert_eq!(hit_rate(&mut Lru::new(2, 1), &t2), 0.5);
    assert_eq!(belady(&t2, 1), 2);
}

#[test]
fn rebalancing_moves_idle_slots_to_the_layer_that_needs_them() {
    // Layer 0 cycles through 3 experts, layer 1 only ever uses expert 0; 2 slots each.
    let mut acc = Vec::new();
    for i in 0..60u16 {
        acc.push((0, i % 3));
        acc.push((1, 0));
    }
    let t = trace(&acc);
    let mut fixed = Adaptive::new(2, 8, 2, 1e9);
    let mut moved = Adaptive::new(2, 8, 2, 1e9).with_rebalancing(8);
    let (hf, hm) = (hit_rate(&mut fixed, &t), hit_rate(&mut moved, &t));
    // Layer 1's idle slot went to layer 0 (layer 1 keeps its floor of 1).
    assert_eq!(moved.slots(), &[3, 1]);
    assert_eq!(fixed.slots(), &[2, 2]);
    // Fixed: layer 0 hits at most 2 of every 3 after warm-up; moved: all of them.
    assert!(hm > hf, "{hm} vs {hf}");
    assert!(hm > 0.9, "{hm}");
}

#[test]
fn zero_and_full_capacity() {
    let pop = expert_popularity(64);
    let t = skewed_trace(&pop, 3, 4, 500, 2, 1);
    let distinct = {
        let mut s = std::collections::HashSet::new();
        t.accesses.iter().for_each(|a| {
            s.insert(*a);
        });
        s.len() as u64
    };
    let n = t.accesses.len() as u64;
    assert_eq!(belady(&t, 0), 0);
    assert_eq!(hit_rate(&mut Lru::new(3, 0), &t), 0.0);
    assert_eq!(hit_rate(&mut Adaptive::new(3, 64, 0, 100.0), &t), 0.0);
    // Room for every expert: only the first use of each misses.
    let full = (n - distinct) as f64 / n as f64;
    assert_eq!(belady(&t, 64), n - distinct);
    assert_eq!(hit_rate(&mut Lru::new(3, 64), &t), full);
    assert_eq!(hit_rate(&mut Adaptive::new(3, 64, 64, 100.0), &t), full);
    let mut s = StaticFrequency::from_counts(&t.counts(), 64);
    assert_eq!(hit_rate(&mut s, &t), 1.0);
}

#[test]
fn synthetic_trace_has_the_measured_skew() {
    let pop = expert_popularity(256);
    let t = skewed_trace(&pop, 4, 6, 4000, 1, 7);
    let share = t.top_share(0.125);
    assert!((share - 0.58).abs() < 0.03, "top 12.5 % take {share:.3}");
    // Every token selects k distinct experts per layer.
    for tok in t.accesses.chunks(4 * 6) {
        for layer in tok.chunks(6) {
            let mut e: Vec<u16> = layer.iter().map(|a| a.expert).collect();
            e.sort_unstable();
            e.dedup();
            assert_eq!(e.len(), 6);
        }
    }
}
