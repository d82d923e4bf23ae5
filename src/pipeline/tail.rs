//! Watching the state topic after the rebuild, for as long as a partition is ours: the second line
//! of fencing, for when the consumer group alone does not keep one owner per partition (a zombie
//! replica that lost its session but still works off what it fetched, or a broker that assigned a
//! partition twice; docs/kafka-broker.md shows the test broker doing that).
//!
//! - A **claim** by another replica for a partition we work on means we were replaced: the
//!   partition is fenced here at once ([`Control::Fenced`]): its work is stale, nothing more of it
//!   is sent, it is paused until the group assigns it again.
//! - A **block record** by another replica is taken into our state: a key we are sending right now
//!   becomes *contested*, and the batch asks the gateways instead of sending it.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{error, warn};

use super::rebuild::{decode, StateMessage};
use super::{Control, Shared};

/// What the watch is told: watch a partition from an offset, knowing the offset of our own
/// claim on it (only a later claim replaces us); or stop.
pub enum Watch {
    From {
        partition: i32,
        offset: i64,
        own_claim: i64,
    },
    Stop(i32),
}

/// Starts the watch in a thread of its own; it ends when the returned sender is dropped.
pub fn start(
    shared: Arc<Shared>,
    control: tokio::sync::mpsc::UnboundedSender<Control>,
) -> mpsc::Sender<Watch> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("samgate-state-watch".into())
        .spawn(move || watch(&shared, &control, &rx))
        .expect("a thread");
    tx
}

fn watch(
    shared: &Shared,
    control: &tokio::sync::mpsc::UnboundedSender<Control>,
    commands: &mpsc::Receiver<Watch>,
) {
    let config = &shared.config;
    let topic = &config.kafka.topics.state;
    let reader: BaseConsumer = match crate::kafka::base_config(&config.kafka)
        .set("group.id", format!("{}-state-watch", config.run.group_id))
        .set("enable.auto.commit", "false")
        // A claim must be seen within milliseconds, not at the end of a long poll.
        .set("fetch.wait.max.ms", "10")
        .create()
    {
        Ok(reader) => reader,
        Err(e) => {
            return error!(error = %e, "cannot watch the state topic; fencing rests on the group alone")
        }
    };
    // Per partition: the next offset to read, and our own claim's offset.
    let mut watched: HashMap<i32, (i64, i64)> = HashMap::new();
    let mut changed = false;
    loop {
        loop {
            match commands.try_recv() {
                Ok(Watch::From {
                    partition,
                    offset,
                    own_claim,
                }) => {
                    watched.insert(partition, (offset, own_claim));
                    changed = true;
                }
                Ok(Watch::Stop(p)) => changed |= watched.remove(&p).is_some(),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        }
        if changed {
            let mut list = TopicPartitionList::new();
            for (&p, &(offset, _)) in &watched {
                let _ = list.add_partition_offset(topic, p, Offset::Offset(offset));
            }
            if let Err(e) = reader.assign(&list) {
                warn!(error = %e, "cannot watch the state topic's partitions");
            }
            changed = false;
        }
        if watched.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let Some(Ok(message)) = reader.poll(Duration::from_millis(100)) else {
            continue;
        };
        let p = message.partition();
        let Some((next, own_claim)) = watched.get_mut(&p) else {
            continue;
        };
        *next = message.offset() + 1;
        let newer_than_ours = message.offset() > *own_claim;
        match decode(&message) {
            StateMessage::Claim(claim) if claim.replica != shared.replica && newer_than_ours => {
                watched.remove(&p);
                changed = true;
                let _ = control.send(Control::Fenced(p, claim.replica));
            }
            StateMessage::Block(record)
                if record.writer.as_deref() != Some(&shared.replica)
                    && shared.ownership.claim(p).is_some() =>
            {
                let mut state = shared.state.lock().expect("state");
                state.foreign(p, &record, Utc::now());
            }
            _ => {}
        }
    }
}
