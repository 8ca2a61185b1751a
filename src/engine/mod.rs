//! The model's forward pass and decode state, one module per concept of the spec (§5–6).
//! Each section is written once against the ops of `ops` (`host`: on the CPU, `offload`: on
//! a device); where each layer runs is placement's choice, not the model code's. The public
//! surface is what the CLI and the tests use: `Engine`, `Session`, `Numerics`, the
//! placement options, the plan, the sampler and the traps.

mod attention;
mod compressor;
mod host;
mod hyper;
mod indexer;
mod kv_cache;
mod model;
mod moe;
pub mod numerics;
mod offload;
mod ops;
mod placement;
pub mod plan;
mod rope;
pub mod sampler;
pub mod sections;
pub mod session;
pub mod snapshot;
pub mod traps;

pub use model::{Engine, Want};
pub use numerics::Numerics;
pub use placement::{ExpertPolicy, HybridOptions, Placement};
pub use session::{Mark, Session, SessionError};
