//! PEFT's enumerations as they appear in `adapter_config.json`.

use anyhow::{bail, Result};

/// PEFT's `peft_type` values this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftType {
    /// `PROMPT_TUNING`.
    PromptTuning,
    /// `P_TUNING`.
    PTuning,
    /// `PREFIX_TUNING`.
    PrefixTuning,
    /// `CARTRIDGE`: a K/V prefix stored directly as parameters (Eyuboglu et al. 2025).
    Cartridge,
    /// `MULTITASK_PROMPT_TUNING`: a shared prompt times per-task low-rank factors (Wang et al.
    /// 2023).
    MultitaskPromptTuning,
    /// `CPT`: context-aware prompt tuning, a prompt of real in-context examples (Blau et al.
    /// 2024), prepended like prompt tuning.
    Cpt,
}

impl PeftType {
    /// The string PEFT writes.
    pub fn as_str(self) -> &'static str {
        match self {
            PeftType::PromptTuning => "PROMPT_TUNING",
            PeftType::PTuning => "P_TUNING",
            PeftType::PrefixTuning => "PREFIX_TUNING",
            PeftType::Cartridge => "CARTRIDGE",
            PeftType::MultitaskPromptTuning => "MULTITASK_PROMPT_TUNING",
            PeftType::Cpt => "CPT",
        }
    }

    /// Whether the adapter is a per-layer key/value prefix (prefix tuning, Cartridges) rather
    /// than an input prompt.
    pub fn is_kv_prefix(self) -> bool {
        matches!(self, PeftType::PrefixTuning | PeftType::Cartridge)
    }

    /// Parses PEFT's string.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "PROMPT_TUNING" => PeftType::PromptTuning,
            "P_TUNING" => PeftType::PTuning,
            "PREFIX_TUNING" => PeftType::PrefixTuning,
            "CARTRIDGE" => PeftType::Cartridge,
            "MULTITASK_PROMPT_TUNING" => PeftType::MultitaskPromptTuning,
            "CPT" => PeftType::Cpt,
            other => {
                bail!(
                    "unknown peft_type `{other}` (supported: PROMPT_TUNING, P_TUNING, PREFIX_TUNING, CARTRIDGE, \
                     MULTITASK_PROMPT_TUNING, CPT)"
                )
            }
        })
    }
}

/// PEFT's `task_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskType {
    /// `CAUSAL_LM`.
    CausalLm,
    /// `SEQ_CLS`.
    SeqCls,
    /// `SEQ_2_SEQ_LM`.
    Seq2SeqLm,
    /// `TOKEN_CLS`.
    TokenCls,
    /// `QUESTION_ANS`.
    QuestionAns,
    /// `FEATURE_EXTRACTION`.
    FeatureExtraction,
}

impl TaskType {
    /// The string PEFT writes.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::SeqCls => "SEQ_CLS",
            TaskType::Seq2SeqLm => "SEQ_2_SEQ_LM",
            TaskType::TokenCls => "TOKEN_CLS",
            TaskType::QuestionAns => "QUESTION_ANS",
            TaskType::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }

    /// Parses PEFT's string.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "CAUSAL_LM" => TaskType::CausalLm,
            "SEQ_CLS" => TaskType::SeqCls,
            "SEQ_2_SEQ_LM" => TaskType::Seq2SeqLm,
            "TOKEN_CLS" => TaskType::TokenCls,
            "QUESTION_ANS" => TaskType::QuestionAns,
            "FEATURE_EXTRACTION" => TaskType::FeatureExtraction,
            other => bail!(
                "unknown task_type `{other}` (PEFT's task types: CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, \
                 QUESTION_ANS, FEATURE_EXTRACTION)"
            ),
        })
    }
}
