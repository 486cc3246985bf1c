//! Prompt words steer the style: palette, symmetry, frequency and contrast.
//!
//! The vocabulary below is the whole of it; every other word goes into a hash that fills in what
//! the vocabulary left open and perturbs the network's weights. A prompt's style is a pure function
//! of its normalised text, so one prompt looks the same forever.
//!
//! | aspect | words |
//! |---|---|
//! | palette | `ember` `fire` `lava` `sunset` · `ocean` `sea` `tide` `wave` · `forest` `moss` `leaf` · `neon` `cyber` `electric` · `mono` `ink` `noir` · `pastel` `candy` · `dusk` `twilight` `violet` · `desert` `sand` `dune` |
//! | symmetry | `asymmetric` `wild` (none) · `mirror` · `quad` `tiled` · `kaleidoscope` `mandala` `radial` (eightfold) |
//! | frequency | `calm` `smooth` `minimal` (low) · `busy` `intricate` `detailed` `dense` (high) |
//! | contrast | `soft` `muted` `hazy` (low) · `bold` `sharp` `vivid` `stark` (high) |

use serde::Serialize;

use crate::prng::{Rng, splitmix64};

/// Mirror symmetry applied to the coordinates before the network sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Symmetry {
    /// No symmetry.
    None,
    /// Left–right mirror.
    Mirror,
    /// Mirror on both axes.
    Quad,
    /// Both axes and the diagonal: eightfold.
    Kaleidoscope,
}

impl Symmetry {
    /// The code the kernels switch on.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// A named palette: five colour stops in sRGB.
#[derive(Debug, Clone, Copy)]
struct Palette {
    name: &'static str,
    words: &'static [&'static str],
    stops: [u32; 5],
}

const PALETTES: [Palette; 8] = [
    Palette {
        name: "ember",
        words: &["ember", "fire", "lava", "sunset"],
        stops: [0x12_0608, 0x5c_1a10, 0xc4_3d12, 0xf5_9e2c, 0xff_e9b0],
    },
    Palette {
        name: "ocean",
        words: &["ocean", "sea", "tide", "wave"],
        stops: [0x04_1024, 0x0b_3c5d, 0x1d_7a8c, 0x6f_c5c0, 0xe6_f7f1],
    },
    Palette {
        name: "forest",
        words: &["forest", "moss", "leaf"],
        stops: [0x0d_1a0f, 0x27_4d2a, 0x5f_8a3a, 0xb5_c46a, 0xf0_ead0],
    },
    Palette {
        name: "neon",
        words: &["neon", "cyber", "electric"],
        stops: [0x0a_0018, 0x5a_00b8, 0xff_2fa8, 0x00_e5ff, 0xf4_ff6b],
    },
    Palette {
        name: "mono",
        words: &["mono", "ink", "noir"],
        stops: [0x08_0808, 0x3a_3a3a, 0x7a_7a7a, 0xbd_bdbd, 0xf7_f5f0],
    },
    Palette {
        name: "pastel",
        words: &["pastel", "candy"],
        stops: [0xf2_c6de, 0xc6_def1, 0xdb_cdf0, 0xfa_edcb, 0xc9_e4de],
    },
    Palette {
        name: "dusk",
        words: &["dusk", "twilight", "violet"],
        stops: [0x1b_1035, 0x4b_2a6b, 0x9c_4f96, 0xf2_8c7c, 0xff_d6a5],
    },
    Palette {
        name: "desert",
        words: &["desert", "sand", "dune"],
        stops: [0x3b_2416, 0x8a_5a34, 0xc9_8b4f, 0xe8_c07d, 0xf8_ecd2],
    },
];

const SYMMETRY_WORDS: [(&str, Symmetry); 9] = [
    ("asymmetric", Symmetry::None),
    ("wild", Symmetry::None),
    ("mirror", Symmetry::Mirror),
    ("quad", Symmetry::Quad),
    ("tiled", Symmetry::Quad),
    ("kaleidoscope", Symmetry::Kaleidoscope),
    ("mandala", Symmetry::Kaleidoscope),
    ("radial", Symmetry::Kaleidoscope),
    ("symmetric", Symmetry::Mirror),
];
const LOW_FREQUENCY: [&str; 3] = ["calm", "smooth", "minimal"];
const HIGH_FREQUENCY: [&str; 4] = ["busy", "intricate", "detailed", "dense"];
const LOW_CONTRAST: [&str; 3] = ["soft", "muted", "hazy"];
const HIGH_CONTRAST: [&str; 4] = ["bold", "sharp", "vivid", "stark"];

/// The style a prompt asks for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Style {
    /// Palette name.
    pub palette_name: &'static str,
    /// Five palette stops in linear RGB.
    #[serde(skip)]
    pub palette: [[f32; 3]; 5],
    /// Coordinate symmetry.
    pub symmetry: Symmetry,
    /// Spatial frequency: the scale of the coordinates fed to the network.
    pub frequency: f32,
    /// Contrast of the tone curve (1 is neutral).
    pub contrast: f32,
    /// 64 bits of the words outside the vocabulary: they perturb the weights.
    pub rest_hash: u64,
}

/// sRGB transfer function, decoding: a sRGB component in [0, 1] to linear light.
pub fn srgb_to_linear(c: f32) -> f32 {
    if c <= 0.040_45 { c / 12.92 } else { ((c + 0.055) / 1.055).powf(2.4) }
}

fn hex_to_linear(rgb: u32) -> [f32; 3] {
    let ch = |shift: u32| srgb_to_linear(((rgb >> shift) & 0xff) as f32 / 255.0);
    [ch(16), ch(8), ch(0)]
}

impl Style {
    /// The style of a normalised prompt.
    pub fn from_prompt(prompt: &str) -> Style {
        let mut palette = None;
        let mut symmetry = None;
        let mut frequency = None;
        let mut contrast = None;
        let mut rest = Vec::new();
        for word in prompt.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
            if let Some(p) = PALETTES.iter().position(|p| p.words.contains(&word)) {
                palette = Some(p);
            } else if let Some((_, s)) = SYMMETRY_WORDS.iter().find(|(w, _)| *w == word) {
                symmetry = Some(*s);
            } else if LOW_FREQUENCY.contains(&word) {
                frequency = Some(0.55);
            } else if HIGH_FREQUENCY.contains(&word) {
                frequency = Some(2.6);
            } else if LOW_CONTRAST.contains(&word) {
                contrast = Some(0.6);
            } else if HIGH_CONTRAST.contains(&word) {
                contrast = Some(1.9);
            } else {
                rest.push(word);
            }
        }
        let digest = blake3::hash(rest.join(" ").as_bytes());
        let mut h = [0u8; 8];
        h.copy_from_slice(&digest.as_bytes()[..8]);
        let rest_hash = u64::from_le_bytes(h);
        // Whatever the words left open comes from the rest of the prompt.
        let mut state = rest_hash;
        let mut rng = Rng::new(splitmix64(&mut state));
        let p = &PALETTES[palette.unwrap_or_else(|| rng.below(PALETTES.len()))];
        let symmetry = symmetry.unwrap_or_else(|| {
            [Symmetry::None, Symmetry::None, Symmetry::Mirror, Symmetry::Quad, Symmetry::Kaleidoscope][rng.below(5)]
        });
        let frequency = frequency.unwrap_or_else(|| rng.range(0.8, 1.6));
        let contrast = contrast.unwrap_or_else(|| rng.range(0.95, 1.35));
        Style { palette_name: p.name, palette: p.stops.map(hex_to_linear), symmetry, frequency, contrast, rest_hash }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_words_set_the_style() {
        let s = Style::from_prompt("bold kaleidoscope ember at night");
        assert_eq!(s.palette_name, "ember");
        assert_eq!(s.symmetry, Symmetry::Kaleidoscope);
        assert_eq!(s.contrast, 1.9);
        let s = Style::from_prompt("calm ocean");
        assert_eq!((s.palette_name, s.frequency), ("ocean", 0.55));
    }

    #[test]
    fn the_same_rest_words_give_the_same_structure_hash() {
        let a = Style::from_prompt("ember rock pools");
        let b = Style::from_prompt("ocean rock pools");
        // `ember` and `ocean` are palette words: the rest, "rock pools", agrees.
        assert_eq!(a.rest_hash, b.rest_hash);
        assert_ne!(a.palette_name, b.palette_name);
        assert_ne!(Style::from_prompt("pools").rest_hash, Style::from_prompt("lakes").rest_hash);
    }

    #[test]
    fn a_prompt_style_is_stable() {
        assert_eq!(Style::from_prompt("quiet harbour"), Style::from_prompt("quiet harbour"));
    }
}
