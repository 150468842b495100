//! Profiles: defect taxonomies written as sentences.
//!
//! A profile is a named set of classes; each class has prompts (expanded through the
//! profile's templates), a `defect` flag and an optional threshold. A new defect type is a
//! new class in the config file, not a training run.

use serde::{Deserialize, Serialize};

use super::ScoreError;
use crate::preprocess::{ClaheSettings, TileConfig, View};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Sentence frames, each with one `{}` where a class prompt goes. Every prompt is run
    /// through every template and the embeddings are averaged (a prompt ensemble).
    #[serde(default = "default_templates")]
    pub templates: Vec<String>,
    /// Under this probability of the winning side (the defect probability, or the mass on
    /// the acceptable classes, whichever is larger) the outcome is REVIEW: the part goes to a
    /// person. Under softmax the two sides sum to 1, so only values above 0.5 make a band of
    /// doubt around the even split: 0.6 sends parts 40–60 % likely defective to REVIEW.
    #[serde(default = "default_review_threshold")]
    // As written, not as the f32 nearest to it (0.6000000238418579).
    #[schemars(extend("default" = 0.6))]
    pub review_threshold: f32,
    /// Contrast equalisation before the model, for uneven lighting.
    #[serde(default)]
    pub clahe: Option<ClaheSettings>,
    /// What of the frame (or of the request's region of interest) the model sees: `pad`
    /// (default: the whole frame, aspect kept, centred on a square of the model's mean
    /// colour; every pixel is seen), `center_crop` (the checkpoint's own processor: CLIP
    /// resizes the shorter side and crops the middle square, so the sides of a wide frame are
    /// never seen) or `squash` (the whole frame stretched to the square).
    #[serde(default)]
    pub view: View,
    /// Multi-scale windows scored besides the whole-frame view, so a small defect anywhere
    /// in the frame counts and the verdict says where it is (`regions`, `heatmap`). Unset:
    /// the whole-frame view only.
    #[serde(default)]
    pub tiles: Option<TileConfig>,
    /// Normal and anomalous *state* prompts about the object ("a photo of a flawless steel
    /// bracket" against "a photo of a damaged steel bracket", through the profile's
    /// templates), averaged into two prototypes whose anomalous probability is blended into
    /// every view's anomaly score. Unset: the anomaly score is the defect classes' mass.
    #[serde(default)]
    pub states: Option<StatesConfig>,
    /// How the few-shot exemplar bank weighs in (see docs/profiles.md, Exemplars).
    #[serde(default)]
    pub exemplars: ExemplarWeights,
    /// Which operator feedback becomes exemplars of this profile.
    #[serde(default)]
    pub feedback: FeedbackPolicy,
    /// Score each part against the line's own recent parts too (no labels, no prompts):
    /// `line_memory_score` in verdicts, and with a `weight` in the anomaly score. Unset: off.
    #[serde(default)]
    pub line_memory: Option<super::line_memory::LineMemoryConfig>,
    /// Outline the defect of DEFECT and REVIEW verdicts with Segment Anything, prompted by
    /// each region's box (the inspected area's for a profile without `tiles`): the verdict's
    /// `masks` (COCO RLE in source-frame pixels, area, box, SAM's predicted IoU). Needs
    /// `model.sam_dir`. PASS verdicts are never segmented; when the segmentation queue is
    /// full the verdict goes out without masks (`segmentation = "SEGMENT_QUEUE_FULL"`).
    #[serde(default)]
    pub segment: bool,
    /// A DEFECT whose every mask is smaller than this many square millimetres becomes
    /// `below_min_area` (acceptance criteria such as "spots under 0.5 mm² accepted"). Needs
    /// `segment = true`; applies to requests whose camera has `mm_per_pixel` (a route's),
    /// and to no other. Unset: no area rule in millimetres.
    #[serde(default)]
    pub min_area_mm2: Option<f64>,
    /// As `min_area_mm2`, in pixels of the source frame (for cameras without a calibration).
    #[serde(default)]
    pub min_area_pixels: Option<u64>,
    /// What a DEFECT whose masks are all under the minimum area becomes: `review` (default: a
    /// person looks) or `pass`.
    #[serde(default)]
    pub below_min_area: BelowMinArea,
    /// The classes a part is judged against (at least two; `defect = true` marks defects).
    pub classes: Vec<ClassConfig>,
}

/// What a DEFECT under a profile's minimum mask area becomes.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BelowMinArea {
    #[default]
    Review,
    Pass,
}

/// A profile's `feedback`: which operator answers become exemplars, and how many per class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackPolicy {
    pub learn: Learn,
    /// The most exemplars of one class that feedback keeps: past it, the oldest feedback
    /// exemplars of the class are removed (exemplars added with the CLI are never removed).
    pub max_per_class: usize,
}

impl Default for FeedbackPolicy {
    fn default() -> Self {
        Self {
            learn: Learn::Corrections,
            max_per_class: 100,
        }
    }
}

/// Which feedback a profile learns from.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Learn {
    /// Answers that correct the verdict's class, and confirmed REVIEWs (and answers that do
    /// not say what the verdict was).
    #[default]
    Corrections,
    /// Every answer.
    All,
    /// None: feedback is counted and ignored.
    Off,
}

/// A profile's `exemplars`: the whole-frame view's class logits gain Tip-Adapter's cache term
/// `alpha × Σ exp(−beta × (1 − sᵢ))` over the class's `k` nearest exemplars (`k` the smallest
/// count of any class with exemplars; Tip-Adapter's defaults). `clipqc eval --search` finds
/// both on a labelled set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ExemplarWeights {
    /// The exemplars' weight against the text prompts, in logit units (CLIP's logits are 100 ×
    /// cosine; 0: off).
    #[schemars(extend("default" = 1.0))]
    pub alpha: f32,
    /// How sharply similarity counts: at 5.5 a cosine of 0.9 gives 0.58, 0.7 gives 0.19.
    #[schemars(extend("default" = 5.5))]
    pub beta: f32,
}

impl Default for ExemplarWeights {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            beta: 5.5,
        }
    }
}

/// A profile's `states`: WinCLIP's compositional prompt ensemble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatesConfig {
    /// What the camera sees, as the prompts name it: `steel bracket`.
    pub object: String,
    /// States of a good part, each with one `{}` where the object goes.
    #[serde(default = "default_normal_states")]
    pub normal: Vec<String>,
    /// States of a bad part, each with one `{}` where the object goes.
    #[serde(default = "default_anomalous_states")]
    pub anomalous: Vec<String>,
    /// How much of each view's anomaly score comes from the states, in [0, 1]: 1 uses the
    /// states alone, 0 the defect classes alone (the states then change nothing).
    #[serde(default = "default_state_weight")]
    #[schemars(extend("default" = 0.5))]
    pub weight: f32,
}

/// WinCLIP's state words (Jeong et al., 2023, and anomalib's implementation).
fn default_normal_states() -> Vec<String> {
    [
        "{}",
        "flawless {}",
        "perfect {}",
        "unblemished {}",
        "{} without flaw",
        "{} without defect",
        "{} without damage",
    ]
    .map(String::from)
    .to_vec()
}

fn default_anomalous_states() -> Vec<String> {
    [
        "damaged {}",
        "broken {}",
        "{} with flaw",
        "{} with defect",
        "{} with damage",
    ]
    .map(String::from)
    .to_vec()
}

fn default_state_weight() -> f32 {
    0.5
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    /// Identifier written into verdicts and metrics (`surface_scratch`).
    pub name: String,
    /// Display name for people (`表面划痕`); defaults to the name.
    #[serde(default)]
    pub label: Option<String>,
    /// Sentences describing the class; their text embeddings are averaged (a prompt
    /// ensemble).
    pub prompts: Vec<String>,
    /// Whether this class is a defect (DEFECT) or an acceptable state (PASS).
    #[serde(default)]
    pub defect: bool,
    /// For defect classes: at or above this probability the part is a DEFECT even when
    /// another class scores higher; a top-ranked defect under it goes to REVIEW.
    #[serde(default)]
    pub threshold: Option<f32>,
}

impl ClassConfig {
    /// The name people read: the label, else the name.
    pub fn display(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.name)
    }
}

fn default_templates() -> Vec<String> {
    vec!["{}".to_string()]
}

fn default_review_threshold() -> f32 {
    0.6
}

impl crate::preprocess::ProfilePreprocessing for ProfileConfig {
    fn clahe(&self) -> Option<&ClaheSettings> {
        self.clahe.as_ref()
    }

    fn view(&self) -> View {
        self.view
    }

    fn tiles(&self) -> Option<&TileConfig> {
        self.tiles.as_ref()
    }
}

impl ProfileConfig {
    /// The prompts of one class after template expansion, in a stable order.
    pub fn expanded_prompts(&self, class: &ClassConfig) -> Vec<String> {
        self.templates
            .iter()
            .flat_map(|t| class.prompts.iter().map(move |p| t.replace("{}", p)))
            .collect()
    }

    /// The state prompts after template expansion: normal, then anomalous.
    pub fn state_prompts(&self, states: &StatesConfig) -> [Vec<String>; 2] {
        [&states.normal, &states.anomalous].map(|list| {
            self.templates
                .iter()
                .flat_map(|t| {
                    list.iter()
                        .map(move |s| t.replace("{}", &s.replace("{}", &states.object)))
                })
                .collect()
        })
    }

    /// Structural checks (no tokenizer needed): names, prompts, templates, thresholds.
    pub fn validate(&self, profile: &str) -> Result<(), ScoreError> {
        let bad = |message: String| ScoreError::InvalidProfile {
            profile: profile.to_string(),
            message,
        };
        if self.classes.is_empty() {
            return Err(bad("has no classes".into()));
        }
        if self.templates.is_empty() {
            return Err(bad(
                "has an empty template list (use [\"{}\"] for prompts as written)".into(),
            ));
        }
        for t in &self.templates {
            if t.matches("{}").count() != 1 {
                return Err(bad(format!("template {t:?} must contain exactly one {{}}")));
            }
        }
        if let Some(t) = &self.tiles {
            t.validate().map_err(|source| ScoreError::Tiles {
                profile: profile.to_string(),
                source,
            })?;
        }
        if let Some(m) = &self.line_memory {
            m.validate().map_err(|source| ScoreError::LineMemory {
                profile: profile.to_string(),
                source,
            })?;
        }
        let area_rule = self.min_area_mm2.is_some() || self.min_area_pixels.is_some();
        if area_rule && !self.segment {
            return Err(bad(
                "min_area_mm2 and min_area_pixels need segment = true (the area is the mask's)"
                    .into(),
            ));
        }
        if let Some(a) = self.min_area_mm2.filter(|a| !(a.is_finite() && *a > 0.0)) {
            return Err(bad(format!("min_area_mm2 {a} is not a positive number")));
        }
        if let Some(st) = &self.states {
            if st.object.trim().is_empty() {
                return Err(bad("states.object is empty".into()));
            }
            for (key, list) in [("normal", &st.normal), ("anomalous", &st.anomalous)] {
                if list.is_empty() {
                    return Err(bad(format!("states.{key} is empty")));
                }
                if let Some(s) = list.iter().find(|s| s.matches("{}").count() != 1) {
                    return Err(bad(format!(
                        "states.{key}: {s:?} must contain exactly one {{}} (where the object goes)"
                    )));
                }
            }
            if !(0.0..=1.0).contains(&st.weight) {
                return Err(bad(format!(
                    "states.weight {} is not within [0, 1]",
                    st.weight
                )));
            }
        }
        if !(0.0..=1.0).contains(&self.review_threshold) {
            return Err(bad(format!(
                "review_threshold {} is not within [0, 1]",
                self.review_threshold
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.classes {
            if c.name.trim().is_empty() {
                return Err(bad("has a class with an empty name".into()));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(bad(format!("class {:?} appears twice", c.name)));
            }
            if c.prompts.is_empty() || c.prompts.iter().any(|p| p.trim().is_empty()) {
                return Err(bad(format!(
                    "class {:?} needs at least one non-empty prompt",
                    c.name
                )));
            }
            if let Some(t) = c.threshold {
                if !(t > 0.0 && t <= 1.0) {
                    return Err(bad(format!(
                        "class {:?}: threshold {t} is not within (0, 1]",
                        c.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// The seed's five classes, so `classify` works before anyone writes a config.
    pub fn builtin_default() -> Self {
        let class = |name: &str, label: &str, prompts: &[&str], defect: bool| ClassConfig {
            name: name.into(),
            label: Some(label.into()),
            prompts: prompts.iter().map(|s| s.to_string()).collect(),
            defect,
            threshold: None,
        };
        Self {
            templates: vec![
                "a photo of {}.".into(),
                "a close-up photo of {} on a manufactured part.".into(),
            ],
            review_threshold: default_review_threshold(),
            clahe: None,
            view: View::default(),
            tiles: None,
            states: None,
            exemplars: ExemplarWeights::default(),
            feedback: FeedbackPolicy::default(),
            line_memory: None,
            segment: false,
            min_area_mm2: None,
            min_area_pixels: None,
            below_min_area: Default::default(),
            classes: vec![
                class(
                    "surface_scratch",
                    "表面划痕",
                    &["a surface scratch", "a scratched surface"],
                    true,
                ),
                class(
                    "edge_chip",
                    "边缘缺口",
                    &["a chipped edge", "a chip broken off the edge"],
                    true,
                ),
                class(
                    "paint_spot",
                    "油漆斑点",
                    &["a paint spot", "a stain of paint"],
                    true,
                ),
                class(
                    "misassembly",
                    "装配错误",
                    &["a misassembled part", "a wrongly assembled component"],
                    true,
                ),
                class(
                    "good_part",
                    "合格产品",
                    &["a good part", "a flawless clean surface"],
                    false,
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_default_is_valid_and_has_the_seed_classes() {
        let p = ProfileConfig::builtin_default();
        p.validate("default").unwrap();
        let names: Vec<_> = p.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "surface_scratch",
                "edge_chip",
                "paint_spot",
                "misassembly",
                "good_part"
            ]
        );
        assert_eq!(p.classes.iter().filter(|c| c.defect).count(), 4);
    }

    #[test]
    fn templates_expand_every_prompt() {
        let p = ProfileConfig::builtin_default();
        let e = p.expanded_prompts(&p.classes[0]);
        assert_eq!(
            e,
            [
                "a photo of a surface scratch.",
                "a photo of a scratched surface.",
                "a close-up photo of a surface scratch on a manufactured part.",
                "a close-up photo of a scratched surface on a manufactured part.",
            ]
        );
    }

    #[test]
    fn bad_profiles_are_refused_with_the_reason() {
        let mut p = ProfileConfig::builtin_default();
        p.classes.clear();
        assert!(p
            .validate("line7")
            .unwrap_err()
            .to_string()
            .contains("profile \"line7\" has no classes"));
        let mut p = ProfileConfig::builtin_default();
        p.classes[1].name = "surface_scratch".into();
        assert!(p
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        let mut p = ProfileConfig::builtin_default();
        p.templates = vec!["no placeholder".into()];
        assert!(p
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("exactly one {}"));
        let mut p = ProfileConfig::builtin_default();
        p.classes[0].threshold = Some(1.5);
        assert!(p.validate("x").is_err());
        let mut p = ProfileConfig::builtin_default();
        p.classes[2].prompts = vec![" ".into()];
        assert!(p
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("paint_spot"));
    }
}
