//! Stored weights against candle's dequantization and the f32 products; inference scopes.

use super::*;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

/// A stored weight converts to exactly what candle's whole-tensor dequantization gives,
/// and its products equal the f32 products of those values.
#[test]
fn stored_rows_dequantize_like_candle_and_multiply_like_f32() {
    let (rows, cols, m) = (300, 64, 3);
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
    ] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Stacked from two parts (of different types: the second is f32).
        let bytes = q.data().unwrap();
        let split = 100 * cols / dtype.block_size() * dtype.type_size();
        let top = StoredRows::from_bytes(dtype, 100, cols, &bytes[..split]).unwrap();
        let rest: Vec<u8> = want[100 * cols..].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bottom = StoredRows::from_bytes(GgmlDType::F32, rows - 100, cols, &rest).unwrap();
        let parts = vec![top, bottom];
        let mut got = vec![0.0; rows * cols];
        stack_rows_f32(&parts, 0, rows, &mut got);
        assert_eq!(got, want, "{dtype:?}");
        let mut some = vec![0.0; 11 * cols];
        stack_rows_f32(&parts, 95, 106, &mut some);
        assert_eq!(some, want[95 * cols..106 * cols], "{dtype:?}");
        let plain = FrozenWeight::F32(PackedWeight::pack(&want, rows, cols));
        let stored = FrozenWeight::Stored(parts);
        assert!(stored.bytes() <= plain.bytes());
        let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.3).sin()).collect();
        let (mut a, mut b) = (vec![0.0; m * rows], vec![0.0; m * rows]);
        plain.matmul_wt(&x, &mut a, m, cols, rows, false);
        stored.matmul_wt(&x, &mut b, m, cols, rows, false);
        assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-4), "{dtype:?}");
        let dy: Vec<f32> = (0..m * rows).map(|i| (i as f32 * 0.7).cos()).collect();
        let (mut a, mut b) = (vec![0.0; m * cols], vec![0.0; m * cols]);
        plain.matmul(&dy, &mut a, m, rows, cols, false);
        stored.matmul(&dy, &mut b, m, rows, cols, false);
        assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-3), "{dtype:?}");
    }
}

/// The integer kernels read GGUF's blocks as candle (GGML's port) does: the kernel crate's
/// exact dequantization of each block type equals candle's, value for value.
#[test]
fn the_kernels_read_blocks_as_ggml_lays_them_out() {
    let (rows, cols) = (7, 512);
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let stored = StoredRows::from_bytes(dtype, rows, cols, &q.data().unwrap()).unwrap();
        let parts = stored.quant_rows().expect("a type the kernels multiply");
        let mut got = vec![0f32; rows * cols];
        softprompt_kernels::quant::blocks::dequantize_row(parts.dtype, parts.bytes, &mut got);
        assert_eq!(got, want, "{dtype:?}");
    }
    let f16 = StoredRows::from_bytes(GgmlDType::F16, 1, 32, &[0; 64]).unwrap();
    assert!(f16.quant_rows().is_none());
}

/// Inside an inference scope a few rows go through the integer kernels: close to the exact
/// product (8-bit activations); more rows, or outside the scope, the exact product.
#[test]
fn inference_scopes_use_the_integer_kernels_for_few_rows() {
    let (rows, cols) = (96, 256);
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q6K] {
        let stored = FrozenWeight::Stored(vec![StoredRows::convert(&w, dtype).unwrap()]);
        assert!(stored.quantized());
        for m in [1, QUANT_ROWS, QUANT_ROWS + 1] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let product = |rounding| {
                let mut out = vec![0.25f32; m * rows];
                rounding_scope(rounding, || stored.matmul_wt(&x, &mut out, m, cols, rows, true));
                out
            };
            let (exact, inferred) = (product(Rounding::Exact), product(Rounding::Inference));
            let outside = {
                let mut out = vec![0.25f32; m * rows];
                stored.matmul_wt(&x, &mut out, m, cols, rows, true);
                out
            };
            assert_eq!(outside, exact, "{dtype:?}");
            let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
            let err = exact.iter().zip(&inferred).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            if m <= QUANT_ROWS {
                assert!(err > 0.0 && err < 2e-2 * scale, "{dtype:?} m {m}: {err} of {scale}");
            } else {
                assert!(err < 1e-4 * scale, "{dtype:?} m {m}: {err} of {scale}");
            }
        }
    }
    // the scope ends, also on a panic; a forward on the pool takes the caller's rounding, or
    // exact products when it keeps a tape
    let caught = std::panic::catch_unwind(|| rounding_scope(Rounding::Inference, || panic!("inside")));
    assert!(caught.is_err());
    assert_eq!(rounding(), Rounding::Exact);
    assert_eq!(forward_on_pool(false, rounding), Rounding::Exact);
    rounding_scope(Rounding::Inference, || {
        assert_eq!(forward_on_pool(false, rounding), Rounding::Inference);
        assert_eq!(forward_on_pool(true, rounding), Rounding::Exact);
    });
}

#[test]
fn wrong_sizes_are_refused() {
    assert!(StoredRows::from_bytes(GgmlDType::Q8_0, 2, 48, &[0; 68]).is_err());
    assert!(StoredRows::from_bytes(GgmlDType::Q8_0, 2, 32, &[0; 67]).is_err());
    assert!(StoredRows::from_bytes(GgmlDType::Q8_0, 2, 32, &[0; 68]).is_ok());
}
