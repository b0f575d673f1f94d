//! Initial values of a prompt matrix `[p, d]` (Lester et al. 2021 §3.2 and HF PEFT's
//! `prompt_tuning_init`), and the seeded random numbers every initialiser draws from.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::tokenizer::TextTokenizer;

/// How many of the most common tokens [`PromptInit::Vocab`] samples from (Lester et al.).
pub const VOCAB_SAMPLE_POOL: usize = 5000;

/// How the learnable `[p, d]` matrix starts.
#[derive(Debug, Clone)]
pub enum PromptInit {
    /// Uniform in `[-0.5, 0.5]` (Lester et al.'s "random uniform").
    Random,
    /// Standard normal `N(0, 1)`: PEFT's `RANDOM` (the default init of `torch.nn.Embedding`).
    RandomNormal,
    /// All zeros (PEFT's `init_weights="zero"` of prefix tuning).
    Zero,
    /// Embeddings of `p` distinct tokens drawn without replacement from the
    /// [`VOCAB_SAMPLE_POOL`] most common tokens (see [`common_token_ids`] for what "most
    /// common" means without corpus counts).
    Vocab,
    /// One virtual token per label: the label's embedding, averaged over its sub-tokens; the
    /// remaining virtual tokens as [`PromptInit::Vocab`] (drawn among tokens not used by a label).
    /// With fewer virtual tokens than labels, virtual token `i` is the average of labels `i`,
    /// `i + p`, `i + 2p`, … (so a one-token prompt starts at the mean of all labels). Each label is tokenized as written, without special tokens: for byte-level BPE
    /// vocabularies pass `" positive"` to get the word as it appears after a space.
    Labels(Vec<String>),
    /// PEFT's `TEXT`: the text is tokenized as PEFT does (`tokenizer(text)`, i.e. with the
    /// special tokens the tokenizer adds), then truncated to `p` ids, or repeated
    /// (`ids * ceil(p / len)`) and cut to `p`; the prompt is those ids' embeddings.
    Text(String),
    /// A given `[p, d]` matrix (prompt transfer, e.g. from an existing adapter's
    /// `prompt_embeddings`).
    FromTensor(Tensor),
}

impl PromptInit {
    /// PEFT's `prompt_tuning_init` value for this init (`RANDOM`, `SAMPLE_VOCAB` or `TEXT`).
    /// Inits PEFT has no name for are reported as `RANDOM`, which PEFT treats as "the weights in
    /// the file are the prompt".
    pub fn peft_name(&self) -> &'static str {
        match self {
            PromptInit::Vocab => "SAMPLE_VOCAB",
            PromptInit::Text(_) => "TEXT",
            _ => "RANDOM",
        }
    }
}

/// The seeded generator every initialiser uses (`StdRng::seed_from_u64(seed)`).
pub fn seeded_rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` numbers uniform in `[lo, hi]`.
pub(crate) fn uniform(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..=hi)).collect()
}

/// `n` standard-normal numbers (Box–Muller): the one normal sampler of the crate (random-normal
/// prompts, classification-head weights).
pub(crate) fn normal(rng: &mut StdRng, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 - U in (0, 1] keeps ln finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push(r * a.cos());
        out.push(r * a.sin());
    }
    out.truncate(n);
    out
}

/// What an initialiser may need besides the RNG.
#[derive(Clone, Copy)]
pub struct InitSource<'a> {
    /// The model's input embedding table `[vocab, d]` (needed by Vocab, Labels, Text).
    pub embedding_table: Option<&'a Tensor>,
    /// The model's tokenizer (needed by Vocab, Labels, Text).
    pub tokenizer: Option<&'a TextTokenizer>,
}

impl<'a> InitSource<'a> {
    /// No model: only [`PromptInit::Random`], [`PromptInit::RandomNormal`] and
    /// [`PromptInit::FromTensor`] work.
    pub fn none() -> Self {
        Self {
            embedding_table: None,
            tokenizer: None,
        }
    }

    /// A model's embedding table and tokenizer.
    pub fn model(embedding_table: &'a Tensor, tokenizer: &'a TextTokenizer) -> Self {
        Self {
            embedding_table: Some(embedding_table),
            tokenizer: Some(tokenizer),
        }
    }

    fn table(&self, what: &str) -> Result<&'a Tensor> {
        self.embedding_table
            .with_context(|| format!("the {what} prompt initialisation needs the model's embedding table"))
    }

    fn tok(&self, what: &str) -> Result<&'a TextTokenizer> {
        self.tokenizer
            .with_context(|| format!("the {what} prompt initialisation needs the model's tokenizer"))
    }
}

/// Builds the initial prompt matrix `[p, d]` (f32 for the random inits, the embedding table's
/// dtype otherwise; on the table's device, or the CPU without a table).
pub fn initial_prompt(
    init: &PromptInit,
    num_virtual_tokens: usize,
    token_dim: usize,
    source: InitSource,
    rng: &mut StdRng,
) -> Result<Tensor> {
    let p = num_virtual_tokens;
    if p == 0 {
        bail!("num_virtual_tokens must be at least 1");
    }
    if token_dim == 0 {
        bail!("token_dim must be at least 1");
    }
    let device = source
        .embedding_table
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    if let Some(table) = source.embedding_table {
        let (_, d) = table
            .dims2()
            .context("the embedding table should be a matrix [vocab, d]")?;
        if d != token_dim
            && !matches!(
                init,
                PromptInit::Random | PromptInit::RandomNormal | PromptInit::Zero | PromptInit::FromTensor(_)
            )
        {
            bail!("the embedding table has {d} columns but token_dim is {token_dim}");
        }
    }
    let from_values =
        |v: Vec<f64>| -> Result<Tensor> { Ok(Tensor::from_vec(v, (p, token_dim), &device)?.to_dtype(DType::F32)?) };
    match init {
        PromptInit::Random => from_values(uniform(rng, p * token_dim, -0.5, 0.5)),
        PromptInit::RandomNormal => from_values(normal(rng, p * token_dim)),
        PromptInit::Zero => Ok(Tensor::zeros((p, token_dim), DType::F32, &device)?),
        PromptInit::FromTensor(t) => {
            let dims = t.dims();
            if dims != [p, token_dim] {
                let width = match dims {
                    [_, w] if *w != token_dim => format!(
                        "; its width {w} is another model's (this one's hidden size is {token_dim}): \
                         start from an adapter of this model"
                    ),
                    _ => String::new(),
                };
                bail!(
                    "the prompt to start from (an adapter's, option `init_from` (--init-from)) has \
                     shape {dims:?}, expected [{p}, {token_dim}] (this run's virtual tokens × the \
                     model's hidden size){width}"
                );
            }
            Ok(t.clone())
        }
        PromptInit::Vocab => {
            let table = source.table("sampled-vocabulary")?;
            let tok = source.tok("sampled-vocabulary")?;
            let ids = sample_vocab_ids(tok, table.dim(0)?, p, &[], rng)?;
            rows(table, &ids)
        }
        PromptInit::Text(text) => {
            let table = source.table("text")?;
            let tok = source.tok("text")?;
            let ids = tok
                .encode(text, true)
                .context("cannot tokenize the prompt initialisation text")?;
            let ids = text_init_ids(&ids, p).context("the prompt initialisation text has no tokens")?;
            check_ids(&ids, table.dim(0)?)?;
            rows(table, &ids)
        }
        PromptInit::Labels(labels) => {
            let table = source.table("class-label")?;
            let tok = source.tok("class-label")?;
            if labels.is_empty() {
                bail!("the class-label prompt initialisation needs at least one label");
            }
            let vocab = table.dim(0)?;
            let mut parts = Vec::with_capacity(p);
            let mut used = Vec::new();
            for label in labels {
                let ids = tok
                    .encode(label, false)
                    .with_context(|| format!("cannot tokenize label {label:?}"))?;
                if ids.is_empty() {
                    bail!("label {label:?} has no tokens");
                }
                check_ids(&ids, vocab)?;
                used.extend_from_slice(&ids);
                parts.push(rows(table, &ids)?.mean_keepdim(0)?);
            }
            if parts.len() > p {
                // More labels than virtual tokens: token i averages labels i, i + p, …
                let shared: Vec<Tensor> = (0..p)
                    .map(|i| Tensor::cat(&parts[i..].iter().step_by(p).collect::<Vec<_>>(), 0)?.mean_keepdim(0))
                    .collect::<candle_core::Result<_>>()?;
                return Ok(Tensor::cat(&shared, 0)?);
            }
            let rest = p - labels.len();
            if rest > 0 {
                let ids = sample_vocab_ids(tok, vocab, rest, &used, rng)?;
                parts.push(rows(table, &ids)?);
            }
            Ok(Tensor::cat(&parts, 0)?)
        }
    }
}

/// PEFT's TEXT rule: truncate `ids` to `p`, or repeat them `ceil(p / len)` times and take the
/// first `p`. `None` when `ids` is empty.
pub fn text_init_ids(ids: &[u32], p: usize) -> Option<Vec<u32>> {
    if ids.is_empty() {
        return None;
    }
    let reps = p.div_ceil(ids.len());
    let mut out: Vec<u32> = ids.iter().copied().cycle().take(reps * ids.len()).collect();
    out.truncate(p);
    Some(out)
}

fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("token id {bad} is outside the embedding table ({vocab} rows)");
    }
    Ok(())
}

fn rows(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let idx = Tensor::new(ids, table.device())?;
    Ok(table.index_select(&idx, 0)?)
}

/// The "most common" tokens of a vocabulary, most common first, without corpus counts.
///
/// BPE vocabularies (byte-level and SentencePiece) number tokens in merge order, and merges are
/// learned most-frequent-pair first, so a lower id is a more common token; WordPiece vocabularies
/// built by BERT's recipe are likewise ordered by frequency after their reserved block. The ids
/// are therefore taken in increasing order, skipping what is not a learned merge:
/// - special / added tokens of the tokenizer (`<|endoftext|>`, `[CLS]`, …);
/// - reserved or control spellings: `[...]` (e.g. BERT's `[unused7]`), `<...>` without spaces
///   (`<s>`, `<unk>`, `<0x0A>` byte-fallback tokens, `<|im_start|>`);
/// - the base alphabet: tokens whose spelling is a single character (the 256 byte symbols of
///   byte-level BPE, WordPiece's single characters), plus `##x` continuation characters.
///
/// Returns at most `limit` ids below `vocab_rows`.
pub fn common_token_ids(tokenizer: &TextTokenizer, vocab_rows: usize, limit: usize) -> Vec<u32> {
    let special: std::collections::HashSet<u32> =
        tokenizer.inner().get_added_tokens_decoder().keys().copied().collect();
    let n = tokenizer.vocab_size().min(vocab_rows);
    let mut out = Vec::with_capacity(limit.min(n));
    for id in 0..n as u32 {
        if out.len() >= limit {
            break;
        }
        if special.contains(&id) {
            continue;
        }
        let Some(tok) = tokenizer.id_to_token(id) else {
            continue;
        };
        if is_reserved_spelling(&tok) {
            continue;
        }
        let body = tok.strip_prefix("##").unwrap_or(&tok);
        if body.chars().count() <= 1 {
            continue;
        }
        out.push(id);
    }
    out
}

fn is_reserved_spelling(tok: &str) -> bool {
    let bracketed = |open: char, close: char| {
        tok.len() > 2 && tok.starts_with(open) && tok.ends_with(close) && !tok.contains(char::is_whitespace)
    };
    bracketed('[', ']') || bracketed('<', '>')
}

/// `k` distinct ids drawn uniformly without replacement from the [`VOCAB_SAMPLE_POOL`] most
/// common tokens (more when `k` exceeds it), leaving out `exclude`: the ids
/// [`PromptInit::Vocab`] uses for the same `rng` state.
pub fn sample_vocab_ids(
    tok: &TextTokenizer,
    vocab_rows: usize,
    k: usize,
    exclude: &[u32],
    rng: &mut StdRng,
) -> Result<Vec<u32>> {
    let pool: Vec<u32> = common_token_ids(tok, vocab_rows, VOCAB_SAMPLE_POOL.max(k) + exclude.len())
        .into_iter()
        .filter(|id| !exclude.contains(id))
        .take(VOCAB_SAMPLE_POOL.max(k))
        .collect();
    if pool.len() < k {
        bail!(
            "cannot sample {k} distinct vocabulary tokens: the vocabulary has only {} ordinary tokens",
            pool.len()
        );
    }
    Ok(rand::seq::index::sample(rng, pool.len(), k)
        .into_iter()
        .map(|i| pool[i])
        .collect())
}
