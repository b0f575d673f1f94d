//! Does an adapter fit a model?

use anyhow::{bail, Result};

use super::peft_config::PeftConfig;
use super::peft_types::TaskType;
use crate::backbone::ModelInfo;

/// Refuses an adapter made for a different model: `token_dim` ≠ the hidden size (prefix
/// tuning: ≠ key/value width), `num_layers` ≠ the model's layers, a different attention-head
/// count, more than one transformer submodule, or a task the model cannot run (SEQ_CLS on a
/// causal model, CAUSAL_LM on an encoder, SEQ_2_SEQ_LM on either).
pub fn check_compatible(config: &PeftConfig, info: &ModelInfo) -> Result<()> {
    let model = info.source.display();
    let (dim, dim_what, heads, heads_what) = if config.peft_type().is_kv_prefix() {
        (
            info.head_dim() * info.kv_heads,
            "key/value width (kv_heads × head_dim)",
            info.kv_heads,
            "key/value heads",
        )
    } else {
        (info.hidden, "hidden size", info.heads, "attention heads")
    };
    if config.token_dim != dim {
        bail!(
            "the adapter does not fit model {model}: adapter token_dim is {} but the model's {dim_what} is {dim}",
            config.token_dim
        );
    }
    if let Some(layers) = config.num_layers {
        if layers != info.layers {
            bail!(
                "the adapter does not fit model {model}: adapter num_layers is {layers} but the model has {} layers",
                info.layers
            );
        }
    }
    if let Some(h) = config.num_attention_heads {
        if h != heads {
            bail!(
                "the adapter does not fit model {model}: adapter num_attention_heads is {h} but the model has {heads} {heads_what}"
            );
        }
    }
    if let Some(n) = config.num_transformer_submodules {
        if n != 1 {
            bail!(
                "the adapter does not fit model {model}: adapter num_transformer_submodules is {n} (an encoder-decoder \
                 adapter) but the model has 1"
            );
        }
    }
    let kind = if info.arch.is_causal() {
        "a causal language model"
    } else {
        "an encoder"
    };
    match config.task_type {
        Some(TaskType::SeqCls) if info.arch.is_causal() => {
            bail!(
                "the adapter's task_type is SEQ_CLS but model {model} ({:?}) is {kind}",
                info.arch
            )
        }
        Some(TaskType::CausalLm) if !info.arch.is_causal() => {
            bail!(
                "the adapter's task_type is CAUSAL_LM but model {model} ({:?}) is {kind}",
                info.arch
            )
        }
        Some(TaskType::Seq2SeqLm) => {
            bail!(
                "the adapter's task_type is SEQ_2_SEQ_LM but model {model} ({:?}) is {kind}",
                info.arch
            )
        }
        _ => {}
    }
    Ok(())
}
