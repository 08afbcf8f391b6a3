//! Who may use the console: tokens with a label and a role, the session cookie a
//! sign-in gives, and the CSRF token every form carries.
//!
//! Nothing is kept on the server: the cookie is `<token index>.<expiry>.<MAC>`,
//! the MAC an HMAC-SHA1 keyed by the token, so it holds in every process that has
//! the same tokens and dies with a token's change. The CSRF token is a MAC of the
//! cookie under the same key.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

type HmacSha1 = hmac::Hmac<sha1::Sha1>;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "comapi_console";

/// How long a sign-in lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// The shortest token taken: as Comapi's guidance for secrets.
pub const MIN_TOKEN_CHARS: usize = 16;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// Sees everything and acts: requeue, discard, retry now, pause.
    Operator,
    /// Sees everything, changes nothing.
    Viewer,
}

#[derive(Clone)]
struct Token {
    label: String,
    role: Role,
    secret: Zeroizing<Vec<u8>>,
    /// The token's MAC under a fixed key: sign-in compares MACs, so neither the
    /// bytes nor the length of a wrong token shows in the time taken.
    digest: [u8; 20],
}

/// The tokens the console takes, each with a label (who, in the audit log) and
/// a [`Role`]. Never printed: its `Debug` shows labels only.
///
/// ```
/// use comapi_webhook::console::{ConsoleAccess, Role};
/// let access = ConsoleAccess::new()
///     .with_token("operator", Role::Operator, "a-long-operator-token-0001")?
///     .with_token("viewer", Role::Viewer, "a-long-viewer-token-00002")?;
/// assert_eq!(access.len(), 2);
/// assert!(ConsoleAccess::new().with_token("x", Role::Viewer, "short").is_err());
/// # Ok::<(), comapi_webhook::console::AccessError>(())
/// ```
#[derive(Clone, Default)]
pub struct ConsoleAccess {
    tokens: Vec<Token>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// Shorter than [`MIN_TOKEN_CHARS`].
    #[error(
        "the console token for {label:?} is {chars} characters long; use at least {MIN_TOKEN_CHARS}"
    )]
    TooShort {
        /// The token's label.
        label: String,
        /// Its length.
        chars: usize,
    },
    /// The same token twice: a sign-in could not tell the two apart.
    #[error(
        "the console token for {label:?} is already given for another label; give each its own"
    )]
    Repeated {
        /// The second token's label.
        label: String,
    },
}

fn fixed_digest(token: &[u8]) -> [u8; 20] {
    let mut mac = <HmacSha1 as KeyInit>::new_from_slice(b"comapi-webhook console sign-in")
        .unwrap_or_else(|_| unreachable_key());
    mac.update(token);
    mac.finalize().into_bytes().into()
}

#[cold]
fn unreachable_key() -> HmacSha1 {
    // HMAC takes keys of any length; this is never reached.
    <HmacSha1 as KeyInit>::new(&Default::default())
}

/// A signed-in session: which token, until when.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) index: usize,
    pub(crate) label: String,
    pub(crate) role: Role,
    /// The cookie's value, to derive the CSRF token from.
    cookie: String,
}

impl ConsoleAccess {
    /// No token: a console with it answers 404 to everything.
    #[must_use]
    pub fn new() -> Self {
        ConsoleAccess::default()
    }

    /// Adds `token` for `label` with `role`.
    ///
    /// # Errors
    /// [`AccessError`] for a token shorter than [`MIN_TOKEN_CHARS`] or given twice.
    pub fn with_token(
        mut self,
        label: &str,
        role: Role,
        token: impl AsRef<[u8]>,
    ) -> Result<Self, AccessError> {
        let token = token.as_ref();
        let chars = String::from_utf8_lossy(token).chars().count();
        if chars < MIN_TOKEN_CHARS {
            return Err(AccessError::TooShort {
                label: label.to_owned(),
                chars,
            });
        }
        let digest = fixed_digest(token);
        if self.tokens.iter().any(|t| t.digest == digest) {
            return Err(AccessError::Repeated {
                label: label.to_owned(),
            });
        }
        self.tokens.push(Token {
            label: label.to_owned(),
            role,
            secret: Zeroizing::new(token.to_vec()),
            digest,
        });
        Ok(self)
    }

    /// The console's tokens from the environment: `COMAPI_CONSOLE_TOKEN`
    /// (label `operator`, [`Role::Operator`]) and `COMAPI_CONSOLE_READ_TOKEN`
    /// (label `viewer`, [`Role::Viewer`]), each optional; `lookup` reads a
    /// variable.
    ///
    /// # Errors
    /// A message naming the variable when a token is too short or both are the same.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut access = ConsoleAccess::new();
        for (name, label, role) in [
            ("COMAPI_CONSOLE_TOKEN", "operator", Role::Operator),
            ("COMAPI_CONSOLE_READ_TOKEN", "viewer", Role::Viewer),
        ] {
            let Some(token) = lookup(name).map(|t| Zeroizing::new(t.trim().to_owned())) else {
                continue;
            };
            if token.is_empty() {
                continue;
            }
            access = access.with_token(label, role, token.as_bytes()).map_err(|e| match e {
                AccessError::TooShort { chars, .. } => format!(
                    "{name} is {chars} characters long; use at least {MIN_TOKEN_CHARS} \
                     (openssl rand -hex 24 makes one)"
                ),
                AccessError::Repeated { .. } => format!(
                    "{name} is the same as COMAPI_CONSOLE_TOKEN: give the read-only token a value of its own"
                ),
            })?;
        }
        Ok(access)
    }

    /// How many tokens it takes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it takes none (the console is then off).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token `given` matches, compared in constant time with every token.
    pub(crate) fn sign_in(&self, given: &[u8], now: SystemTime) -> Option<(Session, String)> {
        let digest = fixed_digest(given);
        let mut found = None;
        for (index, token) in self.tokens.iter().enumerate() {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(index);
            }
        }
        let index = found?;
        let expiry = (now + SESSION_LIFETIME)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let cookie = format!(
            "{index}.{expiry}.{}",
            hex::encode(self.mac(index, &format!("session|{index}|{expiry}")))
        );
        let session = self.session(&cookie, now)?;
        Some((session, cookie))
    }

    fn mac(&self, index: usize, message: &str) -> Vec<u8> {
        let Some(token) = self.tokens.get(index) else {
            return Vec::new();
        };
        let mut mac = <HmacSha1 as KeyInit>::new_from_slice(&token.secret)
            .unwrap_or_else(|_| unreachable_key());
        mac.update(message.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    fn verify(&self, index: usize, message: &str, hex_mac: &str) -> bool {
        let Some(token) = self.tokens.get(index) else {
            return false;
        };
        let mut given = [0u8; 20];
        if hex::decode_to_slice(hex_mac, &mut given).is_err() {
            return false;
        }
        let Ok(mut mac) = <HmacSha1 as KeyInit>::new_from_slice(&token.secret) else {
            return false;
        };
        mac.update(message.as_bytes());
        mac.verify_slice(&given).is_ok()
    }

    /// The session a cookie value proves, if it is whole and not expired.
    pub(crate) fn session(&self, cookie: &str, now: SystemTime) -> Option<Session> {
        let mut parts = cookie.splitn(3, '.');
        let index: usize = parts.next()?.parse().ok()?;
        let expiry_text = parts.next()?;
        let expiry: u64 = expiry_text.parse().ok()?;
        let mac = parts.next()?;
        let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if expiry <= now_secs || !self.verify(index, &format!("session|{index}|{expiry_text}"), mac)
        {
            return None;
        }
        let token = self.tokens.get(index)?;
        Some(Session {
            index,
            label: token.label.clone(),
            role: token.role,
            cookie: cookie.to_owned(),
        })
    }

    /// The CSRF token of `session`'s forms.
    pub(crate) fn csrf(&self, session: &Session) -> String {
        hex::encode(self.mac(session.index, &format!("csrf|{}", session.cookie)))
    }

    /// Whether `given` is `session`'s CSRF token.
    pub(crate) fn csrf_holds(&self, session: &Session, given: &str) -> bool {
        self.verify(session.index, &format!("csrf|{}", session.cookie), given)
    }
}

impl fmt::Debug for ConsoleAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.tokens.iter().map(|t| (&t.label, t.role)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> ConsoleAccess {
        ConsoleAccess::new()
            .with_token("ops", Role::Operator, "operator-token-0123456789")
            .and_then(|a| a.with_token("viewer", Role::Viewer, "viewer-token-0123456789"))
            .unwrap_or_default()
    }

    #[test]
    fn a_sign_in_gives_a_cookie_that_proves_the_session_until_it_expires() {
        let access = access();
        let now = SystemTime::now();
        assert!(access.sign_in(b"operator-token-012345678", now).is_none());
        assert!(access.sign_in(b"", now).is_none());
        let signed = access.sign_in(b"viewer-token-0123456789", now);
        assert!(signed.is_some(), "the viewer's token was refused");
        let Some((session, cookie)) = signed else {
            return;
        };
        assert_eq!(
            (session.label.as_str(), session.role),
            ("viewer", Role::Viewer)
        );
        assert!(access.session(&cookie, now).is_some());
        assert!(access.session(&cookie, now + SESSION_LIFETIME).is_none());
        // Another token's index with this MAC, a changed expiry, junk.
        let forged = format!("0{}", &cookie[1..]);
        assert!(access.session(&forged, now).is_none());
        let (index, rest) = cookie.split_once('.').unwrap_or_default();
        let (_, mac) = rest.split_once('.').unwrap_or_default();
        assert!(
            access
                .session(&format!("{index}.99999999999.{mac}"), now)
                .is_none()
        );
        for junk in ["", "1", "1.2", "x.y.z", "1.2.zz", "9.9.9"] {
            assert!(access.session(junk, now).is_none(), "{junk:?}");
        }
        let csrf = access.csrf(&session);
        assert!(access.csrf_holds(&session, &csrf));
        assert!(!access.csrf_holds(&session, ""));
        assert!(!access.csrf_holds(&session, &"0".repeat(40)));
    }

    #[test]
    fn short_and_repeated_tokens_are_refused() {
        let err = ConsoleAccess::new().with_token("a", Role::Operator, "0123456789abcde");
        assert!(matches!(err, Err(AccessError::TooShort { chars: 15, .. })));
        let err = access().with_token("again", Role::Viewer, "viewer-token-0123456789");
        assert!(matches!(err, Err(AccessError::Repeated { .. })));
        assert!(!format!("{:?}", access()).contains("token-0123"));
    }
}
