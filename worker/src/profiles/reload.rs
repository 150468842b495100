//! Watching the config file and applying its profile and route changes while the worker runs.
//!
//! How it watches: it polls. Every `pipeline.config_reload_ms` (default 2000; 0: off) a
//! thread of its own reads the file and compares the SHA-256 of its bytes with the last one
//! it saw; only different bytes are parsed, and exactly those bytes: the file is never read
//! a second time for parsing, since an editor or `cp` saving in place can leave it different
//! (or half written) between two reads. New bytes must also read the same a moment later
//! ([`Reloader::settle`]: a quarter of the period, at most 250 ms) before they are parsed, so a
//! save still being written is looked at again at the next poll rather than applied. Polling, rather than inotify (`notify`), because
//! a Kubernetes ConfigMap changes by swapping a symlink in the mounted directory, which a
//! watch on the file itself never sees, and because it works alike on every filesystem
//! (overlay, NFS, a bind mount from a laptop) with no new dependency; reading a few kilobytes
//! every two seconds costs nothing next to inference.
//!
//! What it applies: `profiles` (a profile whose version changed, or a new one, is built and
//! its prompts embedded; unchanged ones are kept as they are, embeddings included; one no
//! longer in the file is removed) and `routes`. Every other key (kafka, model, batch, …)
//! takes a restart: a change there is logged once as a warning naming the keys, shown by
//! `clipqc_config_restart_pending`, and the worker goes on with the values it started with.
//! A file that cannot be read, does not load or validate, or whose changed profiles cannot be
//! built (a prompt too long for the tokenizer, the model failing) is refused whole: one log
//! line naming the problem per distinct problem, `clipqc_profile_reload_failures_total`, and
//! the catalog in service untouched. So is a file that defines no profile at all while
//! profiles of the file are in service (reason `emptied`): an empty or truncated TOML parses
//! as a valid config with only the built-in profile, and applying it would send every line to
//! that profile and clear the routes. To remove every profile on purpose, restart.
//!
//! Reading and validating the file is the caller's ([`Load`]: `clipqc run` gives the
//! settings' own loader, so a change is checked exactly as at start): this module sees the
//! config only as profiles and routes, and stays below the module that gathers it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::Digest;

use super::{Builder, Catalog, Live};
use crate::metrics;
use crate::model::{Manifest, ModelHandle, PromptTokenizer};
use crate::preprocess::PreprocessSettings;
use crate::routing::{RouteConfig, Router};
use crate::score::ProfileConfig;

/// Sends the exemplar follower the profiles in service after a change (it re-indexes the
/// bank by their classes).
pub type BankUpdates = std::sync::mpsc::Sender<HashMap<String, ProfileConfig>>;

/// What the reloader applies from the config file: every profile (the built-in default
/// included), the routes, and the router compiled from them, all validated.
pub struct Definitions {
    pub profiles: BTreeMap<String, ProfileConfig>,
    pub routes: Vec<RouteConfig>,
    pub router: Router,
    /// The file's own values (no environment, no defaults), as JSON: keys that take a
    /// restart are compared on these.
    pub file: Value,
}

/// Parses the config file's contents (the text read from the path given, in the format its
/// name says) into [`Definitions`], or says why they do not load or validate (the refusal's
/// message is its error's). It must not read the file again: the text is what was hashed.
/// Given by the caller, which knows the whole config (`clipqc run` hands over the settings'
/// own loader, environment included), so that this module needs no more of the config than
/// profiles and routes.
pub type Load = Box<dyn Fn(&Path, &str) -> Result<Definitions, LoadError> + Send>;

/// Why [`Load`] refused the file: the loader's own error (the settings' `ConfigError` for
/// `clipqc run`: `downcast_ref` it), which this module, below the config, cannot name.
pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

/// What the reloader needs of the worker's config: how to read the file, and what the worker
/// started with.
pub struct Source {
    pub load: Load,
    /// Restart-only: profiles are always built with the settings the worker started with.
    pub preprocess: PreprocessSettings,
    /// The routes in service at start.
    pub routes: Vec<RouteConfig>,
}

/// What one look at the file found.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked {
    /// The same bytes as last time, or nothing that changes the catalog.
    Unchanged,
    /// A new catalog is in service.
    Applied(Applied),
    /// Refused: the catalog in service stays. `reason` is the metric label.
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// What an applied change changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Profiles built anew: (name, old version or empty for a new profile, new version).
    pub changed: Vec<(String, String, String)>,
    pub removed: Vec<String>,
    pub routes: bool,
    pub took: Duration,
}

/// Applies the config file's profile and route changes to a [`Live`] catalog.
pub struct Reloader {
    path: PathBuf,
    manifest: Manifest,
    tokenizer: PromptTokenizer,
    model: ModelHandle,
    load: Load,
    /// Restart-only: profiles are always built with the settings the worker started with.
    preprocess: PreprocessSettings,
    live: Live,
    bank: Option<BankUpdates>,
    /// The file's routes in service.
    routes: Vec<RouteConfig>,
    /// The file as parsed when the worker started: restart-only keys are compared with it.
    started_with: Value,
    /// The SHA-256 of the bytes last looked at.
    seen: Option<[u8; 32]>,
    /// How long new bytes must stay the same before they are parsed.
    settle: Duration,
    /// The last problem logged, so a file left broken is logged and counted once.
    last_problem: Option<String>,
    restart_pending: Vec<String>,
}

impl Reloader {
    /// `source` is how the worker's config is read, and what it held when loaded from `path`
    /// at start; `live` is the worker's catalog.
    pub fn new(
        path: PathBuf,
        source: Source,
        manifest: Manifest,
        tokenizer: PromptTokenizer,
        model: ModelHandle,
        live: Live,
    ) -> Self {
        let started_with = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| (source.load)(&path, &text).ok())
            .map_or(Value::Null, |d| d.file);
        metrics::config_restart_pending(false);
        Self {
            path,
            manifest,
            tokenizer,
            model,
            load: source.load,
            preprocess: source.preprocess,
            live,
            bank: None,
            routes: source.routes,
            started_with,
            // Not the file's hash at start: the first look parses it, so a change made while
            // the worker was loading is not missed.
            seen: None,
            settle: Duration::ZERO,
            last_problem: None,
            restart_pending: Vec::new(),
        }
    }

    /// Tell the exemplar follower of each applied change.
    pub fn with_bank(mut self, updates: BankUpdates) -> Self {
        self.bank = Some(updates);
        self
    }

    /// New bytes are parsed only if the file reads the same again after `settle` (the
    /// [`Watcher`] sets a quarter of its period, at most 250 ms; zero: at once).
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// The keys in the file that differ from the start's and take a restart.
    pub fn restart_pending(&self) -> &[String] {
        &self.restart_pending
    }

    /// Look at the file once and apply what changed. Blocking: parses, embeds prompts.
    pub fn check(&mut self) -> Checked {
        let settle = self.settle;
        self.check_settling(|| {
            if !settle.is_zero() {
                std::thread::sleep(settle)
            }
        })
    }

    /// [`Self::check`], with `settle` run between the read and the second read that new bytes
    /// must match (the tests land a save there).
    pub(crate) fn check_settling(&mut self, settle: impl FnOnce()) -> Checked {
        let checked = match std::fs::read(&self.path) {
            Err(e) => Checked::Refused {
                reason: "unreadable",
                message: format!("cannot read {}: {e}", self.path.display()),
            },
            Ok(bytes) => {
                let hash: [u8; 32] = sha2::Sha256::digest(&bytes).into();
                if self.seen == Some(hash) {
                    return Checked::Unchanged;
                }
                settle();
                if std::fs::read(&self.path).ok().as_deref() != Some(&bytes[..]) {
                    // Still being written: not marked seen, so the next poll looks again.
                    tracing::debug!(file = %self.path.display(),
                        "config file changing while read: looking again at the next poll");
                    return Checked::Unchanged;
                }
                self.seen = Some(hash);
                match String::from_utf8(bytes) {
                    Ok(text) => self.apply(&text),
                    Err(e) => Checked::Refused {
                        reason: "invalid",
                        message: format!("{}: not UTF-8 text: {e}", self.path.display()),
                    },
                }
            }
        };
        self.report(&checked);
        checked
    }

    fn report(&mut self, checked: &Checked) {
        match checked {
            Checked::Unchanged => self.last_problem = None,
            Checked::Applied(a) => {
                self.last_problem = None;
                let changed: Vec<String> = a
                    .changed
                    .iter()
                    .map(|(name, old, new)| match old.as_str() {
                        "" => format!("{name} (new) {new}"),
                        old => format!("{name} {old}→{new}"),
                    })
                    .collect();
                tracing::info!(file = %self.path.display(), ?changed, removed = ?a.removed,
                    routes = a.routes, seconds = a.took.as_secs_f64(),
                    "profiles reloaded: records started from now on use them");
                metrics::profile_reloaded(a.took);
            }
            Checked::Refused { reason, message } => {
                if self.last_problem.as_deref() == Some(message) {
                    return;
                }
                self.last_problem = Some(message.clone());
                tracing::error!(file = %self.path.display(), reason, problem = %message,
                    "config change refused: the profiles in service stay as they were");
                metrics::profile_reload_failed(reason);
            }
        }
    }

    fn apply(&mut self, text: &str) -> Checked {
        let started = Instant::now();
        let refused = |reason, message| Checked::Refused { reason, message };
        let loaded = match (self.load)(&self.path, text) {
            Ok(d) => d,
            Err(e) => return refused("invalid", e.to_string()),
        };
        let current = self.live.load_full();
        let builtin = super::version(&ProfileConfig::builtin_default());
        let in_service = current
            .profiles
            .values()
            .filter(|p| p.version != builtin)
            .count();
        let defined = loaded
            .profiles
            .values()
            .filter(|c| super::version(c) != builtin);
        if in_service > 0 && defined.count() == 0 {
            return refused(
                "emptied",
                format!(
                    "the file defines no profile ({in_service} in service): an empty or \
                     half-written save? To remove every profile, restart the worker"
                ),
            );
        }
        self.warn_restart_keys(&loaded.file);
        let builder = Builder {
            manifest: &self.manifest,
            tokenizer: &self.tokenizer,
            model: &self.model,
            preprocess: &self.preprocess,
        };
        let mut profiles = HashMap::new();
        let mut applied = Applied::default();
        for (name, config) in &loaded.profiles {
            let version = super::version(config);
            let old = current.profiles.get(name);
            if let Some(p) = old.filter(|p| p.version == version) {
                profiles.insert(name.clone(), p.clone());
                continue;
            }
            // Built whole before anything is swapped: a failure leaves the catalog as it was.
            match builder.build(name, config) {
                Ok(p) => {
                    let old = old.map(|p| p.version.clone()).unwrap_or_default();
                    applied.changed.push((name.clone(), old, version));
                    profiles.insert(name.clone(), Arc::new(p));
                }
                Err(e) => return refused("build", format!("profile {name:?}: {e:#}")),
            }
        }
        applied.removed = current
            .profiles
            .keys()
            .filter(|n| !profiles.contains_key(*n))
            .cloned()
            .collect();
        applied.removed.sort();
        applied.routes = loaded.routes != self.routes;
        if applied.changed.is_empty() && applied.removed.is_empty() && !applied.routes {
            return Checked::Unchanged;
        }
        let Definitions {
            profiles: configs,
            routes,
            router,
            file: _,
        } = loaded;
        self.live.store(Arc::new(Catalog { profiles, router }));
        applied.took = started.elapsed();
        for (name, old, new) in &applied.changed {
            if !old.is_empty() {
                metrics::profile_version(name, old, false);
            }
            metrics::profile_version(name, new, true);
        }
        for name in &applied.removed {
            metrics::profile_version(name, &current.profiles[name].version, false);
        }
        self.routes = routes;
        if let Some(bank) = &self.bank {
            // The follower may have stopped (shutdown): nothing left to re-index then.
            let _ = bank.send(configs.into_iter().collect());
        }
        Checked::Applied(applied)
    }

    /// Warn (once per set of keys) when keys that take a restart differ from the start's.
    fn warn_restart_keys(&mut self, now: &Value) {
        let keys = restart_keys(&self.started_with, now);
        if keys == self.restart_pending {
            return;
        }
        if !keys.is_empty() {
            tracing::warn!(file = %self.path.display(), keys = ?keys,
                "these settings changed in the config file but take a restart: the worker goes on with the values it started with");
        }
        metrics::config_restart_pending(!keys.is_empty());
        self.restart_pending = keys;
    }
}

/// Keys outside `profiles` and `routes` whose values differ, as `section.key` (or `section`
/// for a section added or removed whole), sorted.
pub fn restart_keys(old: &Value, new: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (old, new) = (
        old.as_object().unwrap_or(&empty),
        new.as_object().unwrap_or(&empty),
    );
    let mut sections: Vec<&String> = old.keys().chain(new.keys()).collect();
    sections.sort();
    sections.dedup();
    let mut keys = Vec::new();
    for s in sections {
        if s == "profiles" || s == "routes" {
            continue;
        }
        match (old.get(s), new.get(s)) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => {
                let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
                names.sort();
                names.dedup();
                keys.extend(
                    names
                        .into_iter()
                        .filter(|k| a.get(*k) != b.get(*k))
                        .map(|k| format!("{s}.{k}")),
                );
            }
            (a, b) if a != b => keys.push(s.clone()),
            _ => {}
        }
    }
    keys
}

/// The reloader's thread, polling the file; stopped and joined when dropped.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Look at the file every `every` on a thread of its own (the embedding calls block).
    pub fn spawn(reloader: Reloader, every: Duration) -> std::io::Result<Self> {
        let mut reloader = reloader.settle((every / 4).min(Duration::from_millis(250)));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("clipqc-config".into())
            .spawn(move || {
                tracing::info!(file = %reloader.path.display(), every = ?every,
                    "watching the config file for profile and route changes");
                let tick = Duration::from_millis(50).min(every);
                let mut next = Instant::now() + every;
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    if Instant::now() >= next {
                        reloader.check();
                        next = Instant::now() + every;
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
