//! Text from outside that a store cannot keep: PostgreSQL's text refuses the NUL character, so a
//! NUL in any string of a message or body is refused where it enters, naming where it is, rather
//! than failing a write later (and, before the writers isolated bad writes, a batch with it).

/// Where in a JSON document the first string (or key) holding a NUL is, as a path such as
/// `jobs[3].prompt` (`body` for the top level); `None` when there is none. Only a document that
/// spells `\u0000` can hold one (JSON carries no raw NUL), so any other is not parsed here.
pub fn nul_in_json(bytes: &[u8]) -> Option<String> {
    if !bytes.windows(6).any(|w| w == b"\\u0000") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    nul_in_value(&value, "")
}

/// [`nul_in_json`] of a parsed document, under `path`.
pub fn nul_in_value(v: &serde_json::Value, path: &str) -> Option<String> {
    let here = || if path.is_empty() { "body".to_owned() } else { path.to_owned() };
    match v {
        serde_json::Value::String(s) => s.contains('\0').then(here),
        serde_json::Value::Array(items) => {
            items.iter().enumerate().find_map(|(i, item)| nul_in_value(item, &format!("{path}[{i}]")))
        }
        serde_json::Value::Object(fields) => fields.iter().find_map(|(k, item)| {
            let at = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            if k.contains('\0') { Some(at) } else { nul_in_value(item, &at) }
        }),
        _ => None,
    }
}

/// Why a string from outside is refused: it holds a NUL.
pub fn refuse_nul(field: &str, s: &str) -> Result<(), String> {
    if s.contains('\0') { Err(format!("{field}: holds a NUL character, which Kiln does not store")) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_anywhere_is_found_with_its_path() {
        let cases: [(&str, Option<&str>); 7] = [
            (r#"{"prompt":"a kiln"}"#, None),
            (r#"{"prompt":"a\u0000kiln"}"#, Some("prompt")),
            (r#"{"jobs":[{"prompt":"ok"},{"prompt":"x","model":"c\u0000"}]}"#, Some("jobs[1].model")),
            (r#"{"a\u0000":1}"#, Some("a\0")),
            (r#""\u0000""#, Some("body")),
            (r#"{"n":"\\u0000"}"#, None),   // an escaped backslash, then text: no NUL
            (r#"{"broken":"\u0000"#, None), // not JSON: left to the decoder's own error
        ];
        for (doc, want) in cases {
            assert_eq!(nul_in_json(doc.as_bytes()).as_deref(), want, "{doc}");
        }
    }

    #[test]
    fn refuse_nul_names_the_field() {
        assert_eq!(refuse_nul("prompt", "ok"), Ok(()));
        assert_eq!(
            refuse_nul("prompt", "a\0b"),
            Err("prompt: holds a NUL character, which Kiln does not store".into())
        );
    }
}
