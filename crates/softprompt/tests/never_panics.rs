//! Property tests: the template parser, the JSONL reader and the readers of an adapter's files
//! (`adapter_config.json` as PEFT writes it, softprompt's `softprompt.json`) return an error,
//! never panic, on any input (arbitrary text, text made of the characters their syntax gives
//! meaning to, arbitrary bytes, and JSON objects with the real field names holding values of
//! any type).

mod common;
use candle_core::{Device, Tensor};
use proptest::prelude::*;
use serde_json::{Map, Value};
use softprompt::adapter::run_files::AdapterTask;
use softprompt::adapter::{self, PeftConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use softprompt::data::DataSet;
use softprompt::prompt::{PREFIX_TASK_COLS, PREFIX_TASK_ROWS, PROMPT_EMBEDDINGS};
use softprompt::template::Template;
use std::path::Path;

/// Text drawn from the characters the template syntax gives meaning to, plus a few others.
fn template_like() -> impl Strategy<Value = String> {
    let chars = vec![
        '{', '}', '[', ']', '\\', 's', 'o', 'f', 't', ':', '@', '0', '1', '9', 'n', 'x', ' ', '\n', 'é', '—',
    ];
    prop::collection::vec(prop::sample::select(chars), 0..64).prop_map(String::from_iter)
}

/// Text drawn from the characters JSON gives meaning to.
fn jsonl_like() -> impl Strategy<Value = String> {
    let chars = vec![
        '{', '}', '[', ']', '"', ':', ',', '\\', 'u', '0', '1', 'e', '-', '.', 'a', 't', 'n', 'l', ' ', '\n', '\r',
        '\u{feff}',
    ];
    prop::collection::vec(prop::sample::select(chars), 0..96).prop_map(String::from_iter)
}

/// The fields of `adapter_config.json` (every method's, as PEFT 0.21 writes them), and one it
/// does not know.
const PEFT_FIELDS: &[&str] = &[
    "auto_mapping",
    "base_model_name_or_path",
    "inference_mode",
    "modules_to_save",
    "num_attention_heads",
    "num_layers",
    "num_transformer_submodules",
    "num_virtual_tokens",
    "peft_type",
    "peft_version",
    "revision",
    "task_type",
    "token_dim",
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
    "encoder_reparameterization_type",
    "encoder_hidden_size",
    "encoder_num_layers",
    "encoder_dropout",
    "prefix_projection",
    "init_weights",
    "num_frozen_tokens",
    "prompt_tuning_init_state_dict_path",
    "prompt_tuning_init_task",
    "num_ranks",
    "num_tasks",
    "lora_alpha",
];

/// The strings those fields hold (PEFT's enums), and a few others.
const PEFT_WORDS: &[&str] = &[
    "PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
    "CARTRIDGE",
    "MULTITASK_PROMPT_TUNING",
    "LORA",
    "CAUSAL_LM",
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "MLP",
    "LSTM",
    "RANDOM",
    "TEXT",
    "SAMPLE_VOCAB",
    "zero",
    "",
    "0.21.2",
];

/// The fields of `softprompt.json` (format 1, and `config` of the files before it).
const TASK_FIELDS: &[&str] = &[
    "format_version",
    "critical",
    "template",
    "target_field",
    "task",
    "labels",
    "task_labels",
    "verbalizer",
    "method",
    "num_virtual_tokens",
    "model",
    "training",
    "config",
    "future_field",
];

/// The strings those fields hold, and a few others.
const TASK_WORDS: &[&str] = &[
    "[soft:4]Review: {text} {label}",
    "{text} {label}",
    "[soft:99999999999]{text}",
    "{",
    "label",
    "classify",
    "generate",
    "seq-cls",
    "prompt-tuning",
    "prefix-tuning",
    "multitask-prompt-tuning",
    "future_field",
    "positive",
    "",
];

/// Any JSON value: numbers of every kind and size (the sizes fields hold, negative and huge
/// ones), `words`, lists and objects keyed by `fields`.
fn json_value(fields: &'static [&'static str], words: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0u64..8).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(words).prop_map(Value::from),
        ".{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 12, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(fields), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// A JSON object whose keys are among `fields`, each present or not, holding a value of its
/// own type (`typical`) or, now and then, of any type: many objects parse and reach the checks
/// after, and each check meets wrong types.
fn json_object(
    fields: &'static [&'static str],
    words: &'static [&'static str],
    typical: fn(&str) -> BoxedStrategy<Value>,
) -> impl Strategy<Value = Value> {
    let entries: Vec<_> = fields
        .iter()
        .map(move |&k| {
            let value = prop_oneof![40 => typical(k), 1 => json_value(fields, words)];
            prop::option::weighted(0.8, value).prop_map(move |v| (k.to_string(), v))
        })
        .collect();
    entries.prop_map(|entries| {
        Value::Object(
            entries
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect::<Map<_, _>>(),
        )
    })
}

/// A value of the type field `name` of `adapter_config.json` holds: sizes mostly small, now
/// and then huge.
fn typical_peft(name: &str) -> BoxedStrategy<Value> {
    let text = || {
        prop_oneof![
            Just(Value::Null),
            prop::sample::select(PEFT_WORDS).prop_map(Value::from)
        ]
    };
    match name {
        "peft_type" => prop::sample::select(&PEFT_WORDS[..6]).prop_map(Value::from).boxed(),
        "task_type" => prop::sample::select(&PEFT_WORDS[6..9]).prop_map(Value::from).boxed(),
        "encoder_reparameterization_type" => prop::sample::select(&PEFT_WORDS[9..11]).prop_map(Value::from).boxed(),
        "inference_mode" | "prefix_projection" => any::<bool>().prop_map(Value::from).boxed(),
        "encoder_dropout" => (0.0f64..1.0).prop_map(Value::from).boxed(),
        "modules_to_save" => prop_oneof![
            Just(Value::Null),
            prop::collection::vec(prop::sample::select(PEFT_WORDS), 0..3).prop_map(Value::from),
        ]
        .boxed(),
        "auto_mapping" | "tokenizer_kwargs" => Just(Value::Null).boxed(),
        "base_model_name_or_path"
        | "peft_version"
        | "revision"
        | "prompt_tuning_init"
        | "prompt_tuning_init_text"
        | "tokenizer_name_or_path"
        | "init_weights"
        | "prompt_tuning_init_state_dict_path" => text().boxed(),
        _ => prop_oneof![
            12 => (1u64..5).prop_map(Value::from),
            1 => Just(Value::from(0)),
            1 => Just(Value::Null),
            1 => Just(Value::from(1u64 << 32)),
            1 => Just(Value::from(u64::MAX)),
        ]
        .boxed(),
    }
}

/// A value of the type field `name` of `softprompt.json` holds.
fn typical_task(name: &str) -> BoxedStrategy<Value> {
    match name {
        "format_version" | "num_virtual_tokens" => (0u64..4).prop_map(Value::from).boxed(),
        "labels" | "critical" => prop::collection::vec(prop::sample::select(TASK_WORDS), 0..3)
            .prop_map(Value::from)
            .boxed(),
        "task_labels" => prop::collection::vec(prop::collection::vec(prop::sample::select(TASK_WORDS), 0..3), 0..3)
            .prop_map(Value::from)
            .boxed(),
        "verbalizer" | "training" | "config" => {
            prop::collection::btree_map(prop::sample::select(TASK_WORDS), prop::sample::select(TASK_WORDS), 0..3)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), Value::from(v))).collect()))
                .boxed()
        }
        "task" => prop::sample::select(&TASK_WORDS[5..8]).prop_map(Value::from).boxed(),
        "method" => prop::sample::select(&TASK_WORDS[8..11]).prop_map(Value::from).boxed(),
        "template" => prop::sample::select(&TASK_WORDS[..4]).prop_map(Value::from).boxed(),
        _ => prop::sample::select(TASK_WORDS).prop_map(Value::from).boxed(),
    }
}

/// Parses `text` as an adapter config and, when it parses, asks it everything a reader asks.
fn parse_peft_config(text: &str) {
    if let Ok(c) = PeftConfig::from_json_str(text) {
        let _ = c.peft_type();
        let _ = c.multitask_shape();
        let _ = c.encoder_spec();
        let _ = c.total_virtual_tokens();
        let _ = c.prompt_embeddings_shape();
        let again = PeftConfig::from_json_str(&c.to_json_string());
        assert!(again.is_ok(), "{text} → {} → {again:?}", c.to_json_string());
    }
}

/// An adapter folder of `config` (and, when its shapes are small, the weights it asks for,
/// the multitask factors when `factors`): `load_peft` gives the adapter or an error, and the
/// adapter answers every question.
fn load_adapter(dir: &Path, config: &Value, factors: bool) {
    std::fs::write(dir.join(ADAPTER_CONFIG), config.to_string()).unwrap();
    let _ = std::fs::remove_file(dir.join(ADAPTER_WEIGHTS));
    if let Ok(c) = PeftConfig::from_value(config) {
        if let Ok([p, d]) = c.prompt_embeddings_shape() {
            if p <= 256 && d <= 256 && p * d <= 256 {
                let mut tensors = vec![(
                    PROMPT_EMBEDDINGS.to_string(),
                    Tensor::ones((p, d), candle_core::DType::F32, &Device::Cpu).unwrap(),
                )];
                if let (Some((t, r)), true) = (c.multitask_shape(), factors) {
                    if t.checked_mul(r)
                        .and_then(|n| n.checked_mul(p + d))
                        .is_some_and(|n| n <= 1024)
                    {
                        let ones = |shape: (usize, usize, usize)| {
                            Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap()
                        };
                        tensors.push((PREFIX_TASK_COLS.to_string(), ones((t, p, r))));
                        tensors.push((PREFIX_TASK_ROWS.to_string(), ones((t, r, d))));
                    }
                }
                softprompt::io::write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors, None).unwrap();
            }
        }
    }
    if let Ok(a) = adapter::load_peft(dir) {
        let _ = a.num_tasks();
        let _ = a.input_prompt();
        for task in [None, Some(0), Some(1), Some(usize::MAX)] {
            let _ = a.input_prompt_for(task);
        }
        let _ = a.to_soft_prompt();
        let _ = a.classifier();
    }
}

/// Reads `text` as `softprompt.json`, from the text and from a folder.
fn read_task_file(text: &str) {
    let _ = AdapterTask::from_json(text, Path::new("softprompt.json"));
    let dir = common::scratch("never-panics-task");
    std::fs::write(dir.path().join(adapter::run_files::TASK_FILE), text).unwrap();
    if let Ok(task) = AdapterTask::read(dir.path()) {
        let _ = task.to_json();
    }
}

fn parse_template(src: &str) {
    if let Ok(t) = Template::parse(src) {
        let _ = t.num_virtual_tokens();
        let _ = t.fields();
        if let Ok(t) = t.with_target("label") {
            let _ = t.target();
        }
    }
}

fn read_rows(bytes: &[u8]) {
    let dir = common::scratch("never-panics");
    let path = dir.path().join("rows.jsonl");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(ds) = softprompt::data::read_jsonl(&path) {
        assert!(!ds.is_empty());
        for (origin, row) in ds.rows() {
            let _ = softprompt::data::field_text(row, "text", &origin);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn template_parser_never_panics_on_any_text(src in any::<String>()) {
        parse_template(&src);
    }

    #[test]
    fn template_parser_never_panics_on_template_like_text(src in template_like()) {
        parse_template(&src);
    }

    #[test]
    fn jsonl_reader_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        read_rows(&bytes);
        let _ = DataSet::parse("rows.jsonl", &String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn jsonl_reader_never_panics_on_json_like_text(text in jsonl_like()) {
        let _ = DataSet::parse("rows.jsonl", &text);
        read_rows(text.as_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn adapter_config_reader_never_panics_on_json_like_text(text in jsonl_like()) {
        parse_peft_config(&text);
    }

    #[test]
    fn adapter_config_reader_never_panics_on_its_fields_holding_any_type(
        config in json_object(PEFT_FIELDS, PEFT_WORDS, typical_peft)
    ) {
        parse_peft_config(&config.to_string());
        let _ = PeftConfig::from_value(&config);
    }

    #[test]
    fn adapter_loader_never_panics_on_any_config(
        config in json_object(PEFT_FIELDS, PEFT_WORDS, typical_peft),
        factors in any::<bool>(),
    ) {
        let dir = common::scratch("never-panics-adapter");
        load_adapter(dir.path(), &config, factors);
    }

    #[test]
    fn adapter_config_reader_never_panics_on_any_json(value in json_value(PEFT_FIELDS, PEFT_WORDS)) {
        let _ = PeftConfig::from_value(&value);
    }

    #[test]
    fn task_file_reader_never_panics_on_json_like_text(text in jsonl_like()) {
        read_task_file(&text);
    }

    #[test]
    fn task_file_reader_never_panics_on_its_fields_holding_any_type(
        task in json_object(TASK_FIELDS, TASK_WORDS, typical_task)
    ) {
        read_task_file(&task.to_string());
    }

    #[test]
    fn task_file_reader_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        read_task_file(&String::from_utf8_lossy(&bytes));
    }
}
