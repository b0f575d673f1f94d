//! Fused, multi-threaded f32 CPU kernels for frozen transformer backbones.
//!
//! Every kernel works on plain row-major slices and has a hand-written input-gradient
//! counterpart; no weight gradient is ever formed (the weights are frozen). Matrix multiplies go
//! through the `gemm` crate (the one candle uses) or, for f32 weights packed at load, through
//! [`packed`]'s own blocked product; weights kept in GGML's quantized blocks multiply a few
//! rows through [`quant`]'s integer kernels (as llama.cpp decodes); everything else is a fused
//! pass that rayon spreads over rows. The callers (softprompt's backbones) keep the math of each layer visible
//! and are checked against the composed candle version by the parity and gradient tests.

#![warn(missing_docs)]
// Kernels index several arrays with one loop counter, as llm.c does; iterator chains would hide the math.
#![allow(clippy::needless_range_loop)]

pub mod activation;
pub mod attention;
pub mod exp;
pub mod head;
pub mod matmul;
pub mod norm;
pub mod packed;
pub mod quant;
pub mod rope;
pub mod simd;

pub use attention::AttentionLayout;
