//! The model's forward pass and decode state.
