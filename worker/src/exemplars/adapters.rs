//! Tip-Adapter-F adapters (`clipqc adapt --publish`) on `kafka.adapter_topic`, applied to the
//! bank: the exemplar follower reads that topic beside the exemplar topic (catch-up before
//! the first request, then follow), so an adapter is swapped in with a bank snapshot, whole.
//!
//! Guarantees: an adapter is used only by a worker serving the model it was trained in the
//! embedding space of (`model_hash`, `dim`) and by a profile whose class list is the one it
//! was trained on, in order; any other is skipped with its reason (log and
//! `clipqc_adapters_skipped_total{reason}`), and the profile keeps the adapter it had. A
//! tombstone (key = the profile, no payload) removes the profile's adapter.

use std::collections::HashMap;
use std::sync::Arc;

use super::Bank;
use crate::proto::v1::Adapter as AdapterRecord;
use crate::score::bank::Adapter;
use crate::score::ProfileConfig;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter {key:?}: unknown profile {profile:?}")]
    UnknownProfile { key: String, profile: String },
    #[error(
        "adapter {key:?} ({version}): trained with model {got:?}, this worker serves {expected:?}"
    )]
    OtherModel {
        key: String,
        version: String,
        got: String,
        expected: String,
    },
    #[error(
        "adapter {key:?} ({version}): trained on the classes {got:?}, the profile has {expected:?}"
    )]
    OtherClasses {
        key: String,
        version: String,
        got: Vec<String>,
        expected: Vec<String>,
    },
    #[error("adapter {key:?}: {message}")]
    Malformed { key: String, message: String },
}

impl AdapterError {
    /// The metric label of a skipped record.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownProfile { .. } => "unknown_profile",
            Self::OtherModel { .. } => "other_model",
            Self::OtherClasses { .. } => "other_classes",
            Self::Malformed { .. } => "malformed",
        }
    }
}

/// The most keys one adapter may hold (a profile's bank holds at most
/// `exemplars.max_per_profile`, 1,000 by default).
pub const MAX_KEYS: usize = 100_000;

/// The adapter a record carries, checked against the worker's `profiles`, `model_hash` and
/// `dim`.
pub fn check(
    key: &str,
    x: &AdapterRecord,
    profiles: &HashMap<String, ProfileConfig>,
    model_hash: &str,
    dim: usize,
) -> Result<Adapter, AdapterError> {
    let malformed = |message: String| AdapterError::Malformed {
        key: key.into(),
        message,
    };
    if key != x.profile {
        return Err(malformed(format!(
            "its key is not its profile ({:?})",
            x.profile
        )));
    }
    let profile = profiles
        .get(&x.profile)
        .ok_or_else(|| AdapterError::UnknownProfile {
            key: key.into(),
            profile: x.profile.clone(),
        })?;
    if x.model_hash != model_hash || x.dim as usize != dim {
        return Err(AdapterError::OtherModel {
            key: key.into(),
            version: x.version.clone(),
            got: x.model_hash.clone(),
            expected: model_hash.into(),
        });
    }
    let expected: Vec<String> = profile.classes.iter().map(|c| c.name.clone()).collect();
    if x.classes != expected {
        return Err(AdapterError::OtherClasses {
            key: key.into(),
            version: x.version.clone(),
            got: x.classes.clone(),
            expected,
        });
    }
    let n = x.key_classes.len();
    if n == 0 || n > MAX_KEYS || x.keys.len() != n * dim {
        return Err(malformed(format!(
            "{} key floats for {n} keys of {dim} (at most {MAX_KEYS} keys)",
            x.keys.len()
        )));
    }
    if x.key_classes.iter().any(|&c| c as usize >= x.classes.len()) {
        return Err(malformed("a key's class is not one of its classes".into()));
    }
    if x.keys
        .iter()
        .chain([&x.alpha, &x.beta])
        .any(|v| !v.is_finite())
        || x.beta < 0.0
    {
        return Err(malformed(
            "its keys, alpha or beta hold NaN, infinity or a negative beta".into(),
        ));
    }
    Ok(Adapter {
        version: x.version.clone(),
        classes: x.classes.clone(),
        keys: x.keys.chunks(dim).map(<[f32]>::to_vec).collect(),
        key_classes: x.key_classes.iter().map(|&c| c as usize).collect(),
        alpha: x.alpha,
        beta: x.beta,
    })
}

impl Bank {
    /// Applies one record of the adapter topic (key = the profile): `Some` sets the profile's
    /// adapter when [`check`] accepts it, `None` (a tombstone) removes it.
    pub fn apply_adapter(
        &mut self,
        key: &str,
        record: Option<AdapterRecord>,
        profiles: &HashMap<String, ProfileConfig>,
        model_hash: &str,
        dim: usize,
    ) -> Result<(), AdapterError> {
        let Some(x) = record else {
            if let Some(bank) = self.profiles.get_mut(key) {
                bank.set_adapter(None);
            }
            return Ok(());
        };
        let adapter = check(key, &x, profiles, model_hash, dim)?;
        let profile = &profiles[&x.profile];
        let bank = self.profiles.entry(x.profile.clone()).or_default();
        bank.index_by(profile.classes.iter().map(|c| c.name.as_str()));
        bank.set_adapter(Some(Arc::new(adapter)));
        Ok(())
    }
}
