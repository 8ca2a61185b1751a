//! Everything about the model's files: config, tensor inventory, number formats, the mmapped
//! checkpoint and the typed weight views. No compute lives here.

pub mod chat_format;
pub mod checkpoint;
pub mod config;
pub mod dsml;
pub mod formats;
pub mod layout;
pub mod mapped;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use checkpoint::{Checkpoint, CheckpointError, ReadBuffers};
pub use config::ModelConfig;
