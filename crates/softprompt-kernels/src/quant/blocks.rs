//! GGML's weight blocks, byte for byte as a GGUF file stores them (`ggml-common.h`), and their
//! exact decoding into integer codes and scales.
//!
//! | type | values | bytes | layout (offsets in bytes) | value `i` |
//! |---|---|---|---|---|
//! | Q4_0 | 32 | 18 | `d: f16` 0, `qs[16]` 2 | `d·(q − 8)`, `q` = low nibble of `qs[i]` (`i < 16`), high nibble of `qs[i − 16]` |
//! | Q4_1 | 32 | 20 | `d: f16` 0, `m: f16` 2, `qs[16]` 4 | `d·q + m`, nibbles as Q4_0 |
//! | Q8_0 | 32 | 34 | `d: f16` 0, `qs: [i8; 32]` 2 | `d·qs[i]` |
//! | Q4_K | 256 | 144 | `d, dmin: f16` 0, 2, `scales[12]` 4, `qs[128]` 16 | `d·sc_j·q − dmin·m_j` over 8 sub-blocks `j` of 32 (6-bit `sc_j`, `m_j` packed in `scales`); 64 values per 32 bytes of `qs`: low nibbles first, then high |
//! | Q5_K | 256 | 176 | as Q4_K, `qh[32]` 16, `qs[128]` 48 | as Q4_K with a fifth bit: bit `j` of `qh[l]` for sub-block `j` |
//! | Q6_K | 256 | 210 | `ql[128]` 0, `qh[64]` 128, `scales: [i8; 16]` 192, `d: f16` 208 | `d·sc_g·(q − 32)` over 16 groups `g` of 16 values |

/// Values per block of the 32-value types.
pub const QK: usize = 32;
/// Values per super-block of the K-quants.
pub const QK_K: usize = 256;

/// A GGML block type with quantized matrix–vector kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// 4-bit codes around 8, one f16 scale per 32 values (4.5 bits per weight).
    Q4_0,
    /// 4-bit codes, an f16 scale and offset per 32 values (5 bits per weight).
    Q4_1,
    /// 8-bit codes, one f16 scale per 32 values (8.5 bits per weight).
    Q8_0,
    /// 4-bit codes in super-blocks of 256 with 6-bit scales and minima per 32 (4.5 bits).
    Q4K,
    /// 5-bit codes in super-blocks of 256 with 6-bit scales and minima per 32 (5.5 bits).
    Q5K,
    /// 6-bit codes in super-blocks of 256 with 8-bit scales per 16 (6.5625 bits).
    Q6K,
}

impl QuantType {
    /// Every type, in the order of this enum.
    pub const ALL: [QuantType; 6] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q8_0,
        QuantType::Q4K,
        QuantType::Q5K,
        QuantType::Q6K,
    ];

    /// Values per block.
    pub fn block_values(self) -> usize {
        if self.is_k() {
            QK_K
        } else {
            QK
        }
    }

    /// Bytes per block (GGML's `type_size`).
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q8_0 => 34,
            QuantType::Q4K => 144,
            QuantType::Q5K => 176,
            QuantType::Q6K => 210,
        }
    }

    /// Whether this is a K-quant (256-value super-blocks, multiplied with Q8_K activations;
    /// the others with Q8_0/Q8_1 activations in blocks of 32).
    pub fn is_k(self) -> bool {
        matches!(self, QuantType::Q4K | QuantType::Q5K | QuantType::Q6K)
    }
}

/// An IEEE half's bits as f32 (exact).
#[inline(always)]
pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Sub-block `j`'s 6-bit scale and minimum from a Q4_K/Q5_K block's 12 `scales` bytes
/// (GGML's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One block decoded exactly: value `i` is `d·sc[g]·q[i] − dmin·mn[g] (+ offset)` with
/// `g = i / group` (for the 32-value types `sc` = 1, `mn` = 0 and `group` = 32).
#[derive(Debug, Clone)]
pub struct Decoded {
    /// Integer codes (Q4_0 −8..7, Q4_1 0..15, Q8_0 −128..127, Q4_K 0..15, Q5_K 0..31,
    /// Q6_K −32..31); only the block's values are used.
    pub q: [i8; QK_K],
    /// Values per group sharing a scale.
    pub group: usize,
    /// Integer scale per group.
    pub sc: [i32; 16],
    /// Integer minimum per group (K-quants with minima).
    pub mn: [i32; 16],
    /// The block's float scale.
    pub d: f32,
    /// The float scale of the minima (Q4_K, Q5_K).
    pub dmin: f32,
    /// Q4_1's offset `m` (added to every value).
    pub offset: f32,
}

/// Decodes one block of `t` (`block` holds its `block_bytes` bytes).
pub fn decode(t: QuantType, block: &[u8]) -> Decoded {
    assert_eq!(block.len(), t.block_bytes(), "decode: not one {t:?} block");
    let mut out = Decoded {
        q: [0; QK_K],
        group: QK,
        sc: [1; 16],
        mn: [0; 16],
        d: 0.0,
        dmin: 0.0,
        offset: 0.0,
    };
    match t {
        QuantType::Q4_0 | QuantType::Q4_1 => {
            let (qs, bias) = if t == QuantType::Q4_0 {
                (&block[2..18], 8)
            } else {
                out.offset = f16_at(block, 2);
                (&block[4..20], 0)
            };
            out.d = f16_at(block, 0);
            for j in 0..16 {
                out.q[j] = (qs[j] & 0xF) as i8 - bias;
                out.q[j + 16] = (qs[j] >> 4) as i8 - bias;
            }
        }
        QuantType::Q8_0 => {
            out.d = f16_at(block, 0);
            for j in 0..QK {
                out.q[j] = block[2 + j] as i8;
            }
        }
        QuantType::Q4K | QuantType::Q5K => {
            out.d = f16_at(block, 0);
            out.dmin = f16_at(block, 2);
            let scales = &block[4..16];
            let (qh, qs) = if t == QuantType::Q5K {
                (Some(&block[16..48]), &block[48..176])
            } else {
                (None, &block[16..144])
            };
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                out.sc[j] = i32::from(sc);
                out.mn[j] = i32::from(m);
            }
            for c in 0..4 {
                for l in 0..32 {
                    let byte = qs[32 * c + l];
                    let (mut lo, mut hi) = (byte & 0xF, byte >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                    out.q[64 * c + l] = lo as i8;
                    out.q[64 * c + 32 + l] = hi as i8;
                }
            }
        }
        QuantType::Q6K => {
            out.group = 16;
            out.d = f16_at(block, 208);
            for g in 0..16 {
                out.sc[g] = i32::from(block[192 + g] as i8);
            }
            for n in 0..2 {
                let (ql, qh) = (&block[64 * n..64 * n + 64], &block[128 + 32 * n..128 + 32 * n + 32]);
                for l in 0..32 {
                    let q = |low: u8, shift: u32| ((low | (((qh[l] >> shift) & 3) << 4)) as i8) - 32;
                    out.q[128 * n + l] = q(ql[l] & 0xF, 0);
                    out.q[128 * n + l + 32] = q(ql[l + 32] & 0xF, 2);
                    out.q[128 * n + l + 64] = q(ql[l] >> 4, 4);
                    out.q[128 * n + l + 96] = q(ql[l + 32] >> 4, 6);
                }
            }
        }
    }
    out
}

/// A row of `t` blocks (`bytes`) as f32 into `out` (`block_values` per block), computed as
/// GGML's `dequantize_row_*` reference does (products in the same order, no fused multiply-add).
pub fn dequantize_row(t: QuantType, bytes: &[u8], out: &mut [f32]) {
    let (bv, bb) = (t.block_values(), t.block_bytes());
    assert_eq!(bytes.len() / bb * bv, out.len(), "dequantize_row: sizes differ");
    assert_eq!(bytes.len() % bb, 0, "dequantize_row: not whole blocks");
    for (block, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
        let b = decode(t, block);
        for (i, v) in y.iter_mut().enumerate() {
            let (q, g) = (f32::from(b.q[i]), i / b.group);
            *v = match t {
                QuantType::Q4_0 | QuantType::Q8_0 => q * b.d,
                QuantType::Q4_1 => q * b.d + b.offset,
                QuantType::Q4K | QuantType::Q5K => (b.d * b.sc[g] as f32) * q - b.dmin * b.mn[g] as f32,
                QuantType::Q6K => b.d * b.sc[g] as f32 * q,
            };
        }
    }
}
