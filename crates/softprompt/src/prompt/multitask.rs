//! Multitask prompt tuning (Wang et al. 2023; HF PEFT's `MULTITASK_PROMPT_TUNING`): one shared
//! prompt `prompt_embeddings [p, d]` and, per task `t`, a rank-`r` product
//! `prefix_task_cols[t] [p, r] · prefix_task_rows[t] [r, d]`; the prompt of task `t` is their
//! element-wise product `prompt_embeddings ⊙ (cols[t] · rows[t])` (PEFT's
//! `MultitaskPromptEmbedding.forward`).
//!
//! [`TaskFactors::apply`] stacks every task's prompt into one table `[tasks·p, d]`: row
//! `t·p + v` is virtual token `v` of task `t`, so a batch whose rows belong to different tasks
//! splices each row's own prompt (see [`crate::task::assign_task`]) and the gradient of a
//! task's factors comes only from its own rows.
//!
//! Initialisation (PEFT's `MultitaskPromptTuningInit`): the factors start `N(0, 0.02)`; from a
//! source state dict (`prompt_embeddings`, `prefix_task_cols`, `prefix_task_rows`) the shared
//! prompt is copied and the factors are the mean over the source tasks
//! (`AVERAGE_SOURCE_TASKS`), one source task's (`EXACT_SOURCE_TASK`) or fresh
//! (`ONLY_SOURCE_SHARED`); see [`SourceInit`].

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use std::collections::BTreeMap;

use super::init::normal;

/// PEFT's name of the per-task column factors `[tasks, p, r]`.
pub const PREFIX_TASK_COLS: &str = "prefix_task_cols";
/// PEFT's name of the per-task row factors `[tasks, r, d]`.
pub const PREFIX_TASK_ROWS: &str = "prefix_task_rows";
/// Standard deviation of PEFT's fresh factors.
pub const FACTOR_STD: f64 = 0.02;

/// The per-task low-rank factors of a multitask prompt.
#[derive(Debug, Clone)]
pub struct TaskFactors {
    cols: Var,
    rows: Var,
}

/// How a multitask prompt's factors start from a source adapter (PEFT's source-task inits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceInit {
    /// `AVERAGE_SOURCE_TASKS`: the mean of the source tasks' factors.
    AverageSourceTasks,
    /// `EXACT_SOURCE_TASK`: the factors of source task `prompt_tuning_init_task`.
    ExactSourceTask(usize),
    /// `ONLY_SOURCE_SHARED`: only the shared prompt is copied; the factors start fresh.
    OnlySourceShared,
}

impl SourceInit {
    /// PEFT's `prompt_tuning_init` name.
    pub fn peft_name(self) -> &'static str {
        match self {
            SourceInit::AverageSourceTasks => "AVERAGE_SOURCE_TASKS",
            SourceInit::ExactSourceTask(_) => "EXACT_SOURCE_TASK",
            SourceInit::OnlySourceShared => "ONLY_SOURCE_SHARED",
        }
    }
}

impl TaskFactors {
    /// PEFT's fresh factors: `cols [tasks, p, r]` then `rows [tasks, r, d]`, each `N(0, 0.02)`
    /// (f32, drawn from `rng` in that order).
    pub fn random(tasks: usize, p: usize, r: usize, d: usize, device: &Device, rng: &mut StdRng) -> Result<Self> {
        if tasks == 0 || p == 0 || r == 0 || d == 0 {
            bail!("a multitask prompt needs at least one task, virtual token, rank and dimension (got tasks {tasks}, p {p}, r {r}, d {d})");
        }
        let mut draw = |shape: (usize, usize, usize)| -> Result<Tensor> {
            let v: Vec<f32> = normal(rng, shape.0 * shape.1 * shape.2)
                .into_iter()
                .map(|x| (FACTOR_STD * x) as f32)
                .collect();
            Ok(Tensor::from_vec(v, shape, device)?)
        };
        let cols = draw((tasks, p, r))?;
        let rows = draw((tasks, r, d))?;
        Self::new(&cols, &rows)
    }

    /// Factors from tensors `cols [tasks, p, r]` and `rows [tasks, r, d]` (shapes checked).
    pub fn new(cols: &Tensor, rows: &Tensor) -> Result<Self> {
        let (t, _, r) = cols
            .dims3()
            .with_context(|| format!("`{PREFIX_TASK_COLS}` should be [tasks, p, r], got {:?}", cols.dims()))?;
        let (t2, r2, _) = rows
            .dims3()
            .with_context(|| format!("`{PREFIX_TASK_ROWS}` should be [tasks, r, d], got {:?}", rows.dims()))?;
        if t != t2 || r != r2 {
            bail!(
                "`{PREFIX_TASK_COLS}` {:?} and `{PREFIX_TASK_ROWS}` {:?} disagree on the number of tasks or ranks",
                cols.dims(),
                rows.dims()
            );
        }
        Ok(Self {
            cols: Var::from_tensor(&cols.contiguous()?)?,
            rows: Var::from_tensor(&rows.to_dtype(cols.dtype())?.contiguous()?)?,
        })
    }

    /// Factors started from a source state dict (see [`SourceInit`]); `tasks` is the number of
    /// target tasks. The averaged or chosen source factors start every target task (PEFT itself
    /// allows only one target task with these two inits: its strict load wants `[1, p, r]`).
    pub fn from_source(
        init: SourceInit,
        source: &BTreeMap<String, Tensor>,
        tasks: usize,
        p: usize,
        d: usize,
        r: usize,
        rng: &mut StdRng,
    ) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            source
                .get(name)
                .cloned()
                .with_context(|| format!("the source has no tensor `{name}` (needed by {})", init.peft_name()))
        };
        let device = source
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        let (cols, rows) = match init {
            SourceInit::OnlySourceShared => return Self::random(tasks, p, r, d, &device, rng),
            SourceInit::AverageSourceTasks => (
                get(PREFIX_TASK_COLS)?.mean_keepdim(0)?,
                get(PREFIX_TASK_ROWS)?.mean_keepdim(0)?,
            ),
            SourceInit::ExactSourceTask(k) => {
                let cols = get(PREFIX_TASK_COLS)?;
                let n = cols.dims().first().copied().unwrap_or(0);
                if k >= n {
                    bail!("prompt_tuning_init_task is {k}, but the source has {n} tasks (0..{n})");
                }
                (cols.narrow(0, k, 1)?, get(PREFIX_TASK_ROWS)?.narrow(0, k, 1)?)
            }
        };
        let one = Self::new(&cols.to_dtype(DType::F32)?, &rows.to_dtype(DType::F32)?)?;
        let (_, sp, sr) = one.cols.dims3()?;
        let (_, _, sd) = one.rows.dims3()?;
        if (sp, sr, sd) != (p, r, d) {
            bail!(
                "the source factors are for {sp} virtual tokens, rank {sr}, dimension {sd}; this prompt has {p} virtual tokens, rank {r} (num_ranks), dimension {d}"
            );
        }
        let cols = one.cols.as_tensor().repeat((tasks, 1, 1))?;
        let rows = one.rows.as_tensor().repeat((tasks, 1, 1))?;
        Self::new(&cols, &rows)
    }

    /// The same factors on `device` (new parameters).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Self::new(
            &self.cols.as_tensor().to_device(device)?,
            &self.rows.as_tensor().to_device(device)?,
        )
    }

    /// Number of tasks.
    pub fn num_tasks(&self) -> usize {
        self.cols.dims()[0]
    }

    /// Rank `r` of each task's product.
    pub fn num_ranks(&self) -> usize {
        self.cols.dims()[2]
    }

    /// The stacked prompts `[tasks·p, d]` of every task, a differentiable graph over the shared
    /// prompt `shared [p, d]` and the factors: row `t·p + v` is `shared[v] ⊙ (cols[t]·rows[t])[v]`.
    pub fn apply(&self, shared: &Tensor) -> Result<Tensor> {
        let (p, d) = shared.dims2()?;
        let (t, cp, _) = self.cols.dims3()?;
        if cp != p || self.rows.dims()[2] != d {
            bail!(
                "the task factors {:?} · {:?} do not fit a shared prompt [{p}, {d}]",
                self.cols.dims(),
                self.rows.dims()
            );
        }
        let products = self.cols.as_tensor().matmul(self.rows.as_tensor())?;
        Ok(products.broadcast_mul(&shared.unsqueeze(0)?)?.reshape((t * p, d))?)
    }

    /// The factors with PEFT's names: `prefix_task_cols`, `prefix_task_rows`.
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (PREFIX_TASK_COLS.to_string(), self.cols.clone()),
            (PREFIX_TASK_ROWS.to_string(), self.rows.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    fn max_abs(a: Tensor, b: Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    #[test]
    fn each_task_prompt_is_the_shared_prompt_times_its_product() {
        let mut rng = super::super::seeded_rng(3);
        let (t, p, r, d) = (3, 4, 2, 5);
        let f = TaskFactors::random(t, p, r, d, &Device::Cpu, &mut rng).unwrap();
        let shared = Tensor::arange(0f32, (p * d) as f32, &Device::Cpu)
            .unwrap()
            .reshape((p, d))
            .unwrap();
        let table = f.apply(&shared).unwrap();
        assert_eq!(table.dims(), [t * p, d]);
        for k in 0..t {
            let cols = f.cols.as_tensor().i(k).unwrap();
            let rows = f.rows.as_tensor().i(k).unwrap();
            let want = (cols.matmul(&rows).unwrap() * &shared).unwrap();
            let got = table.narrow(0, k * p, p).unwrap();
            let diff = max_abs(want, got);
            assert!(diff < 1e-6, "task {k}: {diff}");
        }
    }

    #[test]
    fn source_inits_average_or_pick_the_source_factors() {
        let mut rng = super::super::seeded_rng(4);
        let (p, r, d) = (2, 1, 3);
        let src = TaskFactors::random(2, p, r, d, &Device::Cpu, &mut rng).unwrap();
        let dict: BTreeMap<String, Tensor> = src
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        let avg = TaskFactors::from_source(SourceInit::AverageSourceTasks, &dict, 1, p, d, r, &mut rng).unwrap();
        let want = dict[PREFIX_TASK_COLS].mean_keepdim(0).unwrap();
        assert!(max_abs(avg.cols.as_tensor().clone(), want) < 1e-7);
        let exact = TaskFactors::from_source(SourceInit::ExactSourceTask(1), &dict, 1, p, d, r, &mut rng).unwrap();
        let want: Vec<f32> = dict[PREFIX_TASK_ROWS]
            .i(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f32> = exact.rows.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want);
        let e = TaskFactors::from_source(SourceInit::ExactSourceTask(2), &dict, 1, p, d, r, &mut rng).unwrap_err();
        assert!(format!("{e:#}").contains("source has 2 tasks"), "{e:#}");
        let e = TaskFactors::from_source(SourceInit::AverageSourceTasks, &dict, 1, p, d, 2, &mut rng).unwrap_err();
        assert!(format!("{e:#}").contains("rank 2"), "{e:#}");
    }
}
