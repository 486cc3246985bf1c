//! Render requests and tiers: what a client asks for, resolved against the tier's defaults and limits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{KeyInput, normalise_prompt};

/// A render tier. Same prompt and seed at every tier is the same artwork at another resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// A fast look: small, one sample per pixel, watermarked.
    Preview,
    /// The sellable asset: supersampled.
    Final,
    /// Printer-ready: large, rendered in tiles, ordered dither.
    Print,
}

impl Tier {
    /// Every tier, in priority order (preview first).
    pub const ALL: [Tier; 3] = [Tier::Preview, Tier::Final, Tier::Print];

    /// The tier's name as it appears in configs, queues and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Preview => "preview",
            Tier::Final => "final",
            Tier::Print => "print",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = RequestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "preview" => Ok(Tier::Preview),
            "final" => Ok(Tier::Final),
            "print" => Ok(Tier::Print),
            _ => Err(RequestError::UnknownTier(s.to_owned())),
        }
    }
}

/// A tier's defaults and limits. Configurable per tier (`tiers.<tier>.<field>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    /// Long side in pixels when the request gives no size.
    pub default_side: u32,
    /// Largest width or height accepted, in pixels.
    pub max_side: u32,
    /// Largest width × height accepted.
    pub max_pixels: u64,
    /// Supersampling factor per axis when the request gives none.
    pub default_samples: u32,
    /// Largest supersampling factor per axis accepted.
    pub max_samples: u32,
    /// Whether the output carries the preview watermark.
    pub watermark: bool,
    /// Whether the 8-bit output is quantised with an ordered dither (print) or rounded.
    pub dither: bool,
}

/// The defaults and limits of every tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierLimits {
    /// The preview tier.
    pub preview: TierSpec,
    /// The final tier.
    pub r#final: TierSpec,
    /// The print tier.
    pub print: TierSpec,
    /// Longest prompt accepted, in characters (after normalisation).
    pub max_prompt_chars: usize,
}

impl Default for TierLimits {
    fn default() -> Self {
        TierLimits {
            preview: TierSpec {
                default_side: 512,
                max_side: 1024,
                max_pixels: 1024 * 1024,
                default_samples: 1,
                max_samples: 2,
                watermark: true,
                dither: false,
            },
            r#final: TierSpec {
                default_side: 2048,
                max_side: 4096,
                max_pixels: 4096 * 4096,
                default_samples: 4,
                max_samples: 4,
                watermark: false,
                dither: false,
            },
            print: TierSpec {
                default_side: 8192,
                max_side: 16384,
                max_pixels: 16384 * 16384,
                default_samples: 1,
                max_samples: 2,
                watermark: false,
                dither: true,
            },
            max_prompt_chars: 2000,
        }
    }
}

impl TierLimits {
    /// The spec of one tier.
    pub fn spec(&self, tier: Tier) -> &TierSpec {
        match tier {
            Tier::Preview => &self.preview,
            Tier::Final => &self.r#final,
            Tier::Print => &self.print,
        }
    }
}

/// A request that does not fit the tier's limits, or names something that does not exist.
/// Each message names the field and, where there is one, the limit and the config key that sets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The tier is not one of preview, final, print.
    #[error("tier: unknown tier {0:?}; expected one of preview, final, print")]
    UnknownTier(String),
    /// A width or height of zero.
    #[error("{field}: must be at least 1 pixel, got 0")]
    ZeroSize {
        /// `width` or `height`.
        field: &'static str,
    },
    /// A side longer than the tier allows.
    #[error("{field}: {value} px exceeds the {tier} tier's limit of {limit} px (tiers.{tier}.max_side)")]
    SideTooLarge {
        /// `width` or `height`.
        field: &'static str,
        /// What was asked.
        value: u32,
        /// The tier.
        tier: Tier,
        /// The limit.
        limit: u32,
    },
    /// More pixels than the tier allows.
    #[error(
        "width × height: {value} pixels exceeds the {tier} tier's limit of {limit} pixels (tiers.{tier}.max_pixels)"
    )]
    TooManyPixels {
        /// What was asked.
        value: u64,
        /// The tier.
        tier: Tier,
        /// The limit.
        limit: u64,
    },
    /// A supersampling factor out of range.
    #[error("samples: {value} is outside 1..={limit} for the {tier} tier (tiers.{tier}.max_samples)")]
    Samples {
        /// What was asked.
        value: u32,
        /// The tier.
        tier: Tier,
        /// The limit.
        limit: u32,
    },
    /// A prompt longer than allowed.
    #[error("prompt: {value} characters exceeds the limit of {limit} (tiers.max_prompt_chars)")]
    PromptTooLong {
        /// Characters after normalisation.
        value: usize,
        /// The limit.
        limit: usize,
    },
}

/// A fully resolved render request: every size known, prompt normalised, within its tier's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderRequest {
    /// Model id, e.g. `cppn`.
    pub model: String,
    /// The prompt, normalised.
    pub prompt: String,
    /// The seed.
    pub seed: u64,
    /// The tier.
    pub tier: Tier,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Supersampling factor per axis: `samples × samples` samples per pixel.
    pub samples: u32,
    /// Whether the post chain blends the preview watermark (from `tiers.<tier>.watermark`).
    pub watermark: bool,
    /// Whether the post chain quantises with an ordered dither (from `tiers.<tier>.dither`).
    pub dither: bool,
    /// Only these rows of the image: a tile of a job the scheduler cut up (see [`Tile`]).
    /// Absent for a whole image (the requests clients send).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile: Option<Tile>,
}

/// A tile of an image: rows `y0 .. y0 + rows`, every column. A job too large for one worker is
/// cut into these by the scheduler; each renders, and is cached, on its own, and their rows
/// stitched in order are the whole image's, byte for byte. Full-width strips, because a PNG's
/// rows stream in order: stitching is a concatenation that holds one row, not a row of tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Tile {
    /// The first row, in the whole image.
    pub y0: u32,
    /// Rows in the tile.
    pub rows: u32,
}

impl RenderRequest {
    /// Resolves a request against its tier: normalises the prompt, fills in the tier's default size
    /// and samples, and checks every limit. A missing height takes the width and vice versa
    /// (square), so `--width 800` alone asks for 800×800.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve(
        model: &str,
        prompt: &str,
        seed: u64,
        tier: Tier,
        width: Option<u32>,
        height: Option<u32>,
        samples: Option<u32>,
        limits: &TierLimits,
    ) -> Result<Self, RequestError> {
        let spec = limits.spec(tier);
        let prompt = normalise_prompt(prompt);
        let chars = prompt.chars().count();
        if chars > limits.max_prompt_chars {
            return Err(RequestError::PromptTooLong { value: chars, limit: limits.max_prompt_chars });
        }
        let (width, height) = match (width, height) {
            (None, None) => (spec.default_side, spec.default_side),
            (Some(w), None) => (w, w),
            (None, Some(h)) => (h, h),
            (Some(w), Some(h)) => (w, h),
        };
        for (field, value) in [("width", width), ("height", height)] {
            if value == 0 {
                return Err(RequestError::ZeroSize { field });
            }
            if value > spec.max_side {
                return Err(RequestError::SideTooLarge { field, value, tier, limit: spec.max_side });
            }
        }
        let pixels = u64::from(width) * u64::from(height);
        if pixels > spec.max_pixels {
            return Err(RequestError::TooManyPixels { value: pixels, tier, limit: spec.max_pixels });
        }
        let samples = samples.unwrap_or(spec.default_samples);
        if samples == 0 || samples > spec.max_samples {
            return Err(RequestError::Samples { value: samples, tier, limit: spec.max_samples });
        }
        Ok(RenderRequest {
            model: model.to_owned(),
            prompt,
            seed,
            tier,
            width,
            height,
            samples,
            watermark: spec.watermark,
            dither: spec.dither,
            tile: None,
        })
    }

    /// The same request, for one tile of its image.
    pub fn tile(&self, tile: Tile) -> RenderRequest {
        RenderRequest { tile: Some(tile), ..self.clone() }
    }

    /// The same request, for the whole image (a tile's whole).
    pub fn whole(&self) -> RenderRequest {
        RenderRequest { tile: None, ..self.clone() }
    }

    /// Rows of the PNG it makes: the tile's, or the image's height.
    pub fn out_rows(&self) -> u32 {
        self.tile.map_or(self.height, |t| t.rows)
    }

    /// Samples it renders: width × height × samples² (of its tile's rows, for a tile).
    pub fn sample_count(&self) -> u64 {
        u64::from(self.width) * u64::from(self.out_rows()) * u64::from(self.samples).pow(2)
    }

    /// The cache key input of this request under a given model version and post chain.
    pub fn key_input(&self, model_version: &str, post_chain_version: &str) -> KeyInput {
        KeyInput {
            model_id: self.model.clone(),
            model_version: model_version.to_owned(),
            prompt: self.prompt.clone(),
            seed: self.seed,
            width: self.width,
            height: self.height,
            samples: self.samples,
            post_chain_version: post_chain_version.to_owned(),
            tile: self.tile,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(tier: Tier, w: Option<u32>, h: Option<u32>) -> Result<RenderRequest, RequestError> {
        RenderRequest::resolve("cppn", "Ember Tide", 7, tier, w, h, None, &TierLimits::default())
    }

    #[test]
    fn a_request_without_a_size_takes_the_tier_default() {
        let r = resolve(Tier::Preview, None, None).unwrap();
        assert_eq!((r.width, r.height, r.samples), (512, 512, 1));
        assert_eq!(r.prompt, "ember tide");
        let r = resolve(Tier::Final, Some(1000), None).unwrap();
        assert_eq!((r.width, r.height, r.samples), (1000, 1000, 4));
    }

    #[test]
    fn a_size_past_the_limit_names_the_field_and_the_limit() {
        let e = resolve(Tier::Final, Some(5000), Some(100)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("width") && msg.contains("4096") && msg.contains("tiers.final.max_side"), "{msg}");
        let e = resolve(Tier::Preview, Some(0), Some(10)).unwrap_err();
        assert_eq!(e, RequestError::ZeroSize { field: "width" });
        let e = resolve(Tier::Preview, Some(10), Some(0)).unwrap_err();
        assert_eq!(e, RequestError::ZeroSize { field: "height" });
    }

    #[test]
    fn a_pixel_budget_is_enforced_separately_from_the_side() {
        let mut limits = TierLimits::default();
        limits.print.max_pixels = 1000;
        let e = RenderRequest::resolve("cppn", "", 1, Tier::Print, Some(100), Some(100), None, &limits).unwrap_err();
        assert!(e.to_string().contains("tiers.print.max_pixels"));
    }

    #[test]
    fn unknown_tiers_and_bad_samples_are_refused() {
        let e = "poster".parse::<Tier>().unwrap_err();
        assert!(e.to_string().contains("preview, final, print"));
        assert_eq!("FINAL".parse::<Tier>().unwrap(), Tier::Final);
        let e = RenderRequest::resolve("cppn", "", 1, Tier::Preview, None, None, Some(9), &TierLimits::default())
            .unwrap_err();
        assert!(matches!(e, RequestError::Samples { value: 9, .. }));
    }

    #[test]
    fn an_overlong_prompt_is_refused() {
        let long = "a".repeat(2001);
        let e = RenderRequest::resolve("cppn", &long, 1, Tier::Preview, None, None, None, &TierLimits::default())
            .unwrap_err();
        assert!(matches!(e, RequestError::PromptTooLong { value: 2001, limit: 2000 }));
    }
}
