//! Scaled dot-product attention over packed queries and padded keys, causal or not, with
//! grouped-query heads, and its input gradient.
//!
//! Queries are the packed real positions `q: [N, heads·head_dim]` (rows of the batch one after
//! another). Keys and values sit in a padded, token-major layout `[rows·keys, kv_heads·head_dim]`:
//! key slot `j` of batch row `b` is row `b·keys + j`, and `key_mask` says which slots are real.
//! Query `i` belongs to batch row `query_row[i]` and, when causal, sees key slots `0..=query_key[i]`.
//! Query head `h` reads key/value head `h / (heads / kv_heads)`.

mod backward;
mod blocks;
mod forward;
#[cfg(test)]
mod tests;

pub use backward::attention_backward;
pub use forward::attention;

/// Shapes and masks of one attention call.
pub struct AttentionLayout<'a> {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Key slots per batch row.
    pub keys: usize,
    /// `[rows·keys]`: whether a key slot holds a real position.
    pub key_mask: &'a [bool],
    /// `[N]`: the batch row of each query (non-decreasing; within a row, `query_key` too).
    pub query_row: &'a [usize],
    /// `[N]`: the key slot of each query's own position (the causal limit).
    pub query_key: &'a [usize],
    /// Whether a query sees only the key slots up to its own.
    pub causal: bool,
}

impl AttentionLayout<'_> {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// Key slots query `i` may see: `(row, end)` with slots `0..end` of that row.
    fn span(&self, i: usize) -> (usize, usize) {
        let end = if self.causal {
            (self.query_key[i] + 1).min(self.keys)
        } else {
            self.keys
        };
        (self.query_row[i], end)
    }
    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) {
        let (n, hd) = (self.query_row.len(), self.head_dim);
        assert!(self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads));
        assert_eq!(q.len(), n * self.heads * hd, "attention: q is not [N, heads·head_dim]");
        assert_eq!(
            k.len(),
            self.key_mask.len() * self.kv_heads * hd,
            "attention: k does not match key_mask"
        );
        assert_eq!(v.len(), k.len(), "attention: v and k differ in size");
        assert_eq!(self.query_key.len(), n);
        assert!(
            self.query_row.windows(2).all(|w| w[0] <= w[1]),
            "attention: queries must be grouped by row"
        );
        // A block's key range is its last query's (see `block_keys`).
        assert!(
            (1..n).all(|i| self.query_row[i] != self.query_row[i - 1] || self.query_key[i] >= self.query_key[i - 1]),
            "attention: the queries of a row must be in key order"
        );
    }
}
