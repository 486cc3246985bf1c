//! The store-and-forward spool: every telemetry message and task report goes to disk first and
//! leaves only once the broker has acknowledged it, so a broker outage or a reboot loses nothing.
//!
//! One file per message, named by a sequence number (`00000000000000000042.r`: `r` a task report,
//! `t` telemetry), holding the topic, a newline, and the payload. A file is written beside its
//! name, synced and renamed in, so a crash leaves a whole message or none. The spool is bounded:
//! when full, the oldest telemetry goes (and is counted in `dropped`, kept on disk too); a task
//! report is never dropped, so the bound may be passed by reports alone.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// What a spooled message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Telemetry: may be dropped when the spool is full.
    Telemetry,
    /// A task report: never dropped.
    Report,
}

impl Kind {
    fn suffix(self) -> &'static str {
        match self {
            Kind::Telemetry => "t",
            Kind::Report => "r",
        }
    }
}

/// A message waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its place in the spool.
    pub seq: u64,
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A device's spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_entries: usize,
    entries: BTreeMap<u64, Kind>,
    next: u64,
    dropped: u64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, picking up what a previous run left.
    pub fn open(dir: &Path, max_entries: usize) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let mut entries = BTreeMap::new();
        for item in fs::read_dir(dir)? {
            let path = item?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if name.ends_with(".tmp") {
                // A write that a crash cut short: it was never in the spool.
                fs::remove_file(&path)?;
                continue;
            }
            let kind = match name.rsplit_once('.') {
                Some((seq, "t")) => seq.parse().ok().map(|s: u64| (s, Kind::Telemetry)),
                Some((seq, "r")) => seq.parse().ok().map(|s: u64| (s, Kind::Report)),
                _ => None,
            };
            if let Some((seq, kind)) = kind {
                entries.insert(seq, kind);
            }
        }
        let dropped = fs::read_to_string(dir.join("dropped")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let next = entries.keys().next_back().map_or(1, |s| s + 1);
        Ok(Spool { dir: dir.to_path_buf(), max_entries, entries, next, dropped })
    }

    /// Adds a message (synced before this returns), dropping the oldest telemetry if full.
    pub fn push(&mut self, kind: Kind, topic: &str, payload: &[u8]) -> io::Result<u64> {
        while self.entries.len() >= self.max_entries {
            let Some(oldest) = self.entries.iter().find(|(_, k)| **k == Kind::Telemetry).map(|(s, _)| *s) else {
                break; // only reports: they stay, past the bound
            };
            self.remove(oldest)?;
            self.dropped += 1;
            write_synced(&self.dir, "dropped", self.dropped.to_string().as_bytes())?;
        }
        let seq = self.next;
        let mut body = Vec::with_capacity(topic.len() + 1 + payload.len());
        body.extend_from_slice(topic.as_bytes());
        body.push(b'\n');
        body.extend_from_slice(payload);
        write_synced(&self.dir, &name(seq, kind), &body)?;
        self.entries.insert(seq, kind);
        self.next += 1;
        Ok(seq)
    }

    /// The oldest message, read from disk. A file that cannot be read as a message is removed
    /// (and logged) so it cannot block the spool.
    pub fn front(&mut self) -> io::Result<Option<Entry>> {
        while let Some((&seq, &kind)) = self.entries.iter().next() {
            let bytes = fs::read(self.dir.join(name(seq, kind)))?;
            let split = bytes.iter().position(|b| *b == b'\n');
            match split.and_then(|i| std::str::from_utf8(&bytes[..i]).ok().map(|t| (t.to_owned(), i))) {
                Some((topic, i)) => return Ok(Some(Entry { seq, topic, payload: bytes[i + 1..].to_vec() })),
                None => {
                    tracing::error!(seq, dir = %self.dir.display(), "a spooled message has no topic line; removed");
                    self.remove(seq)?;
                }
            }
        }
        Ok(None)
    }

    /// Removes a message the broker acknowledged.
    pub fn remove(&mut self, seq: u64) -> io::Result<()> {
        if let Some(kind) = self.entries.remove(&seq) {
            match fs::remove_file(self.dir.join(name(seq, kind))) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Telemetry messages dropped because the spool was full, over the spool's life.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

fn name(seq: u64, kind: Kind) -> String {
    format!("{seq:020}.{}", kind.suffix())
}

/// Writes `dir/name` whole or not at all: a synced temporary file renamed over it, then the
/// folder synced so the rename survives a power cut.
pub fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_leave_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 100).unwrap();
        s.push(Kind::Telemetry, "a/t", b"1").unwrap();
        s.push(Kind::Report, "a/r", b"2").unwrap();
        drop(s);
        // A torn write from a crash is not a message.
        fs::write(dir.path().join("00000000000000000009.r.tmp"), b"a/r\nhalf").unwrap();
        let mut s = Spool::open(dir.path(), 100).unwrap();
        assert_eq!(s.len(), 2);
        let first = s.front().unwrap().unwrap();
        assert_eq!((first.topic.as_str(), first.payload.as_slice()), ("a/t", &b"1"[..]));
        s.remove(first.seq).unwrap();
        s.push(Kind::Telemetry, "a/t", b"3").unwrap();
        let order: Vec<Vec<u8>> = std::iter::from_fn(|| {
            let e = s.front().unwrap()?;
            s.remove(e.seq).unwrap();
            Some(e.payload)
        })
        .collect();
        assert_eq!(order, vec![b"2".to_vec(), b"3".to_vec()]);
        assert!(!dir.path().join("00000000000000000009.r.tmp").exists());
    }

    #[test]
    fn when_full_the_oldest_telemetry_goes_and_reports_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 3).unwrap();
        s.push(Kind::Report, "r", b"r1").unwrap();
        s.push(Kind::Telemetry, "t", b"t1").unwrap();
        s.push(Kind::Telemetry, "t", b"t2").unwrap();
        s.push(Kind::Telemetry, "t", b"t3").unwrap(); // drops t1
        s.push(Kind::Report, "r", b"r2").unwrap(); // drops t2
        s.push(Kind::Report, "r", b"r3").unwrap(); // drops t3
        s.push(Kind::Report, "r", b"r4").unwrap(); // nothing left to drop: the bound is passed
        assert_eq!(s.dropped(), 3);
        assert_eq!(s.len(), 4);
        let s = Spool::open(dir.path(), 3).unwrap();
        assert_eq!(s.dropped(), 3, "the drop count is kept on disk");
        assert!(s.entries.values().all(|k| *k == Kind::Report));
    }
}
