//! Keys and values already computed: a generation cache, a prompt's K/V reused by many
//! requests, or a key/value prefix (prefix tuning, p-tuning v2, Cartridges); batching caches of
//! different lengths and splitting them again.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

/// Per-layer keys and values already computed (a generation cache, or a prompt's K/V reused
/// by many requests). Keys are stored after rotary encoding.
///
/// A new token's key slot is its column after the `len()` cached slots, which is also its
/// rotary position unless `next_pos` says otherwise: rows of different lengths padded to one
/// number of slots (mixed-request batches, [`KvCache::stack`]) each carry their own position.
#[derive(Clone, Default)]
pub struct KvCache {
    /// `(k, v)` per layer, each `[B, Hkv, S, head_dim]`.
    pub layers: Vec<(Tensor, Tensor)>,
    /// `[B, S]` key mask (f32) of the cached positions.
    pub mask: Option<Tensor>,
    /// `[B]` rotary position of each row's next token; `None`: `len()` for every row. Only the
    /// fused f32 CPU path runs a cache whose rows differ here.
    pub next_pos: Option<Vec<usize>>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.mask.as_ref().map_or(0, |m| m.dim(1).unwrap_or(0))
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of rows (1 for an empty cache).
    pub fn rows(&self) -> usize {
        self.mask.as_ref().map_or(1, |m| m.dim(0).unwrap_or(1))
    }

    /// The rotary position of each row's next token (`[B]`).
    pub fn positions(&self) -> Vec<usize> {
        self.next_pos.clone().unwrap_or_else(|| vec![self.len(); self.rows()])
    }

    /// The same cache on `device`.
    pub fn to_device(&self, device: &Device) -> Result<KvCache> {
        Ok(KvCache {
            layers: self
                .layers
                .iter()
                .map(|(k, v)| Ok((k.to_device(device)?, v.to_device(device)?)))
                .collect::<Result<_>>()?,
            mask: self.mask.as_ref().map(|m| m.to_device(device)).transpose()?,
            next_pos: self.next_pos.clone(),
        })
    }

    /// The cache of a single sequence repeated for `n` sequences (a shared prompt's keys and
    /// values reused by a batch).
    pub fn repeat(&self, n: usize) -> Result<KvCache> {
        let grow = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            dims[0] = n;
            Ok(t.broadcast_as(dims)?.contiguous()?)
        };
        Ok(KvCache {
            layers: self
                .layers
                .iter()
                .map(|(k, v)| Ok((grow(k)?, grow(v)?)))
                .collect::<Result<_>>()?,
            mask: self.mask.as_ref().map(grow).transpose()?,
            next_pos: self.next_pos.as_ref().map(|p| vec![p[0]; n]),
        })
    }

    /// Single-row caches of different lengths as one batch: each row padded at its end to the
    /// longest with masked slots, each keeping its own next position. Every cache must be
    /// non-empty and of one row.
    pub fn stack(caches: &[&KvCache]) -> Result<KvCache> {
        let first = caches.first().context("no cache to stack")?;
        let layers = first.layers.len();
        let slots = caches.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut out = KvCache {
            layers: Vec::with_capacity(layers),
            mask: None,
            next_pos: Some(Vec::with_capacity(caches.len())),
        };
        let mut masks = Vec::with_capacity(caches.len());
        for c in caches {
            if c.is_empty() || c.rows() != 1 || c.layers.len() != layers {
                bail!(
                    "cannot stack a cache of {} rows, {} positions and {} layers with one of 1 row and {layers} layers",
                    c.rows(),
                    c.len(),
                    c.layers.len()
                );
            }
            let mask = c.mask.as_ref().context("a non-empty cache has a mask")?;
            let pad = slots - c.len();
            masks.push(if pad == 0 {
                mask.clone()
            } else {
                mask.pad_with_zeros(1, 0, pad)?
            });
            out.next_pos.as_mut().expect("set above").push(c.positions()[0]);
        }
        for l in 0..layers {
            let mut ks = Vec::with_capacity(caches.len());
            let mut vs = Vec::with_capacity(caches.len());
            for c in caches {
                let pad = slots - c.len();
                let (k, v) = &c.layers[l];
                ks.push(if pad == 0 {
                    k.clone()
                } else {
                    k.pad_with_zeros(2, 0, pad)?
                });
                vs.push(if pad == 0 {
                    v.clone()
                } else {
                    v.pad_with_zeros(2, 0, pad)?
                });
            }
            out.layers.push((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
        }
        out.mask = Some(Tensor::cat(&masks, 0)?);
        Ok(out)
    }

    /// The rows of a batched cache as single-row caches holding only their real (unmasked)
    /// slots, each with its next position.
    pub fn unstack(&self) -> Result<Vec<KvCache>> {
        let mask = self.mask.as_ref().context("cannot split an empty cache")?;
        let masks: Vec<Vec<f32>> = mask.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        let positions = self.positions();
        let device = mask.device();
        masks
            .iter()
            .enumerate()
            .map(|(r, m)| {
                let real: Vec<u32> = (0..m.len() as u32).filter(|&j| m[j as usize] != 0.0).collect();
                let n = real.len();
                let idx = Tensor::from_vec(real, n, device)?;
                let layers = self
                    .layers
                    .iter()
                    .map(|(k, v)| {
                        let take = |t: &Tensor| -> Result<Tensor> {
                            Ok(t.narrow(0, r, 1)?.index_select(&idx, 2)?.contiguous()?)
                        };
                        Ok((take(k)?, take(v)?))
                    })
                    .collect::<Result<_>>()?;
                Ok(KvCache {
                    layers,
                    mask: Some(Tensor::ones((1, n), candle_core::DType::F32, device)?),
                    next_pos: (positions[r] != n).then(|| vec![positions[r]]),
                })
            })
            .collect()
    }
}
