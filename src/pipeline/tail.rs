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

/// Starts the watch in a thread of its own; it ends when every returned sender is dropped (join
/// the handle then: its Kafka reader goes with it).
pub fn start(
    shared: Arc<Shared>,
    control: tokio::sync::mpsc::UnboundedSender<Control>,
) -> (mpsc::Sender<Watch>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("samgate-state-watch".into())
        .spawn(move || watch(&shared, &control, &rx))
        .expect("a thread");
    (tx, thread)
}

/// The partitions watched: per partition, the next offset to read and our own claim's offset.
#[derive(Default)]
struct Watched {
    partitions: HashMap<i32, (i64, i64)>,
    /// The reader's assignment must be redone.
    changed: bool,
}

impl Watched {
    /// Takes the commands waiting; false once the pipeline is gone.
    fn take(&mut self, commands: &mpsc::Receiver<Watch>) -> bool {
        loop {
            match commands.try_recv() {
                Ok(Watch::From {
                    partition,
                    offset,
                    own_claim,
                }) => {
                    self.partitions.insert(partition, (offset, own_claim));
                    self.changed = true;
                }
                Ok(Watch::Stop(p)) => self.changed |= self.partitions.remove(&p).is_some(),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Points the reader at the partitions, each from its next offset.
    fn assign(&mut self, reader: &BaseConsumer, topic: &str) {
        if !self.changed {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (&p, &(offset, _)) in &self.partitions {
            let _ = list.add_partition_offset(topic, p, Offset::Offset(offset));
        }
        if let Err(e) = reader.assign(&list) {
            warn!(error = %e, "cannot watch the state topic's partitions");
        }
        self.changed = false;
    }
}

fn watch(
    shared: &Shared,
    control: &tokio::sync::mpsc::UnboundedSender<Control>,
    commands: &mpsc::Receiver<Watch>,
) {
    let config = &shared.config;
    let reader: BaseConsumer = match crate::kafka::base_config(&config.kafka)
        .set("group.id", format!("{}-state-watch", config.run.group_id))
        .set("enable.auto.commit", "false")
        // A claim must be seen well within CLAIM_GRACE, not at the end of a long poll; but every
        // fetch costs the broker a read of each watched partition (tansu answers a fetch only
        // after its wait), so not every few milliseconds either.
        .set("fetch.wait.max.ms", "200")
        .create()
    {
        Ok(reader) => reader,
        Err(e) => {
            return error!(error = %e, "cannot watch the state topic; fencing rests on the group alone")
        }
    };
    let mut watched = Watched::default();
    while watched.take(commands) {
        watched.assign(&reader, &config.kafka.topics.state);
        if watched.partitions.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if let Some(Ok(message)) = reader.poll(Duration::from_millis(100)) {
            read(shared, control, &mut watched, &message);
        }
    }
}

/// One state-topic message of a watched partition: another replica's claim after ours fences
/// the partition; another replica's block record goes into our state.
fn read(
    shared: &Shared,
    control: &tokio::sync::mpsc::UnboundedSender<Control>,
    watched: &mut Watched,
    message: &impl Message,
) {
    let p = message.partition();
    let Some((next, own_claim)) = watched.partitions.get_mut(&p) else {
        return;
    };
    *next = message.offset() + 1;
    let newer_than_ours = message.offset() > *own_claim;
    match decode(message) {
        StateMessage::Claim(claim) if claim.replica != shared.replica && newer_than_ours => {
            watched.partitions.remove(&p);
            watched.changed = true;
            let _ = control.send(Control::Fenced(p, claim.replica));
        }
        // Ownership is asked under the state's lock, which a revoke takes to drop the
        // partition's entries: nothing is added for a partition gone meanwhile.
        StateMessage::Block(record) if record.writer.as_deref() != Some(&shared.replica) => {
            let mut state = shared.state.lock().expect("state");
            if shared.ownership.claim(p).is_some() {
                state.foreign(p, &record, Utc::now());
            }
        }
        StateMessage::Exemption(record) if record.writer.as_deref() != Some(&shared.replica) => {
            let mut state = shared.state.lock().expect("state");
            if shared.ownership.claim(p).is_some() {
                state.load_exemption(p, &record);
            }
        }
        _ => {}
    }
}
