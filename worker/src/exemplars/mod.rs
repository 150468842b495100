//! The few-shot exemplar bank: reference images of a profile's classes, as embeddings, shared
//! by every worker through a compacted Kafka topic ([`follow`]).
//!
//! Guarantees: an exemplar is applied only when it belongs to a profile and class the worker
//! has, its embeddings have the model's dimension and it was computed with the model the
//! worker serves (another model's is skipped and counted: embedding spaces never mix); a
//! profile's bank holds at most `exemplars.max_per_profile` entries, and one over the bound is
//! refused with an error naming it (never an unbounded bank); a tombstone removes its entry;
//! the same key applied twice replaces, so re-reading the topic is idempotent. Memory: an
//! entry holds `(1 + windows) × dim` floats (2 KiB per view for a 512-dimension model: a
//! whole-frame exemplar of ViT-B/32 is about 2.2 KiB, one with 24 windows about 51 KiB) plus
//! about 200 bytes of id and bookkeeping. Pure data: no Kafka, no tokio.

pub mod feedback;
pub mod follow;

use std::collections::HashMap;

use crate::proto::v1::Exemplar;
use crate::score::{normalized, ProfileConfig};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExemplarError {
    #[error("exemplar {key:?}: unknown profile {profile:?}")]
    UnknownProfile { key: String, profile: String },
    #[error("exemplar {key:?}: profile {profile:?} has no class {class:?}")]
    UnknownClass {
        key: String,
        profile: String,
        class: String,
    },
    #[error("exemplar {key:?}: computed with model {got:?}, this worker serves {expected:?}")]
    OtherModel {
        key: String,
        got: String,
        expected: String,
    },
    #[error("exemplar {key:?}: {message}")]
    Malformed { key: String, message: String },
    #[error(
        "exemplar {key:?}: profile {profile:?} already holds {max} exemplars \
         (exemplars.max_per_profile): remove some first"
    )]
    Full {
        key: String,
        profile: String,
        max: usize,
    },
}

impl ExemplarError {
    /// Every [`Self::reason`]: the metrics' vocabulary of the `reason` label (they own it),
    /// which a test checks the variants map onto.
    pub const REASONS: [&'static str; 5] = crate::metrics::EXEMPLAR_SKIP_REASONS;

    /// The metric label of a skipped record.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownProfile { .. } => "unknown_profile",
            Self::UnknownClass { .. } => "unknown_class",
            Self::OtherModel { .. } => "other_model",
            Self::Malformed { .. } => "malformed",
            Self::Full { .. } => "full",
        }
    }
}

/// The bank's settings (`exemplars` in the config).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ExemplarSettings {
    /// The most exemplars one profile's bank holds; more are refused (log and metric).
    pub max_per_profile: usize,
}

impl Default for ExemplarSettings {
    fn default() -> Self {
        Self {
            max_per_profile: 1000,
        }
    }
}

/// One exemplar, ready to compare: unit vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    /// Index into the profile's classes.
    pub class: usize,
    pub whole: Vec<f32>,
    pub windows: Vec<Vec<f32>>,
    /// When it was added (seconds since the epoch; 0 when unknown).
    pub added_at: i64,
    /// Whether operator feedback made it (its source starts with [`FEEDBACK_SOURCE`]):
    /// only those are removed to keep a class under the feedback policy's cap.
    pub from_feedback: bool,
}

/// How an exemplar made from operator feedback names its source.
pub const FEEDBACK_SOURCE: &str = "feedback:";

/// One profile's exemplars.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileBank {
    entries: Vec<Entry>,
    /// The class names [`Entry::class`] indexes: the profile's when its entries were applied.
    classes: Vec<String>,
}

/// The class affinities of one view and its nearest exemplar.
#[derive(Debug, Clone, PartialEq)]
pub struct Affinity {
    /// Per class: `exp(−β (1 − s))` with `s` the class's nearest exemplar's cosine, 0 for a
    /// class without exemplars.
    pub per_class: Vec<f32>,
    /// The nearest exemplar (index into the bank) and its cosine.
    pub nearest: Option<(usize, f32)>,
}

impl ProfileBank {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn entry(&self, i: usize) -> &Entry {
        &self.entries[i]
    }

    pub fn entries(&self) -> &[Entry] {
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
                Some(Entry { class, ..e.clone() })
            })
            .collect();
        std::borrow::Cow::Owned(ProfileBank {
            entries,
            classes: classes.iter().map(|c| c.to_string()).collect(),
        })
    }

    /// Affinities of a view whose unit embedding is `unit`, over `classes` classes. A window
    /// is compared with the exemplars' windows (their whole views when they have none), a
    /// whole-frame view with their whole views.
    pub fn affinity(&self, unit: &[f32], window: bool, classes: usize, beta: f32) -> Affinity {
        let mut best = vec![f32::NEG_INFINITY; classes];
        let mut nearest: Option<(usize, f32)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            let refs: &[Vec<f32>] = if window && !e.windows.is_empty() {
                &e.windows
            } else {
                std::slice::from_ref(&e.whole)
            };
            let s = refs
                .iter()
                .map(|r| dot(unit, r))
                .fold(f32::NEG_INFINITY, f32::max);
            best[e.class] = best[e.class].max(s);
            if nearest.is_none_or(|(_, n)| s > n) {
                nearest = Some((i, s));
            }
        }
        let per_class = best
            .into_iter()
            .map(|s| {
                if s.is_finite() {
                    (-beta * (1.0 - s)).exp()
                } else {
                    0.0
                }
            })
            .collect();
        Affinity { per_class, nearest }
    }

    /// Bytes the bank's embeddings hold.
    pub fn bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| (1 + e.windows.len()) * e.whole.len() * 4 + e.id.len() + 200)
            .sum()
    }
}

/// Every profile's bank.
#[derive(Debug, Clone, Default)]
pub struct Bank {
    profiles: HashMap<String, ProfileBank>,
}

impl Bank {
    pub fn profile(&self, name: &str) -> Option<&ProfileBank> {
        self.profiles.get(name).filter(|b| !b.is_empty())
    }

    /// (profile, class name, count) for the metrics.
    pub fn counts<'a>(
        &'a self,
        profiles: &'a HashMap<String, ProfileConfig>,
    ) -> impl Iterator<Item = (&'a str, &'a str, usize)> + 'a {
        profiles.iter().flat_map(move |(name, p)| {
            let bank = self.profiles.get(name);
            p.classes.iter().enumerate().map(move |(c, class)| {
                let n = bank.map_or(0, |b| b.entries.iter().filter(|e| e.class == c).count());
                (name.as_str(), class.name.as_str(), n)
            })
        })
    }

    /// Applies one record of the exemplar topic: `Some` adds or replaces the entry under
    /// `key` (`profile/id`), `None` (a tombstone) removes it. `profiles` are the worker's,
    /// `model_hash` and `dim` its model's.
    pub fn apply(
        &mut self,
        key: &str,
        record: Option<Exemplar>,
        profiles: &HashMap<String, ProfileConfig>,
        model_hash: &str,
        dim: usize,
        max: usize,
    ) -> Result<(), ExemplarError> {
        let Some(x) = record else {
            // A tombstone names its exemplar by key alone.
            if let Some((profile, id)) = key.split_once('/') {
                if let Some(bank) = self.profiles.get_mut(profile) {
                    bank.entries.retain(|e| e.id != id);
                }
            }
            return Ok(());
        };
        let malformed = |message: String| ExemplarError::Malformed {
            key: key.into(),
            message,
        };
        if key != format!("{}/{}", x.profile, x.id) {
            return Err(malformed(format!(
                "its key is not profile/id ({}/{})",
                x.profile, x.id
            )));
        }
        let profile = profiles
            .get(&x.profile)
            .ok_or_else(|| ExemplarError::UnknownProfile {
                key: key.into(),
                profile: x.profile.clone(),
            })?;
        let class = profile
            .classes
            .iter()
            .position(|c| c.name == x.class)
            .ok_or_else(|| ExemplarError::UnknownClass {
                key: key.into(),
                profile: x.profile.clone(),
                class: x.class.clone(),
            })?;
        if x.model_hash != model_hash {
            return Err(ExemplarError::OtherModel {
                key: key.into(),
                got: x.model_hash,
                expected: model_hash.into(),
            });
        }
        if x.dim as usize != dim || x.embedding.len() != dim {
            return Err(malformed(format!(
                "embedding of {} floats (dim {}), the model's have {dim}",
                x.embedding.len(),
                x.dim
            )));
        }
        if x.window_embeddings.len() % dim != 0 {
            return Err(malformed(format!(
                "{} window floats are not a whole number of {dim}-float embeddings",
                x.window_embeddings.len()
            )));
        }
        if x.embedding
            .iter()
            .chain(&x.window_embeddings)
            .any(|v| !v.is_finite())
        {
            return Err(malformed("an embedding holds NaN or infinity".into()));
        }
        let entry = Entry {
            id: x.id.clone(),
            class,
            whole: normalized(&x.embedding),
            windows: x.window_embeddings.chunks(dim).map(normalized).collect(),
            added_at: x.added_at.map_or(0, |t| t.seconds),
            from_feedback: x.source.starts_with(FEEDBACK_SOURCE),
        };
        let bank = self.profiles.entry(x.profile.clone()).or_default();
        if !bank
            .classes
            .iter()
            .eq(profile.classes.iter().map(|c| &c.name))
        {
            // A bank is applied with one profile definition throughout (the follower
            // re-reads the topic when the classes change).
            bank.classes = profile.classes.iter().map(|c| c.name.clone()).collect();
        }
        let full = bank.entries.len() >= max;
        match bank.entries.iter_mut().find(|e| e.id == entry.id) {
            Some(old) => *old = entry,
            None if full => {
                return Err(ExemplarError::Full {
                    key: key.into(),
                    profile: x.profile,
                    max,
                })
            }
            None => bank.entries.push(entry),
        }
        Ok(())
    }
}

/// The exemplar id of an image: the first 16 hex digits of its SHA-256.
pub fn id_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(bytes)[..8])
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests;
