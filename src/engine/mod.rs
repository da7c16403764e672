//! The serving engine (DESIGN §7): a registry of loaded models under a memory budget with
//! least-recently-used unloading, one engine thread per model fed through a bounded channel
//! (full → the caller answers 429), continuous batching, sampling, stop strings and logprobs.
//! It knows nothing of HTTP or the catalog: callers hand it a loader.

pub mod chat_template;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod text;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::EngineSettings;
use crate::model::servable::Servable;
pub use request::{FinishReason, GenerateRequest, SeqEvent, TokenLogprob, TopLogprob};
pub use sampling::SamplingParams;
use scheduler::{SchedulerConfig, Stats};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model {0:?} does not exist")]
    NotFound(String),
    #[error("model {id:?} cannot be served: {message}")]
    Unservable { id: String, message: String },
    #[error("model {id:?} is at capacity ({capacity} sequences running or queued); retry shortly")]
    Overloaded { id: String, capacity: usize },
    #[error("{wanted} sequences (prompts × n) exceed this model's capacity of {capacity}")]
    TooMany { wanted: usize, capacity: usize },
    #[error("engine: {0}")]
    Internal(String),
}

/// A model with its engine thread.
pub struct LoadedModel {
    pub id: String,
    pub servable: Arc<Servable>,
    pub weight_bytes: usize,
    sender: SyncSender<GenerateRequest>,
    stats: Arc<Stats>,
    capacity: usize,
    last_used: AtomicU64,
}

/// What one loaded model's engine did so far (`GET /v1/engine`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelStats {
    pub id: String,
    pub weight_bytes: usize,
    pub max_positions: usize,
    pub active: usize,
    pub queued: usize,
    pub requests: u64,
    pub rejected: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub steps: u64,
    pub mean_batch: f64,
    pub max_batch_seen: u64,
}

impl LoadedModel {
    /// Queues a sequence, or says the model is at capacity.
    pub fn submit(&self, req: GenerateRequest) -> Result<(), EngineError> {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.sender.try_send(req) {
            Ok(()) => {
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => {
                        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        Err(EngineError::Overloaded {
                            id: self.id.clone(),
                            capacity: self.capacity,
                        })
                    }
                    TrySendError::Disconnected(_) => Err(EngineError::Internal(
                        "the engine thread has stopped".into(),
                    )),
                }
            }
        }
    }

    pub fn max_positions(&self) -> usize {
        self.servable.llama.max_positions()
    }

    /// Sequences that may run or wait at once (`max_batch + queue_depth`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn stats(&self) -> ModelStats {
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let steps = get(&s.steps);
        ModelStats {
            id: self.id.clone(),
            weight_bytes: self.weight_bytes,
            max_positions: self.max_positions(),
            active: s.active.load(Ordering::Relaxed),
            queued: s.queued.load(Ordering::Relaxed),
            requests: get(&s.requests),
            rejected: get(&s.rejected),
            completed: get(&s.completed),
            cancelled: get(&s.cancelled),
            failed: get(&s.failed),
            prompt_tokens: get(&s.prompt_tokens),
            generated_tokens: get(&s.generated_tokens),
            steps,
            mean_batch: if steps == 0 {
                0.0
            } else {
                get(&s.step_sequences) as f64 / steps as f64
            },
            max_batch_seen: get(&s.max_step_sequences),
        }
    }
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    settings: EngineSettings,
    models: Mutex<HashMap<String, Arc<LoadedModel>>>,
    /// One load at a time: two requests for a cold model load it once.
    load_lock: tokio::sync::Mutex<()>,
    clock: AtomicU64,
}

impl Engine {
    pub fn new(settings: EngineSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                models: Mutex::new(HashMap::new()),
                load_lock: tokio::sync::Mutex::new(()),
                clock: AtomicU64::new(0),
            }),
        }
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.inner.settings
    }

    fn touch(&self, m: &LoadedModel) {
        let t = self.inner.clock.fetch_add(1, Ordering::Relaxed);
        m.last_used.store(t, Ordering::Relaxed);
    }

    pub fn get(&self, id: &str) -> Option<Arc<LoadedModel>> {
        let m = self
            .inner
            .models
            .lock()
            .expect("registry lock")
            .get(id)
            .cloned()?;
        self.touch(&m);
        Some(m)
    }

    /// The loaded model `id`, loading it with `open` (which runs the blocking work itself) if
    /// needed, then unloading the least recently used others until the budget holds.
    pub async fn get_or_load<F, Fut>(
        &self,
        id: &str,
        open: F,
    ) -> Result<Arc<LoadedModel>, EngineError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Servable, EngineError>>,
    {
        if let Some(m) = self.get(id) {
            return Ok(m);
        }
        let _guard = self.inner.load_lock.lock().await;
        if let Some(m) = self.get(id) {
            return Ok(m);
        }
        let started = std::time::Instant::now();
        let servable = Arc::new(open().await?);
        let weight_bytes = servable.llama.weight_bytes();
        let s = &self.inner.settings;
        let (sender, rx) = sync_channel(s.queue_depth);
        let stats = Arc::new(Stats::default());
        let cfg = SchedulerConfig {
            max_batch: s.max_batch,
            prefill_chunk: s.prefill_chunk,
        };
        let (thread_model, thread_stats) = (servable.clone(), stats.clone());
        std::thread::Builder::new()
            .name(format!("engine-{id}"))
            .spawn(move || scheduler::run(thread_model, rx, thread_stats, cfg))
            .map_err(|e| EngineError::Internal(format!("spawning the engine thread: {e}")))?;
        let model = Arc::new(LoadedModel {
            id: id.to_string(),
            servable,
            weight_bytes,
            sender,
            stats,
            capacity: s.max_batch + s.queue_depth,
            last_used: AtomicU64::new(0),
        });
        self.touch(&model);
        let evicted = {
            let mut models = self.inner.models.lock().expect("registry lock");
            models.insert(id.to_string(), model.clone());
            evict_over_budget(&mut models, id, s.memory_budget_bytes)
        };
        tracing::info!(
            model = id,
            weight_mib = weight_bytes / (1 << 20),
            secs = started.elapsed().as_secs_f32(),
            evicted = ?evicted,
            "model loaded"
        );
        Ok(model)
    }

    /// Removes a model from the registry. Sequences already running finish; its thread and
    /// weights go once they have.
    pub fn unload(&self, id: &str) -> bool {
        self.inner
            .models
            .lock()
            .expect("registry lock")
            .remove(id)
            .is_some()
    }

    pub fn is_loaded(&self, id: &str) -> bool {
        self.inner
            .models
            .lock()
            .expect("registry lock")
            .contains_key(id)
    }

    pub fn stats(&self) -> Vec<ModelStats> {
        let mut v: Vec<_> = self
            .inner
            .models
            .lock()
            .expect("registry lock")
            .values()
            .map(|m| m.stats())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

/// Drops least recently used models (never `keep`) until the total fits `budget`.
fn evict_over_budget(
    models: &mut HashMap<String, Arc<LoadedModel>>,
    keep: &str,
    budget: u64,
) -> Vec<String> {
    let mut evicted = Vec::new();
    loop {
        let total: u64 = models.values().map(|m| m.weight_bytes as u64).sum();
        if total <= budget {
            break;
        }
        let victim = models
            .values()
            .filter(|m| m.id != keep)
            .min_by_key(|m| m.last_used.load(Ordering::Relaxed))
            .map(|m| m.id.clone());
        match victim {
            Some(v) => {
                models.remove(&v);
                evicted.push(v);
            }
            None => break,
        }
    }
    evicted
}
