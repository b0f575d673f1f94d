//! Inference: greedy generation with a key/value cache, scoring and classification.

pub mod evaluate;
pub mod generate;
pub mod session;
