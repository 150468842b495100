//! The consumer's wakeups. rust-rdkafka's stream sleeps until librdkafka's "queue non-empty"
//! callback, which fires only on the queue's empty → non-empty edge; when the edge is missed the
//! stream wakes only on its fallback timer, every `max.poll.interval.ms / 2` (150 s), while the
//! fetched records wait in the queue. That is how a record of eight once never reached a
//! worker for over a minute under load (issue 31: "records: 7 … left 7, right 8").

use super::*;

/// Switch off the "queue non-empty" callback of `consumer`'s queue: every wakeup from
/// librdkafka is lost from now on, deterministically, as one is lost in the race.
fn lose_every_queue_wakeup(consumer: &clipqc::source::Source) {
    use rdkafka::consumer::Consumer as _;
    // SAFETY: the consumer is alive; the handle taken here refers to the same queue as the
    // stream's and is released at once. A null callback turns the queue's event off.
    unsafe {
        let rk = consumer.client().native_ptr();
        let queue = rdkafka::bindings::rd_kafka_queue_get_consumer(rk);
        assert!(!queue.is_null(), "a group consumer has a consumer queue");
        rdkafka::bindings::rd_kafka_queue_cb_event_enable(queue, None, std::ptr::null_mut());
        rdkafka::bindings::rd_kafka_queue_destroy(queue);
    }
}

/// With every queue wakeup lost, records still reach the pipeline: it looks at the queue
/// again every `source::REPOLL` (1 s) by itself. Without that, nothing here would be taken for
/// 150 s (the stream's fallback), far past the bound below, which allows for 6 records at 1 s
/// each plus joining the group, many times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_the_pipeline_when_the_consumer_queue_never_wakes_it() {
    let (_mock, settings, brokers) = cluster("clipqc-no-wakeup");
    let total = 6;
    publish_inline(&brokers, "w", total).await;
    let (owner, model) = slow_model(Duration::ZERO);
    let artifact = Artifact::open(common::tiny_model()).unwrap();
    let deps = deps(&settings, &brokers, &artifact, &model);
    lose_every_queue_wakeup(&deps.consumer);
    let worker = Running::start(deps);
    let verdicts = reader(&brokers, "clipqc.verdicts");
    let seen = collect(&verdicts, total, Duration::from_secs(40)).await;
    let state = worker.state();
    worker.stop().await.unwrap();
    drop(model);
    owner.join();
    assert_eq!(
        seen.by_source.len(),
        total,
        "every record got its verdict; {state}"
    );
    assert_eq!(committed_total(&brokers, "clipqc-no-wakeup"), total as i64);
}
