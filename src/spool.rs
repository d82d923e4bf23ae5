//! The shim's local spool: input and messages wait here, durably, until Kafka has acknowledged
//! them.
//!
//! A shim run first copies its stdin, untouched and before it reads any configuration, into a
//! *raw segment* (`<nanos>-<pid>.raw`: one JSON header line, then the input). It is written under
//! a hidden temporary name, fsynced, then renamed, so a segment is either whole or absent; when a
//! directory fails (a full or read-only disk), the bytes already written move on to the next
//! directory (the fallback spool), and as a last resort to memory. Then, under the spool lock,
//! each raw segment is *converted* into a message segment of the same name (`.jsonl`: one event
//! or dead letter per line), and every message segment is delivered, oldest first. A message
//! segment is deleted once every record in it is acknowledged, or rewritten with just the records
//! that were not. A run that cannot get the lock in time leaves its segment for the lock holder
//! or the next run: nothing waits unboundedly and nothing is lost. Temporary files left by a
//! crashed run are removed by the next lock holder.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};
use tracing::warn;

const SEGMENT_SUFFIX: &str = ".jsonl";
const RAW_SUFFIX: &str = ".raw";
const LOCK_FILE: &str = "spool.lock";
/// Temporary files written only under the lock (rewrites, conversions): stale for any lock holder.
const LOCKED_TMP_SUFFIXES: &[&str] = &[".rewrite.tmp", ".convert.tmp"];

/// One message to deliver: where to, its key and its JSON value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolRecord {
    pub topic: String,
    pub key: String,
    pub value: String,
}

/// What a shim run knew before reading any configuration, kept as the first line of its raw
/// segment so that its lines are later converted as that run would have converted them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawHeader {
    /// When the run read its input.
    #[serde(with = "crate::event::rfc3339_millis")]
    pub received_at: DateTime<Utc>,
    /// The host the run ran on.
    pub collector: String,
    /// `--site`, `--topic` and `--dlq-topic` of that run, when given (else the configuration's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlq_topic: Option<String>,
}

/// Where a run's input was kept.
#[derive(Debug)]
pub enum Captured {
    /// Nothing arrived.
    Empty,
    /// In a raw segment of this directory.
    Spooled { dir: PathBuf, bytes: u64 },
    /// No spool directory could keep it: only this process holds it now (the input alone,
    /// without the header).
    InMemory(Vec<u8>),
}

/// Why a directory could not keep the input.
#[derive(Debug)]
pub struct DirFailure {
    pub dir: PathBuf,
    pub error: std::io::Error,
}

/// Copies `input` to its end into a raw segment of the first directory that can keep it: bytes
/// written to a directory that then fails (a full or read-only disk) are read back and moved on
/// to the next one; when none is left, to memory. A failure to read `input` ends the input there
/// (what was read is kept) and is returned with the rest.
pub fn capture(
    dirs: &[PathBuf],
    header: &RawHeader,
    mut input: impl Read,
) -> (Captured, Vec<DirFailure>, Option<std::io::Error>) {
    let mut head = serde_json::to_vec(header).expect("headers serialize");
    head.push(b'\n');
    let stem = segment_stem();
    let mut failures = Vec::new();
    let mut sink = Sink::open(dirs, 0, &stem, &head, &mut failures);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut read_error = None;
    let mut bytes = 0u64;
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                read_error = Some(e);
                break;
            }
        };
        bytes += n as u64;
        sink = sink.write(&chunk[..n], dirs, &stem, &mut failures);
    }
    let captured = if bytes == 0 {
        sink.discard();
        Captured::Empty
    } else {
        match sink.finish(dirs, &stem, &mut failures, bytes) {
            // Memory holds the header too (it moved from directory to directory with the
            // input): the caller has the header already, and wants the input alone.
            Captured::InMemory(mut kept) => {
                debug_assert!(kept.starts_with(&head));
                kept.drain(..head.len().min(kept.len()));
                Captured::InMemory(kept)
            }
            captured => captured,
        }
    };
    (captured, failures, read_error)
}

/// Where captured bytes go: a temporary file in `dirs[index]`, or memory.
enum Sink {
    File {
        index: usize,
        tmp: PathBuf,
        file: File,
        /// Bytes the file holds for sure (a failed write may have left part of a chunk).
        written: usize,
    },
    Memory(Vec<u8>),
}

impl Sink {
    /// A temporary file in the first of `dirs[from..]` that takes `content`; else memory.
    fn open(
        dirs: &[PathBuf],
        from: usize,
        stem: &str,
        content: &[u8],
        failures: &mut Vec<DirFailure>,
    ) -> Self {
        for (index, dir) in dirs.iter().enumerate().skip(from) {
            let tmp = dir.join(format!(".{stem}{RAW_SUFFIX}.tmp"));
            let opened = fs::create_dir_all(dir).and_then(|()| {
                let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                file.write_all(content).map(|()| file)
            });
            match opened {
                Ok(file) => {
                    return Sink::File {
                        index,
                        tmp,
                        file,
                        written: content.len(),
                    }
                }
                Err(error) => {
                    let _ = fs::remove_file(&tmp);
                    failures.push(DirFailure {
                        dir: dir.clone(),
                        error,
                    });
                }
            }
        }
        Sink::Memory(content.to_vec())
    }

    fn write(
        self,
        bytes: &[u8],
        dirs: &[PathBuf],
        stem: &str,
        failures: &mut Vec<DirFailure>,
    ) -> Self {
        match self {
            Sink::Memory(mut kept) => {
                kept.extend_from_slice(bytes);
                Sink::Memory(kept)
            }
            Sink::File {
                index,
                tmp,
                mut file,
                written,
            } => match file.write_all(bytes) {
                Ok(()) => Sink::File {
                    index,
                    tmp,
                    file,
                    written: written + bytes.len(),
                },
                Err(error) => {
                    drop(file);
                    let mut kept = Self::abandon(index, &tmp, written, dirs, error, failures);
                    kept.extend_from_slice(bytes);
                    Sink::open(dirs, index + 1, stem, &kept, failures)
                }
            },
        }
    }

    /// Makes the segment durable and visible, moving on while directories fail.
    fn finish(
        self,
        dirs: &[PathBuf],
        stem: &str,
        failures: &mut Vec<DirFailure>,
        bytes: u64,
    ) -> Captured {
        let mut sink = self;
        loop {
            match sink {
                Sink::Memory(kept) => return Captured::InMemory(kept),
                Sink::File {
                    index,
                    tmp,
                    file,
                    written,
                } => {
                    let dir = &dirs[index];
                    let path = dir.join(format!("{stem}{RAW_SUFFIX}"));
                    let done = file
                        .sync_all()
                        .and_then(|()| fs::rename(&tmp, &path))
                        .and_then(|()| sync_dir(dir));
                    match done {
                        Ok(()) => {
                            return Captured::Spooled {
                                dir: dir.clone(),
                                bytes,
                            }
                        }
                        Err(error) => {
                            let _ = fs::rename(&path, &tmp);
                            drop(file);
                            let kept = Self::abandon(index, &tmp, written, dirs, error, failures);
                            sink = Sink::open(dirs, index + 1, stem, &kept, failures);
                        }
                    }
                }
            }
        }
    }

    /// Reads back the `written` bytes a failing directory holds and removes them there. (Bytes
    /// that cannot be read back are lost; the failure says how many.)
    fn abandon(
        index: usize,
        tmp: &Path,
        written: usize,
        dirs: &[PathBuf],
        error: std::io::Error,
        failures: &mut Vec<DirFailure>,
    ) -> Vec<u8> {
        let dir = dirs[index].clone();
        failures.push(DirFailure { dir, error });
        let mut kept = fs::read(tmp).unwrap_or_else(|e| {
            failures.push(DirFailure {
                dir: dirs[index].clone(),
                error: std::io::Error::new(
                    e.kind(),
                    format!("{written} bytes written there could not be read back: {e}"),
                ),
            });
            Vec::new()
        });
        kept.truncate(written);
        let _ = fs::remove_file(tmp);
        kept
    }

    fn discard(self) {
        if let Sink::File { tmp, file, .. } = self {
            drop(file);
            let _ = fs::remove_file(tmp);
        }
    }
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
        let name = format!("{}{SEGMENT_SUFFIX}", segment_stem());
        let path = self.dir.join(&name);
        self.begin_segment_at(path, format!(".{name}.tmp"))
    }

    fn begin_segment_at(&self, path: PathBuf, tmp_name: String) -> std::io::Result<SegmentWriter> {
        let tmp = self.dir.join(tmp_name);
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

    /// Complete message segments, oldest first.
    pub fn segments(&self, _lock: &SpoolLock) -> std::io::Result<Vec<PathBuf>> {
        self.list(SEGMENT_SUFFIX)
    }

    /// Complete raw segments (input not yet converted into messages), oldest first.
    pub fn raw_segments(&self, _lock: &SpoolLock) -> std::io::Result<Vec<PathBuf>> {
        self.list(RAW_SUFFIX)
    }

    fn list(&self, suffix: &str) -> std::io::Result<Vec<PathBuf>> {
        let mut segments: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(suffix) && !n.starts_with('.'))
            })
            .collect();
        segments.sort();
        Ok(segments)
    }

    /// Converts a raw segment into the message segment of the same name, then removes it. A
    /// crash between the two leaves both; the next conversion sees the message segment and only
    /// removes the raw one, so no input is converted twice.
    pub fn convert(
        &self,
        _lock: &SpoolLock,
        raw: &Path,
        mut convert: impl FnMut(&RawHeader, &mut dyn BufRead, &mut SegmentWriter) -> std::io::Result<()>,
    ) -> std::io::Result<Option<PathBuf>> {
        let path = raw.with_extension(&SEGMENT_SUFFIX[1..]);
        let converted = if path.exists() {
            None
        } else {
            let mut input = BufReader::new(File::open(raw)?);
            let mut line = String::new();
            input.read_line(&mut line)?;
            let header: RawHeader = serde_json::from_str(&line).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("header: {e}"))
            })?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("segment");
            let mut writer = self.begin_segment_at(path.clone(), format!(".{name}.convert.tmp"))?;
            convert(&header, &mut input, &mut writer)?;
            writer.commit()?
        };
        fs::remove_file(raw)?;
        sync_dir(&self.dir)?;
        Ok(converted)
    }

    /// Removes temporary files a crashed run left: those written under the lock (we hold it
    /// now), and captures whose process is gone. Returns how many.
    pub fn remove_stale(&self, _lock: &SpoolLock) -> std::io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !(name.starts_with('.') && name.ends_with(".tmp")) {
                continue;
            }
            let locked = LOCKED_TMP_SUFFIXES.iter().any(|s| name.ends_with(s));
            if locked || !writer_alive(name) {
                fs::remove_file(&path)?;
                warn!(file = %path.display(), "removed a temporary spool file a crashed run left");
                removed += 1;
            }
        }
        Ok(removed)
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

/// `<nanos>-<pid>`: segment names sort by age.
fn segment_stem() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{nanos:024}-{:010}", std::process::id())
}

/// Whether the process that named a capture's temporary file (`.<nanos>-<pid>.raw.tmp`) still
/// runs. Where that cannot be told (no `/proc`), it is taken as running and the file is kept.
fn writer_alive(name: &str) -> bool {
    let pid = name
        .trim_start_matches('.')
        .split(['-', '.'])
        .nth(1)
        .and_then(|p| p.parse::<u32>().ok());
    match pid {
        Some(pid) if Path::new("/proc/self").exists() => {
            Path::new(&format!("/proc/{pid}")).exists()
        }
        _ => true,
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
    // Bytes, not `lines()`: a line that is not UTF-8 is one undecodable line, not an error.
    Ok(reader
        .split(b'\n')
        .enumerate()
        .filter_map(move |(i, line)| match line {
            Err(e) => Some(Err(e)),
            Ok(line) => match serde_json::from_slice(&line) {
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
    fn a_corrupt_line_is_skipped_and_the_rest_of_its_segment_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment.jsonl");
        let mut bytes = Vec::new();
        write_record(&mut bytes, &record(1)).unwrap();
        bytes.extend_from_slice(b"{\"topic\":\"t\",\xff\xfe}\n"); // not UTF-8
        bytes.extend_from_slice(b"not json\n");
        write_record(&mut bytes, &record(2)).unwrap();
        fs::write(&path, bytes).unwrap();
        assert_eq!(read_segment(&path).unwrap(), vec![record(1), record(2)]);
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

    fn header() -> RawHeader {
        RawHeader {
            received_at: Utc::now(),
            collector: "c".into(),
            site: Some("s".into()),
            events_topic: None,
            dlq_topic: None,
        }
    }

    /// Turns each input line into one record.
    fn lines_to_records(
        _: &RawHeader,
        input: &mut dyn BufRead,
        out: &mut SegmentWriter,
    ) -> std::io::Result<()> {
        for (i, line) in input.lines().enumerate() {
            out.push(&SpoolRecord {
                topic: "t".into(),
                key: i.to_string(),
                value: line?,
            })?;
        }
        Ok(())
    }

    #[test]
    fn input_is_captured_converted_once_and_crash_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let (captured, failures, error) =
            capture(&[dir.path().to_owned()], &header(), &b"a\nb\n"[..]);
        assert!(
            matches!(captured, Captured::Spooled { bytes: 4, .. }),
            "{captured:?}"
        );
        assert!(failures.is_empty() && error.is_none());
        let lock = spool.lock(Duration::ZERO).unwrap().unwrap();
        let raw = spool.raw_segments(&lock).unwrap();
        assert_eq!(raw.len(), 1);

        // A crash after the message segment was written but before the raw one was removed:
        // the next conversion does not convert it again.
        let copy = dir.path().join("copy");
        fs::copy(&raw[0], &copy).unwrap();
        let converted = spool
            .convert(&lock, &raw[0], lines_to_records)
            .unwrap()
            .unwrap();
        assert_eq!(read_segment(&converted).unwrap().len(), 2);
        fs::rename(&copy, &raw[0]).unwrap();
        assert_eq!(
            spool.convert(&lock, &raw[0], lines_to_records).unwrap(),
            None
        );
        assert!(spool.raw_segments(&lock).unwrap().is_empty());
        assert_eq!(spool.pending(&lock).unwrap(), 2);

        // Temporary files: a dead writer's capture, an interrupted rewrite; a live capture stays.
        let dead = dir
            .path()
            .join(".000000000000000000000001-4000000000.raw.tmp");
        let rewrite = dir.path().join(".x.jsonl.rewrite.tmp");
        let live = dir.path().join(format!(
            ".000000000000000000000002-{:010}.raw.tmp",
            std::process::id()
        ));
        for f in [&dead, &rewrite, &live] {
            fs::write(f, "partial").unwrap();
        }
        assert_eq!(spool.remove_stale(&lock).unwrap(), 2);
        assert!(!dead.exists() && !rewrite.exists() && live.exists());
    }

    #[test]
    fn a_directory_that_fails_passes_its_bytes_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the first spool directory should be: it cannot be created.
        let blocked = dir.path().join("blocked");
        fs::write(&blocked, "").unwrap();
        let second = dir.path().join("second");
        let dirs = [blocked.join("spool"), second.clone()];
        let (captured, failures, _) = capture(&dirs, &header(), &b"x\n"[..]);
        assert!(
            matches!(&captured, Captured::Spooled { dir, .. } if *dir == second),
            "{captured:?}"
        );
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].dir, dirs[0]);

        let (captured, failures, _) = capture(&dirs[..1], &header(), &b"x\n"[..]);
        let Captured::InMemory(bytes) = captured else {
            panic!("no directory left: memory");
        };
        assert_eq!(bytes, b"x\n", "the input alone: the header is the caller's");
        assert_eq!(failures.len(), 1);
        let (captured, _, _) = capture(&dirs, &header(), &b""[..]);
        assert!(matches!(captured, Captured::Empty));
        assert_eq!(
            fs::read_dir(&second).unwrap().count(),
            1,
            "an empty run leaves nothing"
        );
    }
}
