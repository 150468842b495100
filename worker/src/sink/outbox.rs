//! The exactly-once outbox: finished records' verdicts and dead letters, held until the
//! transaction that also commits their input offsets.
//!
//! Guarantee: [`Outbox::take`] hands out, for each partition, exactly the records of the
//! offsets from the last committed position up to the partition's current position (every
//! offset below it is done: see [`crate::offsets`]), each offset once, in offset order. A
//! transaction that writes what `take` gave and commits those positions therefore makes
//! visible exactly the verdicts of the input records it marks consumed: a crash before the
//! commit shows none of them (the next owner redoes them all), a crash after shows all of
//! them and none is redone. Records finished out of order wait here until the records
//! before them are done. A record of an offset already committed (a consumer that rewound)
//! is dropped, and a second copy of an offset replaces the first, so no offset is written
//! twice.
//!
//! Records are kept by assignment epoch (see [`crate::offsets::Ledger`]): a partition
//! assigned anew starts from nothing, and a straggler of an earlier assignment is dropped,
//! also one that finishes after its partition left this worker ([`Outbox::forget`] keeps the
//! partition's epoch floor): staged, it would re-create the partition at its old epoch and
//! hold its record slot for ever, since no transaction of this worker commits that
//! partition again.

use std::collections::{BTreeMap, HashMap};

use crate::offsets::Partition;

/// A record to write, owned (it waits here for its transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OwnedRecord {
    /// Bytes it takes in a produce request, near enough to compare with a size limit.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + 64
    }
}

/// What one input record publishes: its verdict (and dead letter), and what to publish
/// instead if the broker refuses those for good (a small ERROR verdict and a dead letter
/// without the payload), so a refusal costs the record its details, not its answer.
#[derive(Debug)]
pub struct Staged {
    pub records: Vec<OwnedRecord>,
    pub fallback: Vec<OwnedRecord>,
    /// The records were refused: publish the fallback.
    pub on_fallback: bool,
    /// Released when the records are committed or dropped: the pipeline's record slot, so
    /// records waiting for their transaction count as in flight and a stalled broker pauses
    /// the intake instead of filling the outbox.
    pub hold: Option<Hold>,
}

/// Anything held while a record waits here.
pub struct Hold(pub Box<dyn std::any::Any + Send>);

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}

impl Staged {
    pub fn current(&self) -> &[OwnedRecord] {
        if self.on_fallback {
            &self.fallback
        } else {
            &self.records
        }
    }
}

#[derive(Debug, Default)]
struct Part {
    epoch: u64,
    /// The partition left this worker: records of assignments up to `epoch` are dropped.
    retired: bool,
    staged: BTreeMap<i64, Staged>,
    /// Every offset below is done.
    position: Option<i64>,
    /// The position the last successful transaction committed.
    committed: Option<i64>,
}

/// One partition's share of a transaction.
#[derive(Debug)]
pub struct PartBatch {
    pub partition: Partition,
    pub epoch: u64,
    /// The input position the transaction commits for the partition.
    pub position: i64,
    /// The records of the offsets below `position` not committed before, in offset order.
    pub records: Vec<(i64, Staged)>,
}

/// What one transaction writes and commits.
#[derive(Debug, Default)]
pub struct Batch {
    pub parts: Vec<PartBatch>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Input records (offsets with records) the transaction answers.
    pub fn answered(&self) -> usize {
        self.parts.iter().map(|p| p.records.len()).sum()
    }
}

#[derive(Debug, Default)]
pub struct Outbox {
    parts: HashMap<Partition, Part>,
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// The partition's state for assignment `epoch`: `None` for a straggler of an earlier
    /// assignment; a later assignment starts afresh.
    fn part(&mut self, p: &Partition, epoch: u64) -> Option<&mut Part> {
        let part = self.parts.entry(p.clone()).or_default();
        if epoch < part.epoch || (epoch == part.epoch && part.retired) {
            return None;
        }
        if epoch > part.epoch {
            *part = Part {
                epoch,
                ..Part::default()
            };
        }
        Some(part)
    }

    /// The record at `offset` is finished: what it publishes.
    pub fn stage(&mut self, p: &Partition, epoch: u64, offset: i64, staged: Staged) {
        let Some(part) = self.part(p, epoch) else {
            return;
        };
        if part.committed.is_some_and(|c| offset < c) {
            // Delivered again after its transaction committed: already answered.
            return;
        }
        part.staged.insert(offset, staged);
    }

    /// Every offset of `p` below `position` is done (the ledger's position, never lower than
    /// before).
    pub fn advance(&mut self, p: &Partition, epoch: u64, position: i64) {
        if let Some(part) = self.part(p, epoch) {
            part.position = Some(part.position.map_or(position, |q| q.max(position)));
        }
    }

    /// What the next transaction writes and commits: of `only` (or every partition), those
    /// whose position moved since their last commit. The records leave the outbox;
    /// [`Self::restore`] puts them back if the transaction fails.
    pub fn take(&mut self, only: Option<&[Partition]>) -> Batch {
        let mut parts = Vec::new();
        for (p, part) in &mut self.parts {
            if only.is_some_and(|only| !only.contains(p)) {
                continue;
            }
            let Some(position) = part.position else {
                continue;
            };
            if part.committed.is_some_and(|c| c >= position) {
                continue;
            }
            let later = part.staged.split_off(&position);
            let ready = std::mem::replace(&mut part.staged, later);
            let from = part.committed.unwrap_or(i64::MIN);
            parts.push(PartBatch {
                partition: p.clone(),
                epoch: part.epoch,
                position,
                records: ready.into_iter().filter(|(o, _)| *o >= from).collect(),
            });
        }
        parts.sort_by(|a, b| a.partition.cmp(&b.partition));
        Batch { parts }
    }

    /// The transaction of `batch` failed: its records wait for the next one (unless their
    /// partition was assigned anew meanwhile). A copy staged since wins: it is the newer.
    pub fn restore(&mut self, batch: Batch) {
        for b in batch.parts {
            let Some(part) = self
                .parts
                .get_mut(&b.partition)
                .filter(|x| x.epoch == b.epoch)
            else {
                continue;
            };
            for (offset, staged) in b.records {
                part.staged.entry(offset).or_insert(staged);
            }
        }
    }

    /// The transaction of `batch` committed.
    pub fn committed(&mut self, batch: &Batch) {
        for b in &batch.parts {
            if let Some(part) = self
                .parts
                .get_mut(&b.partition)
                .filter(|x| x.epoch == b.epoch)
            {
                part.committed = Some(part.committed.map_or(b.position, |c| c.max(b.position)));
                // Copies staged while the transaction ran, of offsets it answered.
                part.staged = part.staged.split_off(&b.position);
            }
        }
    }

    /// `p` left this worker: what it had staged is dropped (its next owner redoes it: nothing
    /// of it was made visible), and so is what records of assignments up to `upto` stage
    /// later (give the ledger's latest epoch: a later assignment gets a greater one). One
    /// small entry stays per partition ever owned.
    pub fn forget(&mut self, p: &Partition, upto: u64) {
        let epoch = self.parts.get(p).map_or(upto, |part| part.epoch.max(upto));
        self.parts.insert(
            p.clone(),
            Part {
                epoch,
                retired: true,
                ..Part::default()
            },
        );
    }

    /// Records waiting for a transaction.
    pub fn staged(&self) -> usize {
        self.parts.values().map(|p| p.staged.len()).sum()
    }
}

#[cfg(test)]
mod tests;
