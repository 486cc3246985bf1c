//! API tokens and roles. A token is `kiln_` and 32 random hex digits; only its BLAKE3 is stored.
//! Roles: `operator` may do everything; `client` may submit, read and cancel its own jobs;
//! `worker` (a `kiln-worker` daemon) may only upload the assets it renders; `device` (a `kiln-edge`
//! agent) may fetch assets and upload the photos it takes.

use std::fmt;
use std::io::Read;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: any job, tokens, the operator's views.
    Operator,
    /// Submit jobs, read them, cancel its own.
    Client,
    /// Upload rendered assets (a `kiln-worker` daemon).
    Worker,
    /// Fetch assets and upload photos (a `kiln-edge` agent).
    Device,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Device => "device",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "operator" => Ok(Role::Operator),
            "client" => Ok(Role::Client),
            "worker" => Ok(Role::Worker),
            "device" => Ok(Role::Device),
            _ => Err(format!("role: unknown role {s:?}; expected operator, client, worker or device")),
        }
    }
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        &[Role::Operator, Role::Client, Role::Worker, Role::Device]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// Who is calling: the token's name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
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

/// A new token secret.
pub fn new_token() -> std::io::Result<Secret> {
    let bytes: [u8; 16] = os_random()?;
    Ok(Secret::new(format!("kiln_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())))
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

    #[test]
    fn roles_parse_by_name() {
        assert_eq!("client".parse::<Role>().unwrap(), Role::Client);
        assert!("admin".parse::<Role>().unwrap_err().contains("role"));
    }
}
