//! What a learned prompt looks like from the vocabulary (Lester et al. 2021, §7): for each
//! virtual token its L2 norm and the vocabulary tokens whose input embeddings are nearest by
//! cosine similarity. For p-tuning the prompt is the encoder's output (PEFT's saved
//! `prompt_embeddings`), the vectors the model actually sees. Prefix tuning and Cartridges put
//! keys and values in every layer, not input embeddings, so they have no such neighbours.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;
use std::path::Path;

use crate::adapter::PeftAdapter;
use crate::backbone::LoadedModel;
use crate::model_source::{self, ModelLocation, DEFAULT_MODELS};
use crate::tokenizer::TextTokenizer;

/// A vocabulary token near a virtual token.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NearToken {
    /// Token id.
    pub id: u32,
    /// The token's text as the tokenizer decodes it alone (e.g. `" capital"`).
    pub token: String,
    /// Cosine similarity between the token's input embedding and the virtual token.
    pub cosine: f32,
}

/// One virtual token of a prompt.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VirtualToken {
    /// Position in the prompt (0-based).
    pub index: usize,
    /// L2 norm of the vector.
    pub norm: f32,
    /// The `k` nearest vocabulary tokens, most similar first.
    pub nearest: Vec<NearToken>,
}

/// Norms and `k` nearest tokens (cosine similarity against the rows of `table`, `[vocab,
/// hidden]`) of each row of `prompt` (`[p, hidden]`). Rows of `table` beyond the tokenizer's
/// vocabulary (padding rows some models have) are left out.
pub fn nearest_tokens(
    prompt: &Tensor,
    table: &Tensor,
    tokenizer: &TextTokenizer,
    k: usize,
) -> Result<Vec<VirtualToken>> {
    if k == 0 {
        bail!("the number of nearest tokens must be at least 1");
    }
    let prompt = prompt.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let table = table.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (p, d) = prompt.dims2().context("the prompt must be a [tokens, hidden] matrix")?;
    let (v, td) = table
        .dims2()
        .context("the embedding table must be a [vocab, hidden] matrix")?;
    if d != td {
        bail!("the prompt's vectors have {d} values but the model's embeddings have {td}: the adapter was trained for another model");
    }
    let v = v.min(tokenizer.vocab_size().max(1));
    let table = table.narrow(0, 0, v)?;
    let unit = |t: &Tensor| -> Result<Tensor> {
        let norm = t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        Ok(t.broadcast_div(&norm)?)
    };
    let norms: Vec<f32> = prompt.sqr()?.sum(D::Minus1)?.sqrt()?.to_vec1()?;
    let sims: Vec<Vec<f32>> = unit(&prompt)?.matmul(&unit(&table)?.t()?)?.to_vec2()?;
    let mut out = Vec::with_capacity(p);
    for (index, row) in sims.iter().enumerate() {
        let mut ids: Vec<usize> = (0..row.len()).collect();
        let k = k.min(ids.len());
        let by_sim = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
        ids.select_nth_unstable_by(k.saturating_sub(1), by_sim);
        ids.truncate(k);
        ids.sort_by(by_sim);
        let nearest = ids
            .into_iter()
            .map(|id| {
                let token = tokenizer.decode(&[id as u32], false).unwrap_or_default();
                Ok(NearToken {
                    id: id as u32,
                    token,
                    cosine: row[id],
                })
            })
            .collect::<Result<_>>()?;
        out.push(VirtualToken {
            index,
            norm: norms[index],
            nearest,
        });
    }
    Ok(out)
}

/// [`nearest_tokens`] of an adapter's input prompt against `model`'s input embedding table;
/// refuses prefix-tuning and Cartridge adapters (their vectors are keys and values, not input
/// embeddings).
pub fn inspect_adapter(adapter: &PeftAdapter, model: &LoadedModel, k: usize) -> Result<Vec<VirtualToken>> {
    let kind = adapter.config.peft_type();
    if kind.is_kv_prefix() {
        bail!(
            "{}: a {} adapter holds keys and values for every attention layer, not input embeddings, \
             so its tokens have no nearest vocabulary tokens; inspect works on prompt tuning and p-tuning adapters",
            adapter.dir.display(),
            kind.as_str()
        );
    }
    let table = model.backbone.embedding_table();
    nearest_tokens(adapter.input_prompt()?, table, &model.tokenizer, k)
        .with_context(|| format!("{}", adapter.dir.display()))
}

/// Where the adapter's `base_model_name_or_path` points: a model softprompt can resolve as it
/// is, a path relative to the adapter's folder, or the file name of a default model (what
/// softprompt writes for the default GGUF model). An error asks for `--model` otherwise.
pub fn resolve_base_model(adapter: &PeftAdapter) -> Result<ModelLocation> {
    let Some(name) = adapter
        .config
        .base_model_name_or_path
        .as_deref()
        .filter(|n| !n.is_empty())
    else {
        bail!(
            "{}: adapter_config.json names no base_model_name_or_path; give the model with --model",
            adapter.dir.display()
        );
    };
    if let Ok(loc) = model_source::resolve(name) {
        return Ok(loc);
    }
    let beside = adapter.dir.join(name);
    if beside.exists() {
        if let Ok(loc) = model_source::resolve(&beside.to_string_lossy()) {
            return Ok(loc);
        }
    }
    let file = Path::new(name).file_name().and_then(|f| f.to_str()).unwrap_or(name);
    if let Some(m) = DEFAULT_MODELS.iter().find(|m| m.entry == Some(file)) {
        return model_source::resolve(m.name);
    }
    bail!(
        "{}: the base model `{name}` (base_model_name_or_path) is not a file, a directory or a default model's file here; give the model with --model",
        adapter.dir.display()
    )
}
