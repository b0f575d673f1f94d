//! The math shared by the backbones: forward kernels and their input-gradient (backward)
//! counterparts. Only gradients with respect to activations are computed; weights are frozen,
//! so no weight gradient is ever formed.

use candle_core::{Result, Tensor, D};

/// `x · Wᵀ (+ b)` for `x` of shape `[.., in]` and `w` of shape `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner;
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("non-empty dims") = w.dim(0)?;
    y.reshape(out)
}

/// Input gradient of [`linear`]: `dy · W`, shape `[.., in]`.
pub fn linear_backward(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = dy.dims().to_vec();
    let out = dims[dims.len() - 1];
    let rows = dy.elem_count() / out;
    let dx = dy.reshape((rows, out))?.matmul(w)?;
    let mut shape = dims;
    *shape.last_mut().expect("non-empty dims") = w.dim(1)?;
    dx.reshape(shape)
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) · g`.
/// The fused kernel runs for f32/f16/bf16; f64 (used by the gradient tests) takes the composed path.
pub fn rms_norm(x: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == candle_core::DType::F64 {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        return x.broadcast_mul(&r)?.broadcast_mul(g);
    }
    candle_nn::ops::rms_norm(&x.contiguous()?, g, eps as f32)
}

/// Input gradient of [`rms_norm`]: with `r = 1/sqrt(mean(x²)+eps)` and `a = g·dy`,
/// `dx = r·a − x·r³·mean(a·x)`.
pub fn rms_norm_backward(x: &Tensor, g: &Tensor, eps: f64, dy: &Tensor) -> Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let a = dy.broadcast_mul(g)?;
    let dot = (&a * x)?.mean_keepdim(D::Minus1)?;
    let r3 = r.powf(3.0)?;
    a.broadcast_mul(&r)? - x.broadcast_mul(&(r3 * dot)?)?
}

/// LayerNorm: `(x − mean) / sqrt(var + eps) · g + b`.
/// The fused kernel runs for f32/f16/bf16; f64 (used by the gradient tests) takes the composed path.
pub fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == candle_core::DType::F64 {
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        return xc.broadcast_mul(&r)?.broadcast_mul(g)?.broadcast_add(b);
    }
    candle_nn::ops::layer_norm(&x.contiguous()?, g, b, eps as f32)
}

/// Input gradient of [`layer_norm`]: with `x̂ = (x−μ)·r` and `a = g·dy`,
/// `dx = r·(a − mean(a) − x̂·mean(a·x̂))`.
pub fn layer_norm_backward(x: &Tensor, g: &Tensor, eps: f64, dy: &Tensor) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&r)?;
    let a = dy.broadcast_mul(g)?;
    let mean_a = a.mean_keepdim(D::Minus1)?;
    let mean_ax = (&a * &xhat)?.mean_keepdim(D::Minus1)?;
    a.broadcast_sub(&mean_a)?
        .sub(&xhat.broadcast_mul(&mean_ax)?)?
        .broadcast_mul(&r)
}

/// Input gradient of SiLU: `silu'(z) = s·(1 + z·(1 − s))`, `s = sigmoid(z)`.
pub fn silu_backward(z: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(z)?;
    let one_minus = s.affine(-1.0, 1.0)?;
    let d = (&s * (z * one_minus)?.affine(1.0, 1.0)?)?;
    dy * d
}

/// Input gradient of the exact (erf) GELU: `Φ(z) + z·φ(z)`.
pub fn gelu_erf_backward(z: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let cdf = (z / std::f64::consts::SQRT_2)?.erf()?.affine(0.5, 0.5)?;
    let pdf = (z.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
    let d = (cdf + (z * pdf?)?)?;
    dy * d
}

/// `sqrt(2/π)`, the GELU tanh approximation's constant.
const GELU_K: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the GELU tanh approximation.
const GELU_C: f64 = 0.044_715;

/// GELU's tanh approximation (transformers' `gelu_pytorch_tanh`, GPT-2's `gelu_new`):
/// `0.5·z·(1 + tanh(sqrt(2/π)·(z + 0.044715·z³)))`.
pub fn gelu_tanh(z: &Tensor) -> Result<Tensor> {
    let inner = ((z + ((z.sqr()? * z)? * GELU_C)?)? * GELU_K)?;
    (z * 0.5)? * (inner.tanh()? + 1.0)?
}

/// Input gradient of [`gelu_tanh`] times `dy`: with `t = tanh(k·(z + c·z³))`,
/// `0.5·(1 + t) + 0.5·z·(1 − t²)·k·(1 + 3c·z²)`.
pub fn gelu_tanh_backward(z: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let t = ((z + ((z.sqr()? * z)? * GELU_C)?)? * GELU_K)?.tanh()?;
    let slope = ((z.sqr()? * (3.0 * GELU_C))? + 1.0)? * GELU_K;
    let d = (((&t + 1.0)? * 0.5)? + ((z * 0.5)? * (t.sqr()?.affine(-1.0, 1.0)? * slope?)?)?)?;
    dy * d
}

/// What attention keeps for its backward pass.
pub struct AttentionSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
    scale: f64,
}

/// Grouped scaled-dot-product attention.
///
/// `q`: `[B, Hkv, G·T, hd]` (the G query heads that share a key/value head stacked along the
/// sequence axis, so grouped-query attention needs no copy of K/V); `k`, `v`: `[B, Hkv, S, hd]`;
/// `bias`: additive mask broadcastable to `[B, Hkv, G, T, S]`. Returns `[B, Hkv, G·T, hd]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    groups: usize,
    keep: bool,
) -> Result<(Tensor, Option<AttentionSaved>)> {
    let (b, hkv, gt, hd) = q.dims4()?;
    let s = k.dim(2)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = scores
        .reshape((b, hkv, groups, gt / groups, s))?
        .broadcast_add(bias)?
        .reshape((b, hkv, gt, s))?;
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = p.matmul(v)?;
    let saved = keep.then(|| AttentionSaved {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        p,
        scale,
    });
    Ok((out, saved))
}

/// Input gradients of [`attention`]: returns `(dq, dk, dv)` in the layouts of q, k, v.
pub fn attention_backward(saved: &AttentionSaved, d_out: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let AttentionSaved { q, k, v, p, scale } = saved;
    let dp = d_out.matmul(&v.t()?)?;
    let dv = p.t()?.matmul(d_out)?;
    let row = (&dp * p)?.sum_keepdim(D::Minus1)?;
    let ds = (p * dp.broadcast_sub(&row)?)?;
    let dq = (ds.matmul(k)? * *scale)?;
    let dk = (ds.t()?.matmul(q)? * *scale)?;
    Ok((dq, dk, dv))
}

/// Additive attention bias `[B, 1, 1, T, S]` from a key mask `[B, S]` (1 = attend, 0 = padding),
/// optionally causal with the `T` queries at key positions `S−T .. S`.
pub fn attention_bias(key_mask: &Tensor, queries: usize, causal: bool, dtype: candle_core::DType) -> Result<Tensor> {
    let (b, s) = key_mask.dims2()?;
    let mask = key_mask.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let offset = s - queries;
    let mut bias = vec![0f32; b * queries * s];
    for (bi, row) in mask.iter().enumerate() {
        for t in 0..queries {
            for (j, &m) in row.iter().enumerate() {
                let blocked = m == 0.0 || (causal && j > offset + t);
                if blocked {
                    bias[(bi * queries + t) * s + j] = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, 1, queries, s), key_mask.device())?.to_dtype(dtype)
}

/// The value added to masked attention scores: finite, so a fully masked row stays defined.
pub const MASKED: f32 = -1e9;

/// Maps between the padded layout `[B, T, ·]` and the packed layout `[N, ·]` of the `N` real
/// positions. Position-wise layers (projections, norms, MLP) run packed, so padding costs no
/// matrix-multiply work; only attention unpacks. Without padding both maps are the identity.
pub struct Packing {
    b: usize,
    t: usize,
    n: usize,
    /// `[N]` flat indices of the real positions (None when nothing is padded).
    pack: Option<Tensor>,
    /// `[B·T]` index into `[packed; zero row]` for every padded-layout position.
    unpack: Option<Tensor>,
}

impl Packing {
    /// From a `[B, T]` mask (1 = real).
    pub fn new(mask: &Tensor) -> Result<Self> {
        let (b, t) = mask.dims2()?;
        let m: Vec<f32> = mask.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let real: Vec<u32> = (0..b * t).filter(|&i| m[i] != 0.0).map(|i| i as u32).collect();
        let n = real.len();
        if n == b * t {
            return Ok(Self {
                b,
                t,
                n,
                pack: None,
                unpack: None,
            });
        }
        let mut unpack = vec![n as u32; b * t];
        for (j, &i) in real.iter().enumerate() {
            unpack[i as usize] = j as u32;
        }
        let device = mask.device();
        Ok(Self {
            b,
            t,
            n,
            pack: Some(Tensor::from_vec(real, n, device)?),
            unpack: Some(Tensor::from_vec(unpack, b * t, device)?),
        })
    }

    /// `[B, T, C]` → `[N, C]`.
    pub fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        let flat = x.reshape((self.b * self.t, c))?;
        match &self.pack {
            Some(idx) => flat.index_select(idx, 0),
            None => Ok(flat),
        }
    }

    /// `[N, C]` → `[B, T, C]` with zeros at padded positions.
    pub fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        let full = match &self.unpack {
            Some(idx) => Tensor::cat(&[x, &Tensor::zeros((1, c), x.dtype(), x.device())?], 0)?.index_select(idx, 0)?,
            None => x.clone(),
        };
        full.reshape((self.b, self.t, c))
    }

    /// Number of real positions.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether there is no real position.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}
