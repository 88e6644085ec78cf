//! Chunked bodies through the codec's decoder: no panic, and the same data, trailers,
//! end and leftover bytes (or an error) however the bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_lb::proxy::__fuzz;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let whole = __fuzz::decode_chunked([bytes]);
    let (a, b) = bytes.split_at(usize::from(split) * bytes.len() / 256);
    let parts = __fuzz::decode_chunked([a, b]);
    match (&whole, &parts) {
        (Ok(w), Ok(p)) => assert_eq!(w, p, "split at {}", a.len()),
        _ => assert_eq!(whole.is_ok(), parts.is_ok(), "split at {}", a.len()),
    }
    if bytes.len() <= 1024 {
        let bytewise = __fuzz::decode_chunked(bytes.chunks(1));
        match (&whole, &bytewise) {
            (Ok(w), Ok(p)) => assert_eq!(w, p, "byte by byte"),
            _ => assert_eq!(whole.is_ok(), bytewise.is_ok(), "byte by byte"),
        }
    }
});
