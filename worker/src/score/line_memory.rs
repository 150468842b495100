//! Line memory: a part is scored against the line's own recent parts, without prompts or
//! labels (mutual scoring, as MuSc does for unlabeled images). On a production line almost
//! every part is good, so a view of a new part that finds near-identical views among many
//! recent parts is normal, and one that finds them only in a few is suspect.
//!
//! Score: for each view `v` of the new part (its whole frame and windows) and each part `m` in
//! the memory, `s_m(v)` is the largest cosine between `v` and any view of `m`; the view's
//! similarity is the mean of the highest `top_fraction` of those (MuSc's robust mean: a few
//! defective parts in the memory do not make a defect look normal), and its score
//! `1 − similarity`, clamped to [0, 1]; the part's raw score is its worst view's. Parts judged
//! DEFECT never enter the memory.
//!
//! Calibration: raw scores depend on the product, the camera and the model (a line of shiny
//! brackets scores 0.01–0.05, a textured casting 0.1–0.2), so no one `weight` could mean the
//! same on every line. The verdict's `line_memory_score` is therefore the raw score's
//! *percentile* among the line's own leave-one-out scores: each remembered part's raw score
//! against the other remembered parts (`(#lower + ½ #equal) / n`, in [0, 1]). A part as odd as
//! the line's usual parts scores about 0.5, one odder than all of them 1; `weight` blends that.
//! The leave-one-out scores reuse the cosines computed when each part was scored (each pair of
//! parts is compared once, both ways), so they cost `n²` per line to keep, not `n²` dot
//! products per part.
//!
//! Guarantees: per key (profile and line, or camera) at most `size` parts younger than
//! `max_age_s` are kept, oldest out, and at most [`MAX_KEYS`] keys (the least recently used
//! go), and at most [`MAX_BYTES`] of views in all (the least recently used lines go first,
//! then the oldest parts of the line remembering); a part of 64 parts of 25 views of 512
//! floats takes 3.2 MiB per line (plus 0.4 MiB of pairwise cosines for the calibration), so 70
//! such lines fit. Keys are the requests' ids, which
//! validation caps at 256 bytes. No score until `min_parts` other parts are in memory. The
//! lock is held to look up and copy pointers, never while scoring: parts are shared
//! (`Arc`), and a score is computed on the caller's thread (the pipeline's blocking pool)
//! from a snapshot. Pure data and a mutex: no Kafka, no tokio.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The most lines (or cameras) remembered at once, per worker.
pub const MAX_KEYS: usize = 1024;
/// The most bytes of remembered views, per worker.
pub const MAX_BYTES: usize = 256 << 20;

/// A profile's `line_memory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LineMemoryConfig {
    /// Parts kept per line (or camera).
    pub size: usize,
    /// Parts older than this many seconds are forgotten.
    pub max_age_s: u64,
    /// Remember per `line` (line_id) or per `camera` (camera_id).
    pub key: MemoryKey,
    /// No score until this many other parts are remembered.
    pub min_parts: usize,
    /// The share of the most similar remembered parts a view's similarity is the mean of.
    #[schemars(extend("default" = 0.3))]
    pub top_fraction: f32,
    /// How much of the anomaly score comes from the line memory, in [0, 1] (0: reported in
    /// the verdict only; the outcome is the prompts' and exemplars').
    pub weight: f32,
}

impl Default for LineMemoryConfig {
    fn default() -> Self {
        Self {
            size: 64,
            max_age_s: 3600,
            key: MemoryKey::Line,
            min_parts: 8,
            top_fraction: 0.3,
            weight: 0.0,
        }
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum MemoryKey {
    #[default]
    Line,
    Camera,
}

/// Why a profile's `line_memory` is refused: each names the key at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineMemoryError {
    #[error("line_memory.min_parts {min_parts} must be within 1..=line_memory.size ({size})")]
    MinParts { min_parts: usize, size: usize },
    #[error("line_memory.top_fraction {top_fraction} is not within (0, 1]")]
    TopFraction { top_fraction: f32 },
    #[error("line_memory.weight {weight} is not within [0, 1]")]
    Weight { weight: f32 },
}

impl LineMemoryConfig {
    pub fn validate(&self) -> Result<(), LineMemoryError> {
        if self.size == 0 || self.min_parts == 0 || self.min_parts > self.size {
            return Err(LineMemoryError::MinParts {
                min_parts: self.min_parts,
                size: self.size,
            });
        }
        if !(self.top_fraction > 0.0 && self.top_fraction <= 1.0) {
            return Err(LineMemoryError::TopFraction {
                top_fraction: self.top_fraction,
            });
        }
        if !(0.0..=1.0).contains(&self.weight) {
            return Err(LineMemoryError::Weight {
                weight: self.weight,
            });
        }
        Ok(())
    }
}

struct Part {
    /// Unique in its memory: the pairwise cosines are keyed by it.
    id: u64,
    at: Instant,
    /// Unit vectors.
    views: Vec<Vec<f32>>,
    /// Its views and, at most, its pairwise cosines with a full ring's other parts (both ways).
    bytes: usize,
}

impl Part {
    fn new(id: u64, at: Instant, views: Vec<Vec<f32>>, size: usize) -> Self {
        let bytes = views.iter().map(|v| v.len() * 4 + 24).sum::<usize>()
            + 64
            + 2 * size * (views.len() * 4 + 64);
        Self {
            id,
            at,
            views,
            bytes,
        }
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The new part's cosines with the remembered parts it was scored against (by part id): per
/// new view, its best cosine with that part's views; per that part's view, its best with
/// the new part's views. [`LineMemory::assess`] computes them and [`LineMemory::remember_with`]
/// keeps them for the calibration.
#[derive(Debug, Clone, Default)]
pub struct Cosines(Vec<(u64, Vec<f32>, Vec<f32>)>);

/// A part's line-memory score: raw and calibrated (see the module docs).
#[derive(Debug, Clone)]
pub struct Assessment {
    pub raw: f32,
    /// The raw score's percentile among the line's leave-one-out scores, in [0, 1].
    pub percentile: f32,
    pub cosines: Cosines,
}

#[derive(Default)]
struct Ring {
    parts: VecDeque<std::sync::Arc<Part>>,
    used: u64,
    /// `(p, m)` → per view of part `p`, its best cosine with part `m`'s views.
    sims: HashMap<(u64, u64), Vec<f32>>,
    /// Each remembered part's leave-one-out score, kept current with `parts`.
    loo: Vec<f32>,
}

impl Ring {
    /// Forgets parts older than `max_age_s`; returns the bytes given back.
    fn forget_old(&mut self, cfg: &LineMemoryConfig, now: Instant) -> usize {
        let age = Duration::from_secs(cfg.max_age_s);
        let mut freed = 0;
        while self
            .parts
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.at) > age)
        {
            freed += self.pop_oldest();
        }
        freed
    }

    /// Forgets the oldest part and its cosines; returns the bytes given back.
    fn pop_oldest(&mut self) -> usize {
        let Some(p) = self.parts.pop_front() else {
            return 0;
        };
        self.sims.retain(|&(a, b), _| a != p.id && b != p.id);
        p.bytes()
    }

    /// Recomputes every part's leave-one-out score from the kept cosines.
    fn refresh_loo(&mut self, cfg: &LineMemoryConfig) {
        let ids: Vec<u64> = self.parts.iter().map(|p| p.id).collect();
        self.loo = self
            .parts
            .iter()
            .map(|p| {
                let others: Vec<&Vec<f32>> = ids
                    .iter()
                    .filter(|&&m| m != p.id)
                    .filter_map(|&m| self.sims.get(&(p.id, m)))
                    .collect();
                if others.is_empty() {
                    return 0.0;
                }
                worst_view(p.views.len(), others.len(), cfg.top_fraction, |v, m| {
                    others[m][v]
                })
            })
            .collect();
    }

    fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes()).sum()
    }
}

/// A part's score (unit `views`) against other parts (each its unit views), as the module
/// docs define it; `None` under `min_parts` parts. What the worker's memory computes against
/// the line's recent parts, and `clipqc eval --line-memory` against the rest of a dataset.
pub fn score_against(
    views: &[Vec<f32>],
    parts: &[&[Vec<f32>]],
    cfg: &LineMemoryConfig,
) -> Option<f32> {
    let n = parts.len();
    if n < cfg.min_parts.max(1) || views.is_empty() {
        return None;
    }
    Some(worst_view(views.len(), n, cfg.top_fraction, |v, m| {
        parts[m]
            .iter()
            .map(|r| dot(&views[v], r))
            .fold(f32::NEG_INFINITY, f32::max)
    }))
}

/// The module's score from `best(view, part)`, each of `views` views' best cosine with each of
/// `parts` parts: per view `1 −` the mean of its `top_fraction` highest, clamped to [0, 1];
/// the worst view's. One definition for a new part ([`score_against`], [`LineMemory::assess`])
/// and for the remembered parts' leave-one-out scores.
fn worst_view(
    views: usize,
    parts: usize,
    top_fraction: f32,
    best: impl Fn(usize, usize) -> f32,
) -> f32 {
    let top = ((top_fraction * parts as f32).ceil() as usize).clamp(1, parts);
    let mut per_part = Vec::with_capacity(parts);
    (0..views)
        .map(|v| {
            per_part.clear();
            per_part.extend((0..parts).map(|m| best(v, m)));
            per_part.sort_by(|a, b| b.total_cmp(a));
            let similarity = per_part[..top].iter().sum::<f32>() / top as f32;
            (1.0 - similarity).clamp(0.0, 1.0)
        })
        .fold(0f32, f32::max)
}

/// `raw`'s percentile among `loo`: `(#lower + ½ #equal) / n`; 0.5 when `loo` is empty.
pub fn percentile(raw: f32, loo: &[f32]) -> f32 {
    if loo.is_empty() {
        return 0.5;
    }
    let lower = loo.iter().filter(|&&l| l < raw).count() as f32;
    let equal = loo.iter().filter(|&&l| l == raw).count() as f32;
    (lower + equal / 2.0) / loo.len() as f32
}

/// The best cosines both ways between unit views `a` and `b`: per view of `a` its best with
/// `b`'s, and per view of `b` its best with `a`'s.
fn cosines(a: &[Vec<f32>], b: &[Vec<f32>]) -> (Vec<f32>, Vec<f32>) {
    let mut a_best = vec![f32::NEG_INFINITY; a.len()];
    let mut b_best = vec![f32::NEG_INFINITY; b.len()];
    for (i, x) in a.iter().enumerate() {
        for (j, y) in b.iter().enumerate() {
            let c = dot(x, y);
            a_best[i] = a_best[i].max(c);
            b_best[j] = b_best[j].max(c);
        }
    }
    (a_best, b_best)
}

/// Every line's memory, for one worker.
pub struct LineMemory {
    rings: Mutex<Rings>,
    clock: std::sync::atomic::AtomicU64,
    max_bytes: usize,
}

#[derive(Default)]
struct Rings {
    by_key: HashMap<(String, String), Ring>,
    /// Bytes of the parts in `by_key`.
    bytes: usize,
}

impl Default for LineMemory {
    fn default() -> Self {
        Self::with_max_bytes(MAX_BYTES)
    }
}

impl LineMemory {
    /// The part's raw score against the remembered parts of `(profile, key)` (its own views
    /// are not yet there), or `None` while fewer than `min_parts` are remembered. `views` are
    /// the part's embeddings (not necessarily unit).
    pub fn score(
        &self,
        profile: &str,
        key: &str,
        views: &[Vec<f32>],
        cfg: &LineMemoryConfig,
        now: Instant,
    ) -> Option<f32> {
        self.assess(profile, key, views, cfg, now).map(|a| a.raw)
    }

    /// [`Self::score`], calibrated (the module docs), with the cosines computed on the way
    /// for [`Self::remember_with`].
    pub fn assess(
        &self,
        profile: &str,
        key: &str,
        views: &[Vec<f32>],
        cfg: &LineMemoryConfig,
        now: Instant,
    ) -> Option<Assessment> {
        let units: Vec<Vec<f32>> = views.iter().map(|v| super::normalized(v)).collect();
        let (parts, loo): (Vec<std::sync::Arc<Part>>, Vec<f32>) = {
            let mut guard = self.rings.lock().unwrap_or_else(|e| e.into_inner());
            let rings = &mut *guard;
            let ring = rings
                .by_key
                .get_mut(&(profile.to_string(), key.to_string()))?;
            let freed = ring.forget_old(cfg, now);
            if freed > 0 {
                ring.refresh_loo(cfg);
            }
            rings.bytes -= freed;
            (ring.parts.iter().cloned().collect(), ring.loo.clone())
        };
        // Scored without the lock: other records' lines (and this one's) go on meanwhile.
        let n = parts.len();
        if n < cfg.min_parts.max(1) || units.is_empty() {
            return None;
        }
        let pairs: Vec<(u64, Vec<f32>, Vec<f32>)> = parts
            .iter()
            .map(|p| {
                let (new, old) = cosines(&units, &p.views);
                (p.id, new, old)
            })
            .collect();
        let raw = worst_view(units.len(), n, cfg.top_fraction, |v, m| pairs[m].1[v]);
        Some(Assessment {
            raw,
            percentile: percentile(raw, &loo),
            cosines: Cosines(pairs),
        })
    }

    /// A memory of at most `max_bytes` of views (instead of [`MAX_BYTES`]).
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        Self {
            rings: Mutex::default(),
            clock: Default::default(),
            max_bytes,
        }
    }

    /// Bytes of views remembered.
    pub fn bytes(&self) -> usize {
        self.rings.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// Remembers a part judged not DEFECT.
    pub fn remember(
        &self,
        profile: &str,
        key: &str,
        views: &[Vec<f32>],
        cfg: &LineMemoryConfig,
        now: Instant,
    ) {
        self.remember_with(profile, key, views, cfg, now, &Cosines::default());
    }

    /// [`Self::remember`] with the cosines [`Self::assess`] computed for this part: those with
    /// parts still remembered are kept as they are, those with parts remembered since are
    /// computed here (under the lock: a few parts at most).
    pub fn remember_with(
        &self,
        profile: &str,
        key: &str,
        views: &[Vec<f32>],
        cfg: &LineMemoryConfig,
        now: Instant,
        known: &Cosines,
    ) {
        let units = views.iter().map(|v| super::normalized(v)).collect();
        let tick = self
            .clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let part = std::sync::Arc::new(Part::new(tick, now, units, cfg.size.max(1)));
        let mut guard = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let rings = &mut *guard;
        let id = (profile.to_string(), key.to_string());
        let least_used = |by_key: &HashMap<(String, String), Ring>, id: &(String, String)| {
            by_key
                .iter()
                .filter(|(k, _)| *k != id)
                .min_by_key(|(_, r)| r.used)
                .map(|(k, _)| k.clone())
        };
        if !rings.by_key.contains_key(&id) && rings.by_key.len() >= MAX_KEYS {
            // The line not heard from for longest goes.
            if let Some(old) = least_used(&rings.by_key, &id) {
                rings.bytes -= rings.by_key.remove(&old).map_or(0, |r| r.bytes());
            }
        }
        // Over the byte bound: the lines not heard from for longest go first.
        while rings.bytes + part.bytes() > self.max_bytes {
            let Some(old) = least_used(&rings.by_key, &id) else {
                break;
            };
            rings.bytes -= rings.by_key.remove(&old).map_or(0, |r| r.bytes());
        }
        rings.bytes += part.bytes();
        let ring = rings.by_key.entry(id).or_default();
        ring.used = tick;
        let mut freed = ring.forget_old(cfg, now);
        while ring.parts.len() + 1 > cfg.size.max(1) {
            freed += ring.pop_oldest();
        }
        for m in &ring.parts {
            let (new, old) = match known.0.iter().find(|(id, _, _)| *id == m.id) {
                Some((_, new, old)) => (new.clone(), old.clone()),
                None => cosines(&part.views, &m.views),
            };
            ring.sims.insert((part.id, m.id), new);
            ring.sims.insert((m.id, part.id), old);
        }
        ring.parts.push_back(part);
        // Still over (this line alone): its oldest parts go, never the one just added.
        while rings.bytes - freed > self.max_bytes && ring.parts.len() > 1 {
            freed += ring.pop_oldest();
        }
        ring.refresh_loo(cfg);
        rings.bytes -= freed;
    }

    /// Lines (or cameras) remembered.
    pub fn keys(&self) -> usize {
        self.rings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
#[path = "line_memory_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "line_memory_calibration_tests.rs"]
mod calibration_tests;
