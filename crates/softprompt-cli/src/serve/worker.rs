//! The model's one thread: a [`Engine`] fed by a channel. Between decode steps it takes the
//! requests that arrived (each prefilled and joining the batch, or a classification scored at
//! once), runs one step for every active sequence, and sends each event to its request's
//! channel. A request whose receiver is gone
//! (the client disconnected) is cancelled. HTTP handlers never wait on the model.

use softprompt::backbone::LoadedModel;
use softprompt::infer::classify::{Classification, Classifier};
use softprompt::infer::engine::{Engine, Event, GenRequest};
use softprompt::task::Example;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;

/// What a request receives: events, or the error that ended it.
pub type Reply = Result<Event, String>;

/// What a classification receives.
pub type ClassifyReply = Result<Vec<Classification>, String>;

/// A request for the worker.
pub enum Job {
    /// A sequence to generate.
    Generate(GenJob),
    /// Inputs to classify.
    Classify(ClassifyJob),
}

/// Inputs to classify with an adapter.
pub struct ClassifyJob {
    /// The adapter's classifier.
    pub classifier: Arc<Classifier>,
    /// The inputs, encoded by the classifier.
    pub examples: Vec<Example>,
    /// Where the answer goes.
    pub tx: tokio::sync::oneshot::Sender<ClassifyReply>,
}

impl Job {
    /// Whether the client is gone.
    fn abandoned(&self) -> bool {
        match self {
            Job::Generate(g) => g.tx.is_closed(),
            Job::Classify(c) => c.tx.is_closed(),
        }
    }
}

/// A sequence to generate.
pub struct GenJob {
    /// What to generate.
    pub req: GenRequest,
    /// Where its events go.
    pub tx: UnboundedSender<Reply>,
    /// When it was handed over.
    pub submitted: Instant,
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: Sender<Job>,
    /// Queue depth and the model thread's counters.
    pub metrics: Arc<Metrics>,
}

impl WorkerHandle {
    /// Hands a job to the worker unless `max_queue` requests are already queued or generating;
    /// `Err(true)` when full, `Err(false)` when the worker is gone.
    pub fn submit(&self, job: Job, max_queue: usize) -> Result<(), bool> {
        let depth = &self.metrics.queue_depth;
        if depth.fetch_add(1, Ordering::SeqCst) >= max_queue {
            depth.fetch_sub(1, Ordering::SeqCst);
            self.metrics.rejected.fetch_add(1, Ordering::SeqCst);
            return Err(true);
        }
        if self.tx.send(job).is_err() {
            depth.fetch_sub(1, Ordering::SeqCst);
            return Err(false);
        }
        Ok(())
    }
}

/// Starts the worker thread over `model`.
pub fn spawn(model: Arc<LoadedModel>, metrics: Arc<Metrics>) -> WorkerHandle {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let m = metrics.clone();
    std::thread::Builder::new()
        .name("softprompt-model".into())
        .spawn(move || run(&model, rx, &m))
        .expect("cannot start the model thread");
    WorkerHandle { tx, metrics }
}

fn run(model: &LoadedModel, rx: Receiver<Job>, metrics: &Metrics) {
    let load = &metrics.queue_depth;
    let Some(lm) = model.backbone.causal() else {
        return classify_only(model, rx, metrics);
    };
    let mut engine: Engine<u64> = Engine::new(lm, &model.tokenizer);
    let mut senders: HashMap<u64, (UnboundedSender<Reply>, Instant)> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        // Wait for work when idle; otherwise take whatever arrived since the last step.
        let mut jobs = Vec::new();
        if engine.is_idle() {
            match rx.recv() {
                Ok(job) => jobs.push(job),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if engine.is_idle() && jobs.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }
        let mut events = Vec::new();
        let start = Instant::now();
        for job in jobs {
            if job.abandoned() {
                load.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let job = match job {
                Job::Generate(g) => g,
                Job::Classify(c) => {
                    classify(model, c);
                    load.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
            };
            let id = next_id;
            next_id += 1;
            // A panic in the model code fails this request, not the server.
            let added = catch_unwind(AssertUnwindSafe(|| engine.add(id, job.req)))
                .unwrap_or_else(|p| Err(anyhow::anyhow!("internal error: {}", panic_text(&*p))));
            match added {
                Ok(ev) => {
                    senders.insert(id, (job.tx, job.submitted));
                    events.extend(ev);
                }
                Err(e) => {
                    let _ = job.tx.send(Err(format!("{e:#}")));
                    load.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        let step_start = Instant::now();
        let stepped = catch_unwind(AssertUnwindSafe(|| engine.step())).unwrap_or_else(|p| {
            // the batch may be half-updated: every active request fails (below), the engine
            // starts empty
            engine = Engine::new(lm, &model.tokenizer);
            Err(anyhow::anyhow!("internal error: {}", panic_text(&*p)))
        });
        let now = Instant::now();
        metrics
            .busy_us
            .fetch_add((now - start).as_micros() as u64, Ordering::SeqCst);
        match stepped {
            Ok(ev) => {
                let tokens = ev.iter().filter(|(_, e)| matches!(e, Event::Token { .. })).count();
                if tokens > 0 {
                    let tps = tokens as f64 / (now - step_start).as_secs_f64().max(1e-9);
                    metrics.last_step_tps.store(tps.to_bits(), Ordering::SeqCst);
                }
                events.extend(ev)
            }
            Err(e) => {
                // A failed step fails every active request; the server goes on.
                for (id, (tx, _)) in senders.drain() {
                    engine.cancel(&id);
                    let _ = tx.send(Err(format!("generation failed: {e:#}")));
                    load.fetch_sub(1, Ordering::SeqCst);
                }
                continue;
            }
        }
        for (id, event) in events {
            let done = matches!(event, Event::Done { .. });
            if matches!(event, Event::Token { .. }) {
                metrics.tokens.fetch_add(1, Ordering::SeqCst);
            }
            let Some((tx, submitted)) = senders.get(&id) else {
                continue;
            };
            if done {
                let secs = submitted.elapsed().as_secs_f64();
                metrics.generation_latency.lock().unwrap().observe(secs);
            }
            if tx.send(Ok(event)).is_err() || done {
                // finished, or the client went away: the sequence leaves the batch
                engine.cancel(&id);
                senders.remove(&id);
                load.fetch_sub(1, Ordering::SeqCst);
            }
        }
        metrics.active.store(engine.active(), Ordering::SeqCst);
    }
}

/// The loop of an encoder, which only classifies: jobs one at a time, in arrival order.
fn classify_only(model: &LoadedModel, rx: Receiver<Job>, metrics: &Metrics) {
    for job in rx {
        match job {
            Job::Classify(c) if !c.tx.is_closed() => {
                let start = Instant::now();
                classify(model, c);
                metrics
                    .busy_us
                    .fetch_add(start.elapsed().as_micros() as u64, Ordering::SeqCst);
            }
            Job::Classify(_) => {}
            Job::Generate(g) => {
                let _ =
                    g.tx.send(Err("the served model is an encoder, which does not generate".into()));
            }
        }
        metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Scores one classification job and answers it (a panic fails the job, not the server).
fn classify(model: &LoadedModel, job: ClassifyJob) {
    let reply = catch_unwind(AssertUnwindSafe(|| job.classifier.classify(model, &job.examples)))
        .unwrap_or_else(|p| Err(anyhow::anyhow!("internal error: {}", panic_text(&*p))))
        .map_err(|e| format!("classification failed: {e:#}"));
    let _ = job.tx.send(reply);
}

/// The message of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
