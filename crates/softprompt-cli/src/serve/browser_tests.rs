//! The playground in a real headless Chromium, driven over the DevTools protocol: the test
//! starts the real server, loads `/`, makes the page run a streamed completion and a
//! classification, and reads the results out of the DOM.
//!
//! Chromium is found as `$SOFTPROMPT_CHROMIUM` or `chromium`, `chromium-browser`,
//! `google-chrome` on the PATH (`scripts/test.sh` installs Debian's `chromium` when missing). Without
//! one the test fails and says how to install it: it never skips silently.
//!
//! The protocol runs over `--remote-debugging-pipe` (JSON messages ending in a NUL byte on file
//! descriptors 3 and 4 of the browser), so no WebSocket client or DevTools crate is needed.

use super::tests::{case, model, server};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long one protocol answer or one page state may take before the test fails.
const WAIT: Duration = Duration::from_secs(180);

/// The Chromium binary, or a failure that says how to get one.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("SOFTPROMPT_CHROMIUM") {
        return PathBuf::from(p);
    }
    let names = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"];
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for n in names {
            if dir.join(n).is_file() {
                return dir.join(n);
            }
        }
    }
    panic!(
        "no Chromium found (looked for {} on the PATH and $SOFTPROMPT_CHROMIUM): the playground \
         test needs a real browser. Install it (Debian: `apt-get install -y chromium`; `scripts/test.sh` \
         does this) or set SOFTPROMPT_CHROMIUM",
        names.join(", ")
    );
}

/// A headless Chromium with one page, spoken to over the DevTools pipe.
struct Browser {
    child: Child,
    to: std::io::PipeWriter,
    from: Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    profile: PathBuf,
}

impl Browser {
    fn launch() -> Browser {
        let exe = chromium();
        let profile = std::env::temp_dir().join(format!("softprompt-chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        // fd 3: commands to the browser; fd 4: its answers and events
        let (child_in, to) = std::io::pipe().unwrap();
        let (from, child_out) = std::io::pipe().unwrap();
        let (r, w) = (child_in.as_raw_fd(), child_out.as_raw_fd());
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, dup2, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // move both ends above 3 and 4 first, so neither dup2 overwrites the other
                let hi_r = libc::fcntl(r, libc::F_DUPFD, 10);
                let hi_w = libc::fcntl(w, libc::F_DUPFD, 10);
                if hi_r < 0 || hi_w < 0 || libc::dup2(hi_r, 3) < 0 || libc::dup2(hi_w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(hi_r);
                libc::close(hi_w);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        drop((child_in, child_out));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from);
            let mut buf = Vec::new();
            while matches!(reader.read_until(0, &mut buf), Ok(n) if n > 0) {
                buf.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                buf.clear();
            }
        });
        Browser {
            child,
            to,
            from: rx,
            next_id: 0,
            session: None,
            profile,
        }
    }

    /// Sends one command (to the page once attached) and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to.write_all(&bytes).expect("the browser closed its DevTools pipe");
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from.recv_timeout(left) {
                Ok(v) if v["id"] == id => {
                    if let Some(e) = v.get("error") {
                        panic!("{method}: {e}");
                    }
                    return v["result"].clone();
                }
                Ok(_) => continue, // an event
                Err(RecvTimeoutError::Timeout) => panic!("{method}: no answer from the browser in {WAIT:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("{method}: the browser exited"),
            }
        }
    }

    /// Opens `url` in a new page and attaches to it.
    fn open(&mut self, url: &str) {
        let target = self.call("Target.createTarget", json!({"url": url}));
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        self.session = attached["sessionId"].as_str().map(str::to_string);
        assert!(self.session.is_some(), "no session: {attached}");
    }

    /// Evaluates JavaScript in the page; returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expression` until it is true; `seen` gets every value of `watch` on the way.
    fn wait_for(&mut self, expression: &str, watch: &str, seen: &mut Vec<Value>) {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.eval(watch);
            if seen.last() != Some(&v) {
                seen.push(v);
            }
            if self.eval(expression) == json!(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not reach `{expression}` in {WAIT:?}; last: {:?}",
                seen.last()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[test]
fn playground_streams_a_completion_and_shows_probabilities_in_chromium() {
    let base = server();
    let mut b = Browser::launch();
    b.open(&format!("{base}/"));
    let mut seen = Vec::new();
    b.wait_for(
        "document.body && document.body.dataset.ready === '1'",
        "document.readyState",
        &mut seen,
    );

    // a streamed greedy completion with the prompt-tuning adapter: PEFT's tokens appear
    let (prompt, want) = case("smollm2_generate_prompt_tuning", 0);
    let want = format!("{prompt}{}", model().tokenizer.decode(&want, true).unwrap());
    b.eval(&format!(
        "$('model').value = 'prompt_tuning'; $('prompt').value = {}; $('max').value = 12; \
         $('temp').value = 0; $('go').click(); true",
        json!(prompt)
    ));
    let mut texts = Vec::new();
    b.wait_for(
        "$('status').dataset.state === 'done'",
        "$('out').textContent",
        &mut texts,
    );
    assert_eq!(b.eval("$('out').textContent"), json!(want), "states seen: {texts:?}");
    // one server-sent event per token, plus the last one with the finish reason
    assert_eq!(b.eval("Number($('out').dataset.chunks)"), json!(13));
    assert!(b
        .eval("$('status').textContent")
        .as_str()
        .unwrap()
        .contains("12 tokens"));
    eprintln!("the page's text went through {} states while streaming", texts.len());

    // a multitask adapter: the page offers its tasks and sends the chosen one's task_id
    b.eval("$('model').value = 'multitask'; $('model').dispatchEvent(new Event('change')); true");
    assert_eq!(
        b.eval("[...$('task').options].map(o => o.value)"),
        json!(["0", "1", "2"])
    );
    assert_eq!(b.eval("$('task-label').hidden"), json!(false));
    b.eval("$('task').value = '2'; $('max').value = 6; $('go').click(); true");
    b.wait_for(
        "$('status').dataset.state === 'done'",
        "$('out').textContent",
        &mut Vec::new(),
    );
    let (status, answer) = super::tests::post(
        &format!("{base}/v1/completions"),
        &json!({"model": "multitask", "prompt": prompt, "max_tokens": 6, "temperature": 0, "task_id": 2}).to_string(),
    );
    assert_eq!(status, 200, "{answer}");
    let want = format!("{prompt}{}", answer["choices"][0]["text"].as_str().unwrap());
    assert_eq!(b.eval("$('out').textContent"), json!(want));
    b.eval("$('model').value = 'prompt_tuning'; $('model').dispatchEvent(new Event('change')); true");
    assert_eq!(b.eval("$('task-label').hidden"), json!(true));

    // classify mode: only adapters with labels; one box per input field; the probabilities
    b.eval("$('mode').value = 'classify'; $('mode').dispatchEvent(new Event('change')); true");
    let options = b.eval("[...$('model').options].map(o => o.value)");
    assert_eq!(options, json!(["nli", "sentiment"]));
    b.eval("$('model').value = 'nli'; $('model').dispatchEvent(new Event('change')); true");
    assert_eq!(
        b.eval("[...$('fields').querySelectorAll('textarea')].map(t => t.dataset.field)"),
        json!(["premise", "hypothesis"])
    );
    b.eval("$('model').value = 'sentiment'; $('model').dispatchEvent(new Event('change')); true");
    let text = "a gentle, funny film that stays with you";
    b.eval(&format!(
        "$('fields').querySelector('textarea').value = {}; $('go').click(); true",
        json!(text)
    ));
    b.wait_for(
        "$('status').dataset.state === 'done'",
        "$('status').textContent",
        &mut Vec::new(),
    );
    let shown = b.eval(
        "[...$('probs').querySelectorAll('tr')].map(r => [r.dataset.label, r.className, r.lastChild.textContent])",
    );
    let (status, answer) = super::tests::post(
        &format!("{base}/v1/classify"),
        &json!({"model": "sentiment", "input": text}).to_string(),
    );
    assert_eq!(status, 200);
    let rows = shown.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{shown}");
    for row in rows {
        let label = row[0].as_str().unwrap();
        let p = answer["data"][0]["probabilities"][label].as_f64().unwrap();
        assert_eq!(row[2], json!(format!("{:.1}%", 100.0 * p)), "{shown} vs {answer}");
        assert_eq!(row[1] == "best", answer["data"][0]["label"] == label, "{shown}");
    }
}
