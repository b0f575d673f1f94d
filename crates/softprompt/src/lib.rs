//! softprompt: train, evaluate, save, load and serve soft prompts for frozen pretrained
//! transformers. See `DESIGN.md` at the repository root for the data path and the module map.

pub mod backbone;
pub mod gguf;
pub mod io;
pub mod model_source;
pub mod tokenizer;
