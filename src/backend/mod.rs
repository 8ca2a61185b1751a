//! Kernels and devices, computing on the stored formats. The kernels are V4-Flash's: besides
//! products and norms they include its routing (sqrt-softplus scores, top-k, hash routes),
//! the mHC coefficients with Sinkhorn, the compressor's gated pooling and the indexer's
//! scores; the engine's spec sections decide when each runs and on what (`engine::ops`),
//! the kernels only compute. `cpu` is the portable implementation every other device is
//! checked against; `device` is the interface (memory, uploads, ops with their contract,
//! streams) that `cpu`, `sim` and `cuda` implement; `exec` is what the engine's ops go
//! through.

pub mod cpu;
pub mod cuda;
pub mod device;
pub mod exec;
pub mod expert_cache;
mod promote;
pub mod ram_tier;
pub mod select;
pub mod sim;
