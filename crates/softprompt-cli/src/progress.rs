//! Progress bars on stderr (hidden when stderr is not a terminal): a training run's steps
//! ([`Bar`]), rows scored ([`rows_bar`]), a long prompt's prefill ([`prefill_bar`]) and a
//! sweep's cells above the running cell's steps ([`CellsBar`]).

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use softprompt::sweep::{Cell, CellResult, CellStart, SweepObserver};
use softprompt::train::{self, Observer};

/// A bar of `len` units drawn with `template`.
fn styled(len: usize, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    bar
}

/// The progress bar of a training run (inside `multi` when it shares the terminal with others).
#[derive(Default)]
pub struct Bar {
    /// The bar, once training starts.
    pub bar: Option<ProgressBar>,
    /// The group of bars this one joins.
    pub multi: Option<MultiProgress>,
}

impl Bar {
    /// Clears the bar from the terminal (after the run, or when its sweep cell ends).
    pub fn clear(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl train::Observer for Bar {
    fn start(&mut self, total: usize, done: usize) {
        self.clear();
        let bar = styled(
            total,
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        );
        let bar = match &self.multi {
            Some(m) => m.add(bar),
            None => bar,
        };
        bar.set_position(done as u64);
        self.bar = Some(bar);
    }
    fn step(&mut self, step: usize, loss: f32, lr: f64, examples_per_s: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step as u64);
            b.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {examples_per_s:.1} ex/s"));
        }
    }
    fn message(&mut self, text: &str) {
        match (&self.bar, &self.multi) {
            (Some(b), _) => b.println(text),
            (None, Some(m)) => drop(m.println(text)),
            (None, None) => eprintln!("{text}"),
        }
    }
}

/// A progress bar of `n` rows scored.
pub fn rows_bar(n: usize) -> ProgressBar {
    styled(n, "{bar:30} {pos}/{len} rows  [{elapsed_precise} < {eta_precise}]")
}

/// The bar of a prompt's prefill in chunks of `chunk` tokens (`None` for prompts of at most one
/// chunk).
pub fn prefill_bar(tokens: usize, chunk: usize) -> Option<ProgressBar> {
    (tokens > chunk).then(|| {
        styled(
            tokens,
            "reading the prompt {bar:30} {pos}/{len} tokens  [{elapsed_precise} < {eta_precise}]",
        )
    })
}

/// A bar over a sweep's cells (done / total, time left) above the running cell's step bar.
pub struct CellsBar {
    /// The bar over the cells.
    pub cells: ProgressBar,
    /// The running cell's step bar.
    run: Bar,
}

impl CellsBar {
    /// The bars of a sweep of `total` cells.
    pub fn new(total: usize) -> CellsBar {
        let multi = MultiProgress::new();
        let cells = multi.add(styled(
            total,
            "{bar:30} {pos}/{len} cells  {msg}  [{elapsed_precise} < {eta_precise}]",
        ));
        CellsBar {
            cells,
            run: Bar {
                bar: None,
                multi: Some(multi),
            },
        }
    }

    /// A line above the bars, or on stderr when they are hidden (not a terminal, e.g. a log).
    fn say(&self, text: &str) {
        if self.cells.is_hidden() {
            eprintln!("{text}");
        } else {
            self.cells.println(text);
        }
    }
}

impl SweepObserver for CellsBar {
    fn cell_start(&mut self, index: usize, total: usize, cell: &Cell, how: CellStart) {
        let what = match how {
            CellStart::Finished => "finished earlier".to_string(),
            CellStart::Resume(step) => format!("resuming at step {step}"),
            CellStart::ScoreOnly => "trained earlier; scoring".to_string(),
            CellStart::Fresh => "training".to_string(),
        };
        self.cells.set_position(index as u64);
        self.cells.set_message(format!("{}: {what}", cell.name));
        if self.cells.is_hidden() {
            eprintln!("cell {}/{total} {}: {what}", index + 1, cell.name);
        }
        if how == CellStart::Finished {
            // Finished cells take no time: leave them out of the time-left estimate.
            self.cells.reset_eta();
        }
    }
    fn cell_done(&mut self, index: usize, _total: usize, cell: &Cell, result: &CellResult) {
        self.run.clear();
        self.cells.set_position(index as u64 + 1);
        self.cells
            .println(format!("{}: {} {:.1}%", cell.name, result.metric, 100.0 * result.value));
    }
    fn cell_failed(&mut self, index: usize, _total: usize, cell: &Cell, error: &anyhow::Error) {
        self.run.clear();
        self.cells.set_position(index as u64 + 1);
        self.say(&format!("{}: FAILED: {error:#}", cell.name));
    }
    fn run_observer(&mut self) -> &mut dyn Observer {
        &mut self.run
    }
}
