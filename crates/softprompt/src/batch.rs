//! Batches: examples padded into id and mask tensors, the prompt spliced into the word
//! embeddings at the virtual-token positions, and the splice's gradient (d(loss)/d(prompt) from
//! d(loss)/d(input embeddings)).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::backbone::Backbone;
use crate::task::Example;
use crate::template::Token;

/// A padded batch ready for the backbone.
pub struct Batch {
    /// `[B, T]` ids; virtual-token positions hold 0.
    pub ids: Tensor,
    /// `[B, T]` 1 for real positions.
    pub mask: Tensor,
    /// Flat positions (`b·T + t`) of virtual tokens and their virtual-token indices.
    pub soft_positions: Vec<u32>,
    /// Virtual-token index at each of `soft_positions`.
    pub soft_index: Vec<u32>,
    /// Flat positions of the prompt's real (not virtual) tokens, the input a DePT update reads.
    pub input_positions: Vec<u32>,
    /// At each of `input_positions`: the token's index among its row's real prompt tokens
    /// (the row of DePT's `A·B` added to it).
    pub input_index: Vec<u32>,
    /// Flat positions whose output predicts a target token, and that token.
    pub loss_positions: Vec<u32>,
    /// Target token at each loss position.
    pub loss_targets: Vec<u32>,
    /// Per row: the position of the last prompt token.
    pub last_prompt: Vec<usize>,
    /// Batch size and padded length.
    pub shape: (usize, usize),
}

/// Pads examples into a batch; with `with_targets` the target tokens follow the prompt and their
/// prediction positions are recorded.
pub fn make_batch(examples: &[&Example], with_targets: bool, device: &Device) -> Result<Batch> {
    let lens: Vec<usize> = examples
        .iter()
        .map(|e| e.prompt.len() + if with_targets { e.target.len() } else { 0 })
        .collect();
    let b = examples.len();
    let t = lens.iter().copied().max().unwrap_or(0);
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![0u32; b * t];
    let mut batch = Batch {
        ids: Tensor::zeros((1, 1), DType::U32, device)?,
        mask: Tensor::zeros((1, 1), DType::U32, device)?,
        soft_positions: Vec::new(),
        soft_index: Vec::new(),
        input_positions: Vec::new(),
        input_index: Vec::new(),
        loss_positions: Vec::new(),
        loss_targets: Vec::new(),
        last_prompt: Vec::with_capacity(b),
        shape: (b, t),
    };
    for (r, e) in examples.iter().enumerate() {
        let mut real = 0u32;
        for (i, tok) in e.prompt.iter().enumerate() {
            let flat = r * t + i;
            mask[flat] = 1;
            match *tok {
                Token::Id(id) => {
                    ids[flat] = id;
                    batch.input_positions.push(flat as u32);
                    batch.input_index.push(real);
                    real += 1;
                }
                Token::Soft(v) => {
                    batch.soft_positions.push(flat as u32);
                    batch.soft_index.push(v as u32);
                }
            }
        }
        let p = e.prompt.len();
        batch.last_prompt.push(p - 1);
        if with_targets {
            for (j, &id) in e.target.iter().enumerate() {
                ids[r * t + p + j] = id;
                mask[r * t + p + j] = 1;
                batch.loss_positions.push((r * t + p + j - 1) as u32);
                batch.loss_targets.push(id);
            }
        }
    }
    batch.ids = Tensor::from_vec(ids, (b, t), device)?;
    batch.mask = Tensor::from_vec(mask, (b, t), device)?;
    Ok(batch)
}

/// Word embeddings of the batch with the prompt rows `prompt` (`[p, hidden]`) spliced in at
/// the virtual-token positions.
pub fn splice_embeddings(backbone: &dyn Backbone, batch: &Batch, prompt: Option<&Tensor>) -> Result<Tensor> {
    let words = backbone.embed(&batch.ids)?;
    if batch.soft_positions.is_empty() {
        return Ok(words);
    }
    let Some(prompt) = prompt else {
        bail!("the template has virtual tokens but no prompt was given")
    };
    splice_rows(batch, &words, prompt)
}

/// `base` (`[B, T, d]`: word embeddings, or late prompt tuning's hidden states at its layer)
/// with the prompt rows `prompt` (`[p, d]`) written at the batch's virtual-token positions.
pub fn splice_rows(batch: &Batch, base: &Tensor, prompt: &Tensor) -> Result<Tensor> {
    let (b, t, d) = base.dims3()?;
    let n = b * t;
    let mut index: Vec<u32> = (0..n as u32).collect();
    for (&pos, &v) in batch.soft_positions.iter().zip(&batch.soft_index) {
        index[pos as usize] = n as u32 + v;
    }
    let table = Tensor::cat(&[&base.reshape((n, d))?, &prompt.to_dtype(base.dtype())?], 0)?;
    let index = Tensor::from_vec(index, n, base.device())?;
    Ok(table.index_select(&index, 0)?.reshape((b, t, d))?)
}

/// The input positions a position-wise update of `rows` rows reaches: `(flat position, row)`
/// for each real prompt token whose index is below `rows` (later tokens get no update).
fn update_positions(batch: &Batch, rows: usize) -> (Vec<u32>, Vec<u32>) {
    batch
        .input_positions
        .iter()
        .zip(&batch.input_index)
        .filter(|(_, &j)| (j as usize) < rows)
        .map(|(&p, &j)| (p, j))
        .unzip()
}

/// DePT: `embeds [B, T, d]` plus row `j` of `update [rows, d]` at the `j`-th real prompt token
/// of every row (virtual tokens, targets and padding unchanged).
pub fn add_input_update(batch: &Batch, embeds: &Tensor, update: &Tensor) -> Result<Tensor> {
    let (b, t, d) = embeds.dims3()?;
    let rows = update.dim(0)?;
    let n = b * t;
    let (positions, index) = update_positions(batch, rows);
    let mut gather = vec![0u32; n];
    for (&p, &j) in positions.iter().zip(&index) {
        gather[p as usize] = j + 1;
    }
    let zero = Tensor::zeros((1, d), update.dtype(), update.device())?;
    let table = Tensor::cat(&[&zero, update], 0)?;
    let gather = Tensor::from_vec(gather, n, embeds.device())?;
    let delta = table.index_select(&gather, 0)?.reshape((b, t, d))?;
    Ok((embeds + delta.to_dtype(embeds.dtype())?)?)
}

/// d(loss)/d(update) `[rows, d]` of [`add_input_update`] from d(loss)/d(input embeddings): the
/// sum over the rows of the batch of each input position's gradient.
pub fn input_update_gradient(batch: &Batch, d_embeds: &Tensor, rows: usize) -> Result<Tensor> {
    let (b, t, d) = d_embeds.dims3()?;
    let device = d_embeds.device();
    let zeros = Tensor::zeros((rows, d), d_embeds.dtype(), device)?;
    let (positions, index) = update_positions(batch, rows);
    if positions.is_empty() {
        return Ok(zeros);
    }
    let pos = Tensor::new(positions.as_slice(), device)?;
    let grads = d_embeds.reshape((b * t, d))?.index_select(&pos, 0)?;
    let idx = Tensor::new(index.as_slice(), device)?;
    Ok(zeros.index_add(&idx, &grads, 0)?)
}

/// d(loss)/d(prompt) `[p, hidden]` from d(loss)/d(input embeddings): the sum over every position
/// that holds each virtual token.
pub fn prompt_gradient(batch: &Batch, d_embeds: &Tensor, num_virtual: usize) -> Result<Tensor> {
    let (b, t, d) = d_embeds.dims3()?;
    let device = d_embeds.device();
    let zeros = Tensor::zeros((num_virtual, d), d_embeds.dtype(), device)?;
    if batch.soft_positions.is_empty() {
        return Ok(zeros);
    }
    let pos = Tensor::new(batch.soft_positions.as_slice(), device)?;
    let rows = d_embeds.reshape((b * t, d))?.index_select(&pos, 0)?;
    let idx = Tensor::new(batch.soft_index.as_slice(), device)?;
    Ok(zeros.index_add(&idx, &rows, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(prompt: Vec<Token>, target: Vec<u32>) -> Example {
        Example {
            origin: "t:1".into(),
            prompt,
            target,
            gold: 0,
            truncated: false,
        }
    }

    #[test]
    fn batches_record_soft_and_loss_positions() {
        let a = example(vec![Token::Soft(0), Token::Id(5), Token::Soft(1)], vec![7, 8]);
        let b = example(vec![Token::Soft(1), Token::Id(6)], vec![9]);
        let batch = make_batch(&[&a, &b], true, &Device::Cpu).unwrap();
        assert_eq!(batch.shape, (2, 5));
        assert_eq!(batch.soft_positions, vec![0, 2, 5]);
        assert_eq!(batch.soft_index, vec![0, 1, 1]);
        // A target token is predicted by the position before it.
        assert_eq!(batch.loss_positions, vec![2, 3, 6]);
        assert_eq!(batch.loss_targets, vec![7, 8, 9]);
        assert_eq!(batch.last_prompt, vec![2, 1]);
        let mask: Vec<Vec<u32>> = batch.mask.to_vec2().unwrap();
        assert_eq!(mask, vec![vec![1, 1, 1, 1, 1], vec![1, 1, 1, 0, 0]]);
    }

    #[test]
    fn prompt_gradient_sums_the_rows_of_each_virtual_token() {
        // Virtual token 1 appears twice (row 0 position 2, row 1 position 0), token 0 once.
        let a = example(vec![Token::Soft(0), Token::Id(5), Token::Soft(1)], vec![]);
        let b = example(vec![Token::Soft(1), Token::Id(6), Token::Id(7)], vec![]);
        let batch = make_batch(&[&a, &b], false, &Device::Cpu).unwrap();
        // d(loss)/d(embeds)[b, t, :] = [10·b + t, −(10·b + t)]
        let v: Vec<f32> = (0..2)
            .flat_map(|b| (0..3).flat_map(move |t| [(10 * b + t) as f32, -((10 * b + t) as f32)]))
            .collect();
        let d_embeds = Tensor::from_vec(v, (2, 3, 2), &Device::Cpu).unwrap();
        let g: Vec<Vec<f32>> = prompt_gradient(&batch, &d_embeds, 3).unwrap().to_vec2().unwrap();
        // token 0: position (0, 0) → 0; token 1: (0, 2) + (1, 0) → 2 + 10; token 2: unused.
        assert_eq!(g, vec![vec![0.0, 0.0], vec![12.0, -12.0], vec![0.0, 0.0]]);
    }
}
