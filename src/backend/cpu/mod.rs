//! CPU kernels: matrix products that read weights in their stored formats (FP8 with 128x128
//! scales, FP4 with 1x32 scales, BF16) straight from the mmap, dequantizing a tile of rows at
//! a time, and the small vector operations of the forward pass.

pub mod bf16dot;
mod device;
pub mod hc;
mod linear;
mod ops;
pub mod probe;
pub mod q8dot;
pub mod rowdot;
pub mod topology;

pub use device::CpuDevice;
pub use linear::{dequant_row, linear, linear_range};
pub use ops::*;
