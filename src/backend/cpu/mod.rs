//! CPU kernels: matrix products that read weights in their stored formats (FP8 with 128x128
//! scales, FP4 with 1x32 scales, BF16) straight from the mmap, dequantizing a tile of rows at
//! a time, and the small vector operations of the forward pass.

/// Whether this CPU has every x86 feature named (detected once, at the first call).
macro_rules! has_x86 {
    ($($f:tt),+) => {{
        #[cfg(target_arch = "x86_64")]
        {
            static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *HAS.get_or_init(|| true $(&& std::is_x86_feature_detected!($f))+)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }};
}
pub(crate) use has_x86;

pub mod bf16dot;
mod device;
#[cfg(target_arch = "x86_64")]
mod gemm;
pub mod hc;
mod linear;
mod ops;
pub mod probe;
pub mod q8dot;
pub mod rowdot;
pub mod topology;

pub use device::CpuDevice;

/// Which CPU kernels a product may use. The bf16 and int8 dot-product kernels (where the CPU
/// has them) sum in another order than the fp32 kernels, equal within a few ulp of a row's
/// magnitude; a check that depends on one particular order (agreement with another
/// implementation down to the last rounding flip of the reference numerics) pins the fp32
/// kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The fastest this CPU has.
    #[default]
    Any,
    /// The fp32 kernels only: one summation order on every CPU.
    Fp32,
}

impl Kernels {
    /// Whether the bf16 dot-product kernels run.
    pub fn bf16(self) -> bool {
        self == Kernels::Any && bf16dot::available()
    }

    /// Whether the int8 dot-product kernels run.
    pub fn q8(self) -> bool {
        self == Kernels::Any && q8dot::available()
    }

    /// What decides the products' summation order on this CPU: the kernel set and the
    /// instruction sets the dispatch picks from (a state computed with one is reused only
    /// with the same).
    pub fn identity(self) -> String {
        // The prefill GEMMs' summation order (8 lanes over the columns, added in lane order),
        // which states saved by earlier builds may not share.
        let mut s = format!("{self:?}/lanes8");
        for (name, has) in [
            ("avx2", has_x86!("avx2")),
            ("fma", has_x86!("fma")),
            ("f16c", has_x86!("f16c")),
            ("avx512f", has_x86!("avx512f")),
            ("bf16", self.bf16()),
            ("q8", self.q8()),
        ] {
            if has {
                s.push('+');
                s.push_str(name);
            }
        }
        s
    }
}
pub use linear::{Prepared, dequant_row, linear, linear_range};
pub use ops::*;
