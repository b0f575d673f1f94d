//! Llama 3's rotary scaling reaches the model: the same weights with `llama3` scaling give other
//! hidden states than without (from the second position on), the fused and the composed
//! implementations agree on them, and a GGUF's per-frequency divisors equal to the llama3
//! frequencies' ratios give the same model as the `llama3` config.

use candle_core::{DType, Device, Tensor};
use softprompt::backbone::llama::{ComposedLlama, FusedLlama, LlamaConfig, RopeScaling};
use softprompt::backbone::random::random_llama;
use softprompt::backbone::{Backbone, BackboneInput, Shape};

/// Head size 8: frequencies 1, 0.1, 0.01, 0.001 (wavelengths 6.3, 63, 628, 6283 positions). With
/// an original context of 8 (bands at 8/4 = 2 and 8/1 = 8 positions) `llama3` blends the first
/// and divides the other three by 8: a large change over 40 positions.
fn config(rope_scaling: RopeScaling) -> LlamaConfig {
    LlamaConfig {
        shape: Shape {
            layers: 2,
            hidden: 16,
            heads: 2,
            kv_heads: 1,
            head_dim: 8,
            intermediate: 24,
            vocab: 30,
            max_positions: 64,
        },
        eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling,
    }
}

fn llama3() -> RopeScaling {
    RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_positions: 8.0,
    }
}

fn hidden(model: &dyn Backbone) -> Tensor {
    let dev = Device::Cpu;
    // The same embeddings for every model: a deterministic pattern in [-1, 1].
    let embeds = Tensor::arange(0f32, (2 * 40 * 16) as f32, &dev)
        .unwrap()
        .reshape((2, 40, 16))
        .unwrap()
        .affine(0.37, 0.0)
        .unwrap()
        .sin()
        .unwrap();
    let mask = Tensor::ones((2, 40), DType::U32, &dev).unwrap();
    model.forward(&BackboneInput::new(&embeds, &mask)).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

#[test]
fn llama3_scaling_changes_the_model_and_both_implementations_agree() {
    let dev = Device::Cpu;
    let fused = FusedLlama::new(random_llama(config(llama3()), 7, &dev).unwrap()).unwrap();
    let composed = ComposedLlama::new(random_llama(config(llama3()), 7, &dev).unwrap()).unwrap();
    let plain = FusedLlama::new(random_llama(config(RopeScaling::None), 7, &dev).unwrap()).unwrap();
    let (f, c, p) = (hidden(&fused), hidden(&composed), hidden(&plain));
    assert!(max_abs(&f, &c) < 1e-4, "fused vs composed: {}", max_abs(&f, &c));
    let first = |t: &Tensor| t.narrow(1, 0, 1).unwrap();
    assert!(max_abs(&first(&f), &first(&p)) < 1e-6, "position 0 has no rotation");
    // The random weights are small (attention is nearly uniform), so the change is small in
    // absolute terms; it is hundreds of times the two implementations' rounding (1e-7).
    let (rounding, change) = (max_abs(&f, &c), max_abs(&f, &p));
    assert!(
        change > 1e-5 && change > 100.0 * rounding,
        "scaling ignored? change {change}, rounding {rounding}"
    );
}

#[test]
fn gguf_divisors_give_the_llama3_model() {
    let dev = Device::Cpu;
    let plain = RopeScaling::None.frequencies(10_000.0, 8).unwrap();
    let scaled = llama3().frequencies(10_000.0, 8).unwrap();
    assert!(
        scaled[0] < plain[0] && scaled[0] > plain[0] / 8.0,
        "the shortest wavelength is blended"
    );
    for i in 1..4 {
        assert!(
            (scaled[i] - plain[i] / 8.0).abs() <= f32::EPSILON * plain[i],
            "frequency {i} is divided"
        );
    }
    let divisors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
    let by_divisors = FusedLlama::new(random_llama(config(RopeScaling::Divisors(divisors)), 7, &dev).unwrap()).unwrap();
    let by_config = FusedLlama::new(random_llama(config(llama3()), 7, &dev).unwrap()).unwrap();
    let d = max_abs(&hidden(&by_divisors), &hidden(&by_config));
    assert!(d < 1e-5, "{d}");
}
