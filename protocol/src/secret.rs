//! Secrets that do not print: a token, or a URL with a password in it. Their `Debug` and
//! `Display` hide what must not reach a log, a config dump or an error message.

use std::fmt;

/// A secret (a token) that does not print.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A URL that may hold a password (`postgres://user:pass@host/db`, `amqp://user:pass@host`): it
/// prints (`Debug`, `Display`, and serialized, as `--print-config` shows it) with the password as
/// `***`. [`SecretUrl::expose`] gives it whole, for the one place that connects.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL itself, password and all.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password, if it has one, as `***`.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.clone() };
        let authority_end = url[scheme_end..].find(['/', '?', '#']).map_or(url.len(), |i| scheme_end + i);
        let authority = &url[scheme_end..authority_end];
        let Some(at) = authority.rfind('@') else { return url.clone() };
        match authority[..at].find(':') {
            Some(colon) => {
                let user = &authority[..colon];
                format!("{}{user}:***{}", &url[..scheme_end], &url[scheme_end + at..])
            }
            None => url.clone(),
        }
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        SecretUrl(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        SecretUrl(url.to_owned())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl serde::Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_prints_without_its_password_and_connects_with_it() {
        let cases = [
            ("postgres://kiln:s3cret@db.lan:5432/kiln", "postgres://kiln:***@db.lan:5432/kiln"),
            ("amqp://guest:guest@127.0.0.1:5672/%2f", "amqp://guest:***@127.0.0.1:5672/%2f"),
            ("amqp://p%40ss:w@rd:x@host/v", "amqp://p%40ss:***@host/v"),
            ("postgres://kiln@db/kiln", "postgres://kiln@db/kiln"),
            ("postgres://db/kiln?user=a", "postgres://db/kiln?user=a"),
            ("sqlite:///var/lib/kiln.db", "sqlite:///var/lib/kiln.db"),
            ("not a url", "not a url"),
        ];
        for (url, shown) in cases {
            let u = SecretUrl::from(url);
            assert_eq!((u.to_string(), format!("{u:?}")), (shown.to_owned(), format!("{shown:?}")));
            assert_eq!(u.expose(), url);
        }
        let u: SecretUrl = serde_json::from_str(r#""amqp://a:b@h""#).unwrap();
        assert_eq!(serde_json::to_string(&u).unwrap(), r#""amqp://a:***@h""#);
    }
}
