//! Where a pass spends its time: an opt-in, process-wide tally of seconds per layer kind and
//! direction, filled by the fused kernels' callers and read by `softprompt bench --profile`.
//! When profiling is off, a span costs one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<(&'static str, Direction), f64>> = Mutex::new(BTreeMap::new());

/// Which pass a span belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// Forward pass.
    Forward,
    /// Input-gradient (backward) pass.
    Backward,
}

/// Turns the tally on or off (off by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Clears the tally.
pub fn reset() {
    TOTALS.lock().expect("profile lock").clear();
}

/// Seconds per (layer kind, direction) since the last [`reset`].
pub fn totals() -> BTreeMap<(&'static str, Direction), f64> {
    TOTALS.lock().expect("profile lock").clone()
}

/// Adds seconds to a kind by hand (for work timed outside a [`span`]).
pub fn add(kind: &'static str, dir: Direction, seconds: f64) {
    if ENABLED.load(Ordering::Relaxed) {
        *TOTALS.lock().expect("profile lock").entry((kind, dir)).or_default() += seconds;
    }
}

/// Times `f` under `kind` when profiling is on.
pub fn span<T>(kind: &'static str, dir: Direction, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    add(kind, dir, start.elapsed().as_secs_f64());
    out
}
