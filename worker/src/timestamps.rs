//! Protobuf timestamps (`google.protobuf.Timestamp`, as requests, verdicts, feedback and
//! exemplars carry them) to `SystemTime` and back. A module of its own, below every stage:
//! the stages that convert a timestamp (notify, the feedback loop, the pipeline) need nothing
//! else of `verdict`, and importing it for this would tie them to everything it imports.
//!
//! Guarantees: neither direction panics, whatever the timestamp holds (see each function).

use std::time::{Duration, SystemTime};

/// A protobuf timestamp as a `SystemTime`: negative parts clamp to the epoch, and one past
/// what the platform holds to the latest time it holds (requests' timestamps are validated;
/// this never panics either way).
pub fn system_time(t: &pbjson_types::Timestamp) -> SystemTime {
    let since_epoch = Duration::new(t.seconds.max(0) as u64, 0)
        .saturating_add(Duration::from_nanos(t.nanos.max(0) as u64));
    SystemTime::UNIX_EPOCH
        .checked_add(since_epoch)
        .unwrap_or_else(|| SystemTime::UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 / 2))
}

/// A `SystemTime` as a protobuf timestamp (before the epoch: the epoch).
pub fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_timestamps_convert_without_panicking() {
        use pbjson_types::Timestamp;
        for (seconds, nanos) in [
            (i64::MAX, i32::MAX),
            (i64::MIN, i32::MIN),
            (253402300799, 999_999_999),
        ] {
            let t = system_time(&Timestamp { seconds, nanos });
            assert!(t >= SystemTime::UNIX_EPOCH);
        }
    }
}
