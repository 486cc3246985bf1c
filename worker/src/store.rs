//! The content-addressed asset store: `assets/ab/<blake3>.png` with a `.thumb.png` and a
//! provenance `.json` beside it, plus `keys/<cache key>` naming the asset a key rendered to.
//! Files are written to `tmp/`, synced, then renamed into place: a crash leaves no half asset.
//! Renders that finish together share one sync ([`GroupSync`]).

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use kiln_protocol::CacheKey;

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
    state: Mutex<Tickets>,
    synced: Condvar,
}

/// Tickets are taken after a caller's writes: a sync that starts after ticket `n` was taken
/// covers it.
#[derive(Debug, Default)]
struct Tickets {
    taken: u64,
    covered: u64,
    running: bool,
}

impl GroupSync {
    fn new(dir: &Path) -> io::Result<GroupSync> {
        Ok(GroupSync { dir: File::open(dir)?, state: Mutex::new(Tickets::default()), synced: Condvar::new() })
    }

    /// Returns once `files` (written by this thread) are on disk.
    #[cfg(not(target_os = "linux"))]
    fn sync(&self, files: &[&File]) -> io::Result<()> {
        files.iter().try_for_each(|f| f.sync_all())
    }

    /// Returns once `files` (written by this thread) are on disk: by a `syncfs` that began after
    /// they were written, this thread's or another's.
    #[cfg(target_os = "linux")]
    fn sync(&self, _files: &[&File]) -> io::Result<()> {
        let lock = || self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut t = lock();
        t.taken += 1;
        let mine = t.taken;
        loop {
            if t.covered >= mine {
                return Ok(());
            }
            if t.running {
                t = self.synced.wait(t).unwrap_or_else(std::sync::PoisonError::into_inner);
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
                t.covered = t.covered.max(upto);
            }
            self.synced.notify_all();
            // On failure the waiters it would have covered try again themselves.
            result?;
        }
    }
}

/// A PNG being written: hashes as it goes, lands in the store on [`PendingAsset::commit`].
pub struct PendingAsset {
    file: BufWriter<File>,
    tmp: PathBuf,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl Write for PendingAsset {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl AssetStore {
    /// Opens (creating) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> io::Result<AssetStore> {
        let root = data_dir.to_path_buf();
        for d in ["assets", "keys", "tmp"] {
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

    /// Path of an asset's thumbnail PNG.
    pub fn thumb_path(&self, hash: &str) -> PathBuf {
        self.shard(hash).join(format!("{hash}.thumb.png"))
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
        let tmp = self.scratch_path();
        Ok(PendingAsset {
            // The encoder writes a band's compressed rows at a time; 64 KiB keeps writes few
            // without a megabyte for each small image.
            file: BufWriter::with_capacity(64 << 10, File::create(&tmp)?),
            tmp,
            hasher: blake3::Hasher::new(),
            bytes: 0,
        })
    }

    /// Moves a finished PNG into place under its hash, with its thumbnail and provenance
    /// (`provenance` is given the hash and returns the JSON). Returns the hash and size.
    /// An asset already stored keeps its first provenance.
    pub fn commit(
        &self,
        pending: PendingAsset,
        thumb: &[u8],
        provenance: impl FnOnce(&str) -> String,
    ) -> io::Result<(String, u64)> {
        let PendingAsset { file, tmp, hasher, bytes } = pending;
        let hash = hasher.finalize().to_hex().to_string();
        let file = match file.into_inner() {
            Ok(f) if !self.contains(&hash) => f,
            done => {
                let _ = fs::remove_file(&tmp);
                return done.map(|_| (hash, bytes)).map_err(|e| e.into_error());
            }
        };
        let mut temps = vec![tmp];
        let landed = self.land(&hash, &file, thumb, provenance(&hash).as_bytes(), &mut temps);
        for t in &temps {
            let _ = fs::remove_file(t);
        }
        landed.map(|()| (hash, bytes))
    }

    /// Writes the thumbnail and provenance beside the PNG at `temps[0]`, syncs all three, then
    /// renames them into place, the PNG last: its presence means the asset is complete. What
    /// is still in `temps` afterwards did not land.
    fn land(
        &self,
        hash: &str,
        png: &File,
        thumb: &[u8],
        provenance: &[u8],
        temps: &mut Vec<PathBuf>,
    ) -> io::Result<()> {
        let (t, thumb_file) = self.write_scratch(thumb)?;
        temps.push(t);
        let (p, provenance_file) = self.write_scratch(provenance)?;
        temps.push(p);
        self.sync.sync(&[png, &thumb_file, &provenance_file])?;
        fs::create_dir_all(self.shard(hash))?;
        fs::rename(&temps[1], self.thumb_path(hash))?;
        fs::rename(&temps[2], self.provenance_path(hash))?;
        fs::rename(&temps[0], self.path(hash))?;
        temps.clear();
        Ok(())
    }

    /// A fresh path in the store's scratch folder (the same file system as the assets), for a
    /// file to be filled and then moved in with [`Self::import_file`].
    pub fn scratch_path(&self) -> PathBuf {
        self.root.join("tmp").join(format!("{}.{}", std::process::id(), unique()))
    }

    /// A new scratch file holding `bytes` (not synced).
    fn write_scratch(&self, bytes: &[u8]) -> io::Result<(PathBuf, File)> {
        let tmp = self.scratch_path();
        let mut f = File::create(&tmp)?;
        if let Err(e) = f.write_all(bytes) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok((tmp, f))
    }

    /// Writes a file whole or not at all (scratch file, then rename); with `durable`, its bytes
    /// are on disk before it appears.
    fn write_atomic(&self, path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
        let (tmp, f) = self.write_scratch(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
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
        self.write_atomic(&self.provenance_path(hash), json, true)
    }

    /// Records that `key` rendered to `hash`. The index is a cache, not a record: it is not
    /// synced (an fsync less per asset), and an entry lost in a power cut costs one re-render of
    /// the same bytes. [`Self::lookup_key`] checks what it reads.
    pub fn put_key(&self, key: &CacheKey, hash: &str) -> io::Result<()> {
        self.write_atomic(&self.root.join("keys").join(key.to_string()), hash.as_bytes(), false)
    }

    /// The asset a key rendered to, if it is recorded and the asset is still stored.
    pub fn lookup_key(&self, key: &CacheKey) -> Option<String> {
        let hash = fs::read_to_string(self.root.join("keys").join(key.to_string())).ok()?;
        let hash = hash.trim();
        let valid = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        (valid && self.contains(hash)).then(|| hash.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_asset_lands_under_the_blake3_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let mut p = store.begin().unwrap();
        p.write_all(b"not really a png").unwrap();
        let (hash, bytes) = store.commit(p, b"thumb", |h| format!("{{\"asset\":\"{h}\"}}")).unwrap();
        assert_eq!(hash, blake3::hash(b"not really a png").to_hex().to_string());
        assert_eq!(bytes, 16);
        assert_eq!(fs::read(store.path(&hash)).unwrap(), b"not really a png");
        assert!(fs::read_to_string(store.provenance_path(&hash)).unwrap().contains(&hash));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temp files left");
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
                                let (hash, _) = store.commit(p, &[i, t], |h| format!("{{\"asset\":\"{h}\"}}")).unwrap();
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
            assert_eq!(fs::read(store.thumb_path(hash)).unwrap(), [body[1], body[0]]);
            assert!(fs::read_to_string(store.provenance_path(hash)).unwrap().contains(hash.as_str()));
        }
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temp files left");
    }

    #[test]
    fn a_repeated_asset_keeps_its_first_provenance_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let mut hashes = Vec::new();
        for n in 0..2 {
            let mut p = store.begin().unwrap();
            p.write_all(b"same bytes").unwrap();
            hashes.push(store.commit(p, b"thumb", |_| format!("{{\"n\":{n}}}")).unwrap().0);
        }
        assert_eq!(hashes[0], hashes[1]);
        assert_eq!(fs::read_to_string(store.provenance_path(&hashes[0])).unwrap(), "{\"n\":0}");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temp files left");
    }

    #[test]
    fn a_key_pointing_at_a_missing_or_garbled_asset_is_no_hit() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let key = CacheKey([7; 32]);
        assert_eq!(store.lookup_key(&key), None);
        store.put_key(&key, &"ab".repeat(32)).unwrap();
        assert_eq!(store.lookup_key(&key), None, "the asset itself is not stored");
        fs::write(dir.path().join("keys").join(key.to_string()), "../../etc/passwd").unwrap();
        assert_eq!(store.lookup_key(&key), None);
    }
}
