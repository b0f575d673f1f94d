//! Inference: greedy generation with a key/value cache, scoring and classification.

pub mod generate;
