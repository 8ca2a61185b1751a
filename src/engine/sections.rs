//! Wall time per section of the forward pass, summed over the steps while switched on
//! (`dsflash bench` splits prefill by it); off, each section costs one flag check.

use std::sync::Mutex;
use std::time::Instant;

/// The timed sections. `Attention` is the whole of §5.4-5.9; the compressors, the indexer's
/// top-k and the core are parts of it, and the rest of it is its projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Mhc,
    Attention,
    Compressors,
    Indexer,
    AttnCore,
    Moe,
    Head,
}

const N: usize = 7;

#[derive(Debug, Default)]
pub(crate) struct SectionClock {
    on: bool,
    sums: Mutex<Sums>,
}

#[derive(Debug, Default)]
struct Sums {
    secs: [f64; N],
    /// Routed experts with tokens, and routed selections, over the MoE layers' steps.
    experts: u64,
    selections: u64,
}

/// What [`SectionClock::take`] returns.
#[derive(Debug)]
pub struct SectionTimes {
    /// (section, seconds) in the forward pass's order.
    pub secs: Vec<(&'static str, f64)>,
    /// Tokens per routed expert with tokens, over the steps (NaN where no MoE layer ran).
    pub tokens_per_expert: f64,
}

impl SectionClock {
    pub(crate) fn set(&mut self, on: bool) {
        self.on = on;
    }

    /// `f`, its wall time added to `s` while the clock is on.
    pub(crate) fn time<R>(&self, s: Section, f: impl FnOnce() -> R) -> R {
        if !self.on {
            return f();
        }
        let t = Instant::now();
        let r = f();
        let dt = t.elapsed().as_secs_f64();
        if let Ok(mut v) = self.sums.lock() {
            v.secs[s as usize] += dt;
        }
        r
    }

    /// One MoE layer's step: `experts` routed experts got `selections` tokens between them.
    pub(crate) fn count_experts(&self, experts: usize, selections: usize) {
        if self.on
            && let Ok(mut v) = self.sums.lock()
        {
            v.experts += experts as u64;
            v.selections += selections as u64;
        }
    }

    /// The sums since the last call (then zero): seconds per section, attention split into
    /// its projections, the compressors, the indexer and the core; tokens per expert.
    pub(crate) fn take(&self) -> SectionTimes {
        let v = match self.sums.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => Sums::default(),
        };
        let at = |s: Section| v.secs[s as usize];
        let parts = at(Section::Compressors) + at(Section::Indexer) + at(Section::AttnCore);
        let secs = vec![
            ("mhc", at(Section::Mhc)),
            (
                "attention projections",
                (at(Section::Attention) - parts).max(0.0),
            ),
            ("compressors", at(Section::Compressors)),
            ("indexer", at(Section::Indexer)),
            ("attention core", at(Section::AttnCore)),
            ("moe", at(Section::Moe)),
            ("head", at(Section::Head)),
        ];
        SectionTimes {
            secs,
            tokens_per_expert: v.selections as f64 / v.experts as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_parts_split_its_time_and_take_resets() {
        let mut c = SectionClock::default();
        c.time(Section::Moe, || ()); // off: nothing counted
        c.set(true);
        let sleep = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));
        c.time(Section::Attention, || {
            c.time(Section::Indexer, || sleep(20));
            sleep(20);
        });
        c.time(Section::Moe, || sleep(10));
        c.count_experts(4, 6);
        c.count_experts(2, 6);
        let took = c.take();
        assert_eq!(took.tokens_per_expert, 2.0);
        let t: std::collections::HashMap<_, _> = took.secs.into_iter().collect();
        assert!(t["indexer"] >= 0.02 && t["attention projections"] >= 0.02);
        assert!(t["moe"] >= 0.01 && t["head"] == 0.0 && t["mhc"] == 0.0);
        let again = c.take();
        assert!(again.secs.iter().all(|(_, s)| *s == 0.0) && again.tokens_per_expert.is_nan());
    }
}
