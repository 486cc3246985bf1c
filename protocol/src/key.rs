//! The cache key: BLAKE3 of the canonical JSON of everything that decides an artwork's pixels.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What enters the cache key, exactly as DESIGN.md lists it. The backend is not here on purpose:
/// backends agree within tolerance, and which one rendered is kept in the provenance instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInput {
    /// Model id, e.g. `cppn`.
    pub model_id: String,
    /// Model version: a hash of the model's weights (or of its weight generator).
    pub model_version: String,
    /// The prompt after [`crate::normalise_prompt`].
    pub prompt: String,
    /// The seed.
    pub seed: u64,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Supersampling factor per axis (samples × samples per pixel).
    pub samples: u32,
    /// Version of the post-processing chain (tone map, resolve, watermark, dither, encoding).
    pub post_chain_version: String,
    /// The rows of a tile, for a tile of a job the scheduler cut up; absent (and absent from
    /// the canonical JSON, so a whole image's key is what it always was) for a whole image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile: Option<crate::request::Tile>,
}

impl KeyInput {
    /// The canonical JSON: an object with keys sorted by byte order, no white space,
    /// integers as plain decimals. These bytes are the contract; a test pins them.
    pub fn canonical_json(&self) -> String {
        // The fields in byte order of their names, written as a struct: the same bytes as a
        // sorted map, without building one (and copying its strings) for every submit.
        #[derive(Serialize)]
        struct Sorted<'a> {
            height: u32,
            model_id: &'a str,
            model_version: &'a str,
            post_chain_version: &'a str,
            prompt: &'a str,
            samples: u32,
            seed: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            tile: Option<SortedTile>,
            width: u32,
        }
        #[derive(Serialize)]
        struct SortedTile {
            rows: u32,
            y0: u32,
        }
        let sorted = Sorted {
            height: self.height,
            model_id: &self.model_id,
            model_version: &self.model_version,
            post_chain_version: &self.post_chain_version,
            prompt: &self.prompt,
            samples: self.samples,
            seed: self.seed,
            tile: self.tile.map(|t| SortedTile { rows: t.rows, y0: t.y0 }),
            width: self.width,
        };
        // Plain numbers and strings cannot fail to serialise.
        serde_json::to_string(&sorted).unwrap_or_default()
    }

    /// The cache key of this input.
    pub fn key(&self) -> CacheKey {
        CacheKey(*blake3::hash(self.canonical_json().as_bytes()).as_bytes())
    }
}

/// A cache key: 32 bytes, shown and parsed as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One write of the whole hex, not 32 `{:02x}` through the formatter (a submit shows its
        // key at least once).
        f.write_str(&blake3::Hash::from_bytes(self.0).to_hex())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

/// A cache key that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("a cache key is 64 hex digits, got {0:?}")]
pub struct ParseKeyError(String);

impl FromStr for CacheKey {
    type Err = ParseKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hash = blake3::Hash::from_hex(s).map_err(|_| ParseKeyError(s.to_owned()))?;
        Ok(CacheKey(*hash.as_bytes()))
    }
}

impl Serialize for CacheKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CacheKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> KeyInput {
        KeyInput {
            model_id: "cppn".into(),
            model_version: "0123abcd".into(),
            prompt: "ember tide".into(),
            seed: 42,
            width: 512,
            height: 384,
            samples: 1,
            post_chain_version: "post-1".into(),
            tile: None,
        }
    }

    #[test]
    fn a_tile_has_its_own_key_and_a_whole_image_the_key_it_always_had() {
        let mut i = input();
        i.tile = Some(crate::request::Tile { y0: 128, rows: 64 });
        assert_eq!(
            i.canonical_json(),
            r#"{"height":384,"model_id":"cppn","model_version":"0123abcd","post_chain_version":"post-1","prompt":"ember tide","samples":1,"seed":42,"tile":{"rows":64,"y0":128},"width":512}"#
        );
        assert_ne!(i.key(), input().key());
        i.tile = Some(crate::request::Tile { y0: 0, rows: 64 });
        assert_ne!(i.key(), input().key(), "the first tile is not the whole image");
    }

    #[test]
    fn the_canonical_json_is_pinned_byte_for_byte() {
        assert_eq!(
            input().canonical_json(),
            r#"{"height":384,"model_id":"cppn","model_version":"0123abcd","post_chain_version":"post-1","prompt":"ember tide","samples":1,"seed":42,"width":512}"#
        );
    }

    #[test]
    fn the_canonical_json_is_a_sorted_map_of_the_fields_for_any_prompt() {
        for prompt in ["", "quote \" back\\slash", "tab\tnew\nline \u{1} \u{7f}", "émaux 窯 🔥", "</script>"] {
            let mut i = input();
            i.prompt = prompt.into();
            i.seed = u64::MAX;
            let map: std::collections::BTreeMap<&str, serde_json::Value> = [
                ("height", i.height.into()),
                ("model_id", i.model_id.clone().into()),
                ("model_version", i.model_version.clone().into()),
                ("post_chain_version", i.post_chain_version.clone().into()),
                ("prompt", i.prompt.clone().into()),
                ("samples", i.samples.into()),
                ("seed", i.seed.into()),
                ("width", i.width.into()),
            ]
            .into_iter()
            .collect();
            assert_eq!(i.canonical_json(), serde_json::to_string(&map).unwrap(), "prompt {prompt:?}");
        }
    }

    #[test]
    fn the_cache_key_is_the_blake3_of_the_canonical_json() {
        let key = input().key();
        let expected = blake3::hash(input().canonical_json().as_bytes());
        assert_eq!(key.0, *expected.as_bytes());
        // Pinned: a change here invalidates every cache in the field and needs a migration.
        assert_eq!(key.to_string(), "018d8a4d83bbefc11c5c0b4473c4cd189a4126a242c3b4dc3b0a2400efe6e887");
    }

    #[test]
    fn every_field_moves_the_key() {
        let base = input().key();
        let mut changed = vec![];
        let mut i = input();
        i.seed = 43;
        changed.push(i.key());
        let mut i = input();
        i.width = 513;
        changed.push(i.key());
        let mut i = input();
        i.prompt = "ember tides".into();
        changed.push(i.key());
        let mut i = input();
        i.samples = 2;
        changed.push(i.key());
        let mut i = input();
        i.model_version = "x".into();
        changed.push(i.key());
        let mut i = input();
        i.post_chain_version = "post-2".into();
        changed.push(i.key());
        for k in changed {
            assert_ne!(k, base);
        }
    }

    #[test]
    fn a_key_round_trips_through_hex_and_json() {
        let key = input().key();
        assert_eq!(key.to_string().parse::<CacheKey>().unwrap(), key);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(serde_json::from_str::<CacheKey>(&json).unwrap(), key);
        assert!("xyz".parse::<CacheKey>().is_err());
    }
}
