//! softprompt: train, evaluate, save, load and serve soft prompts for frozen pretrained
//! transformers. See `DESIGN.md` at the repository root for the data path and the module map.

#![warn(missing_docs)]

pub mod adapter;
pub mod backbone;
pub mod batch;
pub mod config;
pub mod data;
pub mod gguf;
pub mod infer;
pub mod inspect;
pub mod io;
pub mod json_fields;
pub mod lock;
pub mod loss;
pub mod model_source;
pub mod plot;
pub mod prompt;
pub mod sweep;
pub mod task;
pub mod template;
pub mod tokenizer;
pub mod train;
