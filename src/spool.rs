//! The shim's local spool: messages wait here, durably, until Kafka has acknowledged them.
//!
//! Each shim run first writes everything it read to a new *segment* (`<nanos>-<pid>.jsonl`,
//! written under a hidden temporary name, fsynced, then renamed, so a segment is either whole or
//! absent). Then the run takes the spool lock and delivers every segment, oldest first, its own
//! included. A segment is deleted once every record in it is acknowledged, or rewritten with just
//! the records that were not. A run that cannot get the lock in time leaves its segment for the
//! lock holder or the next run: nothing waits unboundedly and nothing is lost.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};
use tracing::warn;

const SEGMENT_SUFFIX: &str = ".jsonl";
const LOCK_FILE: &str = "spool.lock";

/// One message to deliver: where to, its key and its JSON value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolRecord {
    pub topic: String,
    pub key: String,
    pub value: String,
}

/// A spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

/// A segment being written; becomes visible to delivery only on [`SegmentWriter::commit`].
pub struct SegmentWriter {
    tmp: PathBuf,
    path: PathBuf,
    out: BufWriter<File>,
    records: usize,
}

/// Proof that this process holds the spool lock (released on drop).
pub struct SpoolLock {
    file: File,
}

impl Drop for SpoolLock {
    fn drop(&mut self) {
        let _ = FileExt::unlock(&self.file);
    }
}

impl Spool {
    /// Opens (creating if needed) the spool directory.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a new segment.
    pub fn begin_segment(&self) -> std::io::Result<SegmentWriter> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let name = format!("{nanos:024}-{:010}{SEGMENT_SUFFIX}", std::process::id());
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        Ok(SegmentWriter {
            tmp,
            path,
            out: BufWriter::new(file),
            records: 0,
        })
    }

    /// Takes the spool lock, waiting at most `wait`. `None` when another run holds it.
    pub fn lock(&self, wait: Duration) -> std::io::Result<Option<SpoolLock>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(LOCK_FILE))?;
        let deadline = Instant::now() + wait;
        loop {
            match FileExt::try_lock_exclusive(&file) {
                Ok(true) => return Ok(Some(SpoolLock { file })),
                Ok(false) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(false) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Complete segments, oldest first.
    pub fn segments(&self, _lock: &SpoolLock) -> std::io::Result<Vec<PathBuf>> {
        let mut segments: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(SEGMENT_SUFFIX) && !n.starts_with('.'))
            })
            .collect();
        segments.sort();
        Ok(segments)
    }

    /// Number of records waiting in complete segments (for `--flush-spool` reports and tests).
    pub fn pending(&self, lock: &SpoolLock) -> std::io::Result<usize> {
        let mut n = 0;
        for segment in self.segments(lock)? {
            for record in segment_records(&segment)? {
                record?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Rewrites `segment` to hold only `remaining`, or deletes it when nothing remains.
    pub fn settle(
        &self,
        _lock: &SpoolLock,
        segment: &Path,
        remaining: &[SpoolRecord],
    ) -> std::io::Result<()> {
        if remaining.is_empty() {
            fs::remove_file(segment)?;
        } else {
            let name = segment
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("segment");
            let tmp = self.dir.join(format!(".{name}.rewrite.tmp"));
            let mut out = BufWriter::new(File::create(&tmp)?);
            for record in remaining {
                write_record(&mut out, record)?;
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            fs::rename(&tmp, segment)?;
        }
        sync_dir(&self.dir)
    }
}

impl SegmentWriter {
    pub fn push(&mut self, record: &SpoolRecord) -> std::io::Result<()> {
        self.records += 1;
        write_record(&mut self.out, record)
    }

    pub fn records(&self) -> usize {
        self.records
    }

    /// Makes the segment durable and visible. An empty segment is simply discarded.
    pub fn commit(self) -> std::io::Result<Option<PathBuf>> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        if self.records == 0 {
            drop(file);
            fs::remove_file(&self.tmp)?;
            return Ok(None);
        }
        file.sync_all()?;
        fs::rename(&self.tmp, &self.path)?;
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        Ok(Some(self.path))
    }
}

fn write_record(out: &mut impl Write, record: &SpoolRecord) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, record)?;
    out.write_all(b"\n")
}

/// Streams a segment's records, in order, without holding the segment in memory. A line that
/// does not decode (which a whole-or-absent segment should never have) is reported and skipped
/// rather than blocking the spool forever.
pub fn segment_records(
    path: &Path,
) -> std::io::Result<impl Iterator<Item = std::io::Result<SpoolRecord>>> {
    let reader = BufReader::new(File::open(path)?);
    let path = path.to_owned();
    Ok(reader
        .lines()
        .enumerate()
        .filter_map(move |(i, line)| match line {
            Err(e) => Some(Err(e)),
            Ok(line) => match serde_json::from_str(&line) {
                Ok(record) => Some(Ok(record)),
                Err(e) => {
                    warn!(segment = %path.display(), line = i + 1, error = %e, "skipping undecodable spool line");
                    None
                }
            },
        }))
}

/// Reads a whole segment (small segments and tests).
pub fn read_segment(path: &Path) -> std::io::Result<Vec<SpoolRecord>> {
    segment_records(path)?.collect()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> SpoolRecord {
        SpoolRecord {
            topic: "t".into(),
            key: format!("k{i}"),
            value: format!("{{\"n\":{i}}}"),
        }
    }

    #[test]
    fn segments_are_invisible_until_committed_then_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let lock = spool.lock(Duration::ZERO).unwrap().unwrap();
        let mut first = spool.begin_segment().unwrap();
        first.push(&record(1)).unwrap();
        assert!(spool.segments(&lock).unwrap().is_empty(), "uncommitted");
        let first = first.commit().unwrap().unwrap();
        let mut second = spool.begin_segment().unwrap();
        second.push(&record(2)).unwrap();
        second.push(&record(3)).unwrap();
        let second = second.commit().unwrap().unwrap();
        assert_eq!(
            spool.segments(&lock).unwrap(),
            vec![first.clone(), second.clone()]
        );
        assert_eq!(spool.pending(&lock).unwrap(), 3);

        spool.settle(&lock, &first, &[]).unwrap();
        spool.settle(&lock, &second, &[record(3)]).unwrap();
        assert_eq!(spool.segments(&lock).unwrap(), vec![second.clone()]);
        assert_eq!(read_segment(&second).unwrap(), vec![record(3)]);
    }

    #[test]
    fn empty_segments_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.begin_segment().unwrap().commit().unwrap(), None);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn the_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let held = spool.lock(Duration::ZERO).unwrap().unwrap();
        // A second open file description contends like a second process would.
        assert!(spool.lock(Duration::from_millis(50)).unwrap().is_none());
        drop(held);
        assert!(spool.lock(Duration::ZERO).unwrap().is_some());
    }
}
