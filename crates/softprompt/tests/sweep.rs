//! `sweep` on the real SmolLM2 with a tiny grid and a few steps per cell: every cell runs, an
//! cell killed before its first checkpoint starts over, an interrupted cell resumes from its checkpoint (ending bit-identical to an uninterrupted run), a
//! rerun skips finished cells, and a cell trained but not yet scored is only scored; shards of
//! one sweep share its folder and the last one writes the summaries.

mod common;
use softprompt::sweep::{spec, Axis, Cell, CellResult, CellStart, Grid, Merge, Shard, Sweep, SweepObserver};
use softprompt::task::TaskKind;
use softprompt::train::optim::Schedule;
use softprompt::train::{self, InitKind, Observer, Quiet, TrainConfig};
use std::path::Path;

fn base() -> TrainConfig {
    TrainConfig {
        model: "smollm2-135m".into(),
        train: common::data("sentiment-movies/train.jsonl"),
        test: Some(common::data("sentiment-movies/test.jsonl")),
        test_rows: Some(4),
        template: "Review: {text}\nSentiment: {label}".into(),
        target_field: "label".into(),
        task: TaskKind::Classify,
        init: InitKind::Vocab,
        lr: 0.03,
        warmup: 0,
        schedule: Schedule::Constant,
        steps: Some(2),
        batch: 2,
        eval_every: 1,
        ..TrainConfig::default()
    }
}

/// Records how each cell was taken up.
#[derive(Default)]
struct Record {
    starts: Vec<(String, CellStart)>,
    quiet: Quiet,
}

impl SweepObserver for Record {
    fn cell_start(&mut self, _: usize, _: usize, cell: &Cell, how: CellStart) {
        self.starts.push((cell.name.clone(), how));
    }
    fn cell_done(&mut self, _: usize, _: usize, _: &Cell, _: &CellResult) {}
    fn run_observer(&mut self) -> &mut dyn Observer {
        &mut self.quiet
    }
}

fn run(output: &Path, lengths: &str) -> (Vec<CellResult>, Vec<(String, CellStart)>) {
    let grid = Grid::new(
        vec![Axis::parse(&format!("num_virtual_tokens={lengths}")).unwrap()],
        1,
        &base(),
    )
    .unwrap();
    let sweep = Sweep::new(base(), grid, output.to_path_buf()).unwrap();
    let mut record = Record::default();
    let results = sweep.run(&mut record).unwrap();
    (results, record.starts)
}

#[test]
fn cells_run_resume_skip_and_rescore() {
    let tmp = common::scratch("sweep");
    let out = tmp.path().join("grid");
    // Cell `num_virtual_tokens-2` was interrupted after its first step's checkpoint.
    let interrupted = TrainConfig {
        num_virtual_tokens: 2,
        steps: Some(1),
        output: out.join("num_virtual_tokens-2_seed-42"),
        ..base()
    };
    train::train(&interrupted, &mut Quiet).unwrap();
    // Cell `num_virtual_tokens-1` was killed before its first checkpoint: only metrics remain.
    let killed = out.join("num_virtual_tokens-1_seed-42");
    std::fs::create_dir_all(&killed).unwrap();
    std::fs::write(killed.join("metrics.jsonl"), "{\"step\": 1, \"loss\": 1.0}\n").unwrap();

    let (results, starts) = run(&out, "1,2");
    let how: Vec<CellStart> = starts.iter().map(|s| s.1).collect();
    assert_eq!(how, vec![CellStart::Fresh, CellStart::Resume(1)]);
    assert_eq!(results.iter().map(|r| r.steps).collect::<Vec<_>>(), vec![2, 2]);
    assert!(results.iter().all(|r| r.metric == "test_accuracy"));
    let metrics = std::fs::read_to_string(out.join("num_virtual_tokens-2_seed-42/metrics.jsonl")).unwrap();
    let steps: Vec<&str> = metrics.lines().filter(|l| l.contains("\"loss\"")).collect();
    assert_eq!(steps.len(), 2, "each step once after resuming:\n{metrics}");
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        table.starts_with("| num_virtual_tokens | test_accuracy (%) | seeds |"),
        "{table}"
    );
    assert_eq!(table.matches('★').count(), 1, "{table}");

    // The resumed cell ends where an uninterrupted run of it ends.
    let fresh = tmp.path().join("fresh");
    run(&fresh, "2");
    let adapter =
        |dir: &Path| std::fs::read(dir.join("num_virtual_tokens-2_seed-42/adapter_model.safetensors")).unwrap();
    assert_eq!(
        adapter(&out),
        adapter(&fresh),
        "resumed cell differs from an uninterrupted run"
    );

    // A rerun only reads the results.
    let (again, starts) = run(&out, "1,2");
    assert!(starts.iter().all(|s| s.1 == CellStart::Finished), "{starts:?}");
    assert_eq!(again, results);

    // A cell trained to the end but never scored is scored again, to the same figure.
    std::fs::remove_file(out.join("num_virtual_tokens-1_seed-42/result.json")).unwrap();
    let (rescored, starts) = run(&out, "1,2");
    assert_eq!(starts[0].1, CellStart::ScoreOnly);
    assert_eq!(rescored[0].value, results[0].value);

    // A second sweep in a folder where one is running (here: util-linux's flock(1) holds the
    // same OS lock) is refused; a lock file no process holds (left by a killed sweep) is free.
    let mut holder = common::flock_holder(&out.join("sweep.lock"));
    let grid = Grid::new(vec![Axis::parse("num_virtual_tokens=1").unwrap()], 1, &base()).unwrap();
    let e = Sweep::new(base(), grid, out.clone())
        .unwrap()
        .run(&mut Record::default())
        .unwrap_err();
    assert!(format!("{e:#}").contains("another sweep (process"), "{e:#}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    std::fs::write(out.join("sweep.lock"), "999999999").unwrap();
    run(&out, "1,2");
    assert!(!out.join("sweep.lock").exists());

    // A sweep with other base options refuses the finished cells rather than mixing them in,
    // and leaves the summaries of the earlier runs as they were.
    let summaries = ["results.jsonl", "results.md"].map(|f| std::fs::read(out.join(f)).unwrap());
    let grid = Grid::new(vec![Axis::parse("num_virtual_tokens=1").unwrap()], 1, &base()).unwrap();
    let other = TrainConfig { lr: 0.1, ..base() };
    let e = Sweep::new(other, grid, out.clone())
        .unwrap()
        .run(&mut Record::default())
        .unwrap_err();
    assert!(format!("{e:#}").contains("option `lr`"), "{e:#}");
    let after = ["results.jsonl", "results.md"].map(|f| std::fs::read(out.join(f)).unwrap());
    assert_eq!(after, summaries, "a refused rerun rewrote the summaries");
}

#[test]
fn a_failed_cell_is_reported_and_the_others_still_run() {
    let tmp = common::scratch("sweep");
    let out = tmp.path().join("failed");
    // `max_len` 4 cannot hold the prompt: that cell fails once the tokenizer is loaded.
    let grid = Grid::new(vec![Axis::parse("max_len=4,256").unwrap()], 1, &base()).unwrap();
    let sweep = Sweep::new(base(), grid, out.clone()).unwrap();
    let e = format!("{:#}", sweep.run(&mut Record::default()).unwrap_err());
    assert!(e.contains("1 of 2 cells failed"), "{e}");
    assert!(
        e.contains("max_len-4_seed-42: ") && e.contains("does not fit in max_len 4"),
        "{e}"
    );
    assert!(out.join("max_len-256_seed-42/result.json").is_file());
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(table.contains("| 256 |") && table.contains("Failed cells"), "{table}");
}

#[test]
fn shards_share_a_folder_and_the_last_one_writes_the_summaries() {
    let tmp = common::scratch("sweep");
    let out = tmp.path().join("sharded");
    let whole = tmp.path().join("whole");
    let grid = || Grid::new(vec![Axis::parse("num_virtual_tokens=1,2,3").unwrap()], 1, &base()).unwrap();
    let shard = |i: usize| {
        Sweep::new(base(), grid(), out.clone())
            .unwrap()
            .with_shard(Shard { index: i, count: 2 })
    };

    // Shard 2/2 takes the second cell only; the others have no result yet, so no summaries.
    let mut record = Record::default();
    let second = shard(1).run(&mut record).unwrap();
    assert_eq!(record.starts.len(), 1);
    assert_eq!(second[0].cell, "num_virtual_tokens-2_seed-42");
    let missing = vec![
        "num_virtual_tokens-1_seed-42".to_string(),
        "num_virtual_tokens-3_seed-42".to_string(),
    ];
    assert_eq!(shard(1).merge().unwrap(), Merge::Unfinished(missing.clone()));
    assert!(!out.join("results.md").exists());
    // `sweep --report` reads the sweep from its folder and names the cells still missing,
    // writing the summaries of those done with the others listed.
    let e = format!("{:#}", spec::read(&out).unwrap().report().unwrap_err());
    assert!(
        e.contains("2 of 3 cells have no result yet") && e.contains(&missing[0]),
        "{e}"
    );
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(table.contains("| 2 |") && table.contains("no result yet"), "{table}");

    // Shard 1/2 runs the first and third; it finishes last, so it merges every cell.
    let first = shard(0).run(&mut Record::default()).unwrap();
    assert_eq!(first.len(), 2);
    let Merge::Written(all) = shard(0).merge().unwrap() else {
        panic!("every cell has a result")
    };
    assert_eq!(
        all.iter().map(|r| r.cell.as_str()).collect::<Vec<_>>(),
        [
            "num_virtual_tokens-1_seed-42",
            "num_virtual_tokens-2_seed-42",
            "num_virtual_tokens-3_seed-42"
        ]
    );
    // The same as the sweep run whole in one process, and the report agrees.
    let together = Sweep::new(base(), grid(), whole.clone())
        .unwrap()
        .run(&mut Record::default())
        .unwrap();
    let values = |r: &[CellResult]| r.iter().map(|r| (r.cell.clone(), r.value)).collect::<Vec<_>>();
    assert_eq!(values(&all), values(&together));
    let table = |dir: &Path| std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert_eq!(table(&out), table(&whole));
    assert_eq!(values(&spec::read(&out).unwrap().report().unwrap()), values(&together));
}
