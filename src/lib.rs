//! dsflash: DeepSeek-V4-Flash on one workstation.
//!
//! Layers, top to bottom (dependencies point down only):
//! - `cli`: argument parsing and the subcommands;
//! - `engine`: the model's forward pass and decode state (device-agnostic);
//! - `prefix_cache`: decode states kept on disk for prompts that start alike;
//! - `backend`: the kernels that compute on the stored formats;
//! - `model`: config, tensor inventory, number formats, the mmapped checkpoint.

pub mod backend;
pub mod cli;
pub mod download;
pub mod engine;
pub mod fsutil;
pub mod hub;
pub mod model;
pub mod prefix_cache;
