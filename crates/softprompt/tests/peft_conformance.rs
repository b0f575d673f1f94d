//! HF PEFT conformance: adapters written by PEFT 0.21.2 load, run on our frozen backbones and
//! give PEFT's logits; saving reproduces PEFT's files byte for byte; adapters for other models
//! and damaged files are refused with errors that name the file.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use softprompt::adapter::*;
use softprompt::backbone::{lm_logits, BackboneInput, LoadedModel};
use softprompt::prompt::{seeded_rng, EncoderSpec, PromptInit, SoftPrompt};
use std::path::{Path, PathBuf};

const TOL: f32 = 2e-3;

const ALL_ADAPTERS: [&str; 11] = [
    "smollm2_prompt_tuning_text",
    "smollm2_prompt_tuning_random",
    "smollm2_p_tuning_mlp",
    "smollm2_p_tuning_lstm",
    "smollm2_prefix_tuning",
    "smollm2_prefix_tuning_projection",
    "smollm2_cartridge",
    "smollm2_multitask_prompt_tuning",
    "minilm_seqcls_prompt_tuning",
    "minilm_seqcls_p_tuning_mlp",
    "smollm2_cpt",
];

/// `[P; word embeddings of ids]` and the mask with ones for the virtual tokens.
fn prepend(model: &LoadedModel, prompt: &Tensor, ids: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
    let (b, _) = ids.dims2().unwrap();
    let (p, d) = prompt.dims2().unwrap();
    let x = model.backbone.embed(ids).unwrap();
    let pb = prompt
        .unsqueeze(0)
        .unwrap()
        .broadcast_as((b, p, d))
        .unwrap()
        .contiguous()
        .unwrap();
    let embeds = Tensor::cat(&[&pb, &x], 1).unwrap();
    let ones = Tensor::ones((b, p), DType::U32, &Device::Cpu).unwrap();
    let mask = Tensor::cat(&[&ones, mask], 1).unwrap();
    (embeds, mask)
}

fn causal_error(model: &LoadedModel, folder: &str) -> f32 {
    let adapter = load_peft(&fixture(folder)).unwrap();
    check_compatible(&adapter.config, model.backbone.info()).unwrap();
    assert_eq!(adapter.config.task_type, Some(TaskType::CausalLm));
    let prompt = adapter.input_prompt().unwrap();
    let p = prompt.dim(0).unwrap();
    let exp = expected(folder);
    let ids = as_u32(&exp["input_ids"]);
    let mask = as_u32(&exp["attention_mask"]);
    let (embeds, full_mask) = prepend(model, prompt, &ids, &mask);
    let hidden = model
        .backbone
        .forward(&BackboneInput {
            embeds: &embeds,
            mask: &full_mask,
            token_types: None,
        })
        .unwrap();
    let lens: Vec<u32> = mask.sum(1).unwrap().to_vec1().unwrap();
    let mut worst = 0f32;
    for (b, &len) in lens.iter().enumerate() {
        let last = hidden.i((b, p + len as usize - 1)).unwrap().unsqueeze(0).unwrap();
        let logits = lm_logits(model.backbone.causal().unwrap(), &last)
            .unwrap()
            .squeeze(0)
            .unwrap();
        worst = worst.max(max_abs_diff(&logits, &exp["last_logits"].i(b).unwrap()));
    }
    worst
}

fn seqcls_error(model: &LoadedModel, folder: &str) -> f32 {
    let adapter = load_peft(&fixture(folder)).unwrap();
    check_compatible(&adapter.config, model.backbone.info()).unwrap();
    assert_eq!(adapter.config.task_type, Some(TaskType::SeqCls));
    let prompt = adapter.input_prompt().unwrap();
    let (w, bias) = adapter.classifier().expect("the classifier head is saved");
    let exp = expected(folder);
    let ids = as_u32(&exp["input_ids"]);
    let mask = as_u32(&exp["attention_mask"]);
    let (embeds, full_mask) = prepend(model, prompt, &ids, &mask);
    let hidden = model
        .backbone
        .forward(&BackboneInput {
            embeds: &embeds,
            mask: &full_mask,
            token_types: None,
        })
        .unwrap();
    let pooled = model.backbone.encoder().unwrap().pool(&hidden).unwrap();
    let logits = pooled.matmul(&w.t().unwrap()).unwrap().broadcast_add(bias).unwrap();
    max_abs_diff(&logits, &exp["logits"])
}

#[test]
fn smollm2_adapters_give_peft_logits() {
    let model = load_model("smollm2-135m");
    for folder in [
        "smollm2_prompt_tuning_text",
        "smollm2_prompt_tuning_random",
        "smollm2_p_tuning_mlp",
        "smollm2_p_tuning_lstm",
    ] {
        let err = causal_error(&model, folder);
        println!("{folder}: max-abs last_logits {err:.2e}");
        assert!(err <= TOL, "{folder}: last_logits differ by {err}");
    }
}

#[test]
fn minilm_seqcls_adapters_give_peft_logits() {
    let model = load_model("minilm-l6");
    for folder in ["minilm_seqcls_prompt_tuning", "minilm_seqcls_p_tuning_mlp"] {
        let err = seqcls_error(&model, folder);
        println!("{folder}: max-abs logits {err:.2e}");
        assert!(err <= TOL, "{folder}: logits differ by {err}");
    }
}

#[test]
fn save_reproduces_peft_files_byte_for_byte() {
    let tmp = common::scratch("peft");
    for folder in ALL_ADAPTERS {
        let src = fixture(folder);
        let adapter = load_peft(&src).unwrap();
        let out = tmp.path().join(format!("roundtrip-{folder}"));
        save_peft(&out, &adapter.config, &adapter.prompt_embeddings, &adapter.extra()).unwrap();
        for file in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
            let a = std::fs::read(src.join(file)).unwrap();
            let b = std::fs::read(out.join(file)).unwrap();
            assert!(
                a == b,
                "{folder}/{file}: the saved file differs from PEFT's ({} vs {} bytes)",
                b.len(),
                a.len()
            );
        }
        let again = load_peft(&out).unwrap();
        assert_eq!(again.config, adapter.config, "{folder}");
        assert_eq!(max_abs_diff(&again.prompt_embeddings, &adapter.prompt_embeddings), 0.0);
        assert_eq!(
            again.tensors.keys().collect::<Vec<_>>(),
            adapter.tensors.keys().collect::<Vec<_>>()
        );
        for (k, t) in &adapter.tensors {
            assert_eq!(max_abs_diff(t, &again.tensors[k]), 0.0, "{folder}: {k}");
        }
        // serde goes through the same JSON object.
        let via_serde: PeftConfig = serde_json::from_str(&serde_json::to_string(&adapter.config).unwrap()).unwrap();
        assert_eq!(via_serde, adapter.config);
    }
}

#[test]
fn configs_we_build_equal_peft_configs() {
    let tmp = common::scratch("peft");
    let model = load_model("smollm2-135m");
    let info = model.backbone.info();
    let d = info.hidden;

    // Prompt tuning, RANDOM, 5 virtual tokens.
    let init = PromptInit::RandomNormal;
    let m = softprompt::prompt::initial_prompt(&init, 5, d, softprompt::prompt::InitSource::none(), &mut seeded_rng(0))
        .unwrap();
    let prompt = SoftPrompt::prompt_tuning(&m).unwrap();
    let config = PeftConfig::for_prompt(&prompt, &init, TaskType::CausalLm, info);
    let peft = load_peft(&fixture("smollm2_prompt_tuning_random")).unwrap().config;
    assert_eq!(config, peft);

    // P-tuning, MLP hidden 128 and LSTM hidden 64, 6 virtual tokens; the saved prompt is the
    // encoder's output.
    for (folder, spec) in [
        ("smollm2_p_tuning_mlp", EncoderSpec::Mlp { hidden: 128 }),
        (
            "smollm2_p_tuning_lstm",
            EncoderSpec::Lstm {
                hidden: 64,
                num_layers: 2,
                dropout: 0.0,
            },
        ),
    ] {
        let m =
            softprompt::prompt::initial_prompt(&init, 6, d, softprompt::prompt::InitSource::none(), &mut seeded_rng(1))
                .unwrap();
        let prompt = SoftPrompt::p_tuning(&m, &spec, &mut seeded_rng(2)).unwrap();
        let config = PeftConfig::for_prompt(&prompt, &init, TaskType::CausalLm, info);
        let peft = load_peft(&fixture(folder)).unwrap().config;
        assert_eq!(config, peft, "{folder}");
        assert_eq!(
            config.to_json_string(),
            std::fs::read_to_string(fixture(folder).join(ADAPTER_CONFIG)).unwrap()
        );
        let out = tmp.path().join(format!("ours-{folder}"));
        let output = prompt.forward().unwrap();
        save_peft(&out, &config, &output, &[]).unwrap();
        let back = load_peft(&out).unwrap();
        assert_eq!(max_abs_diff(&back.prompt_embeddings, &output), 0.0);
        assert_eq!(back.config.encoder_spec().unwrap(), Some(spec));
    }

    // TEXT init: PEFT needs a tokenizer name next to the text.
    let text = PromptInit::Text("Answer with the capital city:".into());
    let m = softprompt::prompt::initial_prompt(
        &text,
        8,
        d,
        softprompt::prompt::InitSource::model(model.backbone.embedding_table(), &model.tokenizer),
        &mut seeded_rng(0),
    )
    .unwrap();
    let config = PeftConfig::for_prompt(&SoftPrompt::prompt_tuning(&m).unwrap(), &text, TaskType::CausalLm, info);
    let mut peft = load_peft(&fixture("smollm2_prompt_tuning_text")).unwrap().config;
    peft.method = match peft.method {
        MethodConfig::PromptTuning {
            prompt_tuning_init,
            prompt_tuning_init_text,
            tokenizer_name_or_path,
            ..
        } => MethodConfig::PromptTuning {
            prompt_tuning_init,
            prompt_tuning_init_text,
            tokenizer_name_or_path,
            tokenizer_kwargs: None,
        },
        other => panic!("{other:?}"),
    };
    assert_eq!(config, peft);
}

#[test]
fn adapters_for_other_models_are_refused() {
    let smollm = load_model("smollm2-135m");
    let minilm = load_model("minilm-l6");
    let s_info = smollm.backbone.info();
    let m_info = minilm.backbone.info();

    let bert_adapter = load_peft(&fixture("minilm_seqcls_prompt_tuning")).unwrap();
    let err = check_compatible(&bert_adapter.config, s_info).unwrap_err().to_string();
    println!("refusal: {err}");
    assert!(err.contains("token_dim is 384") && err.contains("576"), "{err}");

    let llama_adapter = load_peft(&fixture("smollm2_p_tuning_mlp")).unwrap();
    let err = check_compatible(&llama_adapter.config, m_info).unwrap_err().to_string();
    assert!(err.contains("token_dim is 576") && err.contains("384"), "{err}");

    // Same width, different depth.
    let mut cfg = bert_adapter.config.clone();
    cfg.num_layers = Some(12);
    let err = check_compatible(&cfg, m_info).unwrap_err().to_string();
    assert!(err.contains("num_layers is 12") && err.contains("6 layers"), "{err}");

    // Matching shapes but the wrong kind of model for the task.
    let mut cfg = bert_adapter.config.clone();
    cfg.token_dim = s_info.hidden;
    cfg.num_layers = Some(s_info.layers);
    cfg.num_attention_heads = Some(s_info.heads);
    let err = check_compatible(&cfg, s_info).unwrap_err().to_string();
    assert!(err.contains("SEQ_CLS") && err.contains("causal"), "{err}");
    let mut cfg = llama_adapter.config.clone();
    cfg.token_dim = m_info.hidden;
    cfg.num_layers = Some(m_info.layers);
    cfg.num_attention_heads = Some(m_info.heads);
    let err = check_compatible(&cfg, m_info).unwrap_err().to_string();
    assert!(err.contains("CAUSAL_LM") && err.contains("encoder"), "{err}");

    // Prefix tuning: loads and fits (GQA key/value width 3 × 64); it has no input prompt.
    for folder in ["smollm2_prefix_tuning", "smollm2_prefix_tuning_projection"] {
        let prefix = load_peft(&fixture(folder)).unwrap();
        assert_eq!(prefix.config.peft_type(), PeftType::PrefixTuning);
        assert_eq!(prefix.prompt_embeddings.dims(), [4, 30 * 2 * 192]);
        check_compatible(&prefix.config, s_info).unwrap();
        let err = prefix.input_prompt().unwrap_err().to_string();
        assert!(err.contains("prefix cache"), "{err}");
    }
}

/// Prefix tuning (with and without PEFT's projection, which is saved already projected) and a
/// Cartridge (the same K/V layout, stored directly): the per-layer K/V prefix as a cache of every row, the input's positions after it, gives PEFT's
/// logits.
#[test]
fn smollm2_prefix_tuning_gives_peft_logits() {
    let model = load_model("smollm2-135m");
    let lm = model.backbone.causal().unwrap();
    for folder in [
        "smollm2_prefix_tuning",
        "smollm2_prefix_tuning_projection",
        "smollm2_cartridge",
    ] {
        let adapter = load_peft(&fixture(folder)).unwrap();
        check_compatible(&adapter.config, lm.info()).unwrap();
        let exp = expected(folder);
        let ids = as_u32(&exp["input_ids"]);
        let mask = as_u32(&exp["attention_mask"]);
        let b = ids.dim(0).unwrap();
        let mut cache = adapter.prefix_cache(lm.info()).unwrap().unwrap().repeat(b).unwrap();
        let embeds = lm.embed(&ids).unwrap();
        let hidden = lm
            .forward_cached(&BackboneInput::new(&embeds, &mask), &mut cache)
            .unwrap();
        let lens: Vec<u32> = mask.sum(1).unwrap().to_vec1().unwrap();
        let mut worst = 0f32;
        for (r, &len) in lens.iter().enumerate() {
            let last = hidden.i((r, len as usize - 1)).unwrap().unsqueeze(0).unwrap();
            let logits = lm_logits(lm, &last).unwrap().squeeze(0).unwrap();
            worst = worst.max(max_abs_diff(&logits, &exp["last_logits"].i(r).unwrap()));
        }
        println!("{folder}: max-abs last_logits {worst:.2e}");
        assert!(worst <= TOL, "{folder}: last_logits differ by {worst}");
    }
}

/// A writable copy of fixture `folder`'s adapter files in the new folder `dir`.
fn copy_fixture(folder: &str, dir: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&dir).unwrap();
    for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        std::fs::copy(fixture(folder).join(f), dir.join(f)).unwrap();
        let mut perm = std::fs::metadata(dir.join(f)).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(dir.join(f), perm).unwrap();
    }
    dir
}

/// A change made to a parsed `adapter_config.json`.
type ConfigEdit = Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>;

fn load_err(dir: &Path) -> String {
    format!("{:#}", load_peft(dir).unwrap_err())
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join(ADAPTER_CONFIG);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn damaged_files_give_errors_naming_the_file() {
    let tmp = common::scratch("peft");
    // Truncated weights.
    let truncated = copy_fixture("smollm2_prompt_tuning_random", tmp.path().join("truncated"));
    let dir = truncated.clone();
    let w = dir.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&dir);
    println!("truncated: {err}");
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    // Header cut short too.
    std::fs::write(&w, &bytes[..20]).unwrap();
    assert!(load_err(&dir).contains("adapter_model.safetensors"));
    std::fs::remove_file(&w).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("adapter_model.safetensors"), "{err}");

    // Malformed JSON.
    let malformed = copy_fixture("smollm2_prompt_tuning_random", tmp.path().join("malformed"));
    let dir = malformed.clone();
    std::fs::write(
        dir.join(ADAPTER_CONFIG),
        "{\"peft_type\": \"PROMPT_TUNING\", \"num_virtual",
    )
    .unwrap();
    let err = load_err(&dir);
    println!("malformed: {err}");
    assert!(
        err.contains("adapter_config.json") && err.contains("not valid JSON"),
        "{err}"
    );

    // Missing field, wrong type, unknown peft_type, unknown task type.
    let dir = copy_fixture("smollm2_p_tuning_mlp", tmp.path().join("fields"));
    let cases: Vec<(ConfigEdit, &str)> = vec![
        (
            Box::new(|m| {
                m.remove("token_dim");
            }),
            "`token_dim` is missing",
        ),
        (
            Box::new(|m| {
                m.insert("num_virtual_tokens".into(), "six".into());
            }),
            "`num_virtual_tokens` should be a non-negative integer",
        ),
        (
            Box::new(|m| {
                m.insert("peft_type".into(), "LORA".into());
            }),
            "unknown peft_type `LORA`",
        ),
        (
            Box::new(|m| {
                m.insert("task_type".into(), "TRANSLATION".into());
            }),
            "unknown task_type `TRANSLATION`",
        ),
        (
            Box::new(|m| {
                m.insert("encoder_reparameterization_type".into(), "GRU".into());
            }),
            "unknown encoder `GRU`",
        ),
        (
            Box::new(|m| {
                m.insert("num_virtual_tokens".into(), 7.into());
            }),
            "shape [6, 576]",
        ),
        (
            Box::new(|m| {
                m.insert("token_dim".into(), 512.into());
            }),
            "expected [6, 512]",
        ),
    ];
    let original = std::fs::read(fixture("smollm2_p_tuning_mlp").join(ADAPTER_CONFIG)).unwrap();
    for (edit, want) in cases {
        std::fs::write(dir.join(ADAPTER_CONFIG), &original).unwrap();
        edit_config(&dir, edit);
        let err = load_err(&dir);
        println!("{want}: {err}");
        assert!(err.contains(want), "{err}");
        assert!(
            err.contains("adapter_config.json") || err.contains("adapter_model.safetensors"),
            "{err}"
        );
    }

    // A missing folder names the config file.
    let err = load_err(&dir.join("nope"));
    assert!(err.contains("adapter_config.json"), "{err}");

    // Saving refuses a prompt that does not match the config.
    let adapter = load_peft(&fixture("smollm2_p_tuning_mlp")).unwrap();
    let wrong = Tensor::zeros((5, 576), DType::F32, &Device::Cpu).unwrap();
    let out = tmp.path().join("wrong-shape");
    assert!(save_peft(&out, &adapter.config, &wrong, &[]).is_err());
    assert!(!out.join(ADAPTER_CONFIG).exists());
}
