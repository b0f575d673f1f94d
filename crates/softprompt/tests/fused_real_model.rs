//! On the real SmolLM2 and MiniLM, the fused f32 CPU kernels give the composed candle path's
//! hidden states and input gradients (the composed path is the one checked against finite
//! differences and transformers): a batch with a shared prefix (a soft prompt), padding and
//! rows of different lengths. SmolLM2 with its weights kept in the file's Q4_1 blocks gives the
//! numbers of the f32 copy; converted to f16, bf16 or Q8_0 at load, numbers close to them. Each
//! path is asked for explicitly at load ([`KernelPath`]).

mod common;
use candle_core::{DType, Device, Tensor};
use softprompt::backbone::{BackboneInput, KernelPath, LoadOptions, LoadedModel, WeightStorage};

fn relative(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-12)
}

/// `n` values in [-0.5, 0.5) from a fixed generator (the same every run: a random draw can
/// land where the two paths' rounding differs more, and a test must not depend on the draw).
fn fixed_uniform(n: usize, seed: u64) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::from_vec(values, n, &Device::Cpu).unwrap()
}

/// The model `name` loaded twice: on the composed path, and on the fused path.
fn both(name: &str) -> (LoadedModel, LoadedModel) {
    let location = softprompt::model_source::resolve(name).unwrap();
    let load = |path: KernelPath| {
        let model = softprompt::backbone::load_with(&location, &Device::Cpu, path).unwrap();
        assert_eq!(model.backbone.kernel_path(), path);
        model
    };
    (load(KernelPath::Composed), load(KernelPath::Fused))
}

fn compare(
    name: &str,
    (composed, fused): (&LoadedModel, &LoadedModel),
    ids: &[[u32; 9]; 3],
    lens: [usize; 3],
    prefix: usize,
    tolerance: f32,
) {
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let mask: Vec<u32> = (0..27).map(|i| u32::from(i % 9 < lens[i / 9])).collect();
    let mask = Tensor::from_vec(mask, (3, 9), &Device::Cpu).unwrap();
    let embeds = composed.backbone.embed(&ids).unwrap();
    // a soft prompt: the same random rows at the first `prefix` positions of every row
    let d = embeds.dim(2).unwrap();
    let prompt = fixed_uniform(prefix * d, 1)
        .reshape((1, prefix, d))
        .unwrap()
        .repeat((3, 1, 1))
        .unwrap();
    let embeds = Tensor::cat(&[&prompt, &embeds.narrow(1, prefix, 9 - prefix).unwrap()], 1).unwrap();
    let keep = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let r = (fixed_uniform(3 * 9 * d, 2) * 3.4)
        .unwrap()
        .reshape((3, 9, d))
        .unwrap()
        .broadcast_mul(&keep)
        .unwrap();
    let run = |m: &LoadedModel| {
        let (h, tape) = m.backbone.forward_train(&BackboneInput::new(&embeds, &mask)).unwrap();
        let g = m.backbone.backward(&tape, &r).unwrap();
        // the prompt's gradient is the sum over rows at its positions; the rest per row
        let g_prompt = g.narrow(1, 0, prefix).unwrap().sum(0).unwrap();
        let g_rest = g.narrow(1, prefix, 9 - prefix).unwrap();
        (h.broadcast_mul(&keep).unwrap(), g_prompt, g_rest)
    };
    let (h0, p0, r0) = run(composed);
    let (h1, p1, r1) = run(fused);
    let errs = [relative(&h1, &h0), relative(&p1, &p0), relative(&r1, &r0)];
    println!(
        "{name}: relative max error: hidden {:.1e}, prompt gradient {:.1e}, other gradients {:.1e}",
        errs[0], errs[1], errs[2]
    );
    for e in errs {
        assert!(e < tolerance, "{name}: the two paths differ by {e} (relative)");
    }
}

#[test]
fn fused_equals_composed_on_smollm2_and_minilm() {
    let ids = [
        [1u32, 504, 3575, 282, 4649, 314, 2, 17, 99],
        [1, 504, 3575, 282, 38634, 314, 260, 3575, 0],
        [1, 504, 3575, 282, 7, 0, 0, 0, 0],
    ];
    let (composed, fused) = both("smollm2-135m");
    compare(
        "smollm2 fused vs composed",
        (&composed, &fused),
        &ids,
        [9, 8, 5],
        4,
        1e-3,
    );
    drop(composed);
    // The weights kept as the file stores them (Q4_1 blocks, converted tile by tile) give the
    // numbers of the f32 copy made at load.
    let location = softprompt::model_source::resolve("smollm2-135m").unwrap();
    let stored = softprompt::backbone::load_with(&location, &Device::Cpu, WeightStorage::File).unwrap();
    compare(
        "smollm2 stored (Q4_1) vs f32 weights",
        (&fused, &stored),
        &ids,
        [9, 8, 5],
        4,
        1e-3,
    );
    drop(stored);
    // Converted at load to f16, bf16 or Q8_0: close to the f32 copy, within each type's
    // rounding (f16 keeps 11 significant bits, bf16 8, Q8_0 8 per block of 32). Measured:
    // hidden states 9.6e-4 / 4.2e-3 / 2.7e-2 (relative max), gradients up to 4.8e-3 / 0.19 /
    // 0.27 (the input gradient amplifies the weights' rounding); a wrong row order or block
    // layout gives errors of order 1.
    for (storage, tolerance) in [
        (WeightStorage::F16, 1e-2),
        (WeightStorage::Bf16, 0.4),
        (WeightStorage::Q8_0, 0.4),
    ] {
        let converted = softprompt::backbone::load_with(&location, &Device::Cpu, storage).unwrap();
        let name = format!("smollm2 converted to {} vs f32 weights", storage.name());
        compare(&name, (&fused, &converted), &ids, [9, 8, 5], 4, tolerance);
    }
    // Weights kept in another storage than f32 only run on the fused path.
    let options = LoadOptions {
        storage: WeightStorage::File,
        path: Some(KernelPath::Composed),
    };
    let err = softprompt::backbone::load_with(&location, &Device::Cpu, options)
        .err()
        .expect("stored weights refuse the composed path");
    assert!(format!("{err:#}").contains("needs the fused path"), "{err:#}");
    drop(fused);
    let ids = [
        [101u32, 2023, 3185, 2001, 2307, 102, 0, 0, 0],
        [101, 1996, 2143, 2001, 6659, 1010, 2092, 102, 0],
        [101, 7592, 102, 0, 0, 0, 0, 0, 0],
    ];
    let (composed, fused) = both("minilm-l6");
    compare(
        "minilm fused vs composed",
        (&composed, &fused),
        &ids,
        [6, 8, 3],
        2,
        1e-3,
    );
    let location = softprompt::model_source::resolve("minilm-l6").unwrap();
    let err = softprompt::backbone::load_with(&location, &Device::Cpu, WeightStorage::F16)
        .err()
        .expect("BERT refuses a conversion");
    assert!(format!("{err:#}").contains("BERT encoders hold f32"), "{err:#}");
}
