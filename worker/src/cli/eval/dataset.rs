//! The labelled dataset of `clipqc eval`: one sub-folder per label (the usual image-folder
//! layout), images found recursively under each, in a stable (sorted) order.
//!
//! A folder's binary truth, in order: named by `--normal` → normal; named like a profile
//! class (its `name` or its `label`) → that class's `defect` flag; anything else →
//! defective. Files directly in the dataset folder have no label and are skipped, as are
//! hidden files and files that are not images by their extension (counted, logged).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::EvalError;
use crate::score::ProfileConfig;

/// Extensions the decoder reads (`image` with jpeg, png, bmp and tiff).
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "tif", "tiff"];

#[derive(Debug, Clone, PartialEq)]
pub struct Folder {
    pub name: String,
    /// Defective (the positive class of the binary metrics).
    pub defective: bool,
    /// Index of the profile class this folder is named like.
    pub class: Option<usize>,
}

#[derive(Debug)]
pub struct Dataset {
    /// The folder scanned.
    pub root: PathBuf,
    /// By name, sorted.
    pub folders: Vec<Folder>,
    /// (path, index into `folders`), sorted by folder then path.
    pub images: Vec<(PathBuf, usize)>,
    /// Files that are not images (or lie outside any sub-folder), not counted anywhere else.
    pub skipped: Vec<PathBuf>,
}

impl Dataset {
    pub fn scan(
        root: &Path,
        normal: &[String],
        profile: &ProfileConfig,
    ) -> Result<Self, EvalError> {
        if !root.is_dir() {
            return Err(EvalError::NotAFolder(root.to_path_buf()));
        }
        let mut folders = Vec::new();
        let mut skipped = Vec::new();
        let mut names = BTreeMap::new();
        for entry in read_dir_sorted(root)? {
            let name = entry.file_name().map(|n| n.to_string_lossy().into_owned());
            let Some(name) = name.filter(|n| !n.starts_with('.')) else {
                continue;
            };
            if entry.is_dir() {
                names.insert(name, entry);
            } else {
                skipped.push(entry);
            }
        }
        for n in normal {
            if !names.contains_key(n) {
                return Err(EvalError::NoSuchNormal {
                    folder: n.clone(),
                    dataset: root.to_path_buf(),
                    folders: names.keys().cloned().collect(),
                });
            }
        }
        let mut images = Vec::new();
        for (i, (name, path)) in names.into_iter().enumerate() {
            let class = profile
                .classes
                .iter()
                .position(|c| c.name == name || c.label.as_deref() == Some(name.as_str()));
            let is_normal = normal.contains(&name);
            if let (true, Some(c)) = (is_normal, class) {
                if profile.classes[c].defect {
                    return Err(EvalError::NormalIsADefect {
                        folder: name,
                        class: profile.classes[c].name.clone(),
                    });
                }
            }
            let defective = !is_normal && class.is_none_or(|c| profile.classes[c].defect);
            let mut files = Vec::new();
            walk(&path, &mut files, &mut skipped)?;
            images.extend(files.into_iter().map(|f| (f, i)));
            folders.push(Folder {
                name,
                defective,
                class,
            });
        }
        if images.is_empty() {
            return Err(EvalError::NoImages(root.to_path_buf()));
        }
        Ok(Self {
            root: root.to_path_buf(),
            folders,
            images,
            skipped,
        })
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let io = |source| EvalError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut v = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    v.sort();
    Ok(v)
}

fn walk(
    dir: &Path,
    images: &mut Vec<PathBuf>,
    skipped: &mut Vec<PathBuf>,
) -> Result<(), EvalError> {
    for path in read_dir_sorted(dir)? {
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, images, skipped)?;
        } else if is_image(&path) {
            images.push(path);
        } else {
            skipped.push(path);
        }
    }
    Ok(())
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn folders_get_their_truth_and_class() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for f in [
            "good_part/a.jpg",
            "ok/b.PNG",
            "ok/nested/c.bmp",
            "surface_scratch/d.jpg",
            "dent/e.tif",
            "dent/notes.txt",
            "dent/.hidden.jpg",
            "loose.jpg",
        ] {
            touch(&r.join(f));
        }
        let p = ProfileConfig::builtin_default();
        let ds = Dataset::scan(r, &["ok".into()], &p).unwrap();
        let by: BTreeMap<_, _> = ds.folders.iter().map(|f| (f.name.as_str(), f)).collect();
        assert!(!by["good_part"].defective && by["good_part"].class.is_some());
        assert!(!by["ok"].defective && by["ok"].class.is_none());
        assert!(by["surface_scratch"].defective && by["surface_scratch"].class == Some(0));
        assert!(by["dent"].defective && by["dent"].class.is_none());
        assert_eq!(ds.images.len(), 5);
        assert_eq!(ds.skipped.len(), 2, "{:?}", ds.skipped);
    }

    #[test]
    fn refusals_name_the_input() {
        let d = tempfile::tempdir().unwrap();
        let p = ProfileConfig::builtin_default();
        let e = Dataset::scan(&d.path().join("nope"), &[], &p).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        touch(&d.path().join("good/readme.txt"));
        let e = Dataset::scan(d.path(), &[], &p).unwrap_err();
        assert!(matches!(e, EvalError::NoImages(_)), "{e}");
        let e = Dataset::scan(d.path(), &["god".into()], &p).unwrap_err();
        assert!(
            e.to_string().contains("\"god\"") && e.to_string().contains("good"),
            "{e}"
        );
        touch(&d.path().join("edge_chip/a.jpg"));
        let e = Dataset::scan(d.path(), &["edge_chip".into()], &p).unwrap_err();
        assert!(matches!(e, EvalError::NormalIsADefect { .. }), "{e}");
    }
}
