//! The content-addressed asset store: `assets/ab/<blake3>.png` with a provenance `.json` (unless
//! its caller keeps the provenance, as the scheduler does in its database) and a `.thumb.png`
//! beside it, plus `keys/cd/<cache key>` naming the asset a key rendered to. An
//! image no larger than a thumbnail ([`own_thumbnail`]) is its own thumbnail and has no
//! `.thumb.png`: a third file per tiny asset cost a tenth of a busy farm's CPU.
//! Files are written under a scratch name, synced, renamed into place and synced again: a crash
//! leaves no half asset, and an asset its caller was told is stored is on disk under its name.
//! One thread lands every file ([`Lander`]), so assets that come together share their syncs.
//!
//! The scratch file of a file held in memory is made in its asset's shard folder, not one
//! shared folder: a rename between folders takes the file system's one rename lock, and a
//! folder's lock is held for each file made or renamed in it. A PNG is held in memory until it
//! outgrows [`SPILL_BYTES`] (its hash, and so its shard, is known only once it is written); a
//! larger one is written to `tmp/` as it is encoded.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use kiln_protocol::CacheKey;
use tokio::sync::oneshot;

use crate::render::own_thumbnail;

/// The store under a data directory.
#[derive(Debug, Clone)]
pub struct AssetStore {
    root: PathBuf,
    lander: Arc<Lander>,
}

/// Moves files into the store for every thread and task that stores one, on a thread of its
/// own. A sync flushes the disk's cache, which costs about a millisecond whatever it carries, so
/// a sync per file caps a store at a few hundred files a second; here what comes while a sync
/// runs shares the next (group commit). A landing's files are written, synced, renamed into
/// place, and synced again before its caller hears: a rename is on disk only once a sync after
/// it ends, and the caller goes on to record the asset (a record whose file a power cut took
/// would name an asset that is not there). The second sync of one group is the first of the
/// next. On Linux one `syncfs` covers every file written and renamed before it began; elsewhere
/// each file, and each folder a file was renamed into, is synced on its own.
#[derive(Debug)]
struct Lander {
    tx: mpsc::Sender<Landing>,
    /// Syncs ended, successful or not (read by tests).
    #[cfg_attr(not(test), allow(dead_code))]
    syncs: Arc<AtomicU64>,
}

/// Files to move into place, in order (an asset's PNG last: its presence means the asset is
/// whole), and whom to tell once they are on disk. A file whose place is taken already is not
/// moved: the first of an asset's files stays.
struct Landing {
    files: Vec<(Content, PathBuf)>,
    done: oneshot::Sender<io::Result<()>>,
}

/// A file's bytes on their way in.
enum Content {
    Held(Vec<u8>),
    /// Written (not necessarily synced) to a scratch file on the store's file system.
    Written(Scratch),
}

/// A landing whose files were written and await a sync: each file's scratch file and place.
type Staged = (Vec<(Scratch, PathBuf)>, oneshot::Sender<io::Result<()>>);

/// A landing whose files were renamed and await a sync: the places they took.
type Moved = (Vec<PathBuf>, oneshot::Sender<io::Result<()>>);

impl Lander {
    /// Starts the thread that lands files, syncing the file system `dir` is on.
    fn start(dir: &Path) -> io::Result<Lander> {
        let dir = File::open(dir)?;
        let (tx, rx) = mpsc::channel();
        let syncs = Arc::new(AtomicU64::new(0));
        let counted = syncs.clone();
        std::thread::Builder::new().name("kiln-assets".into()).spawn(move || Lander::run(&rx, &dir, &counted))?;
        Ok(Lander { tx, syncs })
    }

    /// Hands `files` to the thread; the answer comes once they are on disk in place.
    fn land(&self, files: Vec<(Content, PathBuf)>) -> oneshot::Receiver<io::Result<()>> {
        let (done, answer) = oneshot::channel();
        // Without the thread the landing drops (its scratch files with it) and `answer` says so.
        let _ = self.tx.send(Landing { files, done });
        answer
    }

    /// Lands what comes until every sender is gone and the last landing is answered.
    fn run(rx: &mpsc::Receiver<Landing>, dir: &File, syncs: &AtomicU64) {
        // Renamed into place; the next sync puts the renames on disk.
        let mut moved: Vec<Moved> = Vec::new();
        loop {
            let mut batch = Vec::new();
            if moved.is_empty() {
                match rx.recv() {
                    Ok(landing) => batch.push(landing),
                    Err(mpsc::RecvError) => return,
                }
            }
            batch.extend(rx.try_iter());
            let mut staged: Vec<Staged> = Vec::with_capacity(batch.len());
            for Landing { files, done } in batch {
                match stage(files) {
                    Ok(files) => staged.push((files, done)),
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                }
            }
            let synced = flush(dir, &staged, &moved);
            syncs.fetch_add(1, Ordering::Relaxed);
            let copy = |r: &io::Result<()>| r.as_ref().map(|_| ()).map_err(|e| io::Error::new(e.kind(), e.to_string()));
            for (_, done) in moved.drain(..) {
                let _ = done.send(copy(&synced));
            }
            for (files, done) in staged {
                // Not synced: nothing moves, and the scratch files go.
                let moved_in = copy(&synced).and_then(|()| move_in(files));
                match moved_in {
                    Ok(places) => moved.push((places, done)),
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                }
            }
        }
    }
}

/// Writes a landing's held files to scratch files beside their places. A place taken already is
/// found at the rename ([`move_in`]): a look beforehand cost a lookup per file, and the place
/// is almost always free.
fn stage(files: Vec<(Content, PathBuf)>) -> io::Result<Vec<(Scratch, PathBuf)>> {
    let mut staged = Vec::with_capacity(files.len());
    for (content, to) in files {
        let scratch = match content {
            Content::Written(scratch) => scratch,
            Content::Held(bytes) => {
                let folder = to.parent().unwrap_or(Path::new("."));
                let path = folder.join(scratch_name());
                let mut file = match File::create(&path) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::create_dir_all(folder)?;
                        File::create(&path)?
                    }
                    made => made?,
                };
                let scratch = Scratch::new(path);
                file.write_all(&bytes)?;
                scratch
            }
        };
        staged.push((scratch, to));
    }
    Ok(staged)
}

/// Renames synced scratch files into their places, in order, leaving out (and removing) those
/// whose place is taken; returns the places taken.
fn move_in(files: Vec<(Scratch, PathBuf)>) -> io::Result<Vec<PathBuf>> {
    let mut places = Vec::with_capacity(files.len());
    for (mut scratch, to) in files {
        let folder = to.parent().unwrap_or(Path::new("."));
        let moved = match rename_new(&scratch.path, &to) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !folder.exists() => {
                fs::create_dir_all(folder)?;
                rename_new(&scratch.path, &to)?
            }
            moved => moved?,
        };
        if !moved {
            continue;
        }
        scratch.moved = true;
        places.push(to);
    }
    Ok(places)
}

/// Renames `from` to `to` unless `to` is taken; false (and nothing renamed) when it is. The
/// check and the rename are one step (`RENAME_NOREPLACE`).
#[cfg(target_os = "linux")]
fn rename_new(from: &Path, to: &Path) -> io::Result<bool> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => Ok(false),
        // A file system without the flag.
        Err(rustix::io::Errno::INVAL) => rename_unless_taken(from, to),
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(target_os = "linux"))]
fn rename_new(from: &Path, to: &Path) -> io::Result<bool> {
    rename_unless_taken(from, to)
}

/// Renames `from` to `to` unless `to` is taken, in two steps: only the landing thread moves
/// files in, so a place free at the look is free at the rename.
fn rename_unless_taken(from: &Path, to: &Path) -> io::Result<bool> {
    if to.exists() {
        return Ok(false);
    }
    fs::rename(from, to).map(|()| true)
}

/// Puts the `staged` files written and the renames of the `moved` on disk: one `syncfs`.
#[cfg(target_os = "linux")]
fn flush(dir: &File, _staged: &[Staged], _moved: &[Moved]) -> io::Result<()> {
    rustix::fs::syncfs(dir).map_err(io::Error::from)
}

/// Puts the `staged` files written and the renames of the `moved` on disk: each file written,
/// and each folder a file was renamed into, synced on its own.
#[cfg(not(target_os = "linux"))]
fn flush(_dir: &File, staged: &[Staged], moved: &[Moved]) -> io::Result<()> {
    let written = staged.iter().flat_map(|(files, _)| files.iter().map(|(s, _)| s.path.as_path()));
    let mut folders: Vec<&Path> = Vec::new();
    for folder in moved.iter().flat_map(|(places, _)| places.iter().filter_map(|p| p.parent())) {
        if !folders.contains(&folder) {
            folders.push(folder);
        }
    }
    written.chain(folders).try_for_each(|p| File::open(p)?.sync_all())
}

/// What a caller hears when the landing thread is gone (it panicked).
fn lander_gone(_: oneshot::error::RecvError) -> io::Error {
    io::Error::other("the asset store's landing thread stopped")
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

/// A scratch file: removed when dropped, unless it was moved into place.
struct Scratch {
    path: PathBuf,
    moved: bool,
}

impl Scratch {
    fn new(path: PathBuf) -> Scratch {
        Scratch { path, moved: false }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.moved {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Write for PendingAsset {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Body::Memory(held) = &mut self.body
            && held.len() + buf.len() > SPILL_BYTES
        {
            let spill = Scratch::new(self.scratch.clone());
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
        let lander = Arc::new(Lander::start(&root.join("tmp"))?);
        Ok(AssetStore { root, lander })
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

    /// Deletes an asset's files (PNG, thumbnail, provenance); those not there are no error.
    pub fn remove(&self, hash: &str) -> io::Result<()> {
        for path in [self.thumb_path(hash), self.provenance_path(hash), self.path(hash)] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// The hashes of the assets whose PNG was last written before `before` (retention's
    /// candidates). Blocks: reads every shard folder.
    pub fn stored_before(&self, before: std::time::SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(shards) = fs::read_dir(self.root.join("assets")) else { return out };
        for shard in shards.flatten() {
            let Ok(files) = fs::read_dir(shard.path()) else { continue };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let Some(hash) = name.strip_suffix(".png").filter(|h| h.len() == 64 && !h.contains('.')) else {
                    continue;
                };
                if f.metadata().and_then(|m| m.modified()).is_ok_and(|at| at < before) {
                    out.push(hash.to_owned());
                }
            }
        }
        out
    }

    /// Syncs of the store's file system so far, for tests.
    #[cfg(test)]
    fn syncs(&self) -> u64 {
        self.lander.syncs.load(Ordering::Relaxed)
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
    /// image is its own), and returns once they are on disk. Returns the hash and size. An
    /// asset already stored keeps its first provenance. Blocks: for a render's thread.
    pub fn commit(
        &self,
        pending: PendingAsset,
        thumb: Option<&[u8]>,
        provenance: Option<&[u8]>,
    ) -> io::Result<(String, u64)> {
        let hash = pending.hash();
        let PendingAsset { body, bytes, .. } = pending;
        let png = match body {
            Body::Memory(held) => Content::Held(held),
            Body::File(file, scratch) => {
                file.into_inner().map_err(|e| e.into_error())?;
                Content::Written(scratch)
            }
        };
        let mut files = Vec::with_capacity(3);
        if let Some(json) = provenance {
            files.push((Content::Held(json.to_vec()), self.provenance_path(&hash)));
        }
        if let Some(thumb) = thumb {
            files.push((Content::Held(thumb.to_vec()), self.thumb_path(&hash)));
        }
        files.push((png, self.path(&hash)));
        self.lander.land(files).blocking_recv().map_err(lander_gone)??;
        Ok((hash, bytes))
    }

    /// A fresh path in the store's scratch folder (the same file system as the assets), for a
    /// file to be filled and then moved in with [`Self::import_file`], or a large PNG.
    pub fn scratch_path(&self) -> PathBuf {
        self.root.join("tmp").join(scratch_name())
    }

    /// Moves a PNG written at a [`Self::scratch_path`] and whose BLAKE3 the caller checked is
    /// `hash` into place as the asset, with its thumbnail (`None`: the image is its own, or has
    /// none), as [`Self::commit`] does. The scratch file is gone afterwards either way.
    pub async fn import_file(&self, hash: &str, scratch: PathBuf, thumb: Option<Vec<u8>>) -> io::Result<()> {
        let mut files = Vec::with_capacity(2);
        if let Some(thumb) = thumb {
            files.push((Content::Held(thumb), self.thumb_path(hash)));
        }
        files.push((Content::Written(Scratch::new(scratch)), self.path(hash)));
        self.lander.land(files).await.map_err(lander_gone)?
    }

    /// Stores the provenance of an imported asset (the first one stays).
    pub async fn import_provenance(&self, hash: &str, json: Vec<u8>) -> io::Result<()> {
        let files = vec![(Content::Held(json), self.provenance_path(hash))];
        self.lander.land(files).await.map_err(lander_gone)?
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
pub fn png_size(path: &Path) -> io::Result<(u32, u32)> {
    let mut head = [0u8; 24];
    io::Read::read_exact(&mut File::open(path)?, &mut head)?;
    png_dimensions(&head).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a PNG"))
}

/// The width and height the header of a PNG's bytes gives (its IHDR chunk comes first), or
/// `None` where they do not start as a PNG does.
pub fn png_dimensions(png: &[u8]) -> Option<(u32, u32)> {
    let head = png.get(..24)?;
    if &head[..8] != b"\x89PNG\r\n\x1a\n" || &head[12..16] != b"IHDR" {
        return None;
    }
    let be = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    Some((be(16), be(20)))
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

    #[test]
    fn a_commit_returns_only_once_a_sync_after_its_renames_ended() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let mut p = store.begin().unwrap();
        p.write_all(b"synced twice").unwrap();
        let before = store.syncs();
        let (hash, _) = store.commit(p, None, Some(&b"{}"[..])).unwrap();
        // One sync for the written files, one for their renames.
        assert!(store.syncs() >= before + 2, "answered after {} syncs", store.syncs() - before);
        // Stored already: nothing is written, but the answer waits for a sync, which covers
        // the rename the file's place was taken by.
        let mut p = store.begin().unwrap();
        p.write_all(b"synced twice").unwrap();
        let before = store.syncs();
        assert_eq!(store.commit(p, None, None).unwrap().0, hash);
        assert!(store.syncs() > before);
        assert_no_scratch(dir.path());
    }

    #[test]
    fn a_landing_that_cannot_be_written_says_why_and_leaves_no_scratch() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let body = b"blocked".repeat(SPILL_BYTES / 4);
        let hash = blake3::hash(&body).to_hex().to_string();
        // A file where the asset's shard folder should be.
        fs::write(store.shard(&hash), b"in the way").unwrap();
        let mut p = store.begin().unwrap();
        p.write_all(&body).unwrap();
        assert!(store.commit(p, Some(&b"thumb"[..]), Some(&b"{}"[..])).is_err());
        fs::remove_file(store.shard(&hash)).unwrap();
        assert_no_scratch(dir.path());
        assert!(!store.contains(&hash));
    }

    #[tokio::test]
    async fn an_imported_file_lands_and_its_scratch_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let hash = "cd".repeat(32);
        let thumbs = [None, Some(b"its thumb".to_vec()), Some(b"another thumb".to_vec())];
        for (bytes, thumb) in [&b"imported"[..], b"imported again", b"and again"].into_iter().zip(thumbs) {
            let scratch = store.scratch_path();
            fs::write(&scratch, bytes).unwrap();
            store.import_file(&"ab".repeat(32), scratch, thumb).await.unwrap();
        }
        // The first of each file stays: a thumbnail comes to an asset stored without one.
        assert_eq!(fs::read(store.path(&"ab".repeat(32))).unwrap(), b"imported", "the first stays");
        assert_eq!(fs::read(store.thumb_path(&"ab".repeat(32))).unwrap(), b"its thumb");
        store.import_provenance(&hash, b"{\"n\":1}".to_vec()).await.unwrap();
        store.import_provenance(&hash, b"{\"n\":2}".to_vec()).await.unwrap();
        assert_eq!(fs::read(store.provenance_path(&hash)).unwrap(), b"{\"n\":1}");
        assert_no_scratch(dir.path());
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
    fn a_rename_into_a_taken_place_moves_nothing_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join(".scratch"), dir.path().join("place"));
        // The one-step rename, then the two-step one of a file system without it.
        for rename in [rename_new, rename_unless_taken] {
            fs::write(&from, b"second").unwrap();
            fs::write(&to, b"first").unwrap();
            assert!(!rename(&from, &to).unwrap(), "the place was taken");
            assert_eq!(fs::read(&to).unwrap(), b"first", "the first stays");
            assert_eq!(fs::read(&from).unwrap(), b"second", "the scratch file is left to its owner");
            fs::remove_file(&to).unwrap();
            assert!(rename(&from, &to).unwrap(), "the place was free");
            assert_eq!(fs::read(&to).unwrap(), b"second");
            assert!(!from.exists());
            fs::remove_file(&to).unwrap();
        }
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
