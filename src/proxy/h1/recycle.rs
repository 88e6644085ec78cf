//! The parts of messages the codec is done with, kept per thread for the next messages it
//! parses.
//!
//! A message's `HeaderMap` is two allocations (its index and its entries), and its
//! `Extensions` two more once anything is in it (the map and its table, besides each
//! value's own box). A proxied request builds and frees one request and one response.
//! Once a request's head is encoded for its backend, and once a response's head is
//! written to its client, their parts are cleared and kept: the next head parsed on the
//! thread fills them again. hyper does the same for the headers of one connection (its
//! `cached_headers`); here they go from one connection to another, so that an idle
//! connection keeps nothing.
//!
//! A thread keeps at most [`KEEP`] of each, and none with room for more than
//! [`MAX_FIELDS`] fields: a message with many fields does not leave a large map behind.

use std::cell::RefCell;
use std::thread::LocalKey;

use http::{request, response, Method, Request, Response, StatusCode, Uri, Version};

const KEEP: usize = 8;
const MAX_FIELDS: usize = 64;

thread_local! {
    static REQUESTS: RefCell<Vec<request::Parts>> = const { RefCell::new(Vec::new()) };
    static RESPONSES: RefCell<Vec<response::Parts>> = const { RefCell::new(Vec::new()) };
}

/// Request parts to fill: kept ones, cleared, or new ones.
pub(crate) fn request_parts() -> request::Parts {
    take(&REQUESTS).unwrap_or_else(|| Request::new(()).into_parts().0)
}

/// Response parts to fill: kept ones, cleared, or new ones.
pub(crate) fn response_parts() -> response::Parts {
    take(&RESPONSES).unwrap_or_else(|| Response::new(()).into_parts().0)
}

/// Keeps `parts` of a request the codec is done with, cleared, if the thread has room.
pub(crate) fn keep_request(mut parts: request::Parts) {
    // Values under a name already seen are beyond the index's capacity: counted by `len`.
    if parts.headers.capacity() > MAX_FIELDS || parts.headers.len() > MAX_FIELDS {
        return;
    }
    parts.method = Method::GET;
    // The target and the field values are slices of the head: clearing them lets go of it.
    parts.uri = Uri::default();
    parts.version = Version::HTTP_11;
    parts.headers.clear();
    parts.extensions.clear();
    keep(&REQUESTS, parts);
}

/// Keeps `parts` of a response the codec is done with, cleared, if the thread has room.
pub(crate) fn keep_response(mut parts: response::Parts) {
    // Values under a name already seen are beyond the index's capacity: counted by `len`.
    if parts.headers.capacity() > MAX_FIELDS || parts.headers.len() > MAX_FIELDS {
        return;
    }
    parts.status = StatusCode::OK;
    parts.version = Version::HTTP_11;
    parts.headers.clear();
    parts.extensions.clear();
    keep(&RESPONSES, parts);
}

fn take<T>(list: &'static LocalKey<RefCell<Vec<T>>>) -> Option<T> {
    // `try_with`: nothing is kept or taken while the thread's values are destroyed.
    list.try_with(|kept| kept.borrow_mut().pop()).ok().flatten()
}

/// Keeps `parts`, cleared by the caller before the list is borrowed: dropping what they
/// held can run any code (an extension's `Drop`).
fn keep<T>(list: &'static LocalKey<RefCell<Vec<T>>>, parts: T) {
    let _ = list.try_with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.len() < KEEP {
            kept.push(parts);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderName, HeaderValue};

    #[test]
    fn kept_parts_come_back_empty() {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("http://a.example/x?y")
            .version(Version::HTTP_10)
            .header("x-a", "1")
            .body(())
            .unwrap();
        request.extensions_mut().insert(7u32);
        keep_request(request.into_parts().0);
        let parts = request_parts();
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.uri, "/");
        assert_eq!(parts.version, Version::HTTP_11);
        assert!(parts.headers.is_empty());
        assert!(parts.headers.capacity() > 0, "the map is the one kept");
        assert!(parts.extensions.get::<u32>().is_none());

        let mut response = Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .version(Version::HTTP_10)
            .header("x-a", "1")
            .body(())
            .unwrap();
        response.extensions_mut().insert(7u32);
        keep_response(response.into_parts().0);
        let parts = response_parts();
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.version, Version::HTTP_11);
        assert!(parts.headers.is_empty());
        assert!(parts.headers.capacity() > 0);
        assert!(parts.extensions.get::<u32>().is_none());
    }

    #[test]
    fn a_thread_keeps_a_few_small_maps() {
        // Drain what other tests on this thread left.
        while REQUESTS.with(|kept| kept.borrow_mut().pop()).is_some() {}
        for _ in 0..KEEP + 3 {
            keep_request(Request::new(()).into_parts().0);
        }
        assert_eq!(REQUESTS.with(|kept| kept.borrow().len()), KEEP);

        while REQUESTS.with(|kept| kept.borrow_mut().pop()).is_some() {}
        let mut big = Request::new(()).into_parts().0;
        for i in 0..MAX_FIELDS + 1 {
            let name = HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap();
            big.headers.append(name, HeaderValue::from_static("1"));
        }
        keep_request(big);
        assert_eq!(REQUESTS.with(|kept| kept.borrow().len()), 0);

        // Many values under one name: a small index, a large map all the same.
        let mut cookies = Response::new(()).into_parts().0;
        for _ in 0..MAX_FIELDS + 1 {
            cookies
                .headers
                .append("set-cookie", HeaderValue::from_static("a=1"));
        }
        assert!(cookies.headers.capacity() <= MAX_FIELDS);
        while RESPONSES.with(|kept| kept.borrow_mut().pop()).is_some() {}
        keep_response(cookies);
        assert_eq!(RESPONSES.with(|kept| kept.borrow().len()), 0);
    }
}
