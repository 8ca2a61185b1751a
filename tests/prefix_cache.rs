//! The prompt cache on disk (engine level): a state saved at a step boundary and restored
//! for another prompt that starts with the same tokens gives the logits a fresh prefill of
//! that prompt in the same steps gives, bit for bit (the steps decide the bits: another
//! split of a prefill may flip one rounding, see docs/PROMPT_CACHE.md). Checked in every
//! numerics, on the goldens' three models, for restored prefixes ending inside and past the
//! window, on and between the ratio-4 and ratio-128 boundaries, on and off the chunk grid,
//! and on the simulated device. Damaged files are refused, never used.

mod common;
use common::*;
use dsflash::backend::device::Device;
use dsflash::backend::sim::{SimCost, SimDevice};
use dsflash::engine::session::plan_steps;
use dsflash::engine::{Engine, ExpertPolicy, HybridOptions, Numerics, Session, Want};
use dsflash::prefix_cache::PrefixCache;
use std::path::Path;
use std::sync::Arc;

/// The first `n` tokens of a fixture's longest golden prompt.
fn prompt(dir: &str, n: usize) -> Vec<u32> {
    let g = goldens(&fixture(&format!("{dir}/goldens.safetensors")))
        .into_iter()
        .max_by_key(|g| g.input_ids.len())
        .expect("goldens");
    assert!(g.input_ids.len() >= n, "{dir}: golden prompt too short");
    g.input_ids[..n].to_vec()
}

/// `p` up to `k`, then other tokens.
fn diverge(p: &[u32], k: usize, vocab: usize) -> Vec<u32> {
    p.iter()
        .enumerate()
        .map(|(i, &t)| {
            if i < k {
                t
            } else {
                (t + 1 + i as u32) % vocab as u32
            }
        })
        .collect()
}

/// Prefill `p[..keep]` in chunks of `chunk` and keep it; then for `q` (which shares p's
/// first `keep` tokens, more or fewer), prefilled in chunks with a cut at `keep`: restore
/// from the cache and prefill the rest, against a fresh prefill in the same steps. Compares
/// the logits from the restore point on and two greedy decode steps, bit for bit.
fn check(e: &Engine, p: &[u32], q: &[u32], chunk: usize, keep: usize, what: &str) {
    let v = e.cfg.vocab_size;
    let dir = tempfile::tempdir().unwrap();
    let cache = PrefixCache::new(dir.path().to_path_buf(), u64::MAX, true);
    let mut a = Session::new(e, 1 << 20, chunk);
    a.prefill(&p[..keep], Want::None).unwrap();
    cache.store(&a);
    drop(a);

    let plan = plan_steps(q.len(), chunk, &[keep]);
    let mut fresh = Session::new(e, 1 << 20, chunk);
    let mut want = fresh.prefill(&q[..keep], Want::All).unwrap();
    want.extend(fresh.prefill(&q[keep..], Want::All).unwrap());
    let mut b = Session::new(e, 1 << 20, chunk);
    let got_n = cache.restore_longest(&mut b, q, &plan);
    assert_eq!(got_n, Some(keep), "{what}: the stored prefix is found");
    assert_eq!(b.tokens(), &q[..keep]);
    assert_eq!(
        b.steps(),
        &dsflash::engine::snapshot::Steps::of(
            &plan[..plan.iter().position(|&x| x == keep).unwrap()]
        )
    );
    let got = b.prefill(&q[keep..], Want::All).unwrap();
    assert!(
        same_bits(&got, &want[keep * v..]),
        "{what}: logits after the restore differ from a fresh prefill"
    );
    let mut last = (
        got[got.len() - v..].to_vec(),
        want[want.len() - v..].to_vec(),
    );
    for step in 0..2 {
        let t = argmax(&last.1);
        last = (b.decode_step(t).unwrap(), fresh.decode_step(t).unwrap());
        assert!(
            same_bits(&last.0, &last.1),
            "{what}: decode step {step} after the restore differs"
        );
    }
    // A prompt whose prefill takes other steps gets the state only where they agree up to it.
    let other = plan_steps(q.len(), chunk + 1, &[]);
    let agree = other
        .iter()
        .position(|&x| x == keep)
        .is_some_and(|i| other[..i] == plan[..plan.iter().position(|&x| x == keep).unwrap()]);
    let mut c = Session::new(e, 1 << 20, chunk + 1);
    assert_eq!(
        cache.restore_longest(&mut c, q, &other) == Some(keep),
        agree,
        "{what}: a prefill in chunks of {}",
        chunk + 1
    );
}

/// (chunk, restored prefix, prompt length): inside the first ratio-4 window (3), inside the
/// 128-token window (127), past it off the ratio-4 grid (130, 259), on the ratio-128
/// boundaries (128, 256), on the chunk grid (130 = 26 chunks of 5, 259 = 7 of 37) and off it.
const CASES: &[(usize, usize, usize)] = &[
    (1, 130, 136),
    (5, 130, 260),
    (37, 259, 300),
    (37, 127, 200),
    (64, 3, 100),
    (128, 128, 200),
    (128, 256, 300),
    (128, 131, 200),
];

fn all_cases(dir: &str, numerics: Numerics) {
    let e = Engine::open(&fixture(dir), numerics).expect("open");
    let v = e.cfg.vocab_size;
    for &(chunk, keep, n) in CASES {
        let p = prompt(dir, n);
        // q shares the stored prefix and a little more (diverging inside the next chunk),
        // or exactly the stored prefix.
        for k in [keep + chunk.min(3), keep] {
            let q = diverge(&p, k, v);
            check(
                &e,
                &p,
                &q,
                chunk,
                keep,
                &format!("{dir} {numerics:?} chunk {chunk} keep {keep} diverging at {k}"),
            );
        }
    }
}

#[test]
fn restore_equals_fresh_prefill_tiny() {
    for n in [Numerics::Reference, Numerics::Ideal, Numerics::Fast] {
        all_cases("tiny", n);
    }
}

#[test]
fn restore_equals_fresh_prefill_tiny_b() {
    for n in [Numerics::Reference, Numerics::Ideal, Numerics::Fast] {
        all_cases("tiny-b", n);
    }
}

#[test]
fn restore_equals_fresh_prefill_tiny_c() {
    for n in [Numerics::Reference, Numerics::Ideal, Numerics::Fast] {
        all_cases("tiny-c", n);
    }
}

#[test]
fn restore_equals_fresh_prefill_on_the_simulated_device() {
    for dir in ["tiny", "tiny-b", "tiny-c"] {
        let mut e = Engine::open(&fixture(dir), Numerics::Reference).expect("open");
        let dev: Arc<dyn Device> = Arc::new(SimDevice::new(1 << 30, SimCost::default()));
        e.use_device_hybrid(
            dev,
            HybridOptions {
                policy: ExpertPolicy::Adaptive(None),
                slots: Some(2),
                budget: None,
                ctx: Some(4096),
                chunk: 37,
            },
        )
        .expect("place");
        assert!(e.identity().contains("sim"), "{}", e.identity());
        let v = e.cfg.vocab_size;
        let p = prompt(dir, 300);
        check(
            &e,
            &p,
            &diverge(&p, 262, v),
            37,
            259,
            &format!("{dir} on sim"),
        );
    }
}

/// A conversation's exact state (not at a chunk boundary, decoded token by token) comes
/// back as it was: the next steps are the same bits.
#[test]
fn a_conversation_state_resumes_exactly() {
    let e = Engine::open(&fixture("tiny"), Numerics::Reference).expect("open");
    let dir = tempfile::tempdir().unwrap();
    let cache = PrefixCache::new(dir.path().to_path_buf(), u64::MAX, true);
    let p = prompt("tiny", 140);
    let mut a = Session::new(&e, 1 << 20, 64);
    let mut l = a.prefill(&p, Want::Last).unwrap();
    for _ in 0..3 {
        l = a.decode_step(argmax(&l)).unwrap();
    }
    assert!(cache.store_as_run(&a, b"conversation one"));
    let mut b = Session::new(&e, 1 << 20, 64);
    assert_eq!(cache.restore_as_run(&mut b, b"conversation two"), None);
    assert_eq!(cache.restore_as_run(&mut b, b"conversation one"), Some(143));
    assert_eq!(b.tokens(), a.tokens());
    let t = argmax(&l);
    assert!(same_bits(
        &a.decode_step(t).unwrap(),
        &b.decode_step(t).unwrap()
    ));
    // Not offered for another prompt (its steps are no prefill's).
    let mut c = Session::new(&e, 1 << 20, 64);
    let plan = plan_steps(a.len(), 64, &[]);
    assert_eq!(cache.restore_longest(&mut c, a.tokens(), &plan), None);
}

fn state_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(dir.join("states")).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            v.push(f.path());
        }
    }
    v
}

/// Every byte region of a file matters: a flipped byte anywhere (magic, header, tokens,
/// window, carry-over, rows, checksum), a truncation anywhere, or bytes appended, and the
/// file is refused and removed; the session is left as it was.
#[test]
fn a_damaged_file_is_refused_and_removed() {
    let e = Engine::open(&fixture("tiny"), Numerics::Reference).expect("open");
    let dir = tempfile::tempdir().unwrap();
    let cache = PrefixCache::new(dir.path().to_path_buf(), u64::MAX, false);
    let p = prompt("tiny", 200);
    let mut a = Session::new(&e, 1 << 20, 64);
    a.prefill(&p[..192], Want::None).unwrap();
    cache.store(&a);
    let files = state_files(dir.path());
    assert_eq!(files.len(), 1);
    let good = std::fs::read(&files[0]).unwrap();
    let mut damaged: Vec<(String, Vec<u8>)> = Vec::new();
    let n = good.len();
    for i in (0..40).map(|k| k * n / 40).chain([n - 1, 9, 12]) {
        let mut b = good.clone();
        b[i] ^= 0x10;
        damaged.push((format!("byte {i} of {n} flipped"), b));
    }
    for cut in [0, 5, 100, n / 2, n - 33, n - 1] {
        damaged.push((format!("cut at {cut}"), good[..cut].to_vec()));
    }
    let mut longer = good.clone();
    longer.push(0);
    damaged.push(("a byte appended".into(), longer));
    for (what, bytes) in damaged {
        std::fs::write(&files[0], &bytes).unwrap();
        let mut s = Session::new(&e, 1 << 20, 64);
        s.prefill(&p[..3], Want::None).unwrap();
        assert_eq!(
            cache.restore_longest(&mut s, &p, &plan_steps(200, 64, &[])),
            None,
            "{what}: used"
        );
        assert_eq!(s.tokens(), &p[..3], "{what}: the session changed");
        assert!(!files[0].exists(), "{what}: not removed");
    }
    // Another format version (a later dsflash's file, say), checksum and all: refused.
    let text = String::from_utf8_lossy(&good[12..200]).into_owned();
    assert!(text.contains("\"format\":1,"), "{text}");
    std::fs::write(&files[0], &good).unwrap();
    let mut later = Session::new(&e, 1 << 20, 64);
    later.prefill(&p[..192], Want::None).unwrap();
    let mut bytes = Vec::new();
    later.save(&mut bytes).unwrap();
    let at = 12 + text.find("\"format\":1,").unwrap() + 9;
    bytes[at] = b'2';
    std::fs::write(&files[0], &bytes).unwrap();
    let mut s = Session::new(&e, 1 << 20, 64);
    assert_eq!(
        cache.restore_longest(&mut s, &p, &plan_steps(200, 64, &[])),
        None
    );
    assert!(!files[0].exists(), "another format: not removed");
    // The good file is used.
    std::fs::write(&files[0], &good).unwrap();
    let mut s = Session::new(&e, 1 << 20, 64);
    assert_eq!(
        cache.restore_longest(&mut s, &p, &plan_steps(200, 64, &[])),
        Some(192)
    );
}

/// A state is only for the engine that made it: another numerics, chunk size or model
/// finds nothing, and a file moved into another engine's directory is refused there.
#[test]
fn a_foreign_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = PrefixCache::new(dir.path().to_path_buf(), u64::MAX, false);
    let p = prompt("tiny", 200);
    let reference = Engine::open(&fixture("tiny"), Numerics::Reference).expect("open");
    let ideal = Engine::open(&fixture("tiny"), Numerics::Ideal).expect("open");
    assert_ne!(reference.identity(), ideal.identity());
    let mut a = Session::new(&reference, 1 << 20, 64);
    a.prefill(&p[..128], Want::None).unwrap();
    cache.store(&a);
    assert_eq!(
        cache.restore_longest(
            &mut Session::new(&ideal, 1 << 20, 64),
            &p,
            &plan_steps(200, 64, &[])
        ),
        None
    );
    assert_eq!(
        cache.restore_longest(
            &mut Session::new(&reference, 1 << 20, 32),
            &p,
            &plan_steps(200, 32, &[])
        ),
        None
    );
    // Plant the reference state where the ideal engine looks.
    let mut b = Session::new(&ideal, 1 << 20, 64);
    b.prefill(&p[..64], Want::None).unwrap();
    cache.store(&b);
    let files = state_files(dir.path());
    let (ours, theirs): (Vec<_>, Vec<_>) = files.iter().partition(|f| {
        f.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("p128-")
    });
    let planted = theirs[0].with_file_name(ours[0].file_name().unwrap());
    std::fs::copy(ours[0], &planted).unwrap();
    let mut s = Session::new(&ideal, 1 << 20, 64);
    assert_eq!(
        cache.restore_longest(&mut s, &p, &plan_steps(200, 64, &[])),
        Some(64),
        "falls back to its own"
    );
    assert!(!planted.exists(), "the foreign file is removed");
    // The model identity covers the config: another model's engine has another directory.
    let other = Engine::open(&fixture("tiny-b"), Numerics::Reference).expect("open");
    assert_ne!(other.identity(), reference.identity());
}

/// The cap: the least recently used states go first (a restore counts as a use).
#[test]
fn the_cache_keeps_to_its_cap_least_recently_used_first() {
    let e = Engine::open(&fixture("tiny"), Numerics::Reference).expect("open");
    let p = prompt("tiny", 200);
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = state_files(d)
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    // The sizes of the 16-, 32- and 48-token states.
    let sizes: Vec<u64> = {
        let d = tempfile::tempdir().unwrap();
        let c = PrefixCache::new(d.path().to_path_buf(), u64::MAX, false);
        let mut a = Session::new(&e, 1 << 20, 16);
        for n in [16, 32, 48] {
            a.prefill(&p[a.len()..n], Want::None).unwrap();
            c.store(&a);
        }
        let mut f = state_files(d.path());
        f.sort_by_key(|f| std::fs::metadata(f).unwrap().len());
        f.iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .collect()
    };
    assert!(sizes[0] < sizes[1] && sizes[1] < sizes[2], "{sizes:?}");
    let dir = tempfile::tempdir().unwrap();
    // Room for the 32- and 48-token states less a byte.
    let cache = PrefixCache::new(dir.path().to_path_buf(), sizes[1] + sizes[2] - 1, false);
    let mut a = Session::new(&e, 1 << 20, 16);
    for n in [16, 32] {
        a.prefill(&p[a.len()..n], Want::None).unwrap();
        cache.store(&a);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Use the 16-token state: now the 32-token one is the least recently used.
    let mut s = Session::new(&e, 1 << 20, 16);
    assert_eq!(
        cache.restore_longest(&mut s, &p[..20], &plan_steps(20, 16, &[])),
        Some(16)
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    a.prefill(&p[32..48], Want::None).unwrap();
    cache.store(&a);
    let left = names(dir.path());
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left[0].starts_with("p16-") && left[1].starts_with("p48-"),
        "{left:?}"
    );
}
