//! Fault injection: a training run killed with SIGKILL at random instants, and continued the way
//! a user would (`--resume` when the folder holds a checkpoint, `--overwrite` when it does not),
//! ends with exactly what the uninterrupted run writes: the same checkpoint (parameters and AdamW
//! moments, bit for bit) and the same adapter file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// The repository root (the data paths are relative to it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A small classification run: 12 steps of 2 rows, evaluated and checkpointed every step.
fn write_config(dir: &Path, output: &Path) -> PathBuf {
    let data = root().join("data/sentiment-movies");
    let text = format!(
        "model = \"smollm2-135m\"\ntrain = \"{}\"\ndev = \"{}\"\ndev_rows = 4\n\
         template = \"[soft:4]Review: {{text}}\\nSentiment: {{label}}\"\ntarget_field = \"label\"\n\
         task = \"classify\"\ninit = \"random\"\nlr = 0.01\nwarmup = 0\nschedule = \"constant\"\n\
         steps = 12\nbatch = 2\neval_every = 1\nseed = 7\noutput = \"{}\"\n",
        data.join("train.jsonl").display(),
        data.join("dev.jsonl").display(),
        output.display()
    );
    let path = dir.join(format!("{}.toml", output.file_name().unwrap().to_string_lossy()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `softprompt train --config CONFIG` with `extra` flags.
fn start(config: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_softprompt"))
        .args(["train", "--config"])
        .arg(config)
        .args(extra)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the softprompt binary runs")
}

/// Waits for `child`; (exit code, stderr).
fn finish(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The tensors of a run's checkpoint (parameters and AdamW moments) as f32 bit patterns by name.
fn checkpoint(out: &Path) -> Vec<(String, Vec<u32>)> {
    softprompt::io::read_safetensors(&out.join("checkpoint-last/state.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (name, values.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

#[test]
fn a_run_killed_at_random_instants_and_resumed_ends_like_the_uninterrupted_one() {
    let tmp = tempfile::Builder::new().prefix("softprompt-kill-").tempdir().unwrap();
    let full = tmp.path().join("full");
    let config = write_config(tmp.path(), &full);
    let t0 = Instant::now();
    let (code, err) = finish(start(&config, &[]));
    assert_eq!(code, Some(0), "{err}");
    let whole = t0.elapsed();

    let killed = tmp.path().join("killed");
    let config = write_config(tmp.path(), &killed);
    // Kill instants spread over the run's length (a fixed pseudo-random sequence: reproducible).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut kills = 0;
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts <= 12, "the killed run never finished");
        let resume = killed.join("checkpoint-last/state.json").is_file();
        let extra: &[&str] = if resume {
            &["--resume"]
        } else if killed.exists() {
            &["--overwrite"]
        } else {
            &[]
        };
        let mut child = start(&config, extra);
        if kills < 4 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let fraction = 0.15 + 0.3 * (seed % 1000) as f64 / 1000.0;
            std::thread::sleep(whole.mul_f64(fraction));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                continue;
            }
        }
        let (code, err) = finish(child);
        if code == Some(0) || err.contains("nothing to resume") {
            break;
        }
        panic!("a continued run failed: {err}");
    }
    assert!(kills >= 2, "only {kills} kills landed inside a run");
    assert_eq!(checkpoint(&killed), checkpoint(&full), "the resumed checkpoint differs");
    assert_eq!(
        std::fs::read(killed.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(full.join("adapter_model.safetensors")).unwrap(),
        "the resumed run's adapter differs"
    );
}
