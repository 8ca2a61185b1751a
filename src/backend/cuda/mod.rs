//! The CUDA backend: kernels from `kernels/` compiled at run time by NVRTC, launched through
//! the driver API; both libraries are loaded dynamically, so a machine without them runs on
//! the CPU.

pub mod nvrtc;
pub mod sources;
