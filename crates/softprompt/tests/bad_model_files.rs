//! Bad model input gives a clear error naming the file and the problem, never a panic:
//! truncated/corrupted GGUF and safetensors, unknown quantization type or architecture, a
//! config.json missing a field, a tokenizer that does not fit the vocabulary, a missing MODEL.

mod common;
use candle_core::{DType, Device, Tensor};
use softprompt::backbone;
use softprompt::model_source::{self, ModelLocation};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn load_err(location: ModelLocation) -> String {
    match backbone::load(&location, &Device::Cpu) {
        Ok(_) => panic!("loading {location:?} should fail"),
        Err(e) => format!("{e:#}"),
    }
}

/// A minimal GGUF v3 file: string metadata and tensors given as (name, dims, type code, bytes).
fn write_gguf(path: &Path, meta: &[(&str, &str)], tensors: &[(&str, &[u64], u32, usize)]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    for (k, v) in meta {
        s(&mut b, k);
        b.extend_from_slice(&8u32.to_le_bytes());
        s(&mut b, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, bytes) in tensors {
        s(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (*bytes as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.resize(b.len() + offset as usize, 0);
    std::fs::write(path, b).unwrap();
}

fn smollm2_path() -> PathBuf {
    match model_source::resolve("smollm2-135m") {
        Ok(ModelLocation::Gguf(p)) => p,
        other => panic!("{other:?}: run `cargo run -p softprompt-cli -- fetch` first"),
    }
}

#[test]
fn truncated_gguf_names_file_and_problem() {
    let tmp = common::scratch("bad-trunc");
    let dir = tmp.path();
    let path = dir.join("cut.gguf");
    let bytes = std::fs::read(smollm2_path()).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(ModelLocation::Gguf(path.clone()));
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    // Cut inside the metadata too.
    std::fs::write(&path, &bytes[..5000]).unwrap();
    let e = load_err(ModelLocation::Gguf(path));
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
}

#[test]
fn corrupted_gguf_is_refused() {
    let tmp = common::scratch("bad-corrupt");
    let dir = tmp.path();
    let path = dir.join("bad.gguf");
    std::fs::write(&path, b"NOPE this is not a model").unwrap();
    let e = load_err(ModelLocation::Gguf(path.clone()));
    assert!(e.contains("bad.gguf") && e.contains("not a GGUF file"), "{e}");
    // A string length far beyond the file size.
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, b).unwrap();
    let e = load_err(ModelLocation::Gguf(path));
    assert!(e.contains("bad.gguf") && e.contains("claims length"), "{e}");
}

#[test]
fn unknown_quant_type_names_the_tensor() {
    let tmp = common::scratch("bad-quant");
    let dir = tmp.path();
    let path = dir.join("q.gguf");
    write_gguf(
        &path,
        &[("general.architecture", "llama")],
        &[("token_embd.weight", &[4, 4], 99, 64)],
    );
    let e = load_err(ModelLocation::Gguf(path));
    assert!(
        e.contains("q.gguf") && e.contains("token_embd.weight") && e.contains("quantization type 99"),
        "{e}"
    );
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = common::scratch("bad-arch");
    let dir = tmp.path();
    let path = dir.join("a.gguf");
    write_gguf(&path, &[("general.architecture", "rwkv6")], &[("x", &[4], 0, 16)]);
    let e = load_err(ModelLocation::Gguf(path));
    assert!(
        e.contains("a.gguf") && e.contains("rwkv6") && e.contains("not supported"),
        "{e}"
    );
}

/// A tiny BERT folder written into `dir`: `config`, zero weights and MiniLM's tokenizer.
fn tiny_bert_dir(dir: &Path, config: serde_json::Value) -> PathBuf {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let mut t = HashMap::new();
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    t.insert("embeddings.word_embeddings.weight".to_string(), z(&[20, 8]));
    t.insert("embeddings.position_embeddings.weight".to_string(), z(&[16, 8]));
    t.insert("embeddings.token_type_embeddings.weight".to_string(), z(&[2, 8]));
    t.insert("embeddings.LayerNorm.weight".to_string(), z(&[8]));
    t.insert("embeddings.LayerNorm.bias".to_string(), z(&[8]));
    let p = "encoder.layer.0";
    for n in [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    ] {
        t.insert(format!("{p}.{n}.weight"), z(&[8, 8]));
        t.insert(format!("{p}.{n}.bias"), z(&[8]));
    }
    t.insert(format!("{p}.intermediate.dense.weight"), z(&[12, 8]));
    t.insert(format!("{p}.intermediate.dense.bias"), z(&[12]));
    t.insert(format!("{p}.output.dense.weight"), z(&[8, 12]));
    t.insert(format!("{p}.output.dense.bias"), z(&[8]));
    for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
        t.insert(format!("{p}.{n}.weight"), z(&[8]));
        t.insert(format!("{p}.{n}.bias"), z(&[8]));
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let minilm = match model_source::resolve("minilm-l6") {
        Ok(ModelLocation::HfDir(p)) => p,
        other => panic!("{other:?}: run `cargo run -p softprompt-cli -- fetch` first"),
    };
    std::fs::copy(minilm.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    dir.to_path_buf()
}

fn tiny_config() -> serde_json::Value {
    serde_json::json!({"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2,
        "num_hidden_layers": 1, "intermediate_size": 12, "vocab_size": 20, "max_position_embeddings": 16})
}

#[test]
fn tokenizer_larger_than_vocab_is_refused() {
    let tmp = common::scratch("bad-vocab");
    let dir = tiny_bert_dir(tmp.path(), tiny_config());
    let e = load_err(ModelLocation::HfDir(dir));
    assert!(e.contains("30522 tokens") && e.contains("only 20 rows"), "{e}");
}

#[test]
fn config_missing_field_is_named() {
    let mut c = tiny_config();
    c.as_object_mut().unwrap().remove("hidden_size");
    let tmp = common::scratch("bad-config");
    let dir = tiny_bert_dir(tmp.path(), c);
    let e = load_err(ModelLocation::HfDir(dir));
    assert!(e.contains("config.json") && e.contains("`hidden_size`"), "{e}");
}

#[test]
fn truncated_safetensors_names_file() {
    let tmp = common::scratch("bad-st");
    let dir = tiny_bert_dir(tmp.path(), tiny_config());
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(ModelLocation::HfDir(dir));
    assert!(
        e.contains("model.safetensors") && e.contains("corrupted or truncated"),
        "{e}"
    );
}

#[test]
fn wrong_tensor_shape_is_named() {
    let mut c = tiny_config();
    c["intermediate_size"] = serde_json::json!(10);
    let tmp = common::scratch("bad-shape");
    let dir = tiny_bert_dir(tmp.path(), c);
    let e = load_err(ModelLocation::HfDir(dir));
    assert!(
        e.contains("intermediate.dense.weight") && e.contains("expected [10, 8]"),
        "{e}"
    );
}

#[test]
fn missing_model_is_a_clear_error() {
    let e = format!("{:#}", model_source::resolve("no/such/model.gguf").unwrap_err());
    assert!(e.contains("no/such/model.gguf") && e.contains("does not exist"), "{e}");
    let tmp = common::scratch("bad-noconfig");
    let dir = tmp.path();
    let e = format!("{:#}", model_source::resolve(dir.to_str().unwrap()).unwrap_err());
    assert!(e.contains("no config.json"), "{e}");
}
