//! Field names as the codec reads them, requests and responses alike.
//!
//! `HeaderName::from_bytes` lowercases every name into a buffer, byte by byte, before it
//! looks for a standard name. Most fields of most messages have one of a few dozen names,
//! so those are matched first, whole words at a time and in any case, against the
//! lowercase text of the constant they stand for; any other name takes the general path.

use http::header::{self, HeaderName, InvalidHeaderName};

/// The longest name matched here.
const LONGEST: usize = 24;

/// `name` as a `HeaderName`, with the same result as `HeaderName::from_bytes`.
pub(crate) fn field_name(name: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    match common(name) {
        Some(known) => Ok(known),
        None => HeaderName::from_bytes(name),
    }
}

/// The lowercase text of a name, as little-endian words, and the bits that case may flip.
struct Word {
    words: [u64; LONGEST / 8],
    /// `0x20` in each byte that holds a letter: the one bit in which `A` and `a` differ.
    case: [u64; LONGEST / 8],
}

/// The [`Word`] of a `header::` constant's identifier: `CONTENT_LENGTH` is
/// `content-length`.
const fn word(ident: &str) -> Word {
    let ident = ident.as_bytes();
    assert!(ident.len() <= LONGEST);
    let mut word = Word {
        words: [0; LONGEST / 8],
        case: [0; LONGEST / 8],
    };
    let mut i = 0;
    while i < ident.len() {
        let (byte, case) = match ident[i] {
            b'_' => (b'-', 0),
            b @ b'A'..=b'Z' => (b | 0x20, 0x20),
            b => (b, 0),
        };
        word.words[i / 8] |= (byte as u64) << (8 * (i % 8));
        word.case[i / 8] |= (case as u64) << (8 * (i % 8));
        i += 1;
    }
    word
}

/// `name` (of length `N`) as little-endian words, zero after its end.
#[inline(always)]
fn words<const N: usize>(name: &[u8]) -> [u64; LONGEST / 8] {
    let mut padded = [0u8; LONGEST];
    padded[..N].copy_from_slice(&name[..N]);
    let mut words = [0u64; LONGEST / 8];
    for (i, word) in words.iter_mut().enumerate() {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&padded[8 * i..8 * i + 8]);
        *word = u64::from_le_bytes(bytes);
    }
    words
}

/// Whether the words of a name of length `N` are `known`'s, in any case. Only the bit of
/// a letter's case is set before comparing: `A` matches `a`, and no byte matches one it
/// differs from in any other bit (`\r` is not `-`).
#[inline(always)]
fn is<const N: usize>(words: &[u64; LONGEST / 8], known: &Word) -> bool {
    (0..N.div_ceil(8)).all(|i| words[i] | known.case[i] == known.words[i])
}

/// The constant for `name` when it is one of the common names.
fn common(name: &[u8]) -> Option<HeaderName> {
    macro_rules! names {
        ($($len:literal => $($name:ident)|+;)+) => {
            match name.len() {
                $($len => {
                    let words = words::<$len>(name);
                    $(
                        if is::<$len>(&words, &const {
                            assert!(stringify!($name).len() == $len);
                            word(stringify!($name))
                        }) {
                            return Some(header::$name);
                        }
                    )+
                })+
                _ => {}
            }
        };
    }
    // What browsers, curl, load generators and common servers send, by length.
    names! {
        2 => TE;
        3 => AGE | VIA;
        4 => HOST | DATE | ETAG | VARY | LINK;
        5 => RANGE;
        6 => ACCEPT | SERVER | COOKIE | EXPECT | ORIGIN | PRAGMA;
        7 => UPGRADE | REFERER | EXPIRES;
        8 => LOCATION | IF_RANGE;
        9 => FORWARDED;
        10 => CONNECTION | USER_AGENT | SET_COOKIE;
        12 => CONTENT_TYPE;
        13 => CACHE_CONTROL | LAST_MODIFIED | ACCEPT_RANGES | AUTHORIZATION | IF_NONE_MATCH
            | CONTENT_RANGE;
        14 => CONTENT_LENGTH;
        15 => ACCEPT_ENCODING | ACCEPT_LANGUAGE | X_FRAME_OPTIONS;
        16 => CONTENT_ENCODING | WWW_AUTHENTICATE;
        17 => TRANSFER_ENCODING | IF_MODIFIED_SINCE;
        19 => CONTENT_DISPOSITION;
        22 => X_CONTENT_TYPE_OPTIONS;
        23 => CONTENT_SECURITY_POLICY;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same_as_http(input: &[u8]) {
        let ours = field_name(input);
        let http = HeaderName::from_bytes(input);
        assert_eq!(
            ours.as_ref().ok(),
            http.as_ref().ok(),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }

    #[test]
    fn common_names_in_any_case_are_their_constants() {
        let names = [
            header::TE,
            header::HOST,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::CONTENT_SECURITY_POLICY,
            header::X_CONTENT_TYPE_OPTIONS,
            header::IF_MODIFIED_SINCE,
        ];
        for name in names {
            let lower = name.as_str().as_bytes().to_vec();
            assert_eq!(common(&lower), Some(name.clone()));
            assert_eq!(common(&lower.to_ascii_uppercase()), Some(name.clone()));
            let mixed: Vec<u8> = lower
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    if i % 2 == 0 {
                        b.to_ascii_uppercase()
                    } else {
                        *b
                    }
                })
                .collect();
            assert_eq!(common(&mixed), Some(name));
        }
        assert_eq!(common(b"Content-Length"), Some(header::CONTENT_LENGTH));
    }

    #[test]
    fn names_that_differ_in_one_byte_are_not_matched() {
        // A byte differing in one bit other than a letter's case: `\r` for `-`, `^` for
        // `~`, a digit for a letter, and `_` for `-`.
        for near in [
            &b"content\rlength"[..],
            b"content_length",
            b"Content-Lengt",
            b"content-lengthh",
            b"hosT\0",
            b"h0st",
            b"tE ",
            b"",
        ] {
            assert_ne!(common(near), Some(header::CONTENT_LENGTH));
            assert_ne!(common(near), Some(header::HOST));
            assert_ne!(common(near), Some(header::TE));
            same_as_http(near);
        }
    }

    #[test]
    fn every_name_agrees_with_http() {
        // Each common name, and each of its one-byte changes to a byte from a set that
        // includes every case flip and near miss, against `HeaderName::from_bytes`.
        let bytes: Vec<u8> = (0u8..=255).collect();
        let names = [
            "te",
            "age",
            "via",
            "host",
            "date",
            "etag",
            "vary",
            "link",
            "range",
            "accept",
            "server",
            "cookie",
            "expect",
            "origin",
            "pragma",
            "upgrade",
            "referer",
            "expires",
            "location",
            "if-range",
            "forwarded",
            "connection",
            "user-agent",
            "set-cookie",
            "content-type",
            "cache-control",
            "last-modified",
            "accept-ranges",
            "authorization",
            "if-none-match",
            "content-range",
            "content-length",
            "accept-encoding",
            "accept-language",
            "content-encoding",
            "x-frame-options",
            "www-authenticate",
            "transfer-encoding",
            "if-modified-since",
            "content-disposition",
            "x-content-type-options",
            "content-security-policy",
            "x-forwarded-for",
            "keep-alive",
            "a-name-longer-than-twenty-four",
        ];
        for name in names {
            same_as_http(name.as_bytes());
            assert!(
                name.len() > LONGEST
                    || name == "x-forwarded-for"
                    || name == "keep-alive"
                    || common(name.as_bytes()).is_some(),
                "{name} is matched"
            );
            for i in 0..name.len() {
                for &b in &bytes {
                    let mut changed = name.as_bytes().to_vec();
                    changed[i] = b;
                    same_as_http(&changed);
                }
            }
        }
    }
}
