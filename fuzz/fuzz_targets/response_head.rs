//! Response heads through the codec's parser: no panic, the same answer whether the head
//! arrives whole or in two parts, and a head it accepts carries no hop-by-hop field (but a
//! `101`'s `Upgrade`, with `Connection: upgrade`) and no `Content-Length` beside chunked
//! framing.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tower_lb::proxy::__fuzz;

type Outcome = Option<(http::StatusCode, http::HeaderMap, String, bool, Vec<u8>)>;

fn parse(parts: &[&[u8]], head_request: bool) -> Result<Outcome, ()> {
    let mut buf = BytesMut::new();
    let mut last = None;
    for part in parts {
        buf.extend_from_slice(part);
        last = __fuzz::parse_response_head(&mut buf, head_request).map_err(|_| ())?;
        if last.is_some() {
            break;
        }
    }
    Ok(last.map(|h| (h.status, h.headers, h.framing, h.keep_alive, buf.to_vec())))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let whole = parse(&[bytes], head_request);
    let (a, b) = bytes.split_at(usize::from(flags >> 1) * bytes.len() / 128);
    // A first part that holds a whole head is parsed alone; the rest stays in the buffer.
    let parts = parse(&[a, b], head_request);
    match (&whole, &parts) {
        (Ok(Some(w)), Ok(Some(p))) => {
            assert_eq!((&w.0, &w.1, &w.2, w.3), (&p.0, &p.1, &p.2, p.3));
            // The bytes after the head: all of them, or (the head complete in the first
            // part, and the second never added) all but the second part.
            assert!(w.4 == p.4 || w.4 == [&p.4[..], b].concat());
        }
        _ => assert_eq!(whole.is_err(), parts.is_err(), "split at {}", a.len()),
    }
    if let Ok(Some((status, headers, framing, _, _))) = whole {
        // A `101` is the one exception: its `Upgrade` goes on, with `Connection: upgrade`.
        let switching = status == http::StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            let connection: Vec<_> = headers.get_all("connection").iter().collect();
            assert_eq!(connection, ["upgrade"], "a 101's Connection");
        }
        for name in ["connection", "upgrade"] {
            assert!(switching || !headers.contains_key(name), "{name} forwarded");
        }
        for name in ["keep-alive", "transfer-encoding", "te", "proxy-connection"] {
            assert!(!headers.contains_key(name), "{name} forwarded");
        }
        if framing == "chunked" {
            assert!(!headers.contains_key("content-length"));
        }
    }
});
