//! Elementwise loops compiled 8 lanes wide where the CPU allows it.
//!
//! The crate builds for baseline x86-64, so the compiler vectorises loops with 4-lane SSE.
//! [`wide`] runs a closure inside a function compiled with AVX2, where the same loops (inlined
//! into it) vectorise 8 lanes wide. Only the lane count changes: the operations are the same
//! IEEE operations (no FMA contraction), so the results are bit-identical.

/// `f()`, compiled with AVX2 when this CPU has it. Put it around the innermost loop (inside
/// any rayon closure) and mark the functions it calls `#[inline(always)]`, so that their
/// loops are vectorised inside the AVX2 function.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        return unsafe { with_avx2(f) };
    }
    f()
}

/// Runs `f` in a function compiled with AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_loops_give_the_same_bits() {
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let narrow: Vec<f32> = x.iter().map(|&v| v * crate::exp::exp(-v) / (1.0 + v * v)).collect();
        let widened = wide(|| {
            x.iter()
                .map(|&v| v * crate::exp::exp(-v) / (1.0 + v * v))
                .collect::<Vec<f32>>()
        });
        assert_eq!(narrow, widened);
    }
}
