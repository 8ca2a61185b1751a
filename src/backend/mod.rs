//! Kernels and devices: compute on the stored formats without knowing the model. `cpu` is the
//! portable implementation every other device is checked against; `device` is the interface
//! (memory, uploads, launches, streams) that `cpu`, `sim` and `cuda` implement; `exec` is
//! what the engine calls.

pub mod cpu;
pub mod cuda;
pub mod device;
pub mod exec;
pub mod expert_cache;
pub mod promote;
pub mod select;
pub mod sim;
