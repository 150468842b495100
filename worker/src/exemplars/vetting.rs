//! What a feedback record must be before it may teach the workers: anyone who can write the
//! feedback topic can otherwise relabel defects as good parts, or date an answer in year
//! 9999 so that the per-class trim (oldest first) removes the real ones.
//!
//! Guarantees: a record is refused (with a reason, then dead-lettered like any bad feedback)
//! when it names no operator, or one over [`MAX_OPERATOR_BYTES`] or with control characters;
//! when its `decided_at` is not a valid timestamp, lies more than [`MAX_SKEW`] in the future,
//! or comes before the verdict it answers (`verdict_decided_at`, when the answer carries it);
//! or when its operator already gave `exemplars.feedback_per_operator_hour` answers in the
//! last hour (counted by the worker's clock when handled, not the record's own time, which
//! the writer chooses). The counts take bounded memory: at most [`MAX_OPERATORS`] operators
//! are tracked, the one seen longest ago forgotten first.
//!
//! What this cannot catch: a writer with the topic's credentials who names a real operator
//! and plausible fields. The feedback topic must be writable only by the review stations
//! (Kafka ACLs: docs/deployment.md shows them); vetting bounds the damage of a leak.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use crate::proto::v1::Feedback;

/// An answer dated further ahead than this (clocks of stations and workers differ a little)
/// is refused.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// The longest operator id taken.
pub const MAX_OPERATOR_BYTES: usize = 128;
/// Operators whose recent answers are counted at once.
pub const MAX_OPERATORS: usize = 10_000;
const HOUR: Duration = Duration::from_secs(3600);

/// The answers per operator in the last hour, by this worker.
#[derive(Debug, Default)]
pub struct Vetting {
    recent: HashMap<String, VecDeque<SystemTime>>,
    /// The record last counted: one tried again is not counted twice.
    last: Option<(i32, i64)>,
}

impl Vetting {
    /// Whether `fb` (the record at `at`: partition, offset) may teach, handled at `now`;
    /// `per_hour`: answers one operator may give in an hour (0: no limit). A record taken
    /// counts against its operator, once however often it is tried.
    pub fn check(
        &mut self,
        fb: &Feedback,
        at: (i32, i64),
        now: SystemTime,
        per_hour: usize,
    ) -> Result<(), String> {
        let operator = fb.operator.as_str();
        if operator.trim().is_empty() {
            return Err("no operator: every answer must name who gave it".into());
        }
        if operator.len() > MAX_OPERATOR_BYTES || operator.chars().any(char::is_control) {
            return Err(format!(
                "the operator id is not a name ({} bytes; at most {MAX_OPERATOR_BYTES}, no \
                 control characters)",
                operator.len()
            ));
        }
        if let Some(t) = &fb.decided_at {
            if !(0..1_000_000_000).contains(&t.nanos) || t.seconds < 0 {
                return Err(format!("decided_at is not a valid time ({t:?})"));
            }
            let decided = crate::timestamps::system_time(t);
            if decided > now + MAX_SKEW {
                return Err(format!(
                    "decided_at {} s in the future (at most {} s of clock skew)",
                    decided.duration_since(now).unwrap_or_default().as_secs(),
                    MAX_SKEW.as_secs()
                ));
            }
            if let Some(v) = &fb.verdict_decided_at {
                if decided < crate::timestamps::system_time(v) {
                    return Err("decided_at is before the verdict it answers".into());
                }
            }
        }
        if per_hour == 0 || self.last == Some(at) {
            return Ok(());
        }
        let times = self.recent.entry(operator.to_string()).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t).unwrap_or_default() >= HOUR)
        {
            times.pop_front();
        }
        if times.len() >= per_hour {
            return Err(format!(
                "operator {operator:?} gave {per_hour} answers in the last hour \
                 (exemplars.feedback_per_operator_hour)"
            ));
        }
        times.push_back(now);
        self.last = Some(at);
        if self.recent.len() > MAX_OPERATORS {
            self.forget_one();
        }
        Ok(())
    }

    /// Forget the operator seen longest ago.
    fn forget_one(&mut self) {
        let oldest = self
            .recent
            .iter()
            .min_by_key(|(_, t)| t.back().copied().unwrap_or(SystemTime::UNIX_EPOCH))
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.recent.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use pbjson_types::Timestamp;

    use super::*;

    fn answer(operator: &str, decided_at: Option<(i64, i32)>) -> Feedback {
        Feedback {
            operator: operator.into(),
            decided_at: decided_at.map(|(seconds, nanos)| Timestamp { seconds, nanos }),
            ..Default::default()
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn extreme_and_missing_fields_are_refused_with_a_reason() {
        let now = at(1_800_000_000);
        let mut v = Vetting::default();
        let refused = |v: &mut Vetting, fb: Feedback| v.check(&fb, (0, 0), now, 0).unwrap_err();
        assert!(refused(&mut v, answer("", None)).contains("no operator"));
        assert!(refused(&mut v, answer("  ", None)).contains("no operator"));
        let long = "o".repeat(1 << 20);
        assert!(refused(&mut v, answer(&long, None)).contains("1048576 bytes"));
        assert!(refused(&mut v, answer("ana\u{0}", None)).contains("control"));
        // Year 9999, and a second past the skew.
        for seconds in [253_402_300_799, 1_800_000_000 + 301] {
            let why = refused(&mut v, answer("ana", Some((seconds, 0))));
            assert!(why.contains("in the future"), "{why}");
        }
        for t in [
            (i64::MIN, 0),
            (-1, 0),
            (0, -1),
            (0, 1_000_000_000),
            (i64::MAX, i32::MAX),
        ] {
            let why = refused(&mut v, answer("ana", Some(t)));
            assert!(
                why.contains("not a valid time") || why.contains("future"),
                "{t:?}: {why}"
            );
        }
        let mut before = answer("ana", Some((1_800_000_000 - 60, 0)));
        before.verdict_decided_at = Some(Timestamp {
            seconds: 1_800_000_000 - 30,
            nanos: 0,
        });
        assert!(refused(&mut v, before.clone()).contains("before the verdict"));
        // Taken: now, within the skew, after its verdict, or without a time at all.
        before.decided_at = Some(Timestamp {
            seconds: 1_800_000_000 - 10,
            nanos: 0,
        });
        assert_eq!(v.check(&before, (0, 1), now, 0), Ok(()));
        assert_eq!(
            v.check(
                &answer("ana", Some((1_800_000_000 + 299, 0))),
                (0, 2),
                now,
                0
            ),
            Ok(())
        );
        assert_eq!(v.check(&answer("ana", None), (0, 3), now, 0), Ok(()));
    }

    #[test]
    fn an_operator_over_the_hourly_cap_is_refused_until_the_hour_has_passed() {
        let mut v = Vetting::default();
        for i in 0..3 {
            assert_eq!(
                v.check(&answer("ana", None), (0, i as i64), at(1000 + i), 3),
                Ok(())
            );
        }
        // The last record tried again is not counted again.
        assert_eq!(v.check(&answer("ana", None), (0, 2), at(1005), 3), Ok(()));
        let why = v
            .check(&answer("ana", None), (0, 3), at(1010), 3)
            .unwrap_err();
        assert!(
            why.contains("\"ana\"") && why.contains("3 answers"),
            "{why}"
        );
        // Another operator is not held back by ana.
        assert_eq!(v.check(&answer("bo", None), (0, 4), at(1010), 3), Ok(()));
        // An hour after ana's first answer, one more fits.
        assert_eq!(
            v.check(&answer("ana", None), (0, 5), at(1000 + 3600), 3),
            Ok(())
        );
        assert!(v
            .check(&answer("ana", None), (0, 6), at(1000 + 3600), 3)
            .is_err());
    }

    #[test]
    fn the_counts_stay_bounded_however_many_operators_write() {
        let mut v = Vetting::default();
        for i in 0..MAX_OPERATORS + 500 {
            v.check(
                &answer(&format!("op-{i}"), None),
                (0, i as i64),
                at(i as u64),
                10,
            )
            .unwrap();
        }
        assert_eq!(v.recent.len(), MAX_OPERATORS);
        assert!(
            !v.recent.contains_key("op-0"),
            "the one seen longest ago went first"
        );
    }
}
