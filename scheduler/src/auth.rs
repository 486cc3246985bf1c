//! API tokens and roles. A token is `kiln_` and 32 random hex digits; only its BLAKE3 is stored.
//! Roles: `operator` may do everything; `client` may submit, read and cancel its own jobs;
//! `worker` (a `kiln-worker` daemon) may only upload the assets it renders; `device` (a `kiln-edge`
//! agent) may fetch assets and upload the photos it takes.

use std::io::Read;

pub use kiln_protocol::api::Role;

/// Who is calling: the token's name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The devices it serves (a device token).
    pub devices: Vec<String>,
    /// What it may spend; no limit when `None`.
    pub budget: Option<crate::costs::Budget>,
}

impl Caller {
    /// Whether it may see what `owner` (a token's name) made: an operator sees everything, a
    /// client its own.
    pub fn may_see(&self, owner: &str) -> bool {
        self.role == Role::Operator || self.name == owner
    }
}

pub use kiln_protocol::Secret;

/// Random bytes from the operating system.
pub fn os_random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// 16 random bytes as 32 hex digits: a token's secret part, a broker password.
pub fn random_hex() -> std::io::Result<String> {
    let bytes: [u8; 16] = os_random()?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A new token secret.
pub fn new_token() -> std::io::Result<Secret> {
    Ok(Secret::new(format!("kiln_{}", random_hex()?)))
}

/// What the store keeps of a token.
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_their_hash_is_stable() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert!(a.expose().starts_with("kiln_") && a.expose().len() == 37);
        assert_eq!(token_hash(a.expose()), token_hash(a.expose()));
        assert_eq!(format!("{a:?}"), "Secret(***)");
    }
}
