//! `Verifier`: keyed HMAC-SHA1 state, secret rotation, signature parsing and signing.

use core::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use sha1::Digest;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::Error;

/// The header that carries Comapi's signature: `X-Comapi-Signature`.
///
/// Use it to build test requests or to read the header in a framework of your own:
///
/// ```
/// let mut headers = http::HeaderMap::new();
/// headers.insert(comapi_webhook::SIGNATURE_HEADER, http::HeaderValue::from_static("00"));
/// assert!(headers.contains_key("x-comapi-signature"));
/// ```
pub const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-comapi-signature");

/// The shortest secret [`Verifier::new`] accepts: Comapi's documented minimum of 16
/// characters (36 or more are recommended).
pub const MIN_SECRET_LEN: usize = 16;

/// Length of an HMAC-SHA1 tag in bytes.
const TAG_LEN: usize = 20;
/// SHA-1 block length in bytes.
const BLOCK_LEN: usize = 64;
/// SHA-1's initial state (FIPS 180-4, 5.3.1).
const H0: [u32; 5] = [
    0x6745_2301,
    0xEFCD_AB89,
    0x98BA_DCFE,
    0x1032_5476,
    0xC3D2_E1F0,
];

/// Checks `X-Comapi-Signature` against one or more shared secrets.
///
/// The HMAC key schedule runs once, at construction: each secret becomes the SHA-1
/// states after its inner and outer padded key block (RFC 2104), and every request
/// resumes from copies of those states. Verifying therefore costs the hashing of the
/// body plus one compression, and never allocates.
///
/// Several secrets can be held at once while a rotation is under way; the first one
/// is the primary, used by [`Verifier::sign`]. [`Verified::secret_index`] tells which
/// secret matched, so you can see when an old secret has stopped being used.
///
/// A `Verifier` is cheap to clone (one reference count) and is `Send + Sync`. Its
/// `Debug` output never shows key material, and key material is zeroized on drop.
///
/// ```
/// use comapi_webhook::{Verifier, SIGNATURE_HEADER};
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
    keys: Arc<Keys>,
}

struct Keys {
    primary: Key,
    previous: Vec<Key>,
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
    /// ```
    /// use comapi_webhook::Verifier;
    /// let old = Verifier::new("the-old-secret-0123456789")?;
    /// let rotating = Verifier::with_secrets(["the-new-secret-0123456789", "the-old-secret-0123456789"])?;
    /// let body = b"{}";
    /// let verified = rotating.verify_header_value(old.sign(body).to_string().as_bytes(), body)?;
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
        let secrets: Vec<S> = secrets.into_iter().collect();
        for secret in &secrets {
            let len = secret.as_ref().len();
            if len == 0 {
                return Err(Error::EmptySecret);
            }
            if len < MIN_SECRET_LEN {
                return Err(Error::SecretTooShort { len });
            }
        }
        Self::from_checked(&secrets)
    }

    /// A verifier for one secret of any non-empty length, including ones shorter than
    /// Comapi's minimum of 16 bytes. Meant for test vectors such as RFC 2202's
    /// `"Jefe"`; production secrets should go through [`Verifier::new`].
    ///
    /// # Errors
    /// [`Error::EmptySecret`] for an empty secret.
    pub fn new_allowing_short_secret(secret: impl AsRef<[u8]>) -> Result<Self, Error> {
        if secret.as_ref().is_empty() {
            return Err(Error::EmptySecret);
        }
        Self::from_checked(&[secret])
    }

    fn from_checked<S: AsRef<[u8]>>(secrets: &[S]) -> Result<Self, Error> {
        let (primary, previous) = secrets.split_first().ok_or(Error::NoSecrets)?;
        // Exact capacity: the vector never reallocates, so no unzeroized copy of key
        // material is left behind in freed heap memory.
        let mut keys = Vec::with_capacity(previous.len());
        keys.extend(previous.iter().map(|s| Key::new(s.as_ref())));
        Ok(Verifier {
            keys: Arc::new(Keys {
                primary: Key::new(primary.as_ref()),
                previous: keys,
            }),
        })
    }

    /// How many secrets this verifier accepts (1 outside a rotation).
    #[must_use]
    pub fn secret_count(&self) -> usize {
        1 + self.keys.previous.len()
    }

    /// Verifies the `X-Comapi-Signature` header in `headers` against the raw `body`.
    ///
    /// `body` must be the bytes exactly as received, before any JSON parsing; a body
    /// that is not UTF-8 is hashed like any other. Never allocates.
    ///
    /// # Errors
    /// [`Error::MissingSignature`], [`Error::DuplicateSignature`] when the header
    /// appears more than once, [`Error::MalformedSignature`] (see
    /// [`Signature::parse`]) and [`Error::SignatureMismatch`]. All map to `401`
    /// through [`Error::status`].
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, Error> {
        self.verify_header_values(
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
    pub fn verify_header_values<'v>(
        &self,
        values: impl IntoIterator<Item = &'v [u8]>,
        body: &[u8],
    ) -> Result<Verified, Error> {
        // Hash first (see `verify_header_value`): the lookup overlaps with SHA-1.
        let primary = self.keys.primary.tag_words(body);
        let mut values = values.into_iter();
        let value = values.next().ok_or(Error::MissingSignature)?;
        if values.next().is_some() {
            return Err(Error::DuplicateSignature);
        }
        let signature = Signature::parse(value)?;
        self.check(primary, &signature, body)
    }

    /// Verifies a signature header value you read yourself, for frameworks that are
    /// not on `http` 1.x (actix-web 4, for one). Passing each value is your job: if
    /// the header came more than once, reject the request.
    ///
    /// # Errors
    /// As [`Verifier::verify`], apart from the missing and duplicate header cases.
    pub fn verify_header_value(&self, value: &[u8], body: &[u8]) -> Result<Verified, Error> {
        // Hash first, parse second: SHA-1 is one long dependency chain, and the CPU
        // runs the header parse beside its last rounds. A malformed header costs no
        // more than a well-formed wrong one, which anyone can send.
        let primary = self.keys.primary.tag_words(body);
        let signature = Signature::parse(value)?;
        self.check(primary, &signature, body)
    }

    /// Verifies an already parsed [`Signature`] against `body`, in constant time.
    ///
    /// # Errors
    /// [`Error::SignatureMismatch`] when no secret produces `signature`.
    pub fn verify_signature(&self, signature: &Signature, body: &[u8]) -> Result<Verified, Error> {
        self.check(self.keys.primary.tag_words(body), signature, body)
    }

    /// Compares the primary secret's tag, then each previous secret's, with
    /// `signature`, each in constant time (see [`tags_equal`]).
    fn check(
        &self,
        primary: [u32; 5],
        signature: &Signature,
        body: &[u8],
    ) -> Result<Verified, Error> {
        let expected = words(&signature.0);
        if tags_equal(&primary, &expected) {
            return Ok(Verified { secret_index: 0 });
        }
        for (index, key) in self.keys.previous.iter().enumerate() {
            if tags_equal(&key.tag_words(body), &expected) {
                return Ok(Verified {
                    secret_index: index + 1,
                });
            }
        }
        Err(Error::SignatureMismatch)
    }

    /// The signature the primary secret gives `body`; it displays as the 40 lowercase
    /// hex digits Comapi sends. For tests and for senders.
    #[must_use]
    pub fn sign(&self, body: &[u8]) -> Signature {
        let mut tag = [0u8; TAG_LEN];
        write_be(&mut tag, &self.keys.primary.tag_words(body));
        Signature(tag)
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.secret_count())
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
    /// use comapi_webhook::Signature;
    /// assert!(Signature::parse(b" effcdf6ae5eb2fa2d27416d5f184df9c259a7c79 ").is_ok());
    /// assert!(Signature::parse(b"sha1=effcdf6ae5eb2fa2d27416d5f184df9c259a7c79").is_err());
    /// ```
    ///
    /// # Errors
    /// [`Error::MalformedSignature`] for anything else: empty, too short or too long,
    /// a prefix such as `sha1=`, inner whitespace, non-hex or non-ASCII bytes.
    pub fn parse(value: &[u8]) -> Result<Self, Error> {
        let digits: &[u8; 2 * TAG_LEN] = trim_ows(value)
            .try_into()
            .map_err(|_| Error::MalformedSignature)?;
        let mut out = [0u8; TAG_LEN];
        let mut valid = true;
        for (bytes, chunk) in out
            .as_chunks_mut::<4>()
            .0
            .iter_mut()
            .zip(digits.as_chunks::<8>().0)
        {
            let (decoded, ok) = decode_hex8(u64::from_le_bytes(*chunk));
            *bytes = decoded;
            valid &= ok;
        }
        if valid {
            Ok(Signature(out))
        } else {
            Err(Error::MalformedSignature)
        }
    }

    /// The 20 raw bytes of the signature.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; TAG_LEN] {
        &self.0
    }
}

impl PartialEq for Signature {
    fn eq(&self, other: &Self) -> bool {
        tags_equal(&words(&self.0), &words(&other.0))
    }
}

impl Eq for Signature {}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 2 * TAG_LEN];
        for (pair, byte) in hex.as_chunks_mut::<2>().0.iter_mut().zip(self.0) {
            *pair = [
                DIGITS[usize::from(byte >> 4)],
                DIGITS[usize::from(byte & 0x0F)],
            ];
        }
        f.write_str(core::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
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

/// Decodes 8 ASCII hex digits (either case), packed little endian in a `u64`, into 4
/// bytes, and tells whether all 8 were hex digits. Branch-free SWAR: every byte is
/// range-checked at once. For a byte `b < 0x80`, `b + (0x80 - lo)` has its top bit set
/// exactly when `b >= lo`, and no lane carries into the next.
fn decode_hex8(x: u64) -> ([u8; 4], bool) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x80 * ONES;
    let at_least = |v: u64, lo: u8| v.wrapping_add(u64::from(0x80 - lo) * ONES) & HIGH;
    let at_most = |v: u64, hi: u8| !v.wrapping_add(u64::from(0x7F - hi) * ONES) & HIGH;

    let ascii = x & HIGH == 0;
    let digit = at_least(x, b'0') & at_most(x, b'9');
    let folded = x | (0x20 * ONES); // 'A'..='F' -> 'a'..='f'
    let letter = at_least(folded, b'a') & at_most(folded, b'f');
    let valid = ascii && (digit | letter) == HIGH;

    // '0'..'9' -> 0..9 from the low nibble; 'a'/'A' have low nibble 1, plus 9 is 10.
    let nibbles = (x & (0x0F * ONES)) + (letter >> 7) * 9;
    // Each 16-bit lane holds (first, second) digit; make it first << 4 | second.
    let pairs = ((nibbles & 0x000F_000F_000F_000F) << 4) | ((nibbles >> 8) & 0x000F_000F_000F_000F);
    let bytes = [
        pairs as u8,
        (pairs >> 16) as u8,
        (pairs >> 32) as u8,
        (pairs >> 48) as u8,
    ];
    (bytes, valid)
}

/// Constant-time tag equality: the XOR of every word pair is OR-folded into one word,
/// with no data-dependent branch, and `subtle` decides whether that word is zero
/// behind its optimisation barrier. One barrier instead of twenty (one per byte) is
/// what `subtle`'s slice comparison would cost.
fn tags_equal(a: &[u32; 5], b: &[u32; 5]) -> bool {
    let diff = a.iter().zip(b).fold(0u32, |acc, (x, y)| acc | (x ^ y));
    diff.ct_eq(&0).into()
}

/// A 20-byte tag as five big-endian words, the form SHA-1 produces it in.
fn words(tag: &[u8; TAG_LEN]) -> [u32; 5] {
    let mut out = [0u32; 5];
    for (word, chunk) in out.iter_mut().zip(tag.as_chunks::<4>().0) {
        *word = u32::from_be_bytes(*chunk);
    }
    out
}

/// One secret's precomputed HMAC-SHA1 state (RFC 2104): the SHA-1 chaining values
/// after absorbing `K ^ ipad` and `K ^ opad`. These are key-equivalent, so they are
/// zeroized on drop and never printed.
struct Key {
    inner: [u32; 5],
    outer: [u32; 5],
}

impl Key {
    fn new(secret: &[u8]) -> Key {
        let mut block = [0u8; BLOCK_LEN];
        if secret.len() > BLOCK_LEN {
            let mut digest = sha1::Sha1::digest(secret);
            block[..TAG_LEN].copy_from_slice(&digest);
            digest[..].zeroize();
        } else {
            block[..secret.len()].copy_from_slice(secret);
        }
        let mut pad = [0u8; BLOCK_LEN];
        let mut state_after = |xor: u8| {
            for (p, k) in pad.iter_mut().zip(&block) {
                *p = k ^ xor;
            }
            let mut state = H0;
            sha1::block_api::compress(&mut state, &[pad]);
            state
        };
        let key = Key {
            inner: state_after(0x36),
            outer: state_after(0x5C),
        };
        pad.zeroize();
        block.zeroize();
        key
    }

    /// HMAC-SHA1 of `message` under this key, as SHA-1's five state words.
    fn tag_words(&self, message: &[u8]) -> [u32; 5] {
        let (blocks, rest) = message.as_chunks::<BLOCK_LEN>();
        let mut inner = self.inner;
        sha1::block_api::compress(&mut inner, blocks);

        // Final block(s): the rest of the message, 0x80, zeros, and the bit length of
        // the key block plus the message, big endian, in the last 8 bytes.
        let mut tail = [[0u8; BLOCK_LEN]; 2];
        let used = if rest.len() < BLOCK_LEN - 8 { 1 } else { 2 };
        let flat = tail.as_flattened_mut();
        flat[..rest.len()].copy_from_slice(rest);
        flat[rest.len()] = 0x80;
        let bits = (message.len() as u64)
            .wrapping_add(BLOCK_LEN as u64)
            .wrapping_mul(8);
        flat[used * BLOCK_LEN - 8..used * BLOCK_LEN].copy_from_slice(&bits.to_be_bytes());
        sha1::block_api::compress(&mut inner, &tail[..used]);

        // Outer hash: one block holding the inner digest and its padding.
        let mut block = [0u8; BLOCK_LEN];
        write_be(&mut block[..TAG_LEN], &inner);
        block[TAG_LEN] = 0x80;
        block[BLOCK_LEN - 8..].copy_from_slice(&(((BLOCK_LEN + TAG_LEN) * 8) as u64).to_be_bytes());
        let mut outer = self.outer;
        sha1::block_api::compress(&mut outer, &[block]);
        outer
    }
}

fn write_be(out: &mut [u8], words: &[u32; 5]) {
    for (chunk, word) in out.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.inner.zeroize();
        self.outer.zeroize();
    }
}
