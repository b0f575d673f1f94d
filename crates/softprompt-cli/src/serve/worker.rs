//! The model's one thread: a [`Engine`] fed by a channel. Between decode steps it takes the
//! requests that arrived (each prefilled and joining the batch), runs one step for every active
//! sequence, and sends each event to its request's channel. A request whose receiver is gone
//! (the client disconnected) is cancelled. HTTP handlers never wait on the model.

use softprompt::backbone::LoadedModel;
use softprompt::infer::engine::{Engine, Event, GenRequest};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// What a request receives: events, or the error that ended it.
pub type Reply = Result<Event, String>;

/// A request for the worker.
pub struct Job {
    /// What to generate.
    pub req: GenRequest,
    /// Where its events go.
    pub tx: UnboundedSender<Reply>,
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: Sender<Job>,
    /// Requests queued or generating.
    pub load: Arc<AtomicUsize>,
}

impl WorkerHandle {
    /// Hands a job to the worker; false if the worker is gone.
    pub fn submit(&self, job: Job) -> bool {
        self.load.fetch_add(1, Ordering::SeqCst);
        let ok = self.tx.send(job).is_ok();
        if !ok {
            self.load.fetch_sub(1, Ordering::SeqCst);
        }
        ok
    }
}

/// Starts the worker thread over `model`.
pub fn spawn(model: Arc<LoadedModel>) -> WorkerHandle {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let load = Arc::new(AtomicUsize::new(0));
    let counter = load.clone();
    std::thread::Builder::new()
        .name("softprompt-model".into())
        .spawn(move || run(&model, rx, &counter))
        .expect("cannot start the model thread");
    WorkerHandle { tx, load }
}

fn run(model: &LoadedModel, rx: Receiver<Job>, load: &AtomicUsize) {
    let Some(lm) = model.backbone.causal() else {
        return;
    };
    let mut engine: Engine<u64> = Engine::new(lm, &model.tokenizer);
    let mut senders: HashMap<u64, UnboundedSender<Reply>> = HashMap::new();
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
        for job in jobs {
            if job.tx.is_closed() {
                load.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let id = next_id;
            next_id += 1;
            match engine.add(id, job.req) {
                Ok(ev) => {
                    senders.insert(id, job.tx);
                    events.extend(ev);
                }
                Err(e) => {
                    let _ = job.tx.send(Err(format!("{e:#}")));
                    load.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        match engine.step() {
            Ok(ev) => events.extend(ev),
            Err(e) => {
                // A failed step fails every active request; the server goes on.
                for (id, tx) in senders.drain() {
                    engine.cancel(&id);
                    let _ = tx.send(Err(format!("generation failed: {e:#}")));
                    load.fetch_sub(1, Ordering::SeqCst);
                }
                continue;
            }
        }
        for (id, event) in events {
            let done = matches!(event, Event::Done { .. });
            let Some(tx) = senders.get(&id) else { continue };
            if tx.send(Ok(event)).is_err() || done {
                // finished, or the client went away: the sequence leaves the batch
                engine.cancel(&id);
                senders.remove(&id);
                load.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}
