//! Kernels: compute on the stored formats without knowing the model. `cpu` is the portable
//! implementation that every other device is checked against.

pub mod cpu;
pub mod cuda;
