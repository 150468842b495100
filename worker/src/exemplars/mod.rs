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

pub mod adapters;
pub mod feedback;
pub mod follow;
pub mod vetting;

use std::collections::HashMap;

use crate::proto::v1::Exemplar;
use crate::score::{normalized, ProfileConfig};
// The per-profile data the scorer reads lives in `score` (below this module); the bank here
// fills it. Re-exported where its users have always found it.
pub use crate::score::bank::{Affinity, Entry, ProfileBank};

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
    #[error(
        "exemplar {key:?}: profile {profile:?} would hold more than {max_bytes} bytes of \
         embeddings (exemplars.max_bytes_per_profile): remove some first"
    )]
    OverBytes {
        key: String,
        profile: String,
        max_bytes: u64,
    },
}

impl ExemplarError {
    /// Every [`Self::reason`]: the metrics' vocabulary of the `reason` label (they own it),
    /// which a test checks the variants map onto.
    pub const REASONS: [&'static str; 6] = crate::metrics::EXEMPLAR_SKIP_REASONS;

    /// The metric label of a skipped record.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownProfile { .. } => "unknown_profile",
            Self::UnknownClass { .. } => "unknown_class",
            Self::OtherModel { .. } => "other_model",
            Self::Malformed { .. } => "malformed",
            Self::Full { .. } => "full",
            Self::OverBytes { .. } => "over_bytes",
        }
    }
}

/// The bank's settings (`exemplars` in the config).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ExemplarSettings {
    /// The most exemplars one profile's bank holds; more are refused (log and metric).
    pub max_per_profile: usize,
    /// The most bytes of embeddings one profile's bank holds (an exemplar carries its
    /// windows' embeddings too); more are refused (log and metric). Each worker holds the
    /// whole bank.
    pub max_bytes_per_profile: u64,
    /// The most feedback answers one operator may give in an hour, per worker of the
    /// feedback group; more are refused (dead-lettered). 0: no limit.
    pub feedback_per_operator_hour: usize,
}

impl Default for ExemplarSettings {
    fn default() -> Self {
        Self {
            max_per_profile: 1000,
            // 1,000 exemplars of 25 views of 768 floats take 77 MB.
            max_bytes_per_profile: 256 << 20,
            // One answer every 6 s for an hour: more than a person at a line gives.
            feedback_per_operator_hour: 600,
        }
    }
}

/// The most windows one exemplar may carry (a profile's windows at every scale are far fewer).
pub const MAX_WINDOWS: usize = 4096;

/// How an exemplar made from operator feedback names its source.
pub const FEEDBACK_SOURCE: &str = "feedback:";

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
                let n = bank.map_or(0, |b| b.entries().iter().filter(|e| e.class == c).count());
                (name.as_str(), class.name.as_str(), n)
            })
        })
    }

    /// Applies one record of the exemplar topic: `Some` adds or replaces the entry under
    /// `key` (`profile/id`), `None` (a tombstone) removes it. `profiles` are the worker's,
    /// `model_hash` and `dim` its model's; `limits` bound a profile's bank in exemplars and
    /// bytes, and an exemplar's windows to [`MAX_WINDOWS`].
    pub fn apply(
        &mut self,
        key: &str,
        record: Option<Exemplar>,
        profiles: &HashMap<String, ProfileConfig>,
        model_hash: &str,
        dim: usize,
        limits: &ExemplarSettings,
    ) -> Result<(), ExemplarError> {
        let max = limits.max_per_profile;
        let Some(x) = record else {
            // A tombstone names its exemplar by key alone.
            if let Some((profile, id)) = key.split_once('/') {
                if let Some(bank) = self.profiles.get_mut(profile) {
                    bank.remove(id);
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
        if x.window_embeddings.len() / dim.max(1) > MAX_WINDOWS {
            return Err(malformed(format!(
                "{} windows (at most {MAX_WINDOWS})",
                x.window_embeddings.len() / dim.max(1)
            )));
        }
        if x.window_embeddings.len() % dim != 0 {
            return Err(malformed(format!(
                "{} window floats are not a whole number of {dim}-float embeddings",
                x.window_embeddings.len()
            )));
        }
        let windows = x.window_embeddings.len() / dim.max(1);
        if !x.window_scales.is_empty() && x.window_scales.len() != windows {
            return Err(malformed(format!(
                "{} window scales for {windows} windows",
                x.window_scales.len()
            )));
        }
        if x.window_scales.iter().any(|s| !(*s > 0.0 && *s <= 1.0)) {
            return Err(malformed("a window scale is not within (0, 1]".into()));
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
            window_scales: x.window_scales.clone(),
            added_at: x.added_at.map_or(0, |t| t.seconds),
            from_feedback: x.source.starts_with(FEEDBACK_SOURCE),
        };
        let bank = self.profiles.entry(x.profile.clone()).or_default();
        let replaced = bank
            .entries()
            .iter()
            .find(|e| e.id == entry.id)
            .map_or(0, |e| e.bytes());
        if (bank.bytes() - replaced + entry.bytes()) as u64 > limits.max_bytes_per_profile {
            return Err(ExemplarError::OverBytes {
                key: key.into(),
                profile: x.profile,
                max_bytes: limits.max_bytes_per_profile,
            });
        }
        bank.index_by(profile.classes.iter().map(|c| c.name.as_str()));
        if !bank.insert(entry, max) {
            return Err(ExemplarError::Full {
                key: key.into(),
                profile: x.profile,
                max,
            });
        }
        Ok(())
    }
}

/// The exemplar id of an image: the first 16 hex digits of its SHA-256.
pub fn id_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(bytes)[..8])
}

#[cfg(test)]
mod tests;
