//! Inference: scoring candidates with a shared prompt cache, evaluation of a data set, greedy
//! generation with a key/value cache, and sessions that rebuild a task from an adapter.

pub mod evaluate;
pub mod generate;
pub mod score;
pub mod session;
