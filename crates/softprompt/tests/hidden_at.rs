//! `CausalLm::hidden_at` (scoring: the last layer run only at the positions asked for, after a
//! one-row key/value prefix every row continues from) gives the hidden states a full forward
//! gives at those positions, and refuses padding.

use candle_core::{Device, IndexOp, Tensor};
use softprompt::backbone::llama::{FusedLlama, LlamaConfig};
use softprompt::backbone::random::random_llama;
use softprompt::backbone::{Backbone, BackboneInput, CausalLm, KvCache};

fn model() -> FusedLlama {
    let cfg = LlamaConfig {
        shape: softprompt::backbone::Shape {
            layers: 3,
            hidden: 32,
            heads: 4,
            kv_heads: 2,
            head_dim: 32 / 4,
            intermediate: 48,
            vocab: 50,
            max_positions: 64,
        },
        eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: Default::default(),
    };
    FusedLlama::new(random_llama(cfg, 7, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn hidden_at_matches_the_full_forward_after_a_shared_prefix() {
    let lm = model();
    let dev = Device::Cpu;
    // A one-row prefix of 4 positions, then three rows of 5, 3 and 4 real positions.
    let prefix_embeds = (Tensor::randn(0f32, 1.0, (1, 4, 32), &dev).unwrap() * 0.5).unwrap();
    let mut prefix = KvCache::default();
    let ones = Tensor::ones((1, 4), candle_core::DType::U32, &dev).unwrap();
    lm.forward_cached(&BackboneInput::new(&prefix_embeds, &ones), &mut prefix)
        .unwrap();
    let embeds = (Tensor::randn(0f32, 1.0, (3, 5, 32), &dev).unwrap() * 0.5).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], &dev).unwrap();
    let input = BackboneInput::new(&embeds, &mask);
    let full = lm.forward_prefixed(&input, &prefix).unwrap();
    let at = [(0, 1), (0, 4), (1, 2), (2, 3)];
    let picked = lm.hidden_at(&input, Some(&prefix), &at).unwrap();
    for (i, &(r, c)) in at.iter().enumerate() {
        let want: Vec<f32> = full.i((r, c)).unwrap().to_vec1().unwrap();
        let got: Vec<f32> = picked.i(i).unwrap().to_vec1().unwrap();
        let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "position {c} of row {r}: max-abs {worst}");
    }
    // Without a prefix too.
    let full = lm.forward(&input).unwrap();
    let picked = lm.hidden_at(&input, None, &[(1, 0), (2, 3)]).unwrap();
    let want = Tensor::stack(&[full.i((1, 0)).unwrap(), full.i((2, 3)).unwrap()], 0).unwrap();
    let worst: f32 = (picked - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(worst < 1e-5, "no prefix: max-abs {worst}");
}

#[test]
fn hidden_at_reads_positions_the_rows_share() {
    // The first two positions are the same in every row, so the backbone computes them once.
    let lm = model();
    let dev = Device::Cpu;
    let shared = (Tensor::randn(0f32, 1.0, (1, 2, 32), &dev).unwrap() * 0.5).unwrap();
    let own = (Tensor::randn(0f32, 1.0, (2, 3, 32), &dev).unwrap() * 0.5).unwrap();
    let embeds = Tensor::cat(&[&shared.repeat((2, 1, 1)).unwrap(), &own], 1).unwrap();
    let mask = Tensor::ones((2, 5), candle_core::DType::U32, &dev).unwrap();
    let input = BackboneInput::new(&embeds, &mask);
    let full = lm.forward(&input).unwrap();
    let at = [(0, 3), (1, 0), (1, 1), (1, 4)];
    let picked = lm.hidden_at(&input, None, &at).unwrap();
    for (i, &(r, c)) in at.iter().enumerate() {
        let diff = (picked.i(i).unwrap() - full.i((r, c)).unwrap()).unwrap();
        let worst: f32 = diff.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(worst < 1e-5, "position {c} of row {r}: max-abs {worst}");
    }
}

#[test]
fn hidden_at_refuses_padding_and_rows_out_of_order() {
    let lm = model();
    let dev = Device::Cpu;
    let embeds = Tensor::zeros((2, 3, 32), candle_core::DType::F32, &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &dev).unwrap();
    let input = BackboneInput::new(&embeds, &mask);
    let err = lm.hidden_at(&input, None, &[(1, 2)]).unwrap_err().to_string();
    assert!(err.contains("position 2 of row 1 is padding"), "{err}");
    for unordered in [[(1, 0), (0, 0)], [(0, 2), (0, 1)]] {
        let err = lm.hidden_at(&input, None, &unordered).unwrap_err().to_string();
        assert!(err.contains("row order, then column order"), "{err}");
    }
}
