//! The score stage: image embedding × class text embeddings → probabilities → outcome.
//!
//! Guarantees: class text embeddings are computed once per profile (at start) and reused;
//! probabilities follow the model family (softmax over classes for CLIP, independent
//! sigmoids with the learned bias for SigLIP); the outcome rules are the ones below and
//! nothing else. They decide on the *defect probability* (the anomaly score): the mass on
//! the profile's defect classes (their sum under softmax; their maximum under independent
//! sigmoids), against the mass on its acceptable classes, so splitting a defect into
//! sub-classes can never make a part look more acceptable:
//!
//! 1. a defect class with a `threshold` that its probability reaches → DEFECT;
//! 2. otherwise the side with more mass wins (defects on a tie), reported with its most
//!    probable class; under the profile's `review_threshold` the winning side's mass is too
//!    doubtful → REVIEW;
//! 3. a winning defect side whose top class has a threshold it did not reach → REVIEW;
//!    otherwise defects → DEFECT, acceptable states → PASS.

pub mod anomaly_map;
pub mod bank;
pub mod line_memory;
mod localize;
pub mod masks;
pub mod profile;

use serde::Serialize;

pub use anomaly_map::AnomalyMap;
pub use bank::ProfileBank;
pub use localize::{AggregateScores, DefectRegion, Heatmap, Localization};
pub use profile::{
    ClassConfig, ExemplarWeights, FeedbackPolicy, Learn, ProfileConfig, StatesConfig,
};

use crate::model::artifact::{Manifest, Scoring};
use crate::model::{Embeddings, ModelError, PromptTokenizer, TokenBatch};
use crate::preprocess::Window;

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("profile {profile:?} {message}")]
    InvalidProfile { profile: String, message: String },
    /// Its `tiles` are out of range.
    #[error("profile {profile:?} {source}")]
    Tiles {
        profile: String,
        source: crate::preprocess::TileError,
    },
    /// Its `line_memory` is out of range.
    #[error("profile {profile:?} {source}")]
    LineMemory {
        profile: String,
        source: line_memory::LineMemoryError,
    },
    #[error("profile {profile:?}, class {class:?}: {source}")]
    Prompt {
        profile: String,
        class: String,
        source: ModelError,
    },
    #[error("unknown profile {0:?}")]
    UnknownProfile(String),
    #[error("profile {profile:?}: computing the prompt embeddings failed: {source}")]
    Model { profile: String, source: ModelError },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Pass,
    Defect,
    Review,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Defect => "DEFECT",
            Self::Review => "REVIEW",
        }
    }
}

/// The decision for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub outcome: Outcome,
    /// Index into the profile's classes of the class that decided.
    pub class: usize,
    pub probability: f32,
    /// The defect probability: the mass on the defect classes (see the module docs).
    pub anomaly_score: f32,
    /// One probability per class, in the profile's order (for a tiled profile, aggregated
    /// over the views as `tiles.aggregate` says: they need not sum to 1).
    pub probabilities: Vec<f32>,
    /// For a tiled profile: the heatmap and the regions.
    pub localization: Option<Localization>,
    /// The profile's exemplar nearest to the whole-frame view (none while its bank is empty).
    pub nearest: Option<NearestExemplar>,
    /// The mass of the acceptable side the rules weighed the anomaly score against.
    pub acceptable: f32,
    /// The part's score against the line's recent parts (see [`line_memory`]), when the
    /// profile remembers its line and enough parts are remembered.
    pub line_memory_score: Option<f32>,
    /// Profiles with `segment = true`, DEFECT and REVIEW: the defect's outline ([`masks`]).
    pub outline: Option<masks::Outline>,
    /// The Tip-Adapter-F adapter the whole frame was scored with (`clipqc adapt`), if any.
    pub adapter_version: Option<String>,
}

/// Tokenize every prompt of a profile: this is where over-long prompts are caught, at
/// config load, naming the profile, the class and the prompt. One group of prompts per
/// class, then (for a profile with `states`) the normal and the anomalous state prompts.
pub fn tokenize_profile(
    name: &str,
    profile: &ProfileConfig,
    tokenizer: &PromptTokenizer,
) -> Result<Vec<Vec<Vec<i64>>>, ScoreError> {
    profile.validate(name)?;
    let mut groups: Vec<(String, Vec<String>)> = profile
        .classes
        .iter()
        .map(|class| (class.name.clone(), profile.expanded_prompts(class)))
        .collect();
    if let Some(states) = &profile.states {
        let [normal, anomalous] = profile.state_prompts(states);
        groups.push(("states.normal".into(), normal));
        groups.push(("states.anomalous".into(), anomalous));
    }
    groups
        .into_iter()
        .map(|(class, prompts)| {
            prompts
                .iter()
                .map(|p| tokenizer.encode(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| ScoreError::Prompt {
                    profile: name.into(),
                    class,
                    source,
                })
        })
        .collect()
}

/// One view's scores: its class distribution, its anomaly score (the defect mass, blended
/// with the state prompts' anomalous probability when the profile has them) and the mass of
/// the acceptable side (blended the same way).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewScore {
    pub probabilities: Vec<f32>,
    pub anomaly: f32,
    pub acceptable: f32,
    /// The nearest exemplar of the profile's bank (its index there) and its cosine.
    pub nearest: Option<(usize, f32)>,
}

/// The exemplar nearest to a decided part's whole-frame view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NearestExemplar {
    pub id: String,
    /// Index into the profile's classes.
    pub class: usize,
    pub similarity: f32,
}

/// A profile ready to score: its class embeddings computed and normalised.
#[derive(Debug, Clone)]
pub struct Scorer {
    pub name: String,
    pub profile: ProfileConfig,
    /// One unit vector per class (the renormalised mean of its prompts' unit vectors).
    class_embeddings: Vec<Vec<f32>>,
    /// The normal and the anomalous state prototypes, and their weight in anomaly scores.
    states: Option<([Vec<f32>; 2], f32)>,
    scoring: Scoring,
    logit_scale: f32,
    logit_bias: f32,
}

impl Scorer {
    /// Compute the class embeddings with `embed` (the text encoder). Done once per profile.
    pub fn build(
        name: &str,
        profile: &ProfileConfig,
        manifest: &Manifest,
        tokenizer: &PromptTokenizer,
        mut embed: impl FnMut(TokenBatch) -> Result<Embeddings, ModelError>,
    ) -> Result<Self, ScoreError> {
        let tokens = tokenize_profile(name, profile, tokenizer)?;
        let flat: Vec<Vec<i64>> = tokens.iter().flatten().cloned().collect();
        let embeddings = embed(tokenizer.batch(&flat)).map_err(|source| ScoreError::Model {
            profile: name.into(),
            source,
        })?;
        let mut rows = embeddings.rows();
        let mut prototypes: Vec<Vec<f32>> = tokens
            .iter()
            .map(|prompts| {
                let mut mean = vec![0f32; embeddings.dim];
                for row in rows.by_ref().take(prompts.len()) {
                    let unit = normalized(row);
                    mean.iter_mut()
                        .zip(&unit)
                        .for_each(|(m, u)| *m += u / prompts.len() as f32);
                }
                normalized(&mean)
            })
            .collect();
        let states = profile.states.as_ref().map(|s| {
            let anomalous = prototypes
                .pop()
                .expect("tokenized with the states. This is a bug.");
            let normal = prototypes
                .pop()
                .expect("tokenized with the states. This is a bug.");
            ([normal, anomalous], s.weight)
        });
        Ok(Self {
            name: name.into(),
            profile: profile.clone(),
            class_embeddings: prototypes,
            states,
            scoring: manifest.scoring,
            logit_scale: manifest.logit_scale,
            logit_bias: manifest.logit_bias.unwrap_or(0.0),
        })
    }

    /// `decision` with the part's line-memory score: recorded, and with the profile's
    /// `line_memory.weight` w > 0 blended in (`(1 − w) × anomaly + w × score`, the
    /// acceptable side `(1 − w) × acceptable + w × (1 − score)`) and the outcome rules run
    /// again on the blend.
    pub fn with_line_memory(&self, decision: Decision, score: f32) -> Decision {
        let w = self.profile.line_memory.as_ref().map_or(0.0, |m| m.weight);
        let mut d = if w > 0.0 {
            let anomaly = (1.0 - w) * decision.anomaly_score + w * score;
            let acceptable = (1.0 - w) * decision.acceptable + w * (1.0 - score);
            let mut d = decide_masses(
                &self.profile,
                decision.probabilities.clone(),
                anomaly,
                acceptable,
            );
            d.localization = decision.localization;
            d.nearest = decision.nearest;
            d.adapter_version = decision.adapter_version;
            d
        } else {
            decision
        };
        d.line_memory_score = Some(score);
        d
    }

    /// A scorer with placeholder class embeddings, for tests of what consumes decisions.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, profile: ProfileConfig) -> Self {
        let class_embeddings = (0..profile.classes.len())
            .map(|i| vec![i as f32, 1.0])
            .collect();
        Self {
            name: name.into(),
            profile,
            class_embeddings,
            states: None,
            scoring: Scoring::Softmax,
            logit_scale: 100.0,
            logit_bias: 0.0,
        }
    }

    pub fn class_names(&self) -> impl Iterator<Item = &str> {
        self.profile.classes.iter().map(|c| c.name.as_str())
    }

    /// Probabilities per class for one image embedding.
    pub fn probabilities(&self, image_embedding: &[f32]) -> Vec<f32> {
        self.activate(&self.logits(&normalized(image_embedding)))
    }

    /// The zero-shot class logits of a unit embedding: `logit_scale × cosine + bias` per
    /// class (what Tip-Adapter calls CLIP's logits; `clipqc adapt` trains against them).
    pub fn text_logits(&self, unit: &[f32]) -> Vec<f32> {
        self.logits(unit)
    }

    fn logits(&self, unit: &[f32]) -> Vec<f32> {
        self.class_embeddings
            .iter()
            .map(|c| self.logit_scale * dot(unit, c) + self.logit_bias)
            .collect()
    }

    fn activate(&self, logits: &[f32]) -> Vec<f32> {
        match self.scoring {
            Scoring::Softmax => softmax(logits),
            Scoring::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
        }
    }

    /// One view's scores (see [`ViewScore`]). The state prompts are two classes of their
    /// own: `softmax(logit_scale × cosine)` over normal and anomalous, whatever the model
    /// family, as the window-scoring literature does.
    pub fn view(&self, embedding: &[f32]) -> ViewScore {
        self.view_with(embedding, None, false)
    }

    /// [`Self::view`] with the profile's exemplar bank. A whole-frame view's class logits gain
    /// Tip-Adapter's cache term, `alpha × Σ exp(−beta × (1 − sᵢ))` over the class's nearest
    /// exemplars ([`ProfileBank::affinity`]; `exemplars.alpha` and `exemplars.beta` of the
    /// profile), on the model's logit scale (CLIP's ×100) as Tip-Adapter adds it. A `window`
    /// view is scored on its text alone here: WinCLIP+ compares windows with the normal
    /// references' windows ([`Self::decide_views_with`]). An empty bank changes nothing, bit
    /// for bit.
    pub fn view_with(
        &self,
        embedding: &[f32],
        bank: Option<&ProfileBank>,
        window: bool,
    ) -> ViewScore {
        let unit = normalized(embedding);
        let mut logits = self.logits(&unit);
        let mut nearest = None;
        if let Some(bank) = bank.filter(|b| !b.is_empty() && !window) {
            let w = &self.profile.exemplars;
            let a = bank.cache_logits(&unit, logits.len(), w.alpha, w.beta);
            for (l, a) in logits.iter_mut().zip(&a.per_class) {
                *l += a;
            }
            nearest = a.nearest;
        }
        let probabilities = self.activate(&logits);
        let mut anomaly = side_mass(&self.profile, self.scoring, &probabilities, true);
        let mut acceptable = side_mass(&self.profile, self.scoring, &probabilities, false);
        if let Some(([normal, anomalous], weight)) = &self.states {
            let img = normalized(embedding);
            let logits = [normal, anomalous].map(|s| self.logit_scale * dot(&img, s));
            let state = softmax(&logits)[1];
            anomaly = (1.0 - weight) * anomaly + weight * state;
            acceptable = (1.0 - weight) * acceptable + weight * (1.0 - state);
        }
        ViewScore {
            probabilities,
            anomaly,
            acceptable,
            nearest,
        }
    }

    /// Each window's visual association score against the normal references (the bank's
    /// exemplars of acceptable classes) of its scale; `None` when the bank holds no normal
    /// reference windows, or none of some window's scale (WinCLIP+ needs every window's).
    pub fn associations(
        &self,
        bank: &ProfileBank,
        embeddings: &[Vec<f32>],
        windows: &[Window],
    ) -> Option<Vec<f32>> {
        let acceptable: Vec<bool> = self.profile.classes.iter().map(|c| !c.defect).collect();
        if windows.is_empty() || !bank.has_references(&acceptable) {
            return None;
        }
        let scales: Vec<f64> = self
            .profile
            .tiles
            .as_ref()
            .map(|t| t.scales.clone())
            .unwrap_or_default();
        embeddings
            .iter()
            .zip(windows)
            .map(|(e, w)| {
                let scale = scales.get(w.scale).copied().unwrap_or(1.0) as f32;
                bank.association(&normalized(e), scale, &acceptable)
            })
            .collect()
    }

    pub fn decide(&self, image_embedding: &[f32]) -> Decision {
        let v = self.view(image_embedding);
        decide_masses(&self.profile, v.probabilities, v.anomaly, v.acceptable)
    }

    /// The decision on a frame's views: `embeddings[0]` the whole-frame view's, then one
    /// per window of `windows` (a tiled profile's, lying at `origin` in the frame). Without
    /// windows it is [`Self::decide`] on the whole-frame view, plus the localization of a
    /// tiled profile (no heatmap, no regions).
    pub fn decide_views(
        &self,
        embeddings: &[Vec<f32>],
        windows: &[Window],
        origin: (u32, u32),
    ) -> Decision {
        self.decide_views_with(embeddings, windows, origin, None)
    }

    /// [`Self::decide_views`] with the profile's exemplar bank (see [`Self::view_with`]);
    /// the decision names the exemplar nearest to the whole-frame view.
    pub fn decide_views_with(
        &self,
        embeddings: &[Vec<f32>],
        windows: &[Window],
        origin: (u32, u32),
        bank: Option<&ProfileBank>,
    ) -> Decision {
        let associations = match (bank, &self.profile.tiles) {
            (Some(b), Some(_)) => self.associations(b, &embeddings[1..], windows),
            _ => None,
        };
        self.decide_views_associated(embeddings, windows, origin, bank, associations)
    }

    /// [`Self::decide_views_with`] with the windows' visual association scores computed
    /// already ([`Self::associations`]: they depend on the bank's normal references alone,
    /// not on `exemplars.alpha` and `beta`, so `clipqc eval --search` computes them once per
    /// image for its whole grid).
    pub fn decide_views_associated(
        &self,
        embeddings: &[Vec<f32>],
        windows: &[Window],
        origin: (u32, u32),
        bank: Option<&ProfileBank>,
        associations: Option<Vec<f32>>,
    ) -> Decision {
        let nearest = |v: &ViewScore| {
            let bank = bank?;
            v.nearest.map(|(i, similarity)| NearestExemplar {
                id: bank.entry(i).id.clone(),
                class: bank.entry(i).class,
                similarity,
            })
        };
        assert_eq!(
            embeddings.len(),
            windows.len() + 1,
            "one embedding per view. This is a bug."
        );
        let Some(tiles) = &self.profile.tiles else {
            let v = self.view_with(&embeddings[0], bank, false);
            let found = nearest(&v);
            let mut d = decide_masses(&self.profile, v.probabilities, v.anomaly, v.acceptable);
            d.nearest = found;
            d.adapter_version = adapter_version(bank);
            return d;
        };
        let mut views: Vec<ViewScore> = embeddings
            .iter()
            .enumerate()
            .map(|(i, e)| self.view_with(e, bank, i > 0))
            .collect();
        let found = nearest(&views[0]);
        let text: Vec<f32> = views[1..].iter().map(|v| v.anomaly).collect();
        let zero_shot = AnomalyMap::fuse(windows, &text, views[0].anomaly);
        // WinCLIP+: each window against the normal references' windows of its scale.
        let few_shot = associations.map(|vas| {
            for (v, a) in views[1..].iter_mut().zip(&vas) {
                // A window's own score is the mean of its text and vision scores, as
                // the fused map's cells are of the two maps.
                v.anomaly = (v.anomaly + a) / 2.0;
                v.acceptable = (v.acceptable + 1.0 - a) / 2.0;
            }
            AnomalyMap::few_shot(windows, &vas)
        });
        let (map, few_shot_max) = match (zero_shot, few_shot.flatten()) {
            (Some(z), Some(f)) => {
                let max = f.max();
                (Some(z.mean_with(&f)), Some(max))
            }
            (z, _) => (z, None),
        };
        let (probabilities, anomaly, acceptable) =
            localize::aggregate(&self.profile, tiles.aggregate, &views, few_shot_max);
        let aggregates = localize::aggregate_scores(&self.profile, &views, few_shot_max);
        let mut decision = decide_masses(&self.profile, probabilities, anomaly, acceptable);
        let mut localization = localize::localize(
            &self.profile,
            tiles,
            origin,
            windows,
            &views,
            map,
            decision.outcome != Outcome::Pass,
        );
        localization.aggregates = aggregates;
        decision.localization = Some(localization);
        decision.nearest = found;
        decision.adapter_version = adapter_version(bank);
        decision
    }
}

/// The version of the adapter a bank scores the whole frame with.
fn adapter_version(bank: Option<&ProfileBank>) -> Option<String> {
    bank.and_then(|b| b.adapter()).map(|a| a.version.clone())
}

/// The outcome rules of this module's header, on softmax probabilities.
pub fn decide(profile: &ProfileConfig, probabilities: Vec<f32>) -> Decision {
    decide_as(profile, Scoring::Softmax, probabilities)
}

/// The mass on the classes with `defect == side`: the sum of exclusive (softmax)
/// probabilities, the largest of independent (sigmoid) ones; 0 when there are none.
fn side_mass(
    profile: &ProfileConfig,
    scoring: Scoring,
    probabilities: &[f32],
    defect: bool,
) -> f32 {
    let side = profile
        .classes
        .iter()
        .zip(probabilities)
        .filter(|(c, _)| c.defect == defect)
        .map(|(_, &p)| p);
    match scoring {
        Scoring::Softmax => side.sum(),
        Scoring::Sigmoid => side.fold(0.0, f32::max),
    }
}

/// The most probable class with `defect == side` (the first in the profile on a tie), if
/// the profile has one.
fn top_of_side(profile: &ProfileConfig, probabilities: &[f32], defect: bool) -> Option<usize> {
    profile
        .classes
        .iter()
        .enumerate()
        .filter(|(_, c)| c.defect == defect)
        .rev()
        .max_by(|a, b| probabilities[a.0].total_cmp(&probabilities[b.0]))
        .map(|(i, _)| i)
}

/// The outcome rules of this module's header, on probabilities from `scoring`.
pub fn decide_as(profile: &ProfileConfig, scoring: Scoring, probabilities: Vec<f32>) -> Decision {
    let anomaly_score = side_mass(profile, scoring, &probabilities, true);
    let acceptable = side_mass(profile, scoring, &probabilities, false);
    decide_masses(profile, probabilities, anomaly_score, acceptable)
}

/// The outcome rules on per-class probabilities and the two sides' masses (computed from
/// those probabilities for one view; aggregated over the views of a tiled profile).
fn decide_masses(
    profile: &ProfileConfig,
    probabilities: Vec<f32>,
    anomaly_score: f32,
    acceptable: f32,
) -> Decision {
    let fired = profile
        .classes
        .iter()
        .enumerate()
        .filter(|(i, c)| c.defect && c.threshold.is_some_and(|t| probabilities[*i] >= t))
        .max_by(|a, b| probabilities[a.0].total_cmp(&probabilities[b.0]))
        .map(|(i, _)| i);
    let defect_side = anomaly_score >= acceptable;
    let side_top = top_of_side(profile, &probabilities, defect_side)
        .or_else(|| top_of_side(profile, &probabilities, !defect_side))
        .expect("a profile has classes. This is a bug.");
    let side_mass = anomaly_score.max(acceptable);
    let (outcome, class) = if let Some(i) = fired {
        (Outcome::Defect, i)
    } else if side_mass < profile.review_threshold {
        (Outcome::Review, side_top)
    } else if !defect_side {
        (Outcome::Pass, side_top)
    } else if profile.classes[side_top].threshold.is_some() {
        // A threshold it reached would have fired.
        (Outcome::Review, side_top)
    } else {
        (Outcome::Defect, side_top)
    };
    Decision {
        outcome,
        class,
        probability: probabilities[class],
        anomaly_score,
        probabilities,
        localization: None,
        nearest: None,
        acceptable,
        line_memory_score: None,
        outline: None,
        adapter_version: None,
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = dot(v, v).sqrt().max(f32::MIN_POSITIVE);
    v.iter().map(|x| x / norm).collect()
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod localize_tests;
