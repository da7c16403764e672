//! The serving engine (DESIGN §7): a registry of loaded models under a memory budget with
//! least-recently-used unloading, one engine thread per model fed through a bounded channel
//! (full → the caller answers 429), continuous batching, sampling, stop strings and logprobs.
//! It knows nothing of HTTP or the catalog: callers hand it a loader and the catalog's
//! revision of the model, so a model deleted and uploaded again under its id is never served
//! from the old weights, and `retire` ends everything a deleted model was doing.

pub mod chat_template;
pub mod request;
pub mod scheduler;
pub mod text;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde::Serialize;

use crate::config::EngineSettings;
use crate::model::servable::Servable;
pub use crate::nn::sampling::SamplingParams;
pub use request::{FinishReason, GenerateRequest, SeqEvent, TokenLogprob, TopLogprob};
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

/// Which stored model a loaded one is: its id and the catalog's revision of that id. Deleting
/// a model and creating another under its id gives a new revision, so the two never meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelKey {
    pub id: String,
    pub revision: String,
}

/// Taken before the catalog is read for a load (`Engine::ticket`): a `retire` of the id after
/// it voids the load, so a model deleted while it was loading is discarded, not installed.
pub struct LoadTicket {
    id: String,
    retirements: u64,
}

/// A model with its engine thread.
pub struct LoadedModel {
    pub key: ModelKey,
    pub servable: Arc<Servable>,
    pub weight_bytes: usize,
    sender: SyncSender<GenerateRequest>,
    /// Set when the model was deleted: its engine thread ends every sequence and stops.
    retired: Arc<AtomicBool>,
    stats: Arc<Stats>,
    capacity: usize,
    last_used: AtomicU64,
}

/// A model out of the registry whose weights are still held: by sequences finishing after an
/// unload, or for the moment its engine thread takes to stop after a delete.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Unloading {
    pub id: String,
    pub weight_bytes: usize,
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
                            id: self.key.id.clone(),
                            capacity: self.capacity,
                        })
                    }
                    TrySendError::Disconnected(_) if self.retired.load(Ordering::SeqCst) => {
                        Err(EngineError::NotFound(self.key.id.clone()))
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
            id: self.key.id.clone(),
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
    registry: Mutex<Registry>,
    /// One load at a time: two requests for a cold model load it once.
    load_lock: tokio::sync::Mutex<()>,
    clock: AtomicU64,
}

#[derive(Default)]
struct Registry {
    /// By id; the entry's key says which revision it is.
    loaded: HashMap<String, Arc<LoadedModel>>,
    /// How often each id was retired (deleted), for `LoadTicket`.
    retirements: HashMap<String, u64>,
    /// Models out of `loaded` whose weights may still be alive.
    unloading: Vec<(String, usize, Weak<Servable>)>,
}

impl Registry {
    /// Takes `id` out of `loaded`, keeping track of its weights until they are dropped.
    fn take(&mut self, id: &str) -> Option<Arc<LoadedModel>> {
        let m = self.loaded.remove(id)?;
        // Forget the ones already dropped, so the list stays as short as what is held.
        self.unloading.retain(|(_, _, w)| w.strong_count() > 0);
        self.unloading.push((
            m.key.id.clone(),
            m.weight_bytes,
            Arc::downgrade(&m.servable),
        ));
        Some(m)
    }

    fn stale(&self, ticket: &LoadTicket) -> bool {
        self.retirements.get(&ticket.id).copied().unwrap_or(0) != ticket.retirements
    }

    /// Drops least recently used models (never `keep`) until the total fits `budget`.
    fn evict_over_budget(&mut self, keep: &str, budget: u64) -> Vec<String> {
        let mut evicted = Vec::new();
        loop {
            let total: u64 = self.loaded.values().map(|m| m.weight_bytes as u64).sum();
            if total <= budget {
                break;
            }
            let victim = self
                .loaded
                .values()
                .filter(|m| m.key.id != keep)
                .min_by_key(|m| m.last_used.load(Ordering::Relaxed))
                .map(|m| m.key.id.clone());
            match victim {
                Some(v) => {
                    self.take(&v);
                    evicted.push(v);
                }
                None => break,
            }
        }
        evicted
    }
}

impl Engine {
    pub fn new(settings: EngineSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                registry: Mutex::new(Registry::default()),
                load_lock: tokio::sync::Mutex::new(()),
                clock: AtomicU64::new(0),
            }),
        }
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.inner.settings
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.inner.registry.lock().expect("registry lock")
    }

    fn touch(&self, m: &LoadedModel) {
        let t = self.inner.clock.fetch_add(1, Ordering::Relaxed);
        m.last_used.store(t, Ordering::Relaxed);
    }

    /// Take this before reading the catalog for a model that may need loading.
    pub fn ticket(&self, id: &str) -> LoadTicket {
        LoadTicket {
            id: id.to_string(),
            retirements: self.registry().retirements.get(id).copied().unwrap_or(0),
        }
    }

    /// The loaded model `key`, if that revision is the one loaded.
    pub fn get(&self, key: &ModelKey) -> Option<Arc<LoadedModel>> {
        let m = self
            .registry()
            .loaded
            .get(&key.id)
            .filter(|m| m.key == *key)
            .cloned()?;
        self.touch(&m);
        Some(m)
    }

    /// The loaded model `key`, loading it with `open` (which runs the blocking work itself) if
    /// needed, then unloading the least recently used others until the budget holds. Another
    /// revision of the id still loaded is unloaded; a load whose `ticket` a `retire` voided
    /// meanwhile is discarded (`NotFound`).
    pub async fn get_or_load<F, Fut>(
        &self,
        ticket: LoadTicket,
        key: &ModelKey,
        open: F,
    ) -> Result<Arc<LoadedModel>, EngineError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Servable, EngineError>>,
    {
        debug_assert_eq!(ticket.id, key.id);
        if let Some(m) = self.get(key) {
            return Ok(m);
        }
        let _guard = self.inner.load_lock.lock().await;
        if let Some(m) = self.get(key) {
            return Ok(m);
        }
        if self.registry().stale(&ticket) {
            return Err(EngineError::NotFound(key.id.clone()));
        }
        let started = std::time::Instant::now();
        let servable = Arc::new(open().await?);
        let weight_bytes = servable.llama.weight_bytes();
        let s = &self.inner.settings;
        let (sender, rx) = sync_channel(s.queue_depth);
        let stats = Arc::new(Stats::default());
        let retired = Arc::new(AtomicBool::new(false));
        let cfg = SchedulerConfig {
            max_batch: s.max_batch,
            prefill_chunk: s.prefill_chunk,
            model_id: key.id.clone(),
            retired: retired.clone(),
        };
        let (thread_model, thread_stats) = (servable.clone(), stats.clone());
        std::thread::Builder::new()
            .name(format!("engine-{}", key.id))
            .spawn(move || scheduler::run(thread_model, rx, thread_stats, cfg))
            .map_err(|e| EngineError::Internal(format!("spawning the engine thread: {e}")))?;
        let model = Arc::new(LoadedModel {
            key: key.clone(),
            servable,
            weight_bytes,
            sender,
            retired,
            stats,
            capacity: s.max_batch + s.queue_depth,
            last_used: AtomicU64::new(0),
        });
        self.touch(&model);
        let (replaced, evicted) = {
            let mut registry = self.registry();
            if registry.stale(&ticket) {
                // Deleted while it loaded: dropping the model closes its channel, so the
                // thread ends and the weights go.
                tracing::info!(model = %key.id, "model deleted while loading; discarded");
                return Err(EngineError::NotFound(key.id.clone()));
            }
            // Another revision still here was deleted where this engine did not hear of it
            // (the catalog now names this one): it goes as a deleted model does.
            let replaced = registry.take(&key.id).map(|old| {
                old.retired.store(true, Ordering::SeqCst);
                old.key.revision.clone()
            });
            registry.loaded.insert(key.id.clone(), model.clone());
            let evicted = registry.evict_over_budget(&key.id, s.memory_budget_bytes);
            (replaced, evicted)
        };
        tracing::info!(
            model = %key.id,
            revision = %key.revision,
            replaced_revision = ?replaced,
            weight_mib = weight_bytes / (1 << 20),
            secs = started.elapsed().as_secs_f32(),
            evicted = ?evicted,
            "model loaded"
        );
        Ok(model)
    }

    /// Removes a model from the registry. Sequences already running or queued finish; its
    /// thread and weights go once they have.
    pub fn unload(&self, id: &str) -> bool {
        self.registry().take(id).is_some()
    }

    /// Forgets a deleted model: it leaves the registry, a load of it in flight is discarded,
    /// and its engine thread ends every running or queued sequence with
    /// `SeqEvent::ModelGone` and stops, which drops its weights. Returns whether it was loaded.
    pub fn retire(&self, id: &str) -> bool {
        let mut registry = self.registry();
        *registry.retirements.entry(id.to_string()).or_default() += 1;
        match registry.take(id) {
            Some(m) => {
                m.retired.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Whether revision `key` of a model is loaded.
    pub fn is_loaded(&self, key: &ModelKey) -> bool {
        self.registry()
            .loaded
            .get(&key.id)
            .is_some_and(|m| m.key == *key)
    }

    pub fn stats(&self) -> Vec<ModelStats> {
        let mut v: Vec<_> = self.registry().loaded.values().map(|m| m.stats()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Models out of the registry whose weights are still held (forgetting those dropped).
    pub fn unloading(&self) -> Vec<Unloading> {
        let mut registry = self.registry();
        registry.unloading.retain(|(_, _, w)| w.strong_count() > 0);
        registry
            .unloading
            .iter()
            .map(|(id, weight_bytes, _)| Unloading {
                id: id.clone(),
                weight_bytes: *weight_bytes,
            })
            .collect()
    }
}
