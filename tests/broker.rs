//! The test broker behaves like Kafka where samgate depends on it: a consumer group resumes inside
//! a multi-record batch, and a restart keeps messages, committed offsets and groups.
//! (docs/kafka-broker.md says what the broker does and does not do.)

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// Produces `count` records to partition 0 of `topic` in one record batch (they are all queued
/// before the producer's linger ends), and waits for their acknowledgement.
fn produce_one_batch(brokers: &str, topic: &str, count: usize) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "1000")
        .set("batch.num.messages", "10000")
        .create()
        .unwrap();
    for i in 0..count {
        let payload = format!("record {i}");
        producer
            .send(
                BaseRecord::to(topic)
                    .partition(0)
                    .key("k")
                    .payload(&payload),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

fn group_consumer(brokers: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap()
}

/// Commits `offset` for partition 0 of `topic` in `group`, as a consumer that stopped there.
fn commit(brokers: &str, group: &str, topic: &str, offset: i64) {
    let consumer = group_consumer(brokers, group);
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    consumer.commit(&list, CommitMode::Sync).unwrap();
}

/// The offsets a group member receives from partition 0 of `topic` until `count` arrived (or a
/// minute passed).
fn receive(brokers: &str, group: &str, topic: &str, count: usize) -> Vec<i64> {
    let consumer = group_consumer(brokers, group);
    consumer.subscribe(&[topic]).unwrap();
    let mut offsets = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while offsets.len() < count && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => offsets.push(m.offset()),
            Some(Err(e)) => panic!("consume error: {e}"),
            None => {}
        }
    }
    offsets
}

fn create_topic_at(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = runtime
        .block_on(admin.create_topics(
            [&NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        ))
        .unwrap();
    results[0].as_ref().expect("topic created");
}

#[test]
fn a_group_resuming_inside_a_record_batch_receives_the_rest_of_it() {
    let brokers = brokers();
    let topic = unique("batch");
    create_topic_at(&brokers, &topic);
    produce_one_batch(&brokers, &topic, 10);
    let group = unique("group");
    commit(&brokers, &group, &topic, 5);
    assert_eq!(
        receive(&brokers, &group, &topic, 5),
        vec![5, 6, 7, 8, 9],
        "a member resumes at the committed offset, in the middle of the batch"
    );
}

#[test]
fn a_broker_restart_keeps_messages_committed_offsets_and_groups() {
    let broker = OwnBroker::start();
    let brokers = broker.address();
    let topic = unique("restart");
    create_topic_at(&brokers, &topic);
    produce_one_batch(&brokers, &topic, 10);
    produce_one_batch(&brokers, &topic, 10);
    let group = unique("group");
    assert_eq!(receive(&brokers, &group, &topic, 20).len(), 20);
    commit(&brokers, &group, &topic, 13);

    broker.restart();

    assert_eq!(
        receive(&brokers, &group, &topic, 7),
        (13..20).collect::<Vec<i64>>(),
        "the group resumes where it committed before the restart"
    );
    let everything = receive(&brokers, &unique("reader"), &topic, 20);
    assert_eq!(
        everything,
        (0..20).collect::<Vec<i64>>(),
        "every message kept"
    );
}
