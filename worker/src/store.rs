//! The content-addressed asset store: `assets/ab/<blake3>.png` with a `.thumb.png` and a
//! provenance `.json` beside it, plus `keys/<cache key>` naming the asset a key rendered to.
//! Files are written to `tmp/`, synced, then renamed into place: a crash leaves no half asset.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use kiln_protocol::CacheKey;

/// The store under a data directory.
#[derive(Debug, Clone)]
pub struct AssetStore {
    root: PathBuf,
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

/// Writes a file whole or not at all (temp file, then rename); with `durable`, its bytes are on
/// disk before it appears.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let tmp = dir.join(format!("{}.{}", std::process::id(), unique()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
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
        Ok(AssetStore { root })
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
        let tmp = self.root.join("tmp").join(format!("{}.{}.png", std::process::id(), unique()));
        Ok(PendingAsset {
            file: BufWriter::with_capacity(1 << 20, File::create(&tmp)?),
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
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        let hash = hasher.finalize().to_hex().to_string();
        let shard = self.shard(&hash);
        fs::create_dir_all(&shard)?;
        let tmp_dir = self.root.join("tmp");
        if self.contains(&hash) {
            fs::remove_file(&tmp)?;
        } else {
            write_atomic(&tmp_dir, &self.thumb_path(&hash), thumb, true)?;
            write_atomic(&tmp_dir, &self.provenance_path(&hash), provenance(&hash).as_bytes(), true)?;
            // The PNG lands last: its presence means the asset is complete.
            fs::rename(&tmp, self.path(&hash))?;
        }
        Ok((hash, bytes))
    }

    /// A fresh path in the store's scratch folder (the same file system as the assets), for a
    /// file to be filled and then moved in with [`Self::import_file`].
    pub fn scratch_path(&self) -> PathBuf {
        self.root.join("tmp").join(format!("{}.{}", std::process::id(), unique()))
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
        write_atomic(&self.root.join("tmp"), &self.provenance_path(hash), json, true)
    }

    /// Records that `key` rendered to `hash`. The index is a cache, not a record: it is not
    /// synced (an fsync less per asset), and an entry lost in a power cut costs one re-render of
    /// the same bytes. [`Self::lookup_key`] checks what it reads.
    pub fn put_key(&self, key: &CacheKey, hash: &str) -> io::Result<()> {
        write_atomic(&self.root.join("tmp"), &self.root.join("keys").join(key.to_string()), hash.as_bytes(), false)
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
