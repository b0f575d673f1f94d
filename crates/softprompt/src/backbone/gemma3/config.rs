//! Reading a Gemma 3's configuration beyond its sizes: the kind of each layer (`layer_types`,
//! `sliding_window_pattern`, a GGUF's pattern), each kind's rotary encoding (transformers 5's
//! per-layer-type `rope_parameters` or the older `rope_theta` / `rope_local_base_freq` /
//! `rope_scaling`), and the `config.json` fields refused by name because this implementation
//! does not follow them.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

use super::{AttentionKind, Rotary};
use crate::backbone::llama::RopeScaling;
use crate::gguf::{GgufFile, MetaValue};
use crate::json_fields::JsonFields;

/// Refuses the `config.json` fields of a Gemma 3 that would change its numbers and that this
/// implementation does not follow, naming the field (`path` names the file).
pub(super) fn refuse_unsupported(f: &JsonFields, path: &Path) -> Result<()> {
    let shown = path.display();
    for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if let Some(v) = f.opt_value(k) {
            bail!("{shown}: field `{k}` is {v}; logit soft-capping is not supported (only null)");
        }
    }
    for k in ["hidden_activation", "hidden_act"] {
        if let Some(act) = f.opt_str(k)? {
            if act != "gelu_pytorch_tanh" {
                bail!("{shown}: field `{k}` is `{act}`; only `gelu_pytorch_tanh` is supported for gemma3_text");
            }
        }
    }
    if f.opt_bool("attention_bias")? == Some(true) {
        bail!("{shown}: field `attention_bias` is true; biases of the attention projections are not supported");
    }
    if f.opt_bool("use_bidirectional_attention")? == Some(true) {
        bail!("{shown}: field `use_bidirectional_attention` is true; only causal attention is supported");
    }
    Ok(())
}

/// Each layer's kind from `layer_types`, else from `sliding_window_pattern` (every n-th layer
/// global; transformers' default 6).
pub(super) fn hf_layer_kinds(f: &JsonFields, config: &Value, layers: usize, path: &Path) -> Result<Vec<AttentionKind>> {
    if let Some(types) = config.get("layer_types").filter(|v| !v.is_null()) {
        let list = types
            .as_array()
            .with_context(|| format!("{}: field `layer_types` should be a list", path.display()))?;
        return list
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("full_attention") => Ok(AttentionKind::Global),
                Some("sliding_attention") => Ok(AttentionKind::Sliding),
                _ => bail!(
                    "{}: field `layer_types`[{i}] is {t}; supported: \"full_attention\", \"sliding_attention\"",
                    path.display()
                ),
            })
            .collect();
    }
    let pattern = f.opt_usize("sliding_window_pattern")?.unwrap_or(6);
    if pattern == 0 {
        bail!("{}: field `sliding_window_pattern` is 0", path.display());
    }
    Ok(pattern_kinds(layers, pattern))
}

/// Every `pattern`-th layer global, the others sliding (transformers' and llama.cpp's rule:
/// layer `i` is sliding when `(i + 1) % pattern != 0`).
fn pattern_kinds(layers: usize, pattern: usize) -> Vec<AttentionKind> {
    (0..layers)
        .map(|i| {
            if (i + 1) % pattern != 0 {
                AttentionKind::Sliding
            } else {
                AttentionKind::Global
            }
        })
        .collect()
}

/// Each layer's kind from a GGUF's `sliding_window_pattern` metadata (`key`): one boolean per
/// layer (true: sliding), or a period; absent: llama.cpp's period 6 for Gemma 3.
pub(super) fn gguf_layer_kinds(file: &GgufFile, key: &str, layers: usize) -> Result<Vec<AttentionKind>> {
    match file.metadata.get(key) {
        None => Ok(pattern_kinds(layers, 6)),
        Some(MetaValue::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                MetaValue::Bool(true) => Ok(AttentionKind::Sliding),
                MetaValue::Bool(false) => Ok(AttentionKind::Global),
                _ => bail!("{}: metadata `{key}`[{i}] should be a boolean", file.path().display()),
            })
            .collect(),
        Some(_) => match file.get_usize(key)? {
            0 => bail!("{}: metadata `{key}` is 0", file.path().display()),
            n => Ok(pattern_kinds(layers, n)),
        },
    }
}

/// The rotary encoding of layers of `kind` from `config.json`: transformers 5's
/// `rope_parameters` per layer type (`full_attention`, `sliding_attention`), or the older
/// `rope_theta` (global, default 1e6) / `rope_local_base_freq` (sliding, default 1e4) with
/// `rope_scaling` applying to the global layers (as transformers reads them).
pub(super) fn hf_rotary(config: &Value, kind: AttentionKind, path: &Path) -> Result<Rotary> {
    let (type_key, theta_key, default_theta) = match kind {
        AttentionKind::Global => ("full_attention", "rope_theta", 1_000_000.0),
        AttentionKind::Sliding => ("sliding_attention", "rope_local_base_freq", 10_000.0),
    };
    let mut params = serde_json::Map::new();
    if let Some(p) = config.get("rope_parameters").filter(|v| !v.is_null()) {
        let per_type = p
            .as_object()
            .filter(|o| o.keys().all(|k| k == "full_attention" || k == "sliding_attention"));
        let Some(per_type) = per_type else {
            bail!(
                "{}: field `rope_parameters` should hold one object per layer type \
                 (`full_attention`, `sliding_attention`), as transformers writes for gemma3_text",
                path.display()
            );
        };
        if let Some(Value::Object(o)) = per_type.get(type_key) {
            params = o.clone();
        }
    }
    if kind == AttentionKind::Global {
        if let Some(Value::Object(s)) = config.get("rope_scaling") {
            params.extend(s.clone());
        }
    }
    let theta = match params.get("rope_theta").and_then(Value::as_f64) {
        Some(t) => t,
        None => match config.get(theta_key).filter(|v| !v.is_null()) {
            Some(v) => v
                .as_f64()
                .with_context(|| format!("{}: field `{theta_key}` should be a number", path.display()))?,
            None => default_theta,
        },
    };
    if !(theta.is_finite() && theta > 0.0) {
        bail!("{}: the {type_key} layers' rotary base is {theta}", path.display());
    }
    let scaling = RopeScaling::from_hf_config(&serde_json::json!({ "rope_parameters": params }), path)
        .with_context(|| format!("{}: the {type_key} layers' rotary parameters", path.display()))?;
    Ok(Rotary { theta, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sixth_layer_is_global() {
        let kinds = pattern_kinds(12, 6);
        let global: Vec<usize> = (0..12).filter(|&i| kinds[i] == AttentionKind::Global).collect();
        assert_eq!(global, vec![5, 11]);
    }

    #[test]
    fn rotary_bases_old_and_new_spellings() {
        let p = Path::new("config.json");
        let old = serde_json::json!({"rope_theta": 1e6, "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}});
        let g = hf_rotary(&old, AttentionKind::Global, p).unwrap();
        let s = hf_rotary(&old, AttentionKind::Sliding, p).unwrap();
        assert_eq!((g.theta, s.theta), (1e6, 1e4));
        assert_eq!(g.scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(s.scaling, RopeScaling::None);
        let new = serde_json::json!({"rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}});
        assert_eq!(hf_rotary(&new, AttentionKind::Global, p).unwrap().theta, 5e5);
        assert_eq!(hf_rotary(&new, AttentionKind::Sliding, p).unwrap().theta, 100.0);
        let yarn = serde_json::json!({"rope_parameters": {
            "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}});
        let e = format!("{:#}", hf_rotary(&yarn, AttentionKind::Global, p).unwrap_err());
        assert!(e.contains("`yarn`") && e.contains("full_attention"), "{e}");
        let flat = serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}});
        assert!(hf_rotary(&flat, AttentionKind::Global, p).is_err());
    }
}
