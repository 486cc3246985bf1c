//! Prompt normalisation: the one spelling of a prompt that enters the cache key and steers style.

use unicode_normalization::UnicodeNormalization;

/// Normalises a prompt: Unicode NFKC, lower case, runs of white space folded to one space, trimmed.
///
/// Two prompts that a person would call the same ("Ember  Tide", "ember tide", "ｅｍｂｅｒ tide")
/// normalise to the same string, so they share a cache key and an artwork.
pub fn normalise_prompt(prompt: &str) -> String {
    let nfkc: String = prompt.nfkc().collect();
    let lower = nfkc.to_lowercase();
    lower.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_width_and_spacing_fold_to_one_spelling() {
        assert_eq!(normalise_prompt("  Ember\t\tTIDE \n"), "ember tide");
        // Full-width letters are NFKC-equivalent to ASCII.
        assert_eq!(normalise_prompt("ｅｍｂｅｒ tide"), "ember tide");
        // A ligature decomposes under NFKC.
        assert_eq!(normalise_prompt("ﬁre"), "fire");
    }

    #[test]
    fn an_empty_prompt_stays_empty() {
        assert_eq!(normalise_prompt(" \t "), "");
    }
}
