//! The content-addressed asset store: `assets/ab/<blake3>.png` with a provenance `.json` (unless
//! its caller keeps the provenance, as the scheduler does in its database) and a `.thumb.png`
//! beside it, plus `keys/cd/<cache key>` naming the asset a key rendered to. An
//! image no larger than a thumbnail ([`own_thumbnail`]) is its own thumbnail and has no
//! `.thumb.png`: a third file per tiny asset cost a tenth of a busy farm's CPU.
//! Files are written under a scratch name, synced, then renamed into place: a crash leaves no
//! half asset. Renders that finish together share one sync ([`GroupSync`]).
//!
//! Many renders commit at once, so the scratch files of an asset are made in its own shard
//! folder, not one shared folder: a folder's lock is held for each file made or renamed in it,
//! and a rename between folders also takes the file system's one rename lock. With 128 renders
//! committing into `tmp/` while making files was slow (ext4 without a journal, soon after many
//! files were deleted), spinning on those locks took a fifth of a busy farm's CPU. A PNG is
//! held in memory until it outgrows [`SPILL_BYTES`] (its hash, and so its shard, is known only
//! once it is written); a larger one is written to `tmp/` as it is encoded.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::Thread;

use kiln_protocol::CacheKey;

use crate::render::own_thumbnail;

/// The store under a data directory.
#[derive(Debug, Clone)]
pub struct AssetStore {
    root: PathBuf,
    sync: Arc<GroupSync>,
}

/// Makes files that many threads wrote durable together. A sync flushes the disk's cache, which
/// costs about a millisecond whatever it carries, so one file at a time caps a store at a few
/// thousand files a second; on Linux one `syncfs` covers every file written before it began, and
/// the threads that wait while it runs share the next one (group commit). Elsewhere each file is
/// synced on its own.
#[derive(Debug)]
struct GroupSync {
    /// A directory on the store's file system (what `syncfs` flushes).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    dir: File,
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    state: Mutex<Tickets>,
    /// Every ticket up to this one is on disk. A waiter reads it without the lock: a sync's end
    /// woke a hundred waiters at once through one condition variable, and each then queued for
    /// the lock only to read this, which was a third of a busy farm's context switches.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    covered: AtomicU64,
}

/// Tickets are taken after a caller's writes: a sync that starts after ticket `n` was taken
/// covers it.
#[derive(Debug, Default)]
struct Tickets {
    taken: u64,
    running: bool,
    /// The threads waiting for a running sync, with their tickets.
    waiting: Vec<(u64, Thread)>,
}

impl GroupSync {
    fn new(dir: &Path) -> io::Result<GroupSync> {
        Ok(GroupSync { dir: File::open(dir)?, state: Mutex::new(Tickets::default()), covered: AtomicU64::new(0) })
    }

    /// Returns once `files` (written by this thread) are on disk.
    #[cfg(not(target_os = "linux"))]
    fn sync(&self, files: &[&File]) -> io::Result<()> {
        files.iter().try_for_each(|f| f.sync_all())
    }

    /// Returns once `files` (written by this thread) are on disk: by a `syncfs` that began after
    /// they were written, this thread's or another's. A sync's end wakes only the threads it
    /// covered, and one of the others (tickets taken while it ran) to lead the next.
    #[cfg(target_os = "linux")]
    fn sync(&self, _files: &[&File]) -> io::Result<()> {
        let lock = || self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let covered = || self.covered.load(std::sync::atomic::Ordering::Acquire);
        let mut t = lock();
        t.taken += 1;
        let mine = t.taken;
        loop {
            if covered() >= mine {
                return Ok(());
            }
            if t.running {
                t.waiting.push((mine, std::thread::current()));
                drop(t);
                // Woken when a sync covered this ticket, failed, or left this thread to lead the
                // next; `park` may also return for nothing, so the ticket is checked again.
                std::thread::park();
                if covered() >= mine {
                    return Ok(());
                }
                t = lock();
                continue;
            }
            // Lead a sync for every ticket taken so far.
            t.running = true;
            let upto = t.taken;
            drop(t);
            let result = rustix::fs::syncfs(&self.dir).map_err(io::Error::from);
            t = lock();
            t.running = false;
            if result.is_ok() {
                self.covered.fetch_max(upto, std::sync::atomic::Ordering::Release);
            }
            // On failure the waiters it would have covered try again themselves.
            let mut next = None;
            t.waiting.retain(|(n, th)| {
                if *n <= upto {
                    th.unpark();
                    false
                } else {
                    next.get_or_insert_with(|| th.clone());
                    true
                }
            });
            drop(t);
            if let Some(th) = next {
                th.unpark();
            }
            // Its own ticket was taken before `upto`: covered, unless the sync failed.
            return result;
        }
    }
}

/// A PNG up to this size is kept in memory until it is committed; a larger one goes to a file in
/// `tmp/` as it is written. The encoder writes a band's compressed rows at a time, so this is
/// also the write buffer of a spilled PNG.
pub const SPILL_BYTES: usize = 64 << 10;

/// A PNG being written: hashes as it goes, lands in the store on [`AssetStore::commit`].
pub struct PendingAsset {
    body: Body,
    /// Where it spills to.
    scratch: PathBuf,
    hasher: blake3::Hasher,
    bytes: u64,
}

/// The BLAKE3 of what `hasher` has taken so far, in hex: an asset's name.
fn hex(hasher: &blake3::Hasher) -> String {
    hasher.finalize().to_hex().to_string()
}

/// Where a pending PNG's bytes are.
enum Body {
    Memory(Vec<u8>),
    /// Spilled to a file, removed unless it lands.
    File(BufWriter<File>, Scratch),
}

/// Scratch files not (yet) moved into place: those it still holds when dropped are removed.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for t in &self.0 {
            let _ = fs::remove_file(t);
        }
    }
}

impl Write for PendingAsset {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Body::Memory(held) = &mut self.body
            && held.len() + buf.len() > SPILL_BYTES
        {
            let spill = Scratch(vec![self.scratch.clone()]);
            let mut file = BufWriter::with_capacity(SPILL_BYTES, File::create(&self.scratch)?);
            file.write_all(held)?;
            self.body = Body::File(file, spill);
        }
        let n = match &mut self.body {
            Body::Memory(held) => {
                held.extend_from_slice(buf);
                buf.len()
            }
            Body::File(file, _) => file.write(buf)?,
        };
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.body {
            Body::Memory(_) => Ok(()),
            Body::File(file, _) => file.flush(),
        }
    }
}

impl PendingAsset {
    /// The BLAKE3 hex of what was written so far: the asset's hash once the PNG is finished.
    pub fn hash(&self) -> String {
        hex(&self.hasher)
    }

    /// Takes the finished PNG's hash and bytes, when it is held in memory and is at most `max`
    /// bytes (nothing was written to disk); otherwise leaves it pending, to commit.
    pub fn take_held(&mut self, max: u64) -> Option<(String, Vec<u8>)> {
        match &mut self.body {
            Body::Memory(held) if self.bytes <= max => Some((hex(&self.hasher), std::mem::take(held))),
            _ => None,
        }
    }
}

/// A fresh scratch file name. It starts with a dot, which no asset's name does.
fn scratch_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(".{}.{}.tmp", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

impl AssetStore {
    /// Opens (creating) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> io::Result<AssetStore> {
        let root = data_dir.to_path_buf();
        // `keys/` is made by the first key put in it: a worker whose caller keeps its records has none.
        for d in ["assets", "tmp"] {
            fs::create_dir_all(root.join(d))?;
        }
        let sync = Arc::new(GroupSync::new(&root.join("tmp"))?);
        Ok(AssetStore { root, sync })
    }

    /// The data directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn shard(&self, hash: &str) -> PathBuf {
        self.root.join("assets").join(hash.get(..2).unwrap_or("00"))
    }

    /// Path of an asset's PNG.
    pub fn path(&self, hash: &str) -> PathBuf {
        self.shard(hash).join(format!("{hash}.png"))
    }

    /// Path of an asset's thumbnail file, where it has one (see [`Self::thumbnail`]).
    pub fn thumb_path(&self, hash: &str) -> PathBuf {
        self.shard(hash).join(format!("{hash}.thumb.png"))
    }

    /// The file that is an asset's thumbnail: its thumbnail file, or the PNG itself when the
    /// image is no larger than a thumbnail (such an asset has no thumbnail file). `None` when
    /// the asset is not stored, or is a larger one stored without its thumbnail.
    pub fn thumbnail(&self, hash: &str) -> Option<PathBuf> {
        let thumb = self.thumb_path(hash);
        if thumb.is_file() {
            return Some(thumb);
        }
        let png = self.path(hash);
        let (w, h) = png_size(&png).ok()?;
        own_thumbnail(w, h).then_some(png)
    }

    /// Path of an asset's provenance JSON.
    pub fn provenance_path(&self, hash: &str) -> PathBuf {
        self.shard(hash).join(format!("{hash}.json"))
    }

    /// Whether the asset is stored.
    pub fn contains(&self, hash: &str) -> bool {
        self.path(hash).is_file()
    }

    /// Starts writing a PNG.
    pub fn begin(&self) -> io::Result<PendingAsset> {
        Ok(PendingAsset {
            body: Body::Memory(Vec::new()),
            scratch: self.scratch_path(),
            hasher: blake3::Hasher::new(),
            bytes: 0,
        })
    }

    /// Moves a finished PNG into place under its hash ([`PendingAsset::hash`]), with its
    /// provenance JSON (`None`: its caller keeps it elsewhere) and its thumbnail (`None`: the
    /// image is its own). Returns the hash and size. An asset already stored keeps its first
    /// provenance.
    pub fn commit(
        &self,
        pending: PendingAsset,
        thumb: Option<&[u8]>,
        provenance: Option<&[u8]>,
    ) -> io::Result<(String, u64)> {
        let hash = pending.hash();
        let PendingAsset { body, bytes, .. } = pending;
        if self.contains(&hash) {
            return Ok((hash, bytes));
        }
        fs::create_dir_all(self.shard(&hash))?;
        // The PNG's scratch file comes first in `temps`.
        let (png, temps) = match body {
            Body::Memory(held) => {
                let mut temps = Scratch(Vec::with_capacity(3));
                (self.write_scratch(&hash, &held, &mut temps)?, temps)
            }
            Body::File(file, temps) => (file.into_inner().map_err(|e| e.into_error())?, temps),
        };
        self.land(&hash, png, thumb, provenance, temps)?;
        Ok((hash, bytes))
    }

    /// Stores a whole PNG held in memory (an image that is its own thumbnail: it has no thumbnail
    /// file) with its provenance JSON (`None`: kept elsewhere), as [`Self::commit`] does.
    /// Returns its hash.
    pub fn put(&self, png: &[u8], provenance: Option<&[u8]>) -> io::Result<String> {
        let mut pending = self.begin()?;
        pending.write_all(png)?;
        Ok(self.commit(pending, None, provenance)?.0)
    }

    /// Writes the provenance and thumbnail (if any) beside the PNG at `temps[0]`, syncs them
    /// all, then renames them into place, the PNG last: its presence means the asset is complete.
    fn land(
        &self,
        hash: &str,
        png: File,
        thumb: Option<&[u8]>,
        provenance: Option<&[u8]>,
        mut temps: Scratch,
    ) -> io::Result<()> {
        let mut files = vec![(png, self.path(hash))];
        if let Some(json) = provenance {
            files.push((self.write_scratch(hash, json, &mut temps)?, self.provenance_path(hash)));
        }
        if let Some(thumb) = thumb {
            files.push((self.write_scratch(hash, thumb, &mut temps)?, self.thumb_path(hash)));
        }
        self.sync.sync(&files.iter().map(|(f, _)| f).collect::<Vec<_>>())?;
        // `temps` is in the order of `files`; the PNG goes last.
        for (tmp, (_, to)) in temps.0[1..].iter().zip(&files[1..]) {
            fs::rename(tmp, to)?;
        }
        fs::rename(&temps.0[0], &files[0].1)?;
        temps.0.clear();
        Ok(())
    }

    /// A fresh path in the store's scratch folder (the same file system as the assets), for a
    /// file to be filled and then moved in with [`Self::import_file`], or a large PNG.
    pub fn scratch_path(&self) -> PathBuf {
        self.root.join("tmp").join(scratch_name())
    }

    /// A new scratch file in the shard of asset `hash` holding `bytes` (not synced), its path
    /// pushed onto `temps` once it exists.
    fn write_scratch(&self, hash: &str, bytes: &[u8], temps: &mut Scratch) -> io::Result<File> {
        let tmp = self.shard(hash).join(scratch_name());
        let mut f = File::create(&tmp)?;
        temps.0.push(tmp);
        f.write_all(bytes)?;
        Ok(f)
    }

    /// Moves a file that was written and synced at a [`Self::scratch_path`] and whose BLAKE3 the
    /// caller checked is `hash` into place: as the asset (unless it is there already), or as its
    /// thumbnail. The scratch file is gone afterwards either way.
    pub fn import_file(&self, hash: &str, scratch: &Path, thumb: bool) -> io::Result<()> {
        if !thumb && self.contains(hash) {
            return fs::remove_file(scratch);
        }
        fs::create_dir_all(self.shard(hash))?;
        let to = if thumb { self.thumb_path(hash) } else { self.path(hash) };
        fs::rename(scratch, to)
    }

    /// Stores the provenance of an imported asset (the first one stays).
    pub fn import_provenance(&self, hash: &str, json: &[u8]) -> io::Result<()> {
        if self.provenance_path(hash).is_file() {
            return Ok(());
        }
        fs::create_dir_all(self.shard(hash))?;
        let mut temps = Scratch(Vec::with_capacity(1));
        let file = self.write_scratch(hash, json, &mut temps)?;
        // Shares a sync with the others stored meanwhile (a result batch's provenances).
        self.sync.sync(&[&file])?;
        fs::rename(&temps.0[0], self.provenance_path(hash))?;
        temps.0.clear();
        Ok(())
    }

    /// Where the key index keeps `key`, sharded like the assets.
    fn key_path(&self, key: &CacheKey) -> PathBuf {
        let key = key.to_string();
        self.root.join("keys").join(key.get(..2).unwrap_or("00")).join(&key)
    }

    /// Records that `key` rendered to `hash`. The index is a cache, not a record: it is written
    /// in place and not synced (a file and an fsync less per asset). An entry lost or torn in a
    /// crash, or read half written, costs one re-render of the same bytes: [`Self::lookup_key`]
    /// takes only a whole hash of an asset that is stored.
    pub fn put_key(&self, key: &CacheKey, hash: &str) -> io::Result<()> {
        let path = self.key_path(key);
        match fs::write(&path, hash) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(path.parent().unwrap_or(&self.root))?;
                fs::write(&path, hash)
            }
            written => written,
        }
    }

    /// The asset a key rendered to, if it is recorded and the asset is still stored.
    pub fn lookup_key(&self, key: &CacheKey) -> Option<String> {
        let hash = fs::read_to_string(self.key_path(key)).ok()?;
        let hash = hash.trim();
        let valid = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        (valid && self.contains(hash)).then(|| hash.to_owned())
    }
}

/// The width and height a PNG file's header gives (its IHDR chunk comes first).
fn png_size(path: &Path) -> io::Result<(u32, u32)> {
    let mut head = [0u8; 24];
    io::Read::read_exact(&mut File::open(path)?, &mut head)?;
    if &head[..8] != b"\x89PNG\r\n\x1a\n" || &head[12..16] != b"IHDR" {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a PNG"));
    }
    let be = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    Ok((be(16), be(20)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::THUMB_SIDE;

    /// Fails if a scratch file is left in `tmp/` or in an asset shard.
    fn assert_no_scratch(root: &Path) {
        let mut left: Vec<PathBuf> = fs::read_dir(root.join("tmp")).unwrap().map(|e| e.unwrap().path()).collect();
        for shard in fs::read_dir(root.join("assets")).unwrap() {
            let files = fs::read_dir(shard.unwrap().path()).unwrap().map(|e| e.unwrap().path());
            left.extend(files.filter(|f| f.file_name().unwrap().to_string_lossy().starts_with('.')));
        }
        assert!(left.is_empty(), "scratch files left: {left:?}");
    }

    /// A provenance record naming a pending asset.
    fn naming(p: &PendingAsset) -> String {
        format!("{{\"asset\":\"{}\"}}", p.hash())
    }

    #[test]
    fn a_png_larger_than_the_memory_hold_is_spilled_and_lands_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let body: Vec<u8> = (0..3 * SPILL_BYTES + 17).map(|i| (i * 7 % 251) as u8).collect();
        let write = |body: &[u8]| {
            let mut p = store.begin().unwrap();
            body.chunks(5000).for_each(|c| p.write_all(c).unwrap());
            p
        };
        let p = write(&body);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1, "spilled to tmp/");
        let record = naming(&p);
        let (hash, bytes) = store.commit(p, Some(&b"thumb"[..]), Some(record.as_bytes())).unwrap();
        assert_eq!((hash.as_str(), bytes), (blake3::hash(&body).to_hex().as_str(), body.len() as u64));
        assert_eq!(fs::read(store.path(&hash)).unwrap(), body);
        assert_no_scratch(dir.path());
        // The same bytes again, and bytes abandoned before their commit: nothing is left.
        store.commit(write(&body), Some(&b"thumb"[..]), Some(&b"{}"[..])).unwrap();
        assert_eq!(fs::read_to_string(store.provenance_path(&hash)).unwrap(), record, "the first stays");
        drop(write(&body[1..]));
        assert_no_scratch(dir.path());
    }

    #[test]
    fn an_asset_lands_under_the_blake3_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let mut p = store.begin().unwrap();
        p.write_all(b"not really a png").unwrap();
        let record = naming(&p);
        let (hash, bytes) = store.commit(p, Some(&b"thumb"[..]), Some(record.as_bytes())).unwrap();
        assert_eq!(hash, blake3::hash(b"not really a png").to_hex().to_string());
        assert_eq!(bytes, 16);
        assert_eq!(fs::read(store.path(&hash)).unwrap(), b"not really a png");
        assert!(fs::read_to_string(store.provenance_path(&hash)).unwrap().contains(&hash));
        // A provenance kept elsewhere makes no file.
        let mut p = store.begin().unwrap();
        p.write_all(b"another").unwrap();
        let (other, _) = store.commit(p, None, None).unwrap();
        assert!(store.contains(&other) && !store.provenance_path(&other).exists());
        assert_no_scratch(dir.path());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn every_thread_waiting_for_a_shared_sync_goes_on_once_a_sync_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let sync = Arc::new(GroupSync::new(dir.path()).unwrap());
        let (threads, rounds) = (32, 100);
        // Each round, every thread asks for one sync at once and none asks again until all
        // have theirs: those that came while the first sync ran are covered only by a second,
        // which one of them must be woken to lead. No later caller comes to rescue them.
        let round = Arc::new(std::sync::Barrier::new(threads));
        let (done, finished) = std::sync::mpsc::channel();
        for _ in 0..threads {
            let (sync, round, done) = (sync.clone(), round.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..rounds {
                    round.wait();
                    sync.sync(&[]).unwrap();
                }
                done.send(()).unwrap();
            });
        }
        for _ in 0..threads {
            // A thread left waiting with no sync running or coming would wait for ever.
            finished.recv_timeout(std::time::Duration::from_secs(60)).expect("a thread still waits for its sync");
        }
        let t = sync.state.lock().unwrap();
        let all = (threads * rounds) as u64;
        assert_eq!((t.taken, sync.covered.load(std::sync::atomic::Ordering::Acquire)), (all, all));
        assert!(t.waiting.is_empty(), "{} threads still listed as waiting", t.waiting.len());
    }

    #[test]
    fn assets_committed_at_once_from_many_threads_all_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let hashes: Vec<(String, Vec<u8>)> = std::thread::scope(|s| {
            let tasks: Vec<_> = (0..16u8)
                .map(|t| {
                    let store = &store;
                    s.spawn(move || {
                        (0..20u8)
                            .map(|i| {
                                let body = vec![t, i, 0x89];
                                let mut p = store.begin().unwrap();
                                p.write_all(&body).unwrap();
                                // Every other asset is its own thumbnail.
                                let thumb = [i, t];
                                let thumb = (i % 2 == 0).then_some(&thumb[..]);
                                let record = naming(&p);
                                let (hash, _) = store.commit(p, thumb, Some(record.as_bytes())).unwrap();
                                (hash, body)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            tasks.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(hashes.len(), 320);
        for (hash, body) in &hashes {
            assert_eq!(&fs::read(store.path(hash)).unwrap(), body);
            match body[1] % 2 {
                0 => assert_eq!(fs::read(store.thumb_path(hash)).unwrap(), [body[1], body[0]]),
                _ => assert!(!store.thumb_path(hash).exists(), "no thumbnail file was asked for"),
            }
            assert!(fs::read_to_string(store.provenance_path(hash)).unwrap().contains(hash.as_str()));
        }
        assert_no_scratch(dir.path());
    }

    #[test]
    fn an_image_no_larger_than_a_thumbnail_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let commit = |w: u32, h: u32, thumb: Option<&[u8]>| {
            let png = crate::render::encode_png(w, h, &vec![90; (w * h * 3) as usize]).unwrap();
            let mut p = store.begin().unwrap();
            p.write_all(&png).unwrap();
            store.commit(p, thumb, None).unwrap().0
        };
        let small = commit(THUMB_SIDE, 16, None);
        assert!(!store.thumb_path(&small).exists());
        assert_eq!(store.thumbnail(&small), Some(store.path(&small)), "a 256×16 image is its own thumbnail");
        let large = commit(THUMB_SIDE + 1, 2, Some(&b"thumb"[..]));
        assert_eq!(store.thumbnail(&large), Some(store.thumb_path(&large)));
        // A larger image without its thumbnail file (uploaded without it) has none to serve.
        let bare = commit(2, THUMB_SIDE + 1, None);
        assert_eq!(store.thumbnail(&bare), None);
        assert_eq!(store.thumbnail(&"0".repeat(64)), None, "not stored");
        let mut p = store.begin().unwrap();
        p.write_all(b"not a png at all, but long enough").unwrap();
        let junk = store.commit(p, None, None).unwrap().0;
        assert_eq!(store.thumbnail(&junk), None);
        assert_no_scratch(dir.path());
    }

    #[test]
    fn a_repeated_asset_keeps_its_first_provenance_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let mut hashes = Vec::new();
        for n in 0..2 {
            let mut p = store.begin().unwrap();
            p.write_all(b"same bytes").unwrap();
            hashes.push(store.commit(p, Some(&b"thumb"[..]), Some(format!("{{\"n\":{n}}}").as_bytes())).unwrap().0);
        }
        assert_eq!(hashes[0], hashes[1]);
        assert_eq!(fs::read_to_string(store.provenance_path(&hashes[0])).unwrap(), "{\"n\":0}");
        assert_no_scratch(dir.path());
    }

    #[test]
    fn a_key_pointing_at_a_missing_or_garbled_asset_is_no_hit() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let key = CacheKey([7; 32]);
        assert_eq!(store.lookup_key(&key), None);
        store.put_key(&key, &"ab".repeat(32)).unwrap();
        assert_eq!(store.lookup_key(&key), None, "the asset itself is not stored");
        fs::write(store.key_path(&key), "../../etc/passwd").unwrap();
        assert_eq!(store.lookup_key(&key), None);
    }
}
