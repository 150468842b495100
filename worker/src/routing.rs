//! Camera and line routing: which profile (and region of interest) a request gets when it
//! names none, so cameras need not carry profile names in every message.
//!
//! Guarantees: routes are tried in the config's order and the first whose `camera` and
//! `line` patterns both match wins (a missing pattern matches anything); a request's own
//! `profile` and `region` always win over the route's; a route naming an unknown profile, a
//! bad glob or an empty region is refused at config load, naming the route. Patterns are
//! globs (`cam-*`, `line-[1-3]`, `*`), matched against the whole id, case-sensitively.

use globset::{Glob, GlobMatcher};
use serde::Deserialize;

use crate::preprocess::Region;

/// One row of the `routes` table.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A glob over the request's `camera_id` (`cam-7`, `cam-*`); unset: any camera.
    #[serde(default)]
    pub camera: Option<String>,
    /// A glob over the request's `line_id`; unset: any line.
    #[serde(default)]
    pub line: Option<String>,
    /// The profile of matching requests that name none.
    #[serde(default)]
    pub profile: Option<String>,
    /// The region of interest of matching requests that give none (source pixels, after
    /// EXIF orientation).
    #[serde(default)]
    pub region: Option<Region>,
    /// The camera's calibration: millimetres per source-frame pixel, for mask areas in mm²
    /// (`area_mm2` in verdicts, a profile's `min_area_mm2`). Unset: areas in pixels only.
    #[serde(default)]
    pub mm_per_pixel: Option<f64>,
}

/// Why the `routes` table is refused: each names the route by its position (from 0).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    #[error("routes[{index}].{key} {pattern:?} is not a glob: {source}")]
    NotAGlob {
        index: usize,
        /// `camera` or `line`.
        key: &'static str,
        pattern: String,
        source: globset::Error,
    },
    #[error(
        "routes[{index}] has neither camera nor line: it would match every request (use camera \
         = \"*\" to say so)"
    )]
    MatchesEverything { index: usize },
    #[error("routes[{index}] sets neither profile, region nor mm_per_pixel")]
    SetsNothing { index: usize },
    #[error("routes[{index}].mm_per_pixel {value} is not a positive number")]
    MmPerPixel { index: usize, value: f64 },
    #[error("routes[{index}].profile {profile:?} is not a profile")]
    UnknownProfile { index: usize, profile: String },
    #[error("routes[{index}].region {region:?} is empty")]
    EmptyRegion { index: usize, region: Region },
}

#[derive(Debug, Clone)]
struct Route {
    camera: Option<GlobMatcher>,
    line: Option<GlobMatcher>,
    profile: Option<String>,
    region: Option<Region>,
    mm_per_pixel: Option<f64>,
}

/// The compiled `routes` table.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Compiles `routes`; `known` says whether a profile exists. The error names the route
    /// (by its position, from 0) and what is wrong with it.
    pub fn new(routes: &[RouteConfig], known: impl Fn(&str) -> bool) -> Result<Self, RouteError> {
        let compile = |index: usize, key: &'static str, p: &Option<String>| {
            p.as_deref()
                .map(|p| {
                    Glob::new(p).map(|g| g.compile_matcher()).map_err(|source| {
                        RouteError::NotAGlob {
                            index,
                            key,
                            pattern: p.to_string(),
                            source,
                        }
                    })
                })
                .transpose()
        };
        let routes = routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                if r.camera.is_none() && r.line.is_none() {
                    return Err(RouteError::MatchesEverything { index });
                }
                if r.profile.is_none() && r.region.is_none() && r.mm_per_pixel.is_none() {
                    return Err(RouteError::SetsNothing { index });
                }
                if let Some(value) = r.mm_per_pixel.filter(|m| !(m.is_finite() && *m > 0.0)) {
                    return Err(RouteError::MmPerPixel { index, value });
                }
                if let Some(p) = r.profile.as_deref().filter(|p| !known(p)) {
                    return Err(RouteError::UnknownProfile {
                        index,
                        profile: p.to_string(),
                    });
                }
                if let Some(region) = r.region.filter(|g| g.width == 0 || g.height == 0) {
                    return Err(RouteError::EmptyRegion { index, region });
                }
                Ok(Route {
                    camera: compile(index, "camera", &r.camera)?,
                    line: compile(index, "line", &r.line)?,
                    profile: r.profile.clone(),
                    region: r.region,
                    mm_per_pixel: r.mm_per_pixel,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { routes })
    }

    /// The profile and region for a request from `camera` on `line` that names the given
    /// ones (empty profile, no region: none named).
    pub fn resolve<'a>(
        &'a self,
        camera: &str,
        line: &str,
        profile: &'a str,
        region: Option<Region>,
    ) -> (Option<&'a str>, Option<Region>) {
        let matches = |m: &Option<GlobMatcher>, id: &str| m.as_ref().is_none_or(|m| m.is_match(id));
        let route = self
            .routes
            .iter()
            .find(|r| matches(&r.camera, camera) && matches(&r.line, line));
        let profile = Some(profile)
            .filter(|p| !p.is_empty())
            .or_else(|| route.and_then(|r| r.profile.as_deref()));
        (profile, region.or_else(|| route.and_then(|r| r.region)))
    }

    /// Millimetres per pixel of `camera` on `line`: the first matching route's (the same
    /// route [`Router::resolve`] takes), when it sets one.
    pub fn mm_per_pixel(&self, camera: &str, line: &str) -> Option<f64> {
        let matches = |m: &Option<GlobMatcher>, id: &str| m.as_ref().is_none_or(|m| m.is_match(id));
        self.routes
            .iter()
            .find(|r| matches(&r.camera, camera) && matches(&r.line, line))
            .and_then(|r| r.mm_per_pixel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(camera: Option<&str>, line: Option<&str>, profile: &str) -> RouteConfig {
        RouteConfig {
            camera: camera.map(Into::into),
            line: line.map(Into::into),
            profile: Some(profile.into()),
            region: None,
            mm_per_pixel: None,
        }
    }

    fn router(routes: &[RouteConfig]) -> Router {
        Router::new(routes, |p| ["brackets", "housings", "default"].contains(&p)).unwrap()
    }

    #[test]
    fn the_first_matching_route_wins_and_the_request_wins_over_it() {
        let roi = Region {
            x: 10,
            y: 20,
            width: 300,
            height: 200,
        };
        let mut housing = route(Some("cam-7"), None, "housings");
        housing.region = Some(roi);
        let r = router(&[
            housing,
            route(Some("cam-*"), Some("line-[12]"), "brackets"),
            route(None, Some("line-*"), "default"),
        ]);
        assert_eq!(
            r.resolve("cam-7", "line-1", "", None),
            (Some("housings"), Some(roi))
        );
        assert_eq!(
            r.resolve("cam-3", "line-2", "", None),
            (Some("brackets"), None)
        );
        assert_eq!(
            r.resolve("cam-3", "line-3", "", None),
            (Some("default"), None)
        );
        assert_eq!(
            r.resolve("gate", "dock", "", None),
            (None, None),
            "no route"
        );
        // The request's own profile and region win.
        let own = Region {
            x: 0,
            y: 0,
            width: 5,
            height: 5,
        };
        assert_eq!(
            r.resolve("cam-7", "line-1", "brackets", Some(own)),
            (Some("brackets"), Some(own))
        );
        assert_eq!(
            r.resolve("cam-7", "", "brackets", None),
            (Some("brackets"), Some(roi))
        );
        // Globs match the whole id.
        assert_eq!(r.resolve("cam-77", "x", "", None), (None, None));
    }

    #[test]
    fn bad_routes_are_refused_naming_them() {
        let bad = |routes: &[RouteConfig]| Router::new(routes, |p| p == "brackets").unwrap_err();
        let err = bad(&[route(Some("cam-*"), None, "nope")]);
        assert!(
            matches!(&err, RouteError::UnknownProfile { index: 0, profile } if profile == "nope"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "routes[0].profile \"nope\" is not a profile"
        );
        let err = bad(&[route(Some("cam-["), None, "brackets")]);
        assert!(
            matches!(
                err,
                RouteError::NotAGlob {
                    index: 0,
                    key: "camera",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("routes[0].camera"));
        let err = bad(&[
            route(Some("a"), None, "brackets"),
            route(None, None, "brackets"),
        ]);
        assert!(
            matches!(err, RouteError::MatchesEverything { index: 1 }),
            "{err}"
        );
        assert!(err.to_string().contains("routes[1] has neither"));
        let mut empty = route(Some("a"), None, "brackets");
        empty.region = Some(Region {
            x: 0,
            y: 0,
            width: 0,
            height: 4,
        });
        assert!(bad(&[empty]).to_string().contains("routes[0].region"));
    }
}
