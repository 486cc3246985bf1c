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

/// How long a console session lasts after its sign-in.
pub const SESSION_MS: i64 = 12 * 3600 * 1000;

/// The most console sessions held at once; past it the oldest goes.
const MAX_SESSIONS: usize = 10_000;

/// A browser signed in to the console: the token it signed in with (checked again at every
/// request, so a revoked or expired token ends its sessions at once), the CSRF token its forms
/// and calls carry, and when it ends.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token.
    pub token: Secret,
    /// What every state-changing form and call from this session must carry.
    pub csrf: String,
    /// When it ends, unix milliseconds.
    pub expires_ms: i64,
}

/// The console's sessions, by the random id in each browser's cookie. Kept in memory: a restart
/// of the scheduler signs everyone out, and schedulers sharing a database do not share them.
#[derive(Debug, Default)]
pub struct Sessions {
    held: std::sync::Mutex<std::collections::HashMap<String, Session>>,
}

impl Sessions {
    /// A new session for `token` (already authenticated): its id and the session.
    pub fn open(&self, token: &str, now_ms: i64) -> std::io::Result<(String, Session)> {
        let id = format!("{}{}", random_hex()?, random_hex()?);
        let session =
            Session { token: Secret::new(token.to_owned()), csrf: random_hex()?, expires_ms: now_ms + SESSION_MS };
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|_, s| s.expires_ms > now_ms);
        if held.len() >= MAX_SESSIONS
            && let Some(oldest) = held.iter().min_by_key(|(_, s)| s.expires_ms).map(|(k, _)| k.clone())
        {
            held.remove(&oldest);
        }
        held.insert(id.clone(), session.clone());
        Ok((id, session))
    }

    /// The session of `id`, while it lasts.
    pub fn get(&self, id: &str, now_ms: i64) -> Option<Session> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(id).filter(|s| s.expires_ms > now_ms).cloned()
    }

    /// Ends the session of `id`.
    pub fn close(&self, id: &str) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
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
    fn a_session_lasts_until_it_ends_or_is_closed() {
        let s = Sessions::default();
        let (id, opened) = s.open("kiln_x", 1_000).unwrap();
        assert_eq!(id.len(), 64);
        assert_eq!(s.get(&id, 2_000).unwrap().csrf, opened.csrf);
        assert!(s.get(&id, 1_000 + SESSION_MS).is_none(), "ended");
        assert!(s.get("another", 2_000).is_none());
        s.close(&id);
        assert!(s.get(&id, 2_000).is_none(), "closed");
    }
}
