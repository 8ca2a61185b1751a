//! The numerics switch (`--numerics`). `Ideal` is fp32 math on the dequantized weights, what
//! transformers computes. `Reference` adds the official code's QAT roundings (spec §4.4):
//! FP8 activations into every FP8/FP4 GEMM, FP8 on the KV non-rope dims, Hadamard + FP4 on
//! the indexer's queries and keys. Activations stay fp32: the official code's bf16 activations
//! (which also make its indexer scores bf16) are not simulated; see the README's "Numerics".
//! `Fast` is `Ideal` with every FP8/FP4 GEMM input on an int8 grid (per 32 values, integers
//! up to 127 times a power of two): finer than the reference's E4M3 for the large values of
//! a block, and what the CPU's int8 dot-product kernel multiplies exactly.

use crate::model::formats::{
    I8_BLOCK, fake_quant_e2m1_blocks, fake_quant_e4m3_blocks, fake_quant_i8_blocks,
};
use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Numerics {
    /// fp32 on dequantized weights (transformers' semantics).
    #[default]
    Ideal,
    /// Ideal plus the reference implementation's activation roundings (QAT simulation).
    Reference,
    /// Ideal with int8 GEMM inputs (per 32 values, one power-of-two scale): the fastest on
    /// CPUs with int8 dot products; its distance to ideal is measured in tests/golden_ideal.rs.
    Fast,
}

impl Numerics {
    /// Input of an FP8/FP4 GEMM: per row of `cols`, per 128-block rounded to E4M3 with a
    /// power-of-two scale (reference), or per 32-block to the int8 grid (fast).
    pub fn gemm_input<'a>(self, x: &'a [f32], cols: usize) -> Cow<'a, [f32]> {
        match self {
            Numerics::Ideal => Cow::Borrowed(x),
            Numerics::Reference => {
                let mut v = x.to_vec();
                for row in v.chunks_mut(cols) {
                    fake_quant_e4m3_blocks(row, 128);
                }
                Cow::Owned(v)
            }
            Numerics::Fast => {
                let mut v = x.to_vec();
                for row in v.chunks_mut(cols) {
                    fake_quant_i8_blocks(row, I8_BLOCK);
                }
                Cow::Owned(v)
            }
        }
    }

    /// A stored KV row (window or main compressor): FP8-simulate dims [0, nope) in 64-blocks.
    pub fn kv_row(self, row: &mut [f32], nope: usize) {
        if self == Numerics::Reference {
            fake_quant_e4m3_blocks(&mut row[..nope], 64);
        }
    }

    /// Indexer query heads / keys: Hadamard rotation then FP4 in 32-blocks.
    pub fn indexer_vec(self, v: &mut [f32]) {
        if self == Numerics::Reference {
            hadamard(v);
            fake_quant_e2m1_blocks(v, 32);
        }
    }
}

pub use crate::backend::cpu::hadamard;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hadamard_is_orthonormal_sylvester() {
        // H_4 (Sylvester) rows: ++++, +-+-, ++--, +--+ ; scaled by 1/2.
        let mut e1 = vec![0.0, 1.0, 0.0, 0.0];
        hadamard(&mut e1);
        assert_eq!(e1, vec![0.5, -0.5, 0.5, -0.5]);
        let mut v = vec![1.0, 2.0, 3.0, 4.0];
        hadamard(&mut v);
        hadamard(&mut v);
        assert!(
            v.iter()
                .zip([1.0, 2.0, 3.0, 4.0])
                .all(|(a, b)| (a - b).abs() < 1e-6)
        );
    }
}
