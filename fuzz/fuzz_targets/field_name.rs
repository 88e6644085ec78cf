//! Any bytes as a field name: the codec's lookup of common names gives what
//! `HeaderName::from_bytes` gives, the same name or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_lb::proxy::__fuzz;

fuzz_target!(|data: &[u8]| {
    let ours = __fuzz::field_name(data).ok();
    let http = http::HeaderName::from_bytes(data).ok();
    assert_eq!(ours, http, "{:?}", String::from_utf8_lossy(data));
});
