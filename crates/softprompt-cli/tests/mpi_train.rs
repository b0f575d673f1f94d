//! Data-parallel training under `mpirun` (feature `mpi`): N ∈ {1, 2, 3} ranks train the adapter
//! one process trains (to rounding: every tensor within [`BOUND`] of its largest magnitude;
//! prompt tuning with the LM loss, a classification head, prefix tuning),
//! `--resume` continues a checkpoint written with another number of ranks, a rank killed with
//! SIGKILL ends the job in bounded time with its last checkpoint intact and resumable, and a
//! rank whose data differs from rank 0's is refused at start.
//!
//! Built without the feature these tests print why they do not run (and one checks the
//! refusal of a build without MPI under a launcher); built with it they need `mpirun` on the
//! PATH and fail without it (CI installs Open MPI).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (the data paths are relative to it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The largest difference allowed between an N-rank run's tensor and one process's, relative to
/// the tensor's largest magnitude. The ranks add their parts of each micro-batch's gradient in
/// another order than one process does, so results differ by rounding; AdamW normalises each
/// step's update, so after a few steps of these configurations the differences measured were
/// at most 4.2e-5 (AdamW's first moment), 6e-6 (the prompt).
const BOUND: f32 = 1e-3;

/// A run's options: `steps` steps of micro-batches of 5 rows, 2 accumulated (5 rows over 2 or 3
/// ranks: uneven shares), evaluated and checkpointed every `eval_every` steps.
fn sentiment_config(dir: &Path, name: &str, steps: usize, eval_every: usize) -> (PathBuf, PathBuf) {
    let data = root().join("data/sentiment-movies");
    let output = dir.join(name);
    let text = format!(
        "model = \"smollm2-135m\"\ntrain = \"{}\"\ndev = \"{}\"\ndev_rows = 7\ntest = \"{}\"\ntest_rows = 5\n\
         template = \"[soft:4]Review: {{text}}\\nSentiment: {{label}}\"\ntarget_field = \"label\"\n\
         task = \"classify\"\ninit = \"random\"\nlr = 0.01\nwarmup = 0\nschedule = \"constant\"\n\
         steps = {steps}\nbatch = 5\naccumulation = 2\neval_every = {eval_every}\nseed = 7\noutput = \"{}\"\n",
        data.join("train.jsonl").display(),
        data.join("dev.jsonl").display(),
        data.join("test.jsonl").display(),
        output.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    (path, output)
}

/// A generation task whose rows have targets of different lengths (capital names of 1 to 4
/// tokens): a rank's part of the loss is weighted by its share of the target tokens.
fn capital_config(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let data = root().join("data/facts-countries/capital");
    let output = dir.join(name);
    let text = format!(
        "model = \"smollm2-135m\"\ntrain = \"{}\"\ntemplate = \"[soft:4]{{text}} {{target}}\"\n\
         target_field = \"target\"\ntask = \"generate\"\ninit = \"random\"\nlr = 0.01\nwarmup = 0\n\
         schedule = \"constant\"\nsteps = 3\nbatch = 7\nseed = 3\noutput = \"{}\"\n",
        data.join("train.jsonl").display(),
        output.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    (path, output)
}

/// `softprompt` with `args`, as one process (`ranks` 0) or under `mpirun -np ranks`.
fn softprompt(ranks: usize, args: &[&str]) -> Command {
    let bin = env!("CARGO_BIN_EXE_softprompt");
    let mut cmd = if ranks == 0 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "--allow-run-as-root", "-np", &ranks.to_string(), bin]);
        c
    };
    cmd.args(args).current_dir(root()).env("RAYON_NUM_THREADS", "1");
    cmd
}

/// Runs `train --config CONFIG extra…` on `ranks` ranks (0: one process without mpirun) and
/// checks it succeeded.
fn train(ranks: usize, config: &Path, extra: &[&str]) -> Output {
    let config = config.to_str().unwrap();
    let args: Vec<&str> = ["train", "--config", config]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let out = softprompt(ranks, &args).output().expect("the command starts");
    assert!(
        out.status.success(),
        "{ranks} ranks: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every tensor of a safetensors file, flattened, by name.
fn tensors(file: &Path) -> Vec<(String, Vec<f32>)> {
    softprompt::io::read_safetensors(file)
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// Asserts that the adapter and checkpoint in `b` are those in `a` within [`BOUND`].
fn assert_same_run(a: &Path, b: &Path, what: &str) {
    for file in ["adapter_model.safetensors", "checkpoint-last/state.safetensors"] {
        let (ta, tb) = (tensors(&a.join(file)), tensors(&b.join(file)));
        assert_eq!(
            ta.iter().map(|t| &t.0).collect::<Vec<_>>(),
            tb.iter().map(|t| &t.0).collect::<Vec<_>>(),
            "{what}: {file}"
        );
        for ((name, x), (_, y)) in ta.iter().zip(&tb) {
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff <= BOUND * scale,
                "{what}: {file} `{name}` differs by {diff:e} (largest magnitude {scale:e}, bound {BOUND:e} of it)"
            );
        }
    }
}

/// The names of the files and folders in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Whether the tests can run, printing why not.
fn mpi_ready() -> bool {
    if !cfg!(feature = "mpi") {
        eprintln!(
            "skipped: built without feature `mpi` (cargo test -p softprompt-cli --features mpi --test mpi_train)"
        );
        return false;
    }
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "built with feature `mpi` but `mpirun` is not on the PATH (install Open MPI: openmpi-bin)"
    );
    true
}

#[test]
fn one_two_and_three_ranks_train_the_adapter_one_process_trains() {
    if !mpi_ready() {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("softprompt-mpi-").tempdir().unwrap();
    let (config, single) = sentiment_config(tmp.path(), "single", 4, 2);
    let one = train(0, &config, &[]);
    for ranks in 1..=3 {
        let (config, out) = sentiment_config(tmp.path(), &format!("ranks{ranks}"), 4, 2);
        let run = train(ranks, &config, &[]);
        assert_same_run(&single, &out, &format!("{ranks} ranks"));
        // Rank 0 alone writes: the same files as one process, one summary on stdout.
        assert_eq!(listing(&single), listing(&out));
        assert_eq!(
            String::from_utf8_lossy(&run.stdout)
                .matches("\"test_accuracy\"")
                .count(),
            1
        );
        let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let expected: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
        assert_eq!(summary["test_accuracy"], expected["test_accuracy"], "{ranks} ranks");
        assert_eq!(summary["test_rows"], 5);
        // The same losses per step (to rounding) and dev evaluations in metrics.jsonl.
        let lines = |dir: &Path| -> Vec<serde_json::Value> {
            std::fs::read_to_string(dir.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let (a, b) = (lines(&single), lines(&out));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x["step"], y["step"]);
            assert_eq!(x["dev_accuracy"], y["dev_accuracy"]);
            if let (Some(p), Some(q)) = (x["loss"].as_f64(), y["loss"].as_f64()) {
                assert!((p - q).abs() <= 1e-5 * p.abs(), "{ranks} ranks: loss {p} vs {q}");
            }
        }
    }
    // Targets of different lengths: each rank's share of the loss is its share of the tokens.
    let (config, single) = capital_config(tmp.path(), "capital-single");
    train(0, &config, &[]);
    let (config, out) = capital_config(tmp.path(), "capital-ranks3");
    train(3, &config, &[]);
    assert_same_run(&single, &out, "capital, 3 ranks");
}

#[test]
fn two_ranks_train_a_classification_head_and_a_prefix_as_one_process_does() {
    if !mpi_ready() {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("softprompt-mpi-").tempdir().unwrap();
    // A head on MiniLM (its loss a mean over rows) and prefix tuning's K/V and MLP on SmolLM2.
    for example in ["minilm-sentiment-prompt", "sentiment-prefix"] {
        let config = root().join(format!("examples/{example}.toml"));
        let outs: Vec<PathBuf> = [0, 2]
            .into_iter()
            .map(|ranks| {
                let out = tmp.path().join(format!("{example}-{ranks}"));
                let output = out.to_str().unwrap();
                let flags = ["--steps", "3", "--batch", "5", "--eval-every", "0"];
                let rows = ["--dev-rows", "4", "--test-rows", "4", "--output", output];
                train(ranks, &config, &[&flags[..], &rows[..]].concat());
                out
            })
            .collect();
        assert_same_run(&outs[0], &outs[1], example);
    }
}

#[test]
fn resume_continues_a_checkpoint_written_with_another_number_of_ranks() {
    if !mpi_ready() {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("softprompt-mpi-").tempdir().unwrap();
    let (config, whole) = sentiment_config(tmp.path(), "whole", 4, 2);
    train(0, &config, &[]);
    // Steps 1–2 on three ranks, 3–4 on two, then nothing left for one process.
    let (config, parts) = sentiment_config(tmp.path(), "parts", 4, 2);
    train(3, &config, &["--steps", "2"]);
    train(2, &config, &["--resume"]);
    assert_same_run(&whole, &parts, "3 ranks, resumed on 2");
}

/// The processes (pid) whose environment holds `tag` and `OMPI_COMM_WORLD_RANK=rank`.
fn rank_pids(tag: &str, rank: usize) -> Vec<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        if vars.contains(&tag.as_bytes()) && vars.contains(&want.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_killed_rank_ends_the_job_and_its_last_checkpoint_resumes() {
    if !mpi_ready() {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("softprompt-mpi-").tempdir().unwrap();
    let (config, out) = sentiment_config(tmp.path(), "killed", 8, 1);
    let tag = format!("SOFTPROMPT_MPI_TEST={}", std::process::id());
    let (key, value) = tag.split_once('=').unwrap();
    let mut job = softprompt(2, &["train", "--config", config.to_str().unwrap()])
        .env(key, value)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first checkpoint, then kill rank 1.
    let state = out.join("checkpoint-last/state.safetensors");
    let start = std::time::Instant::now();
    while !state.exists() {
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before its first checkpoint"
        );
        assert!(start.elapsed().as_secs() < 600, "no checkpoint after 600 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pids = rank_pids(&tag, 1);
    assert_eq!(pids.len(), 1, "rank 1's process: {pids:?}");
    let killed = Command::new("kill")
        .args(["-9", &pids[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // The job ends, with an error, within a bound.
    let killed_at = std::time::Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if killed_at.elapsed().as_secs() > 120 {
            let _ = job.kill();
            panic!("the job still runs 120 s after one of its ranks was killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let stderr = {
        use std::io::Read;
        let mut s = String::new();
        job.stderr.take().unwrap().read_to_string(&mut s).unwrap();
        s
    };
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("signal 9") || stderr.contains("Killed"), "{stderr}");
    assert!(rank_pids(&tag, 0).is_empty(), "rank 0 outlived the job");
    // The last checkpoint is whole, and the run resumes from it to the end.
    let saved = tensors(&state);
    assert!(saved.iter().any(|(name, _)| name == "prompt_embeddings"), "{saved:?}");
    train(2, &config, &["--resume"]);
    let (config, whole) = sentiment_config(tmp.path(), "whole", 8, 1);
    train(0, &config, &[]);
    assert_same_run(&whole, &out, "killed on 2 ranks, resumed on 2");
}

#[test]
fn a_rank_with_other_data_is_refused_at_start() {
    if !mpi_ready() {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("softprompt-mpi-").tempdir().unwrap();
    let (config, out) = sentiment_config(tmp.path(), "refused", 2, 1);
    // The same options on both ranks (`--train train.jsonl`, relative to each rank's folder);
    // rank 1's file has one label changed.
    let original = std::fs::read_to_string(root().join("data/sentiment-movies/train.jsonl")).unwrap();
    let changed = original.replacen("\"positive\"", "\"negative\"", 1);
    assert_ne!(original, changed);
    for (dir, text) in [("a", &original), ("b", &changed)] {
        std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        std::fs::write(tmp.path().join(dir).join("train.jsonl"), text).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_softprompt");
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "--allow-run-as-root"]);
    for (i, dir) in ["a", "b"].into_iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        let wdir = tmp.path().join(dir);
        cmd.args(["-np", "1", "-wdir", wdir.to_str().unwrap(), bin, "train", "--config"])
            .arg(&config)
            .args(["--train", "train.jsonl"]);
    }
    let run = cmd.env("RAYON_NUM_THREADS", "1").output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("rank 1 of 2 read different options, model files or data than rank 0"),
        "{stderr}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_as_one_of_several_ranks() {
    let out = softprompt(0, &["train", "--config", "examples/sentiment.toml"])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("OMPI_COMM_WORLD_SIZE=2"), "{stderr}");
    assert!(stderr.contains("--features mpi"), "{stderr}");
}
