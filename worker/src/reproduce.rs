//! Reproducing an asset from its provenance alone (`kiln reproduce HASH`): the request, model
//! and post chain the record names are rendered again and the bytes compared. On the backend
//! that made it, they must be identical; on another, within the tolerance the backends are held
//! to ([`MAX_CHANNEL_DIFF`], [`MIN_PSNR_DB`]).

use serde::{Deserialize, Serialize};

use crate::engine::cppn::{MODEL_ID, model_version};
use crate::post::post_chain_version;
use crate::render::{Engine, ModelPath, Progress, render_to};
use kiln_protocol::RenderRequest;

/// The most any channel of a pixel may differ between backends, in 8-bit levels.
pub const MAX_CHANNEL_DIFF: u8 = 2;

/// The least peak signal-to-noise ratio between backends, dB.
pub const MIN_PSNR_DB: f64 = 45.0;

/// What of a provenance record a reproduction reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Record {
    /// The asset's BLAKE3.
    pub asset: String,
    /// The backend that made it: `cpu` or `wgpu`.
    pub backend: String,
    /// The model.
    pub model: RecordModel,
    /// The post chain's version.
    pub post_chain_version: String,
    /// What was rendered.
    pub request: RenderRequest,
}

/// The model a [`Record`] names.
#[derive(Debug, Clone, Deserialize)]
pub struct RecordModel {
    /// Its id (`cppn`).
    pub id: String,
    /// Its version.
    pub version: String,
    /// The code path it ran on.
    pub path: ModelPath,
}

/// Why an asset cannot be reproduced here, before or while rendering.
#[derive(Debug, thiserror::Error)]
pub enum ReproduceError {
    /// The record is not one this build reads.
    #[error("provenance: {0}")]
    Record(String),
    /// This build renders something else than the record names.
    #[error("{field}: the asset was made with {recorded}, this build has {here}; it cannot be reproduced here")]
    Differs {
        /// The field that differs.
        field: &'static str,
        /// What the record says.
        recorded: String,
        /// What this build has.
        here: String,
    },
    /// The original bytes are not the asset the record names.
    #[error("asset: the bytes given hash to {0}, not the asset the provenance names")]
    NotTheAsset(String),
    /// The render failed.
    #[error("render: {0}")]
    Render(String),
    /// A PNG would not decode.
    #[error("{0}: not a readable 8-bit RGB PNG: {1}")]
    Png(&'static str, String),
}

/// How a reproduction came out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// The asset.
    pub asset: String,
    /// The BLAKE3 of the bytes rendered now.
    pub rendered: String,
    /// The backend that made the asset.
    pub recorded_backend: String,
    /// The backend that rendered it now.
    pub backend: String,
    /// Whether the bytes are the same.
    pub identical: bool,
    /// The largest difference of a channel, 8-bit levels (0 when identical).
    pub max_channel_diff: u8,
    /// Peak signal-to-noise ratio, dB (`None`: identical pixels, infinitely high).
    pub psnr_db: Option<f64>,
    /// Whether it reproduced: identical bytes on the same backend, or within the tolerance on
    /// another.
    pub verified: bool,
    /// The verdict in words.
    pub summary: String,
}

/// Reads a provenance record, checking that this build can render what it names.
pub fn read_record(record: &serde_json::Value) -> Result<Record, ReproduceError> {
    let r: Record =
        kiln_protocol::decode_json_value(record.clone()).map_err(|e| ReproduceError::Record(e.to_string()))?;
    let here = [
        ("model.id", r.model.id.clone(), MODEL_ID.to_owned()),
        ("model.version", r.model.version.clone(), model_version().to_owned()),
        ("post_chain_version", r.post_chain_version.clone(), post_chain_version(&r.request)),
    ];
    for (field, recorded, here) in here {
        if recorded != here {
            return Err(ReproduceError::Differs { field, recorded, here });
        }
    }
    Ok(r)
}

/// Decodes an 8-bit RGB PNG to its pixels.
fn pixels(what: &'static str, bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), ReproduceError> {
    let bad = |e: String| ReproduceError::Png(what, e);
    let decoder = png::Decoder::new_with_limits(std::io::Cursor::new(bytes), png::Limits { bytes: 1 << 30 });
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or_else(|| bad("too large".into()))?];
    let info = reader.next_frame(&mut buf).map_err(|e| bad(e.to_string()))?;
    if info.color_type != png::ColorType::Rgb || info.bit_depth != png::BitDepth::Eight {
        return Err(bad(format!("{:?} at {:?} bits", info.color_type, info.bit_depth)));
    }
    buf.truncate(info.buffer_size());
    Ok((info.width, info.height, buf))
}

/// Compares the asset's bytes (`original`) with what `engine` renders now from `record`.
pub fn compare(record: &Record, original: &[u8], now: &[u8], backend: &str) -> Result<Verdict, ReproduceError> {
    let given = blake3::hash(original).to_hex().to_string();
    if given != record.asset {
        return Err(ReproduceError::NotTheAsset(given));
    }
    let rendered = blake3::hash(now).to_hex().to_string();
    let identical = rendered == record.asset;
    let same_backend = backend == record.backend;
    let (max, psnr) = if identical {
        (0, None)
    } else {
        let (aw, ah, a) = pixels("the asset", original)?;
        let (bw, bh, b) = pixels("the render", now)?;
        if (aw, ah) != (bw, bh) {
            return Err(ReproduceError::Render(format!("rendered {bw}×{bh}, the asset is {aw}×{ah}")));
        }
        let max = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
        let mse =
            a.iter().zip(&b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>() / a.len().max(1) as f64;
        (max, (mse > 0.0).then(|| 10.0 * (255.0 * 255.0 / mse).log10()))
    };
    let within = max <= MAX_CHANNEL_DIFF && psnr.is_none_or(|p| p >= MIN_PSNR_DB);
    let verified = identical || (!same_backend && within);
    let psnr_text = psnr.map_or("identical pixels".to_owned(), |p| format!("PSNR {p:.1} dB"));
    let summary = match (identical, same_backend, within) {
        (true, _, _) => format!("identical: the same bytes on {backend}"),
        (false, true, _) => format!(
            "NOT reproduced: {backend} made the asset and now makes other bytes (max channel difference {max}, {psnr_text})"
        ),
        (false, false, true) => format!(
            "within tolerance: made on {}, rendered on {backend}; max channel difference {max} (at most {MAX_CHANNEL_DIFF}), {psnr_text} (at least {MIN_PSNR_DB} dB)",
            record.backend
        ),
        (false, false, false) => format!(
            "NOT reproduced: made on {}, rendered on {backend}; max channel difference {max} (at most {MAX_CHANNEL_DIFF}), {psnr_text} (at least {MIN_PSNR_DB} dB)",
            record.backend
        ),
    };
    Ok(Verdict {
        asset: record.asset.clone(),
        rendered,
        recorded_backend: record.backend.clone(),
        backend: backend.to_owned(),
        identical,
        max_channel_diff: max,
        psnr_db: psnr,
        verified,
        summary,
    })
}

/// Renders `record`'s request on `engine` (the record's code path) and compares it with
/// `original`.
pub fn reproduce(
    record: &Record,
    original: &[u8],
    engine: &Engine,
    progress: &mut dyn FnMut(Progress),
) -> Result<Verdict, ReproduceError> {
    let engine = Engine { path: record.model.path, ..engine.clone() };
    let mut now = Vec::new();
    render_to(&engine, &record.request, &mut now, progress).map_err(|e| ReproduceError::Render(e.to_string()))?;
    compare(record, original, &now, engine.backend.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::Backend;
    use kiln_protocol::{Tier, TierLimits};

    fn cpu() -> Engine {
        Engine { backend: Backend::Cpu { threads: 2 }, path: ModelPath::Fused, band_samples: 1 << 20 }
    }

    fn record_of(req: &RenderRequest, png: &[u8], backend: &str) -> serde_json::Value {
        serde_json::json!({
            "asset": blake3::hash(png).to_hex().to_string(),
            "backend": backend,
            "model": { "id": MODEL_ID, "version": model_version(), "path": "fused" },
            "post_chain_version": post_chain_version(req),
            "request": req,
            "timings": { "total_seconds": 0.1 },
        })
    }

    #[test]
    fn an_asset_reproduces_from_its_record_and_a_changed_one_does_not() {
        let req = RenderRequest::resolve(
            MODEL_ID,
            "ember dusk",
            7,
            Tier::Final,
            Some(48),
            None,
            Some(1),
            &TierLimits::default(),
        )
        .unwrap();
        let mut png = Vec::new();
        render_to(&cpu(), &req, &mut png, &mut |_| {}).unwrap();
        let record = read_record(&record_of(&req, &png, "cpu")).unwrap();
        let v = reproduce(&record, &png, &cpu(), &mut |_| {}).unwrap();
        assert!(v.identical && v.verified, "{v:?}");

        // Another backend's bytes, one level off here and there: within tolerance.
        let (w, h, mut px) = pixels("t", &png).unwrap();
        for p in px.iter_mut().step_by(97) {
            *p = p.saturating_add(1);
        }
        let near = crate::render::encode_png(w, h, &px).unwrap();
        let record = read_record(&record_of(&req, &near, "wgpu")).unwrap();
        let v = reproduce(&record, &near, &cpu(), &mut |_| {}).unwrap();
        assert!(!v.identical && v.verified && v.max_channel_diff == 1, "{v:?}");
        // The same off bytes said to come from this backend: not reproduced.
        let record = read_record(&record_of(&req, &near, "cpu")).unwrap();
        let v = reproduce(&record, &near, &cpu(), &mut |_| {}).unwrap();
        assert!(!v.verified && v.summary.starts_with("NOT reproduced"), "{v:?}");
        // Far off, from another backend: not reproduced either.
        for p in px.iter_mut().step_by(5) {
            *p = p.wrapping_add(40);
        }
        let far = crate::render::encode_png(w, h, &px).unwrap();
        let record = read_record(&record_of(&req, &far, "wgpu")).unwrap();
        let v = reproduce(&record, &far, &cpu(), &mut |_| {}).unwrap();
        assert!(!v.verified && v.max_channel_diff > MAX_CHANNEL_DIFF, "{v:?}");

        // Bytes that are not the asset named, and a record of another model version.
        assert!(matches!(compare(&record, &png, &png, "cpu"), Err(ReproduceError::NotTheAsset(_))));
        let mut other = record_of(&req, &png, "cpu");
        other["model"]["version"] = "0000".into();
        let e = read_record(&other).unwrap_err().to_string();
        assert!(e.starts_with("model.version: the asset was made with 0000"), "{e}");
        let e = read_record(&serde_json::json!({ "asset": "x" })).unwrap_err().to_string();
        assert!(e.starts_with("provenance: "), "{e}");
    }
}
