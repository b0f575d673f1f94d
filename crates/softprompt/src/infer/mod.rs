//! Inference: scoring candidates with a shared prompt cache, evaluation of a data set,
//! generation with a key/value cache (greedy or sampled, stop strings), an adapter's prompt
//! turned into keys and values once (alone, or several adapters composed), mixed-prompt
//! continuous batching, and sessions that rebuild a task from an adapter, and classification
//! of single inputs. [`options`] holds the one set of scoring options all of them share.

pub mod by_task;
pub mod classify;
pub mod compose;
pub mod engine;
pub mod evaluate;
pub mod generate;
pub mod late_prompt;
pub mod options;
pub mod prompt_cache;
pub mod sampling;
pub mod score;
pub mod session;
pub mod templates;
pub mod text_stream;
