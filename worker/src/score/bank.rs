//! One profile's exemplars as the scorer reads them: unit vectors by class, and a view's
//! affinities to them. The exemplar bank (`exemplars`) fills a [`ProfileBank`] per profile
//! from the exemplar topic; it lives here, with the scoring that reads it, so that `score`
//! stays below `exemplars` (which builds on `score`'s profiles and normalisation).
//!
//! Guarantees: a bank never holds more entries than the bound its filler passes to
//! [`ProfileBank::insert`], nor two with one id (a second insert replaces);
//! [`ProfileBank::for_classes`] gives it indexed by another profile version's classes, by
//! name, leaving out the entries of classes that version lacks.

/// One exemplar, ready to compare: unit vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    /// Index into the profile's classes.
    pub class: usize,
    pub whole: Vec<f32>,
    pub windows: Vec<Vec<f32>>,
    /// Each window's scale (its side over the frame's shorter side, as `tiles.scales` says
    /// it), in the order of `windows`; empty for exemplars recorded before scales were (their
    /// windows are then compared at every scale).
    pub window_scales: Vec<f32>,
    /// When it was added (seconds since the epoch; 0 when unknown).
    pub added_at: i64,
    /// Whether operator feedback made it (its source starts with `exemplars::FEEDBACK_SOURCE`):
    /// only those are removed to keep a class under the feedback policy's cap.
    pub from_feedback: bool,
}

impl Entry {
    /// Bytes it holds, near enough.
    pub fn bytes(&self) -> usize {
        (1 + self.windows.len()) * self.whole.len() * 4
            + self.window_scales.len() * 4
            + self.id.len()
            + 200
    }
}

/// One profile's exemplars. Entries are shared: a snapshot of the bank (taken at every
/// change, for the records to score against) copies pointers, not embeddings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileBank {
    entries: Vec<std::sync::Arc<Entry>>,
    /// The class names [`Entry::class`] indexes: the profile's when its entries were applied.
    classes: Vec<String>,
    /// A Tip-Adapter-F adapter trained on the exemplars (`clipqc adapt`): when set, the whole
    /// frame's cache term uses its trained keys instead of the exemplars' embeddings.
    adapter: Option<std::sync::Arc<Adapter>>,
}

/// A Tip-Adapter-F adapter (`clipqc adapt`): the cache's keys after training, each with its
/// class, and the `alpha` and `beta` it was trained with.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub version: String,
    /// The profile's class names it was trained on, in order: a profile whose classes differ
    /// never uses it.
    pub classes: Vec<String>,
    /// The trained keys (not unit vectors: training moves them freely, as Tip-Adapter-F's
    /// linear layer's weights).
    pub keys: Vec<Vec<f32>>,
    /// Index into `classes` of each key.
    pub key_classes: Vec<usize>,
    pub alpha: f32,
    pub beta: f32,
}

impl Adapter {
    /// The cache term per class for a unit whole-frame embedding: `alpha × Σ exp(−beta × (1 −
    /// unit·key))` over each class's `k` nearest keys, as [`ProfileBank::affinity`].
    pub fn cache_logits(&self, unit: &[f32], classes: usize) -> Vec<f32> {
        let mut by_class: Vec<Vec<f32>> = vec![Vec::new(); classes];
        for (key, &c) in self.keys.iter().zip(&self.key_classes) {
            if let Some(v) = by_class.get_mut(c) {
                v.push(dot(unit, key));
            }
        }
        cache_term(by_class, self.beta)
            .into_iter()
            .map(|t| self.alpha * t)
            .collect()
    }

    /// Bytes it holds, near enough.
    pub fn bytes(&self) -> usize {
        self.keys.iter().map(|k| k.len() * 4 + 32).sum::<usize>() + 200
    }
}

/// Tip-Adapter's cache term per class from each class's cosines: the sum of `exp(−β (1 − s))`
/// over its `k` largest, `k` the smallest count of any class that has some.
fn cache_term(mut by_class: Vec<Vec<f32>>, beta: f32) -> Vec<f32> {
    let k = by_class
        .iter()
        .map(Vec::len)
        .filter(|&n| n > 0)
        .min()
        .unwrap_or(0);
    by_class
        .iter_mut()
        .map(|s| {
            s.sort_by(|a, b| b.total_cmp(a));
            s.iter().take(k).map(|s| (-beta * (1.0 - s)).exp()).sum()
        })
        .collect()
}

/// The class affinities of one whole-frame view and its nearest exemplar.
#[derive(Debug, Clone, PartialEq)]
pub struct Affinity {
    /// Per class: Tip-Adapter's cache term `Σ exp(−β (1 − sᵢ))` over the class's `k` nearest
    /// exemplars (`sᵢ` their cosines, `k` the smallest count of any class with exemplars:
    /// see [`ProfileBank::affinity`]), 0 for a class without exemplars.
    pub per_class: Vec<f32>,
    /// The nearest exemplar (index into the bank) and its cosine.
    pub nearest: Option<(usize, f32)>,
}

/// Two window scales are one when they differ by less than this (they are written as f32).
const SAME_SCALE: f32 = 1e-4;

impl ProfileBank {
    /// No exemplars and no adapter: scoring is zero-shot.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.adapter.is_none()
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_deref()
    }

    /// Sets (or, with `None`, removes) the profile's adapter.
    pub fn set_adapter(&mut self, adapter: Option<std::sync::Arc<Adapter>>) {
        self.adapter = adapter;
    }

    /// The whole frame's cache logits (already times `alpha`) and its nearest exemplar: the
    /// adapter's trained keys with its own `alpha` and `beta` when the bank has one, else
    /// [`Self::affinity`] over the exemplars with the profile's.
    pub fn cache_logits(&self, unit: &[f32], classes: usize, alpha: f32, beta: f32) -> Affinity {
        match &self.adapter {
            // The exemplars give the nearest one only; the adapter's keys the cache term.
            Some(adapter) => Affinity {
                per_class: adapter.cache_logits(unit, classes),
                nearest: self.cosines(unit, classes).1,
            },
            None => {
                let mut a = self.affinity(unit, classes, beta);
                a.per_class.iter_mut().for_each(|t| *t *= alpha);
                a
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn entry(&self, i: usize) -> &Entry {
        &self.entries[i]
    }

    pub fn entries(&self) -> &[std::sync::Arc<Entry>] {
        &self.entries
    }

    /// The bank indexed by `classes` (a profile's class names in its order): itself when it
    /// already is, else a copy with each entry's class found by name, and the entries of
    /// classes not in `classes` left out. A profile changed while the worker runs is scored
    /// against a bank indexed by its own classes before the follower has re-read the topic.
    pub fn for_classes(&self, classes: &[&str]) -> std::borrow::Cow<'_, ProfileBank> {
        if self.entries.is_empty()
            || self
                .classes
                .iter()
                .map(String::as_str)
                .eq(classes.iter().copied())
        {
            return std::borrow::Cow::Borrowed(self);
        }
        let entries = self
            .entries
            .iter()
            .filter_map(|e| {
                let name = self.classes.get(e.class)?;
                let class = classes.iter().position(|c| c == name)?;
                Some(std::sync::Arc::new(Entry {
                    class,
                    ..Entry::clone(e)
                }))
            })
            .collect();
        let adapter = self.adapter.clone().filter(|a| {
            a.classes
                .iter()
                .map(String::as_str)
                .eq(classes.iter().copied())
        });
        std::borrow::Cow::Owned(ProfileBank {
            entries,
            classes: classes.iter().map(|c| c.to_string()).collect(),
            adapter,
        })
    }

    /// Tip-Adapter's cache affinities (Zhang et al., ECCV 2022; `gaopengcuhk/Tip-Adapter`,
    /// `exp(−β (1 − A)) @ one_hot`) of a whole-frame view whose unit embedding is `unit`, over
    /// `classes` classes, against the exemplars' whole-frame views.
    ///
    /// Tip-Adapter sums over every cached sample, with as many shots per class. A line's bank
    /// is not balanced (hundreds of good parts, a few of each defect), and a sum over all
    /// entries would give the largest class the most weight whatever the image shows. So each
    /// class sums its `k` nearest entries, `k` the smallest count of any class that has
    /// entries: with balanced classes that is Tip-Adapter's sum exactly, and otherwise it is
    /// the sum over a balanced cache of each class's nearest `k`.
    pub fn affinity(&self, unit: &[f32], classes: usize, beta: f32) -> Affinity {
        let (by_class, nearest) = self.cosines(unit, classes);
        let per_class = cache_term(by_class, beta);
        Affinity { per_class, nearest }
    }

    /// A unit whole-frame embedding's cosine with every exemplar's whole view, by class, and
    /// the nearest exemplar (index, cosine).
    #[allow(clippy::type_complexity)]
    fn cosines(&self, unit: &[f32], classes: usize) -> (Vec<Vec<f32>>, Option<(usize, f32)>) {
        let mut by_class: Vec<Vec<f32>> = vec![Vec::new(); classes];
        let mut nearest: Option<(usize, f32)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            let s = dot(unit, &e.whole);
            if let Some(c) = by_class.get_mut(e.class) {
                c.push(s);
            }
            if nearest.is_none_or(|(_, n)| s > n) {
                nearest = Some((i, s));
            }
        }
        (by_class, nearest)
    }

    /// WinCLIP+'s visual association score of a window (Jeong et al., CVPR 2023, eq. 4;
    /// anomalib's `visual_association_score`): the least cosine distance `(1 − cos) / 2`
    /// between its unit embedding `unit` and the windows of the same `scale` of the normal
    /// references, the exemplars of the classes `acceptable` marks. `None` when no such
    /// window exists. Defect exemplars never count here: they count at whole-frame level,
    /// in [`Self::affinity`]. Windows of an exemplar recorded without scales count at every
    /// scale.
    pub fn association(&self, unit: &[f32], scale: f32, acceptable: &[bool]) -> Option<f32> {
        let mut best: Option<f32> = None;
        for e in &self.entries {
            if !acceptable.get(e.class).copied().unwrap_or(false) {
                continue;
            }
            for (i, w) in e.windows.iter().enumerate() {
                if e.window_scales
                    .get(i)
                    .is_some_and(|&s| (s - scale).abs() >= SAME_SCALE)
                {
                    continue;
                }
                let d = (1.0 - dot(unit, w)) / 2.0;
                best = Some(best.map_or(d, |b| b.min(d)));
            }
        }
        best
    }

    /// Whether any normal reference has windows (so [`Self::association`] can answer).
    pub fn has_references(&self, acceptable: &[bool]) -> bool {
        self.entries
            .iter()
            .any(|e| !e.windows.is_empty() && acceptable.get(e.class).copied().unwrap_or(false))
    }

    /// Index the entries inserted from now on by `classes` (a profile's class names, in its
    /// order). The entries held are not re-indexed: a bank is applied with one profile
    /// definition throughout (the follower re-reads the topic when the classes change).
    pub fn index_by<'a>(&mut self, classes: impl Iterator<Item = &'a str> + Clone) {
        if !self.classes.iter().map(String::as_str).eq(classes.clone()) {
            self.classes = classes.map(str::to_string).collect();
        }
    }

    /// Adds `entry`, or replaces the entry with its id. `false` (and the bank unchanged) when
    /// it holds `max` entries already and none with that id.
    #[must_use]
    pub fn insert(&mut self, entry: Entry, max: usize) -> bool {
        let full = self.entries.len() >= max;
        let entry = std::sync::Arc::new(entry);
        match self.entries.iter_mut().find(|e| e.id == entry.id) {
            Some(old) => *old = entry,
            None if full => return false,
            None => self.entries.push(entry),
        }
        true
    }

    /// Removes the entry with id `id`, if any (a tombstone).
    pub fn remove(&mut self, id: &str) {
        self.entries.retain(|e| e.id != id);
    }

    /// Bytes the bank's embeddings hold.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bytes()).sum::<usize>()
            + self.adapter.as_ref().map_or(0, |a| a.bytes())
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
