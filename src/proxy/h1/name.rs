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

macro_rules! common_names {
    ($($len:literal => $($name:ident)|+;)+) => {
        /// The constant for `name` when it is one of the common names.
        fn common(name: &[u8]) -> Option<HeaderName> {
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
            None
        }

        /// Every common name, for the tests.
        #[cfg(test)]
        fn listed() -> Vec<HeaderName> {
            vec![$($(header::$name),+),+]
        }
    };
}

// What browsers, curl, load generators and common servers send, by length.
common_names! {
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
        for name in listed() {
            let lower = name.as_str().as_bytes().to_vec();
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
            for variant in [lower.clone(), lower.to_ascii_uppercase(), mixed] {
                assert_eq!(common(&variant), Some(name.clone()), "{name}");
            }
        }
        assert_eq!(common(b"Content-Length"), Some(header::CONTENT_LENGTH));
        assert_eq!(common(b"x-forwarded-for"), None);
    }

    #[test]
    fn near_misses_are_not_matched() {
        // `\r` differs from `-` in the case bit alone; `_` and the digit differ in more.
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
            assert_eq!(common(near), None, "{:?}", String::from_utf8_lossy(near));
            same_as_http(near);
        }
    }

    #[test]
    fn every_one_byte_change_of_a_common_name_agrees_with_http() {
        // Every byte value at every position of every common name (in its lowercase and
        // uppercase forms), against `HeaderName::from_bytes`. (`fuzz/`'s `field_name`
        // target compares any bytes.)
        for name in listed() {
            let lower = name.as_str().as_bytes().to_vec();
            for base in [lower.clone(), lower.to_ascii_uppercase()] {
                same_as_http(&base);
                for i in 0..base.len() {
                    for b in 0..=255u8 {
                        let mut changed = base.clone();
                        changed[i] = b;
                        same_as_http(&changed);
                    }
                }
            }
        }
        same_as_http(b"a-name-longer-than-twenty-four");
    }
}
