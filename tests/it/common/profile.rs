//! Profiles for the tests' config files, written as an operator would: `[profiles.NAME]`, its
//! settings, then one `[[profiles.NAME.classes]]` table per class.

use std::path::{Path, PathBuf};

/// A class of a profile.
#[derive(Clone, Copy)]
pub struct Class<'a> {
    pub name: &'a str,
    pub label: Option<&'a str>,
    pub prompts: &'a [&'a str],
    pub defect: bool,
}

/// The defect class most tests use.
pub const SCRATCH: Class = Class {
    name: "scratch",
    label: None,
    prompts: &["a surface scratch"],
    defect: true,
};

/// The one normal class.
pub const GOOD: Class = Class {
    name: "good",
    label: None,
    prompts: &["a clean part"],
    defect: false,
};

/// Another defect class.
pub const DENT: Class = Class {
    name: "dent",
    label: None,
    prompts: &["a dent"],
    defect: true,
};

/// The TOML of profile `name`: its `settings` lines (`tiles = { … }`), then `classes`.
pub fn toml(name: &str, settings: &[&str], classes: &[Class]) -> String {
    let mut out = format!("\n[profiles.{name}]\n");
    for s in settings {
        out.push_str(s);
        out.push('\n');
    }
    for c in classes {
        out.push_str(&format!(
            "[[profiles.{name}.classes]]\nname = \"{}\"\n",
            c.name
        ));
        if let Some(label) = c.label {
            out.push_str(&format!("label = \"{label}\"\n"));
        }
        let prompts: Vec<String> = c.prompts.iter().map(|p| format!("\"{p}\"")).collect();
        out.push_str(&format!("prompts = [{}]\n", prompts.join(", ")));
        if c.defect {
            out.push_str("defect = true\n");
        }
    }
    out
}

/// A config file `file` in `dir` holding `text`; its path.
pub fn config_file(dir: &Path, file: &str, text: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// The tiles of the tests' tiled profiles: the whole frame and windows of half its size
/// overlapping by half (a 250×250 frame: 1 + 1 + 3 × 3 views), every finest window a region.
pub const TILED: &str =
    "tiles = { scales = [1.0, 0.5], overlap = 0.5, max_windows = 16, region_threshold = 0.0 }";

/// [`SCRATCH`] with a label of its own, which verdicts carry.
pub const LABELLED_SCRATCH: Class = Class {
    label: Some("表面划痕"),
    ..SCRATCH
};
