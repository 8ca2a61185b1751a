//! The model's forward pass and decode state, one module per concept of the spec (§5–6).
//! Model code here does not know which device runs it: heavy math goes through `backend`.

pub mod attention;
pub mod compressor;
mod host;
mod hyper;
pub mod indexer;
pub mod kv_cache;
pub mod model;
pub mod moe;
pub mod numerics;
mod offload;
mod ops;
mod placement;
pub mod plan;
pub mod rope;
pub mod sampler;
pub mod session;
pub mod traps;

pub use model::{Engine, Want};
pub use numerics::Numerics;
pub use placement::{ExpertPolicy, HybridOptions, Placement};
pub use session::{Mark, Session, SessionError};
