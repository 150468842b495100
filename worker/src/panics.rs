//! Caught panics as text. A module of its own, below every stage: the pipeline, the feedback
//! loop and the SAM thread each catch panics, and none of them should import another stage
//! for this.

/// The text of a caught panic (`panic!` with a literal or a formatted message).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
