//! Which method learns the prompt: the one name every layer (options, adapter files, training
//! step) uses for it.

use serde::{Deserialize, Serialize};

/// Which parameter-efficient method trains the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Lester et al. 2021: the virtual-token matrix itself is learned.
    PromptTuning,
    /// Liu et al. 2021: virtual tokens pass through an MLP or bi-LSTM encoder.
    PTuning,
    /// Li & Liang 2021 (PEFT's PREFIX_TUNING): learned keys and values before the input in every
    /// attention layer, optionally through a projection MLP (`prefix_projection`). On causal
    /// models, and on encoders with `seq-cls` (p-tuning v2, Liu et al. 2022); the template has
    /// no `[soft]` tokens.
    PrefixTuning,
    /// Eyuboglu et al. 2025 (PEFT's CARTRIDGE): the key/value prefix itself is learned, usually
    /// from a text prefill (`init = "text"`); the first `num_frozen_tokens` stay fixed.
    Cartridge,
    /// Wang et al. 2023 (PEFT's MULTITASK_PROMPT_TUNING): a shared prompt times a rank-`num_ranks`
    /// product per task, trained on every set of `tasks` at once (one task id per set).
    MultitaskPromptTuning,
    /// Razdaibiedina et al. 2023: the prompt through a shared bottleneck MLP with LayerNorm and
    /// a skip connection (`residual_bottleneck` wide); saved as a prompt-tuning adapter holding
    /// the reparameterised prompt.
    ResidualPromptTuning,
    /// Shi & Lipani 2024 (DePT): a shorter prompt plus a rank-`dept_rank` update `A·B`
    /// (`A [max_len, r]`, `B [r, d]`) added to the input tokens' embeddings by position,
    /// `A` and `B` trained with their own learning rate `dept_lr`.
    Dept,
    /// Liu et al. 2022 (LPT, "Late Prompt Tuning"): the prompt enters at decoder layer
    /// `insert_layer` (default: the middle) instead of the input: `p` reserved positions in front
    /// of the input run the layers below on a zero placeholder, and their hidden states at
    /// `insert_layer` are replaced by the learned prompt. Nothing below that layer is
    /// differentiated; its outputs are cached per training row (`cache_lower_layers`). Saved
    /// as a prompt-tuning-shaped adapter plus the layer (`late_prompt_insert_layer`); readers
    /// turn it into per-layer keys and values. Llama family only.
    LatePromptTuning,
    /// Blau et al. 2024 (PEFT's CPT, context-aware prompt tuning): the prompt is a context of
    /// `cpt_examples` training rows rendered with the template, prepended; their embeddings
    /// learn an offset kept within a bound per token type (`cpt_projection_epsilon`,
    /// `cpt_projection_format_epsilon`; label tokens stay fixed), and the loss also covers the
    /// context's labels (`cpt_weighted_loss`, `cpt_loss_decay_factor`).
    Cpt,
}

impl Method {
    /// Whether the method learns a per-layer key/value prefix (prefix tuning, Cartridges)
    /// rather than an input prompt.
    pub fn is_kv_prefix(self) -> bool {
        matches!(self, Method::PrefixTuning | Method::Cartridge)
    }
}
