//! The quantized kernels against a reference written from the definitions: every block decoded
//! to its integer codes and scales ([`blocks::decode`]), the activations quantized as GGML does,
//! the integer dot product of each block pair in i32, scaled and summed in f64.

use super::blocks::{decode, dequantize_row, QuantType, QK_K};
use super::*;

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Offsets of the f16 fields of a block (random bytes there could be NaN or infinite).
fn f16_fields(t: QuantType) -> &'static [usize] {
    match t {
        QuantType::Q4_0 | QuantType::Q8_0 => &[0],
        QuantType::Q4_1 | QuantType::Q4K | QuantType::Q5K => &[0, 2],
        QuantType::Q6K => &[208],
    }
}

/// `rows` rows of `blocks` random blocks of `t`: random bytes, finite f16 factors of either sign.
fn random_blocks(t: QuantType, rows: usize, blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let mut bytes = rng.bytes(rows * blocks * t.block_bytes());
    for block in bytes.chunks_exact_mut(t.block_bytes()) {
        for &at in f16_fields(t) {
            let v = half::f16::from_f32(rng.unit() * 0.05);
            block[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    bytes
}

/// The reference `out[i, j] = Σ_blocks` of each block pair's exact integer dot, scaled (f64),
/// and `Σ |term|`, the scale of the rounding a kernel may add.
fn reference(t: QuantType, w: &[u8], x: &[f32], (m, n, k): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut mag) = (vec![0f64; m * n], vec![0f64; m * n]);
    let (q8, q8k) = if t.is_k() {
        (Q8Rows::default(), Q8KRows::quantize(x, k))
    } else {
        (Q8Rows::quantize(x, k), Q8KRows::default())
    };
    let row_bytes = k / t.block_values() * t.block_bytes();
    for i in 0..m {
        for j in 0..n {
            let row = &w[j * row_bytes..(j + 1) * row_bytes];
            for (b, block) in row.chunks_exact(t.block_bytes()).enumerate() {
                let x = decode(t, block);
                let bv = t.block_values();
                let (y, d8): (&[i8], f64) = if t.is_k() {
                    (&q8k.qs[i * k + b * bv..][..bv], f64::from(q8k.d[i * k / QK_K + b]))
                } else {
                    (&q8.qs[i * k + b * bv..][..bv], f64::from(q8.d[i * k / 32 + b]))
                };
                let (mut dots, mut mins) = (0i32, 0i32);
                for g in 0..bv / x.group {
                    let span = g * x.group..(g + 1) * x.group;
                    let dot: i32 = x.q[span.clone()]
                        .iter()
                        .zip(&y[span.clone()])
                        .map(|(&a, &b)| i32::from(a) * i32::from(b))
                        .sum();
                    let ysum: i32 = y[span].iter().map(|&v| i32::from(v)).sum();
                    dots += x.sc[g] * dot;
                    mins += x.mn[g] * ysum;
                }
                let mut term = f64::from(x.d) * d8 * f64::from(dots) - f64::from(x.dmin) * d8 * f64::from(mins);
                if t == QuantType::Q4_1 {
                    term += f64::from(x.offset) * f64::from(q8.s[i * k / 32 + b]);
                }
                out[i * n + j] += term;
                mag[i * n + j] += term.abs();
            }
        }
    }
    (out, mag)
}

/// Every type, every kernel family this CPU runs, odd and even block counts, odd row counts,
/// one and several activation rows, with and without accumulation.
#[test]
fn kernels_equal_the_integer_reference() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for t in QuantType::ALL {
        for blocks in [1usize, 2, 3, 5] {
            let k = blocks * t.block_values();
            for (m, n) in [(1usize, 1usize), (1, 13), (2, 7), (3, 5), (4, 1), (7, 19)] {
                let w = random_blocks(t, n, blocks, &mut rng);
                let x: Vec<f32> = (0..m * k).map(|_| rng.unit() * 3.0).collect();
                let (want, mag) = reference(t, &w, &x, (m, n, k));
                for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                    for accumulate in [false, true] {
                        let mut out = vec![0.5f32; m * n];
                        matmul_wt_with(isa, &[QuantRows::new(t, n, k, &w)], &x, &mut out, m, accumulate);
                        for (e, (&got, (&want, &mag))) in out.iter().zip(want.iter().zip(&mag)).enumerate() {
                            let want = want + if accumulate { 0.5 } else { 0.0 };
                            assert!(
                                (f64::from(got) - want).abs() <= 2e-6 * mag + 1e-7,
                                "{t:?} {isa:?} blocks {blocks} m {m} n {n} entry {e}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// This CPU's best kernels are the ones tested here (a machine without AVX-512 says so).
#[test]
fn the_best_kernels_are_available() {
    assert!(Isa::best().available());
    println!("best quantized kernels on this CPU: {:?}", Isa::best());
}

/// Parts of different types stacked by rows (q, k, v of a Q4_K_M file) give each part's rows.
#[test]
fn stacked_parts_of_different_types() {
    let mut rng = Rng(7);
    let (k, m) = (2 * QK_K, 3);
    let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
    let types = [QuantType::Q4K, QuantType::Q6K, QuantType::Q8_0];
    let rows = [5usize, 3, 4];
    let data: Vec<Vec<u8>> = types
        .iter()
        .zip(rows)
        .map(|(&t, r)| random_blocks(t, r, k / t.block_values(), &mut rng))
        .collect();
    let parts: Vec<QuantRows<'_>> = types
        .iter()
        .zip(rows)
        .zip(&data)
        .map(|((&t, r), d)| QuantRows::new(t, r, k, d))
        .collect();
    let n: usize = rows.iter().sum();
    let mut out = vec![0f32; m * n];
    matmul_wt(&parts, &x, &mut out, m, false);
    let mut col = 0;
    for part in &parts {
        let mut alone = vec![0f32; m * part.rows];
        matmul_wt(std::slice::from_ref(part), &x, &mut alone, m, false);
        for i in 0..m {
            assert_eq!(
                &out[i * n + col..i * n + col + part.rows],
                &alone[i * part.rows..(i + 1) * part.rows]
            );
        }
        col += part.rows;
    }
}

/// Large enough to be split across threads: the same values as one thread.
#[test]
fn threaded_products_equal_the_sequential_ones() {
    let mut rng = Rng(11);
    let (t, n, k) = (QuantType::Q4_1, 999, 512);
    let w = random_blocks(t, n, k / 32, &mut rng);
    let x: Vec<f32> = (0..k).map(|_| rng.unit()).collect();
    let parts = [QuantRows::new(t, n, k, &w)];
    let mut threaded = vec![0f32; n];
    matmul_wt(&parts, &x, &mut threaded, 1, false);
    for j in 0..n {
        let mut one = [0f32];
        let row = [QuantRows::new(t, 1, k, &w[j * 320..(j + 1) * 320])];
        matmul_wt(&row, &x, &mut one, 1, false);
        assert_eq!(threaded[j], one[0]);
    }
}

/// Against the f32 product of the dequantized weights: within the error of quantizing the
/// activations to 8 bits (weights quantized from Gaussian values, as a model's are).
#[test]
fn close_to_the_f32_product_of_the_dequantized_weights() {
    let mut rng = Rng(3);
    let (n, k, m) = (37, 3 * QK_K, 2);
    let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
    for t in QuantType::ALL {
        let w = random_blocks(t, n, k / t.block_values(), &mut rng);
        let mut dense = vec![0f32; n * k];
        for (row, out) in w.chunks_exact(w.len() / n).zip(dense.chunks_exact_mut(k)) {
            dequantize_row(t, row, out);
        }
        let mut want = vec![0f32; m * n];
        crate::matmul::matmul_wt(&x, &dense, &mut want, m, k, n, false);
        let mut got = vec![0f32; m * n];
        matmul_wt(&[QuantRows::new(t, n, k, &w)], &x, &mut got, m, false);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        println!("{t:?}: max error {:.2e} of the largest output", err / scale);
        assert!(err <= 2e-2 * scale, "{t:?}: {err} against outputs up to {scale}");
    }
}
