//! Every GGUF storage type softprompt promises (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
//! Q4_K, Q5_K, Q6_K) is located and dequantized correctly by our reader: a tensor quantized by
//! ggml's reference kernels, written into a GGUF file, reads back equal to ggml's dequantization
//! and close to the original values.

mod common;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use softprompt::gguf::GgufFile;

fn write_gguf(path: &std::path::Path, tensors: &[(&str, &[usize], u32, Vec<u8>)]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        b.extend_from_slice(&(name.len() as u64).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims.iter().rev() {
            b.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        let start = b.len();
        b.extend_from_slice(data);
        b.resize(start + data.len().div_ceil(32) * 32, 0);
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn every_supported_storage_type_reads_back() {
    let types: [(GgmlDType, u32, f32); 11] = [
        (GgmlDType::F32, 0, 0.0),
        (GgmlDType::F16, 1, 1e-2),
        (GgmlDType::BF16, 30, 2e-2),
        (GgmlDType::Q8_0, 8, 2e-2),
        (GgmlDType::Q4_0, 2, 0.3),
        (GgmlDType::Q4_1, 3, 0.3),
        (GgmlDType::Q5_0, 6, 0.15),
        (GgmlDType::Q5_1, 7, 0.15),
        (GgmlDType::Q4K, 12, 0.3),
        (GgmlDType::Q5K, 13, 0.15),
        (GgmlDType::Q6K, 14, 0.1),
    ];
    let original = Tensor::randn(0f32, 1.0, (3, 512), &Device::Cpu).unwrap();
    let mut entries = Vec::new();
    let mut expected = Vec::new();
    let names: Vec<String> = types.iter().map(|(t, _, _)| format!("w.{t:?}")).collect();
    for ((dtype, code, _), name) in types.iter().zip(&names) {
        let q = QTensor::quantize(&original, *dtype).unwrap();
        entries.push((name.as_str(), &[3usize, 512][..], *code, q.data().unwrap().to_vec()));
        expected.push(q.dequantize(&Device::Cpu).unwrap());
    }
    let dir = common::scratch("dtypes");
    let path = dir.path().join("all.gguf");
    write_gguf(&path, &entries);
    let file = GgufFile::open(&path).unwrap();
    for (((dtype, _, tol), name), want) in types.iter().zip(&names).zip(&expected) {
        let got = file.tensor_f32(name, &Device::Cpu).unwrap();
        assert_eq!(got.dims(), &[3, 512], "{dtype:?}");
        let exact = (&got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(exact, 0.0, "{dtype:?}: differs from ggml's own dequantization");
        let err = (&got - &original)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err <= *tol, "{dtype:?}: mean error {err} above {tol}");
    }
}
