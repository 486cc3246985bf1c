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
            // An empty key is shown as `""`, so the path never reads as the document itself.
            let key = if k.is_empty() { "\"\"" } else { k.as_str() };
            let at = if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
            if k.contains('\0') { Some(at) } else { nul_in_value(item, &at) }
        }),
        _ => None,
    }
}

/// Why a string from outside is refused: it holds a NUL.
pub fn refuse_nul(field: &str, s: &str) -> Result<(), String> {
    if s.contains('\0') { Err(format!("{field}: holds a NUL character, which Kiln does not store")) } else { Ok(()) }
}

/// A JSON document from outside that did not decode, and where: `field` is a path such as
/// `seed`, `jobs[1].model` or `params.scene`, or `body` when the document as a whole is at fault
/// (not JSON, or the wrong kind of value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct JsonError {
    /// Where.
    pub field: String,
    /// What is wrong, as serde says it.
    pub message: String,
}

/// Decodes a JSON document from outside into `T`, naming the field of any error, and refuses
/// one with a NUL in any string (named by its path), which no store keeps.
pub fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    // Something after the document.
    de.end().map_err(|e| JsonError { field: "body".into(), message: e.to_string() })?;
    match nul_in_json(bytes) {
        Some(field) => Err(JsonError { field, message: "holds a NUL character, which Kiln does not store".into() }),
        None => Ok(v),
    }
}

/// [`decode_json`] of a parsed value (an item of a batch, say); NULs are the caller's to find
/// ([`nul_in_value`]).
pub fn decode_json_value<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, JsonError> {
    serde_path_to_error::deserialize(v).map_err(json_error)
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> JsonError {
    use serde_path_to_error::Segment;
    // The path as the API names fields (`jobs[1].model`), up to a place serde could not name
    // (a key not yet read when the text ended, say).
    let mut path = String::new();
    let mut last_key = None;
    for seg in e.path().iter() {
        match seg {
            Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !path.is_empty() {
                    path.push('.');
                }
                // An empty key is shown quoted, so that it still names something.
                path.push_str(if key.is_empty() { "\"\"" } else { key });
                last_key = Some(key.clone());
            }
            Segment::Unknown => break,
        }
    }
    let message = e.into_inner().to_string();
    // serde names a missing (or repeated) field in its message; the path stops at the object
    // that lacks it. Struct fields have plain names, so the message's quoting is safe to read.
    let named = ["missing field `", "duplicate field `"]
        .iter()
        .find_map(|p| message.split_once(p).and_then(|(_, rest)| rest.split_once('`')).map(|(f, _)| f.to_owned()))
        .filter(|f| last_key.as_deref() != Some(f.as_str()));
    let field = match (path.is_empty(), named) {
        (true, Some(f)) => f,
        (true, None) => "body".to_owned(),
        (false, Some(f)) => format!("{path}.{f}"),
        (false, None) => path,
    };
    JsonError { field, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        seed: u64,
        inner: Option<Inner>,
        items: Option<Vec<Inner>>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        scene: String,
    }

    #[test]
    fn a_json_error_names_its_field() {
        let cases = [
            (r#"{"seed":"x"}"#, "seed"),
            (r#"{"seed":1,"inner":{"scene":3}}"#, "inner.scene"),
            (r#"{"seed":1,"items":[{"scene":"a"},{"scene":"b","x":1}]}"#, "items[1].x"),
            (r#"{"seed":1,"inner":{}}"#, "inner.scene"),
            (r#"{"inner":null}"#, "seed"),
            (r#"{"seed":1,"colour":2}"#, "colour"),
            (r#"{"seed":1,"seed":2}"#, "seed"),
            (r#"[1]"#, "body"),
            (r#"{"seed":1} trailing"#, "body"),
            (r#"{"seed":"#, "seed"),
            (r#"{"seed":1,"inner":{"sc"#, "inner"),
            (r#"{"se"#, "body"),
            (r#"{"seed":1,"":2}"#, "\"\""),
            (r#"{"seed":1,"inner":{"scene":"a\u0000"}}"#, "inner.scene"),
        ];
        for (doc, field) in cases {
            let e = decode_json::<Outer>(doc.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{doc}: {e}");
            assert!(e.to_string().starts_with(&format!("{field}: ")), "{doc}: {e}");
        }
        assert_eq!(decode_json::<Outer>(br#"{"seed":3}"#).unwrap().seed, 3);
        let e = decode_json_value::<Outer>(serde_json::json!({"seed": -1})).unwrap_err();
        assert_eq!(e.field, "seed", "{e}");
    }

    #[test]
    fn a_nul_anywhere_is_found_with_its_path() {
        let cases: [(&str, Option<&str>); 9] = [
            (r#"{"prompt":"a kiln"}"#, None),
            // An empty key is named `""`, not as the document (found by tests/decoders.rs).
            (r#"{"":"\u0000"}"#, Some(r#""""#)),
            (r#"{"p":{"":"\u0000"}}"#, Some(r#"p."""#)),
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
