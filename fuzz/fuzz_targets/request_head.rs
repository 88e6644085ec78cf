//! Request bytes through the server's checks: the framing scanner gives the same verdict
//! however the bytes arrive, and a first head that httparse (hyper's parser) completes
//! goes through the Host, target and method rules; one they accept encodes into a head
//! for the backend that parses again, in origin form with exactly one `Host`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_lb::proxy::__fuzz;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let whole = __fuzz::scan_requests([bytes]);
    let (a, b) = bytes.split_at(usize::from(split) * bytes.len() / 256);
    assert_eq!(__fuzz::scan_requests([a, b]), whole, "split at {}", a.len());
    if bytes.len() <= 1024 {
        assert_eq!(
            __fuzz::scan_requests(bytes.chunks(1)),
            whole,
            "byte by byte"
        );
    }

    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut fields);
    if !matches!(parsed.parse(bytes), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return;
    };
    // As hyper builds it.
    let mut request = http::Request::builder().method(method).uri(path);
    for f in parsed.headers.iter() {
        request = request.header(f.name, f.value);
    }
    let Ok(request) = request.body(String::new()) else {
        return;
    };
    if __fuzz::check_request(&request).is_err() {
        return;
    }
    let head = __fuzz::encode_head(&request, "backend:1").expect("a valid backend address");
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut again = httparse::Request::new(&mut fields);
    assert_eq!(
        again.parse(&head).ok(),
        Some(httparse::Status::Complete(head.len())),
        "{head:?}"
    );
    let target = again.path.unwrap_or_default();
    assert!(target.starts_with('/') || target == "*", "{head:?}");
    let hosts = again
        .headers
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("host"))
        .count();
    assert_eq!(hosts, 1, "{head:?}");
});
