//! `Verifier`: keyed HMAC-SHA1 state, secret rotation, signature parsing and signing.

use core::fmt;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha1::Sha1;
use subtle::ConstantTimeEq;

use crate::Error;

/// The header that carries Comapi's signature: `X-Comapi-Signature`.
///
/// Use it to build test requests or to read the header in a framework of your own:
///
/// ```
/// let mut headers = http::HeaderMap::new();
/// headers.insert(comapi_webhook::SIGNATURE_HEADER, http::HeaderValue::from_static("00"));
/// assert!(headers.contains_key("X-Comapi-Signature")); // header names ignore case
/// ```
pub const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-comapi-signature");

/// The shortest secret [`Verifier::new`] accepts: Comapi's documented minimum of 16
/// characters (36 or more are recommended).
pub const MIN_SECRET_LEN: usize = 16;

/// Length of an HMAC-SHA1 tag in bytes.
const TAG_LEN: usize = 20;

/// HMAC-SHA1 as RustCrypto builds it: keyed once, cloned for each request.
type HmacSha1 = Hmac<Sha1>;

/// Checks `X-Comapi-Signature` against one or more shared secrets.
///
/// Each secret is keyed into an `Hmac<Sha1>` (RustCrypto's `hmac`) once, at
/// construction; every request clones that keyed state, which copies a few dozen
/// bytes and never allocates. Verifying therefore costs the hashing of the body plus
/// one block for the outer hash.
///
/// The header is parsed before anything is hashed, so a missing, duplicated or
/// malformed header costs no hashing at all. A well-formed but wrong signature costs
/// one HMAC of the body per configured secret: keep the rotation list short (two
/// secrets while a rotation is under way, one otherwise), since anyone can send a
/// well-formed guess.
///
/// Several secrets can be held at once while a rotation is under way; the first one
/// is the primary, used by [`Verifier::sign`]. [`Verified::secret_index`] tells which
/// secret matched, so you can see when an old secret has stopped being used.
///
/// A `Verifier` is cheap to clone (one reference count) and is `Send + Sync`. Its
/// `Debug` output never shows key material; the keyed states, and each request's
/// copy of them, are zeroized on drop (see SECURITY.md for what is and is not wiped).
///
/// ```
/// use comapi_webhook::{SIGNATURE_HEADER, Verifier};
///
/// let verifier = Verifier::new("a-secret-of-at-least-16-bytes")?;
/// let body = br#"{"eventId":"e1","name":"message.sent"}"#;
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert(SIGNATURE_HEADER, verifier.sign(body).to_string().parse()?);
///
/// let verified = verifier.verify(&headers, body)?;
/// assert!(verified.is_primary());
/// assert!(verifier.verify(&headers, b"tampered").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Verifier {
    /// One keyed state per secret, the primary first; never empty.
    keys: Arc<Vec<HmacSha1>>,
}

impl Verifier {
    /// A verifier for one secret.
    ///
    /// # Errors
    /// [`Error::EmptySecret`] for an empty secret, and [`Error::SecretTooShort`] for
    /// one under [`MIN_SECRET_LEN`] bytes (use
    /// [`Verifier::new_allowing_short_secret`] if you really must).
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, Error> {
        Self::with_secrets([secret])
    }

    /// A verifier for several secrets during a rotation: the primary (current) one
    /// first, then the previous ones still accepted.
    ///
    /// Only the keyed states are kept, never the secrets themselves.
    ///
    /// ```
    /// use comapi_webhook::Verifier;
    /// let old = Verifier::new("the-old-secret-0123456789")?;
    /// let rotating = Verifier::with_secrets(["the-new-secret-0123456789", "the-old-secret-0123456789"])?;
    /// let body = b"{}";
    /// let signature = old.sign(body).to_string();
    /// let verified = rotating.verify_values([signature.as_bytes()], body)?;
    /// assert_eq!(verified.secret_index(), 1);
    /// # Ok::<(), comapi_webhook::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::NoSecrets`] for an empty list, and the errors of [`Verifier::new`]
    /// for any secret in it.
    pub fn with_secrets<S: AsRef<[u8]>>(
        secrets: impl IntoIterator<Item = S>,
    ) -> Result<Self, Error> {
        Self::keyed(secrets, MIN_SECRET_LEN)
    }

    /// A verifier for one secret of any non-empty length, including ones shorter than
    /// Comapi's minimum of 16 bytes. Meant for test vectors such as RFC 2202's
    /// `"Jefe"`; production secrets should go through [`Verifier::new`].
    ///
    /// # Errors
    /// [`Error::EmptySecret`] for an empty secret.
    pub fn new_allowing_short_secret(secret: impl AsRef<[u8]>) -> Result<Self, Error> {
        Self::keyed([secret], 1)
    }

    /// Keys every secret, refusing empty ones and ones under `min_len` bytes.
    ///
    /// The list is checked whole before anything is keyed, and the keyed states go
    /// into a vector of exact capacity, which never reallocates: no copy of key
    /// material is left behind in heap memory this crate freed.
    fn keyed<S: AsRef<[u8]>>(
        secrets: impl IntoIterator<Item = S>,
        min_len: usize,
    ) -> Result<Self, Error> {
        let secrets: Vec<S> = secrets.into_iter().collect();
        for secret in &secrets {
            match secret.as_ref().len() {
                0 => return Err(Error::EmptySecret),
                len if len < min_len => return Err(Error::SecretTooShort { len }),
                _ => {}
            }
        }
        if secrets.is_empty() {
            return Err(Error::NoSecrets);
        }
        let mut keys = Vec::with_capacity(secrets.len());
        for secret in &secrets {
            // HMAC takes keys of any length, so this never fails.
            keys.push(HmacSha1::new_from_slice(secret.as_ref()).map_err(|_| Error::EmptySecret)?);
        }
        Ok(Verifier {
            keys: Arc::new(keys),
        })
    }

    /// Verifies the `X-Comapi-Signature` header in `headers` against the raw `body`.
    ///
    /// `body` must be the bytes exactly as received, before any JSON parsing; a body
    /// that is not UTF-8 is hashed like any other. Never allocates, and hashes
    /// nothing unless the header is present once and well formed.
    ///
    /// # Errors
    /// [`Error::MissingSignature`], [`Error::DuplicateSignature`] when the header
    /// appears more than once, [`Error::MalformedSignature`] (see
    /// [`Signature::parse`]) and [`Error::SignatureMismatch`]. All map to `401`
    /// through [`Error::status`].
    #[inline]
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, Error> {
        self.verify_values(
            headers
                .get_all(SIGNATURE_HEADER)
                .iter()
                .map(HeaderValue::as_bytes),
            body,
        )
    }

    /// Verifies the `X-Comapi-Signature` values of a request whose headers are not an
    /// `http` 1.x [`HeaderMap`] (actix-web 4, for one): pass every value the request
    /// has for the header, in order. None is [`Error::MissingSignature`], more than
    /// one is [`Error::DuplicateSignature`].
    ///
    /// # Errors
    /// As [`Verifier::verify`].
    #[inline]
    pub fn verify_values<'v>(
        &self,
        values: impl IntoIterator<Item = &'v [u8]>,
        body: &[u8],
    ) -> Result<Verified, Error> {
        self.verify_signature(&single_signature(values)?, body)
    }

    /// Verifies a parsed [`Signature`] against `body`: each secret's tag, the
    /// primary's first, is compared with `signature` in constant time (by `hmac`'s
    /// `verify_slice`).
    #[inline]
    fn verify_signature(&self, signature: &Signature, body: &[u8]) -> Result<Verified, Error> {
        self.keys
            .iter()
            .position(|key| {
                let mut mac = key.clone();
                mac.update(body);
                mac.verify_slice(&signature.0).is_ok()
            })
            .map(|secret_index| Verified { secret_index })
            .ok_or(Error::SignatureMismatch)
    }

    /// The signature the primary secret gives `body`; it displays as the 40 lowercase
    /// hex digits Comapi sends. For tests and for senders.
    #[must_use]
    pub fn sign(&self, body: &[u8]) -> Signature {
        // `keyed` never builds a verifier without a key, so the first always exists.
        Signature(self.keys.first().map_or([0; TAG_LEN], |key| tag(key, body)))
    }
}

/// HMAC-SHA1 of `body` under a keyed state: a copy of the state absorbs the body.
fn tag(key: &HmacSha1, body: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = key.clone();
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// The one `X-Comapi-Signature` value of a request, parsed: what can be refused
/// before the body is read.
pub(crate) fn single_signature<'v>(
    values: impl IntoIterator<Item = &'v [u8]>,
) -> Result<Signature, Error> {
    let mut values = values.into_iter();
    let value = values.next().ok_or(Error::MissingSignature)?;
    if values.next().is_some() {
        return Err(Error::DuplicateSignature);
    }
    Signature::parse(value)
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.keys.len())
            .field("keys", &format_args!("[redacted]"))
            .finish()
    }
}

/// A successful verification: which of the verifier's secrets matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verified {
    secret_index: usize,
}

impl Verified {
    /// The position of the matching secret in the list given to the verifier: `0`
    /// for the primary secret, `1` and up for previous ones.
    #[must_use]
    pub fn secret_index(&self) -> usize {
        self.secret_index
    }

    /// Whether the primary (current) secret matched. While rotating, once every
    /// request matches the primary, the previous secrets can be removed.
    #[must_use]
    pub fn is_primary(&self) -> bool {
        self.secret_index == 0
    }
}

/// A decoded HMAC-SHA1 signature: 20 bytes.
///
/// It displays as 40 lowercase hex digits, the form Comapi sends. Equality is
/// constant time.
#[derive(Clone, Copy)]
pub struct Signature([u8; TAG_LEN]);

impl Signature {
    /// Parses an `X-Comapi-Signature` header value.
    ///
    /// Accepts exactly 40 hex digits in either case, with optional spaces or tabs
    /// around them (HTTP's optional whitespace). Never allocates or panics.
    ///
    /// ```
    /// use comapi_webhook::signature::Signature;
    /// assert!(Signature::parse(b" effcdf6ae5eb2fa2d27416d5f184df9c259a7c79 ").is_ok());
    /// assert!(Signature::parse(b"sha1=effcdf6ae5eb2fa2d27416d5f184df9c259a7c79").is_err());
    /// ```
    ///
    /// # Errors
    /// [`Error::MalformedSignature`] for anything else: empty, too short or too long,
    /// a prefix such as `sha1=`, inner whitespace, non-hex or non-ASCII bytes.
    #[inline]
    pub fn parse(value: &[u8]) -> Result<Self, Error> {
        let digits = trim_ows(value);
        if digits.len() != 2 * TAG_LEN {
            return Err(Error::MalformedSignature);
        }
        let Ok(digits) = <&[u8; 2 * TAG_LEN]>::try_from(digits) else {
            return Err(Error::MalformedSignature);
        };
        // Each digit's value with no branch and no table, which the compiler turns
        // into a few vector instructions: faster than `hex::decode_to_slice`, for
        // what is a fixed cost of every request (criterion, `benches/verify.rs`).
        let mut values = [0u8; 2 * TAG_LEN];
        let mut invalid = false;
        for (value, &c) in values.iter_mut().zip(digits) {
            let decimal = c.wrapping_sub(b'0');
            let letter = (c | 0x20).wrapping_sub(b'a');
            *value = if decimal < 10 {
                decimal
            } else {
                letter.wrapping_add(10)
            };
            invalid |= decimal >= 10 && letter >= 6;
        }
        if invalid {
            return Err(Error::MalformedSignature);
        }
        let mut out = [0u8; TAG_LEN];
        for (byte, pair) in out.iter_mut().zip(values.chunks_exact(2)) {
            *byte = (pair[0] << 4) | pair[1];
        }
        Ok(Signature(out))
    }

    /// The 20 raw bytes of the signature.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; TAG_LEN] {
        &self.0
    }
}

impl PartialEq for Signature {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Signature {}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut digits = [0u8; 2 * TAG_LEN];
        hex::encode_to_slice(self.0, &mut digits).map_err(|_| fmt::Error)?;
        f.write_str(core::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// Strips HTTP optional whitespace (spaces and tabs) from both ends.
fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn parsing_agrees_with_the_hex_crate_for_every_byte_in_every_place() {
        let valid = *b"0123456789abcdefABCDEF0123456789abcdef01";
        for place in 0..valid.len() {
            for byte in 0..=u8::MAX {
                let mut digits = valid;
                digits[place] = byte;
                let mut expected = [0u8; TAG_LEN];
                let expected = hex::decode_to_slice(digits, &mut expected).map(|()| expected);
                let parsed = Signature::parse(&digits).map(|s| s.0);
                match (byte, expected) {
                    // OWS at either end is trimmed, then the length is wrong.
                    (b' ' | b'\t', _) if place == 0 || place == digits.len() - 1 => {
                        assert!(parsed.is_err());
                    }
                    (_, Ok(expected)) => assert_eq!(parsed, Ok(expected), "{byte:#x} at {place}"),
                    (_, Err(_)) => assert!(parsed.is_err(), "{byte:#x} at {place}"),
                }
            }
        }
    }

    #[test]
    fn a_signature_is_exactly_40_hex_digits_between_optional_spaces() {
        let hex = "00112233445566778899aabbccddeeff00112233";
        let parsed = Signature::parse(hex.as_bytes()).map(|s| s.to_string());
        assert_eq!(parsed.as_deref(), Ok(hex));
        let upper = Signature::parse(hex.to_uppercase().as_bytes()).map(|s| s.to_string());
        assert_eq!(
            upper.as_deref(),
            Ok(hex),
            "case-insensitive, shown lowercase"
        );
        assert!(Signature::parse(format!(" \t{hex}\t ").as_bytes()).is_ok());
        for wrong in [
            &hex[1..],
            &format!("{hex}0"),
            &format!("sha1={hex}"),
            &hex.replace('a', "g"),
            &format!("{} {}", &hex[..20], &hex[20..]),
            "",
            " ",
        ] {
            assert_eq!(
                Signature::parse(wrong.as_bytes()),
                Err(Error::MalformedSignature),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn only_spaces_and_tabs_are_trimmed() {
        assert_eq!(trim_ows(b" \t a \t "), b"a");
        assert_eq!(trim_ows(b"\na\r"), b"\na\r");
        assert_eq!(trim_ows(b"   "), b"");
    }
}
