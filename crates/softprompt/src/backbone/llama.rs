//! Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2): RMSNorm, rotary position
//! encoding (`rope_theta`), grouped-query attention with optional q/k/v bias, SwiGLU MLP, tied or
//! untied vocabulary head. Forward and input-gradient passes are written out layer by layer.
//!
//! Per layer, with `x` the residual stream:
//! ```text
//! n1 = rms(x)·g1;  q,k,v = n1·Wq,k,vᵀ (+b);  q,k = rope(q,k);  a = softmax(q·kᵀ/√d + mask)·v
//! x2 = x + a·Woᵀ;  n2 = rms(x2)·g2;  y = (silu(n2·Wgᵀ) ⊙ n2·Wuᵀ)·Wdᵀ;  out = x2 + y
//! ```

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

use super::llama_fused::{FusedLayer, FusedLlama, FusedTape};
use super::ops::{self, AttentionSaved};
use super::weights::WeightSource;
use super::{Arch, Backbone, BackboneInput, KvCache, ModelInfo, Tape};
use crate::gguf::GgufFile;

/// Hyper-parameters of a Llama-family model.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// Transformer layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP inner size.
    pub intermediate: usize,
    /// Vocabulary rows.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Longest supported sequence.
    pub max_positions: usize,
}

impl LlamaConfig {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    fn validate(&self, source: &Path) -> Result<()> {
        if self.heads == 0
            || self.kv_heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            bail!(
                "{}: inconsistent attention shape (hidden {}, heads {}, kv heads {})",
                source.display(),
                self.hidden,
                self.heads,
                self.kv_heads
            );
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: Tensor,
    /// q, k and v projections stacked: `[d + 2·kv_dim, d]` (one matrix multiply for all three).
    w_qkv: Tensor,
    /// Their biases (Qwen2), stacked likewise.
    b_qkv: Option<Tensor>,
    wo: Tensor,
    ffn_norm: Tensor,
    /// Gate and up projections stacked: `[2·intermediate, d]`.
    w_gate_up: Tensor,
    w_down: Tensor,
}

/// A frozen Llama-family model.
pub struct Llama {
    info: ModelInfo,
    cfg: LlamaConfig,
    embed: Tensor,
    /// The layers as candle tensors (composed path); empty when `fused` holds them.
    layers: Vec<Layer>,
    /// The layers as plain f32 rows for the fused CPU kernels (f32 on the CPU).
    fused: Option<FusedLlama>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// Parameter roles, mapped to file-specific tensor names.
#[derive(Clone, Copy)]
enum P {
    Embed,
    Norm,
    Head,
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

fn gguf_name(p: P, l: usize) -> String {
    let s = match p {
        P::Embed => return "token_embd.weight".into(),
        P::Norm => return "output_norm.weight".into(),
        P::Head => return "output.weight".into(),
        P::AttnNorm => "attn_norm.weight",
        P::Q => "attn_q.weight",
        P::K => "attn_k.weight",
        P::V => "attn_v.weight",
        P::QBias => "attn_q.bias",
        P::KBias => "attn_k.bias",
        P::VBias => "attn_v.bias",
        P::O => "attn_output.weight",
        P::FfnNorm => "ffn_norm.weight",
        P::Gate => "ffn_gate.weight",
        P::Up => "ffn_up.weight",
        P::Down => "ffn_down.weight",
    };
    format!("blk.{l}.{s}")
}

fn hf_name(p: P, l: usize) -> String {
    let s = match p {
        P::Embed => return "model.embed_tokens.weight".into(),
        P::Norm => return "model.norm.weight".into(),
        P::Head => return "lm_head.weight".into(),
        P::AttnNorm => "input_layernorm.weight",
        P::Q => "self_attn.q_proj.weight",
        P::K => "self_attn.k_proj.weight",
        P::V => "self_attn.v_proj.weight",
        P::QBias => "self_attn.q_proj.bias",
        P::KBias => "self_attn.k_proj.bias",
        P::VBias => "self_attn.v_proj.bias",
        P::O => "self_attn.o_proj.weight",
        P::FfnNorm => "post_attention_layernorm.weight",
        P::Gate => "mlp.gate_proj.weight",
        P::Up => "mlp.up_proj.weight",
        P::Down => "mlp.down_proj.weight",
    };
    format!("model.layers.{l}.{s}")
}

/// Undoes llama.cpp's permutation of q/k rows (interleaved → half-split rotary layout):
/// rows `[h, d/2, 2]` → `[h, 2, d/2]`.
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// What the training forward keeps per layer.
struct LayerTape {
    x: Tensor,
    x2: Tensor,
    gate: Tensor,
    up: Tensor,
    attn: AttentionSaved,
}

struct LlamaTape {
    /// Cached (prefix) positions before the input.
    past: usize,
    layers: Vec<LayerTape>,
    packing: ops::Packing,
    last: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// Loads a GGUF file whose `general.architecture` is llama, mistral or qwen2.
    pub fn from_gguf(file: &GgufFile, device: &Device) -> Result<Self> {
        let arch = file.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let heads = file.get_usize(&key("attention.head_count"))?;
        let embed_rows = file
            .tensors
            .get("token_embd.weight")
            .map(|e| e.shape[0])
            .with_context(|| format!("{}: tensor `token_embd.weight` is missing", file.path().display()))?;
        let cfg = LlamaConfig {
            layers: file.get_usize(&key("block_count"))?,
            hidden: file.get_usize(&key("embedding_length"))?,
            heads,
            kv_heads: file.get_usize(&key("attention.head_count_kv")).unwrap_or(heads),
            intermediate: file.get_usize(&key("feed_forward_length"))?,
            vocab: file.get_usize(&key("vocab_size")).unwrap_or(embed_rows),
            eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: file.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            max_positions: file.get_usize(&key("context_length"))?,
        };
        // llama.cpp permutes q/k rows for the llama architecture only (qwen2 keeps HF's layout).
        let unpermute = arch == "llama" || arch == "mistral";
        Self::build(cfg, file, gguf_name, unpermute, arch, device)
    }

    /// Loads a Hugging Face directory (`config.json` + safetensors).
    pub fn from_hf(
        dir: &Path,
        config: &serde_json::Value,
        weights: &dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let f = super::config_fields(dir, config)?;
        let heads = f.req_usize("num_attention_heads")?;
        let cfg = LlamaConfig {
            layers: f.req_usize("num_hidden_layers")?,
            hidden: f.req_usize("hidden_size")?,
            heads,
            kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            intermediate: f.req_usize("intermediate_size")?,
            vocab: f.req_usize("vocab_size")?,
            eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            max_positions: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
        };
        let model_type = f.opt_str("model_type")?.unwrap_or_else(|| "llama".to_string());
        Self::build(cfg, weights, hf_name, false, model_type, device)
    }

    /// Builds a model from Hugging Face-named weights and an explicit configuration.
    pub fn from_weights(cfg: LlamaConfig, weights: &dyn WeightSource, device: &Device) -> Result<Self> {
        Self::build(cfg, weights, hf_name, false, "llama".into(), device)
    }

    fn build(
        cfg: LlamaConfig,
        w: &dyn WeightSource,
        name: fn(P, usize) -> String,
        unpermute: bool,
        model_type: String,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate(w.location())?;
        let (d, hd, i) = (cfg.hidden, cfg.head_dim(), cfg.intermediate);
        let kvd = cfg.kv_heads * hd;
        let get = |p: P, l: usize, shape: &[usize]| w.tensor_shaped(&name(p, l), shape, device);
        let opt = |p: P, l: usize, shape: &[usize]| -> Result<Option<Tensor>> {
            if w.contains(&name(p, l)) {
                get(p, l, shape).map(Some)
            } else {
                Ok(None)
            }
        };
        let embed = get(P::Embed, 0, &[cfg.vocab, d])?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let mut wq = get(P::Q, l, &[d, d])?;
            let mut wk = get(P::K, l, &[kvd, d])?;
            if unpermute {
                wq = unpermute_rows(&wq, cfg.heads)?;
                wk = unpermute_rows(&wk, cfg.kv_heads)?;
            }
            let wv = get(P::V, l, &[kvd, d])?;
            let biases = [
                opt(P::QBias, l, &[d])?,
                opt(P::KBias, l, &[kvd])?,
                opt(P::VBias, l, &[kvd])?,
            ];
            let b_qkv = if biases.iter().any(Option::is_some) {
                let filled: Vec<Tensor> = biases
                    .into_iter()
                    .zip([d, kvd, kvd])
                    .map(|(b, n)| b.map_or_else(|| Tensor::zeros(n, embed.dtype(), device), Ok))
                    .collect::<candle_core::Result<_>>()?;
                Some(Tensor::cat(&filled, 0)?)
            } else {
                None
            };
            let gate = get(P::Gate, l, &[i, d])?;
            let up = get(P::Up, l, &[i, d])?;
            layers.push(Layer {
                attn_norm: get(P::AttnNorm, l, &[d])?,
                w_qkv: Tensor::cat(&[&wq, &wk, &wv], 0)?,
                b_qkv,
                wo: get(P::O, l, &[d, d])?,
                ffn_norm: get(P::FfnNorm, l, &[d])?,
                w_gate_up: Tensor::cat(&[&gate, &up], 0)?,
                w_down: get(P::Down, l, &[d, i])?,
            });
        }
        let norm = get(P::Norm, 0, &[d])?;
        let lm_head = opt(P::Head, 0, &[cfg.vocab, d])?;
        let tied = lm_head.is_none();
        let lm_head = lm_head.unwrap_or_else(|| embed.clone());
        let per_layer = 2 * d + 2 * d * d + 2 * kvd * d + 3 * d * i;
        let biases: usize = layers
            .iter()
            .filter_map(|l| l.b_qkv.as_ref())
            .map(Tensor::elem_count)
            .sum();
        let params = cfg.vocab * d * if tied { 1 } else { 2 } + d + cfg.layers * per_layer + biases;
        let (cos, sin) = rope_tables(&cfg, embed.dtype(), device)?;
        let fused = if super::fused::applies(device, embed.dtype()) {
            Some(Self::fuse(&cfg, std::mem::take(&mut layers), &norm, &cos, &sin)?)
        } else {
            None
        };
        let info = ModelInfo {
            arch: Arch::Llama,
            model_type,
            source: w.location().to_path_buf(),
            layers: cfg.layers,
            hidden: d,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            intermediate: i,
            vocab: cfg.vocab,
            max_positions: cfg.max_positions,
            params,
            dtypes_on_disk: w.dtype_counts(),
        };
        Ok(Self {
            info,
            cfg,
            embed,
            layers,
            fused,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    /// Moves the layers' weights into the plain rows the fused CPU kernels read.
    fn fuse(cfg: &LlamaConfig, layers: Vec<Layer>, norm: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<FusedLlama> {
        use super::fused::to_vec;
        let layers = layers
            .into_iter()
            .map(|l| {
                Ok(FusedLayer {
                    attn_norm: to_vec(&l.attn_norm)?,
                    w_qkv: to_vec(&l.w_qkv)?,
                    b_qkv: l.b_qkv.as_ref().map(to_vec).transpose()?,
                    wo: to_vec(&l.wo)?,
                    ffn_norm: to_vec(&l.ffn_norm)?,
                    w_gate_up: to_vec(&l.w_gate_up)?,
                    w_down: to_vec(&l.w_down)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(FusedLlama {
            layers,
            norm: to_vec(norm)?,
            cos: to_vec(cos)?,
            sin: to_vec(sin)?,
            hidden: cfg.hidden,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            intermediate: cfg.intermediate,
            eps: cfg.eps as f32,
        })
    }

    fn check_width(&self, input: &BackboneInput) -> Result<()> {
        let d = input.embeds.dim(2)?;
        if d != self.cfg.hidden {
            bail!(
                "input embeddings have width {d}, the model's hidden size is {}",
                self.cfg.hidden
            );
        }
        Ok(())
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn rope_slice(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        if start + len > self.cfg.max_positions {
            bail!(
                "sequence of {} positions exceeds the model's context of {}",
                start + len,
                self.cfg.max_positions
            );
        }
        Ok((self.cos.narrow(0, start, len)?, self.sin.narrow(0, start, len)?))
    }

    /// One decoder layer on the packed real positions `x` `[N, D]`. `past` holds earlier
    /// keys/values (already rotated).
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        packing: &ops::Packing,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        keep: bool,
    ) -> Result<(Tensor, Option<LayerTape>, (Tensor, Tensor))> {
        let (h, hkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim());
        let n1 = ops::rms_norm(x, &layer.attn_norm, self.cfg.eps)?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            let y = packing.unpack(&y)?;
            let (b, t, _) = y.dims3()?;
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let qkv = ops::linear(&n1, &layer.w_qkv, layer.b_qkv.as_ref())?;
        let kvd = hkv * hd;
        let q = heads(qkv.narrow(1, 0, h * hd)?, h)?;
        let k = heads(qkv.narrow(1, h * hd, kvd)?, hkv)?;
        let v = heads(qkv.narrow(1, h * hd + kvd, kvd)?, hkv)?;
        let (b, _, t, _) = q.dims4()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let qg = q.reshape((b, hkv, (h / hkv) * t, hd))?;
        let (a, saved) = ops::attention(&qg, &k, &v, bias, h / hkv, keep)?;
        let a = packing.pack(&a.reshape((b, h, t, hd))?.transpose(1, 2)?.reshape((b, t, h * hd))?)?;
        let x2 = (x + ops::linear(&a, &layer.wo, None)?)?;
        let n2 = ops::rms_norm(&x2, &layer.ffn_norm, self.cfg.eps)?;
        let gate_up = ops::linear(&n2, &layer.w_gate_up, None)?;
        let inter = self.cfg.intermediate;
        let gate = gate_up.narrow(1, 0, inter)?.contiguous()?;
        let up = gate_up.narrow(1, inter, inter)?.contiguous()?;
        let m = (gate.silu()? * &up)?;
        let out = (&x2 + ops::linear(&m, &layer.w_down, None)?)?;
        let tape = saved.map(|attn| LayerTape {
            x: x.clone(),
            x2,
            gate,
            up,
            attn,
        });
        Ok((out, tape, (k, v)))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        layer: &Layer,
        tape: &LayerTape,
        dy: &Tensor,
        packing: &ops::Packing,
        cos: &Tensor,
        sin: &Tensor,
        past: usize,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (h, hkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim());
        let eps = self.cfg.eps;
        // MLP
        let dm = ops::linear_backward(dy, &layer.w_down)?;
        let du = (&dm * tape.gate.silu()?)?;
        let dg = ops::silu_backward(&tape.gate, &(&dm * &tape.up)?)?;
        let dn2 = ops::linear_backward(&Tensor::cat(&[&dg, &du], 1)?, &layer.w_gate_up)?;
        let dx2 = (dy + ops::rms_norm_backward(&tape.x2, &layer.ffn_norm, eps, &dn2)?)?;
        // attention
        let da = packing.unpack(&ops::linear_backward(&dx2, &layer.wo)?)?;
        let (b, t, _) = da.dims3()?;
        let da = da
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, hkv, (h / hkv) * t, hd))?;
        let (dq, dk_all, dv_all) = ops::attention_backward(&tape.attn, &da)?;
        // the cached (prefix) slots' gradient, summed over rows; the rest flows into this input
        let d_past = (
            dk_all.narrow(2, 0, past)?.sum_keepdim(0)?,
            dv_all.narrow(2, 0, past)?.sum_keepdim(0)?,
        );
        let (dk, dv) = (dk_all.narrow(2, past, t)?, dv_all.narrow(2, past, t)?);
        let neg_sin = sin.neg()?;
        let dq = candle_nn::rotary_emb::rope(&dq.reshape((b, h, t, hd))?.contiguous()?, cos, &neg_sin)?;
        let dk = candle_nn::rotary_emb::rope(&dk.contiguous()?, cos, &neg_sin)?;
        let flat =
            |y: Tensor, n: usize| -> Result<Tensor> { Ok(packing.pack(&y.transpose(1, 2)?.reshape((b, t, n * hd))?)?) };
        let d_qkv = Tensor::cat(&[flat(dq, h)?, flat(dk, hkv)?, flat(dv, hkv)?], 1)?;
        let dn1 = ops::linear_backward(&d_qkv, &layer.w_qkv)?;
        Ok((
            (dx2 + ops::rms_norm_backward(&tape.x, &layer.attn_norm, eps, &dn1)?)?,
            d_past,
        ))
    }

    fn run(
        &self,
        input: &BackboneInput,
        keep: bool,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Option<LlamaTape>)> {
        self.check_width(input)?;
        let t = input.embeds.dim(1)?;
        let mask = input.mask.to_dtype(candle_core::DType::F32)?;
        let past_len = cache.as_ref().map_or(0, |c| c.len());
        if let Some(c) = cache.as_ref() {
            if c.positions().iter().any(|&p| p != past_len) {
                bail!(
                    "rows with their own positions after a padded key/value cache (mixed-request \
                     batches) run only on the fused f32 CPU path, not on {:?} {:?}",
                    self.embed.device(),
                    self.embed.dtype()
                );
            }
        }
        let key_mask = match cache.as_ref().and_then(|c| c.mask.as_ref()) {
            Some(m) => Tensor::cat(&[m, &mask], 1)?,
            None => mask.clone(),
        };
        let bias = ops::attention_bias(&key_mask, t, true, input.embeds.dtype())?;
        let (cos, sin) = self.rope_slice(past_len, t)?;
        let packing = ops::Packing::new(input.mask)?;
        let mut x = packing.pack(input.embeds)?;
        let mut tapes = Vec::new();
        let mut new_kv = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let past = cache.as_ref().and_then(|c| c.layers.get(l));
            let (y, tape, kv) = self.layer_forward(layer, &x, &packing, &bias, &cos, &sin, past, keep)?;
            tapes.extend(tape);
            new_kv.push(kv);
            x = y;
        }
        let hidden = packing.unpack(&ops::rms_norm(&x, &self.norm, self.cfg.eps)?)?;
        if let Some(c) = cache {
            c.layers = new_kv;
            c.mask = Some(key_mask);
            c.next_pos = None;
        }
        let tape = keep.then_some(LlamaTape {
            past: past_len,
            layers: tapes,
            last: x,
            cos,
            sin,
            packing,
        });
        Ok((hidden, tape))
    }
}

/// RoPE tables `cos`, `sin` of shape `[max_positions, head_dim/2]`.
fn rope_tables(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32)
        .collect();
    let n = cfg.max_positions;
    let mut angles = Vec::with_capacity(n * hd / 2);
    for p in 0..n {
        angles.extend(inv.iter().map(|f| p as f32 * f));
    }
    let a = Tensor::from_vec(angles, (n, hd / 2), device)?.to_dtype(dtype)?;
    Ok((a.cos()?, a.sin()?))
}

impl Backbone for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn embedding_table(&self) -> &Tensor {
        &self.embed
    }
    fn forward(&self, input: &BackboneInput) -> Result<Tensor> {
        if let Some(f) = &self.fused {
            self.check_width(input)?;
            return Ok(f.forward(input.embeds, input.mask, None, false)?.0);
        }
        Ok(self.run(input, false, None)?.0)
    }
    fn forward_train(&self, input: &BackboneInput) -> Result<(Tensor, Tape)> {
        self.train_forward(input, None)
    }
    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor> {
        Ok(self.train_backward(tape, d_hidden)?.0)
    }
}

impl Llama {
    /// The training forward, after a key/value prefix (one row) when given.
    fn train_forward(&self, input: &BackboneInput, prefix: Option<&KvCache>) -> Result<(Tensor, Tape)> {
        let mut cache = match prefix {
            Some(p) => Some(p.repeat(input.embeds.dim(0)?)?),
            None => None,
        };
        if let Some(f) = &self.fused {
            self.check_width(input)?;
            let (h, tape) = f.forward(input.embeds, input.mask, cache.as_mut(), true)?;
            return Ok((h, Tape(Box::new(tape.expect("keep=true yields a tape")))));
        }
        let (h, tape) = self.run(input, true, cache.as_mut())?;
        Ok((h, Tape(Box::new(tape.expect("keep=true yields a tape")))))
    }

    /// The input gradient and the prefix's gradient (empty without a prefix).
    fn train_backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        if let (Some(f), Some(t)) = (&self.fused, tape.0.downcast_ref::<FusedTape>()) {
            return f.backward(t, d_hidden);
        }
        let tape = tape
            .0
            .downcast_ref::<LlamaTape>()
            .context("tape was not made by a Llama model")?;
        let d_packed = tape.packing.pack(d_hidden)?;
        let mut dx = ops::rms_norm_backward(&tape.last, &self.norm, self.cfg.eps, &d_packed)?;
        let mut d_past = Vec::new();
        for (layer, lt) in self.layers.iter().zip(&tape.layers).rev() {
            let (d, dkv) = self.layer_backward(layer, lt, &dx, &tape.packing, &tape.cos, &tape.sin, tape.past)?;
            dx = d;
            if tape.past > 0 {
                d_past.push(dkv);
            }
        }
        d_past.reverse();
        Ok((tape.packing.unpack(&dx)?, d_past))
    }
}

impl super::CausalLm for Llama {
    fn forward_train_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<(Tensor, Tape)> {
        self.train_forward(input, Some(prefix))
    }
    fn backward_prefixed(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        self.train_backward(tape, d_hidden)
    }
    fn forward_cached(&self, input: &BackboneInput, cache: &mut KvCache) -> Result<Tensor> {
        if let Some(f) = &self.fused {
            self.check_width(input)?;
            return Ok(f.forward(input.embeds, input.mask, Some(cache), false)?.0);
        }
        Ok(self.run(input, false, Some(cache))?.0)
    }
    fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
}
