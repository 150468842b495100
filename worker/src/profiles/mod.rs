//! The profiles in service, and changing them while the worker runs.
//!
//! A [`Catalog`] is every profile ready to serve ([`Profile`]: its scorer, text embeddings
//! computed, and its preprocessing) with the routes that pick one for a request, as one immutable
//! snapshot behind an [`ArcSwap`] ([`Live`]). The intake loop takes the snapshot once per record,
//! when it starts the record, and the record uses that snapshot for its route, its preprocessing
//! and its scoring. A change ([`reload`]) builds a whole new catalog beside the one in service,
//! re-embedding only the profiles whose definition changed, and swaps it in with one pointer store.
//!
//! Guarantees: a record is scored against exactly one profile definition, never a mix of two
//! and never one half built; records are started in their partition's offset order (and in
//! one intake order per worker), so once a record got the new version every record started
//! after it gets it too: a worker switches at one point, and within a partition no verdict of
//! the old version follows one of the new; no record waits for a reload (the prompts are
//! embedded on the reloader's own thread, between the model thread's image batches); a change
//! that does not load, validate or build is refused whole, with a log line naming the problem
//! and `clipqc_profile_reload_failures_total`, and every profile in service stays as it was.
//!
//! A profile's version is the first 12 hex digits of the SHA-256 of its definition as this
//! build reads it (the JSON of its [`ProfileConfig`], defaults filled in): the same
//! definition has the same version on every worker of a build, and a change in any field
//! changes it. Verdicts carry it (`profile_version`).

pub mod reload;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::Digest;

use crate::metrics;
use crate::model::{Manifest, ModelHandle, PromptTokenizer};
use crate::preprocess::{PreprocessSettings, Preprocessor};
use crate::routing::Router;
use crate::score::{ProfileConfig, Scorer};

/// A profile ready to serve: its scorer and its preprocessing (CLAHE is per profile).
pub struct Profile {
    pub scorer: Scorer,
    pub preprocessor: Preprocessor,
    /// [`version`] of its definition, written into its verdicts.
    pub version: String,
}

/// Every profile in service and the routes, swapped whole.
pub struct Catalog {
    pub profiles: HashMap<String, Arc<Profile>>,
    pub router: Router,
}

/// The catalog in service: records take a snapshot, the reloader stores a new one.
pub type Live = Arc<ArcSwap<Catalog>>;

impl Catalog {
    pub fn new(profiles: HashMap<String, Profile>, router: Router) -> Self {
        let profiles = profiles
            .into_iter()
            .map(|(name, p)| (name, Arc::new(p)))
            .collect();
        Self { profiles, router }
    }

    /// In service, with its versions in `clipqc_profile_info`.
    pub fn live(self) -> Live {
        for (name, p) in &self.profiles {
            metrics::profile_version(name, &p.version, true);
        }
        Arc::new(ArcSwap::from_pointee(self))
    }
}

/// The version of a profile: the first 12 hex digits of the SHA-256 of its definition's JSON.
pub fn version(config: &ProfileConfig) -> String {
    // Struct fields serialise in their declared order and maps are ordered: equal definitions
    // give equal bytes.
    let json = serde_json::to_vec(config).expect("a profile serialises. This is a bug.");
    hex::encode(&sha2::Sha256::digest(&json)[..6])
}

/// What building a profile needs from the model: its manifest, tokenizer and text encoder.
pub struct Builder<'a> {
    pub manifest: &'a Manifest,
    pub tokenizer: &'a PromptTokenizer,
    pub model: &'a ModelHandle,
    pub preprocess: &'a PreprocessSettings,
}

impl Builder<'_> {
    /// The profile ready to serve: its prompts embedded (a blocking call to the model thread,
    /// never from an async worker) and its preprocessing.
    pub fn build(&self, name: &str, config: &ProfileConfig) -> anyhow::Result<Profile> {
        let scorer = Scorer::build(name, config, self.manifest, self.tokenizer, |b| {
            self.model.embed_texts_blocking(b)
        })?;
        let preprocessor = Preprocessor::for_profile(&self.manifest.image, self.preprocess, config)
            .map_err(|e| anyhow::anyhow!("profile {name:?}: {e}"))?;
        if let Some(t) = &preprocessor.tiles {
            tracing::info!(
                profile = name,
                max_aspect_ratio = t.max_aspect_ratio,
                max_windows = t.config.max_windows,
                "tiled profile: frames up to this aspect ratio fit its windows"
            );
        }
        Ok(Profile {
            scorer,
            preprocessor,
            version: version(config),
        })
    }
}

#[cfg(test)]
mod tests;
