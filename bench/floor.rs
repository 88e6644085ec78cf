//! A floor under `compare.sh`'s CPU per request, for proxies built on tokio.
//!
//! By default it only moves bytes, less than any HTTP proxy must do: it reads a request
//! from the client, writes it unchanged to a kept-alive connection to the next backend
//! (round robin over `127.0.0.1:9101-9103`), reads the response until its
//! `Content-Length` is complete and writes it unchanged to the client. Nothing is parsed
//! into a map, checked, rewritten or logged, no timer is set, and each connection's
//! buffers are never shrunk. It runs on the runtime of `examples/standalone.rs` (on one
//! CPU: current-thread, event interval 1,024) and makes the same four system calls per
//! request, so the difference between tower-lb's CPU per request and this one's is what
//! tower-lb's HTTP work costs.
//!
//! With `parse` as its second argument it also does the HTTP work no HTTP/1 proxy can
//! skip, and nothing else: it parses each head once with httparse, takes the response's
//! length and both sides' keep-alive from the parsed fields, and writes each head anew
//! without its hop-by-hop fields, adding `X-Forwarded-For` to the request (nginx and
//! HAProxy also write the heads they forward anew). There is no header map, balancer,
//! deadline, limit, counter or log.
//!
//! With `http` as its second argument it does what `parse` does through `http` types:
//! each parsed head becomes an `http::Request` or `http::Response` (a `HeaderMap` whose
//! values are slices of a copy of the head) and is written anew from it. The difference
//! between the two is what building those types costs a proxy that forwards through them.
//!
//! It is a measuring tool, not a proxy: it serves `GET` requests without a body, one at
//! a time, and responses with a `Content-Length` (what `compare.sh` sends and its
//! backends answer), and closes a connection on anything else, bytes after a message
//! included. Bytes mode does not look at `Connection` (wrk does not send it, and the
//! backends keep their connections open); in parse mode a `Connection` field that names
//! other fields is refused rather than acted on.
//!
//! ```text
//! cargo build --release --example floor
//! ../shared/bench/compare.sh --conns 64 --rounds 15 \
//!     --proxy-cmd target/release/examples/floor --proxy-port 8090
//! ../shared/bench/compare.sh --conns 64 --rounds 15 \
//!     --proxy-cmd "target/release/examples/floor 127.0.0.1:8090 parse" --proxy-port 8090
//! ../shared/bench/compare.sh --conns 64 --rounds 15 \
//!     --proxy-cmd "target/release/examples/floor 127.0.0.1:8090 http" --proxy-port 8090
//! ```

use std::cell::{Cell, RefCell};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use memchr::memmem::Finder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// As `examples/standalone.rs`: the `http` mode allocates per request, the others do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `http` mode: heads go through `http::Request` and `http::Response`.
static MAPS: AtomicBool = AtomicBool::new(false);

/// Where it listens unless the first argument says otherwise.
const LISTEN: &str = "127.0.0.1:8090";
const BACKENDS: [&str; 3] = ["127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"];
const BUFFER: usize = 16 * 1024;

/// Built once: `memmem::find` builds its searcher on every call.
static HEAD_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));
/// As nginx writes it. A backend that spells it otherwise fails every request, which
/// compare.sh counts as errors rather than as a cheap run.
static CONTENT_LENGTH: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\nContent-Length:"));

thread_local! {
    static NEXT: Cell<usize> = const { Cell::new(0) };
    static IDLE: RefCell<[Vec<TcpStream>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

fn main() -> io::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus > 1 {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder
        .event_interval(1024)
        .enable_all()
        .build()?
        .block_on(async {
            let mut args = std::env::args().skip(1);
            let listen = args.next().unwrap_or_else(|| LISTEN.to_owned());
            let mode = args.next();
            let parse = mode
                .as_deref()
                .is_some_and(|mode| mode == "parse" || mode == "http");
            MAPS.store(mode.as_deref() == Some("http"), Ordering::Relaxed);
            let listener = TcpListener::bind(listen).await?;
            loop {
                let (client, peer) = listener.accept().await?;
                // The client's address does not change while its connection lasts.
                let forwarded = parse.then(|| format!("x-forwarded-for: {}\r\n", peer.ip()));
                tokio::spawn(async move {
                    // A failed connection is closed; the load generator counts the error.
                    let _ = serve(client, forwarded).await;
                });
            }
        })
}

/// Proxies the requests of one client. With `forwarded` (its `X-Forwarded-For` field),
/// parses and rewrites the heads.
async fn serve(mut client: TcpStream, forwarded: Option<String>) -> io::Result<()> {
    client.set_nodelay(true)?;
    let forwarded = forwarded.as_deref().map(str::as_bytes);
    let mut request = vec![0; BUFFER];
    let mut response = vec![0; BUFFER];
    // The rewritten message, in parse mode.
    let mut out = Vec::with_capacity(BUFFER);
    loop {
        let Some(asked) = read_message(
            &mut client,
            &mut request,
            Side::Request(forwarded),
            &mut out,
        )
        .await?
        else {
            return Ok(());
        };
        let backend = NEXT.with(|next| {
            let at = next.get();
            next.set((at + 1) % BACKENDS.len());
            at
        });
        let mut upstream = match IDLE.with(|idle| idle.borrow_mut()[backend].pop()) {
            Some(upstream) => upstream,
            None => {
                let upstream = TcpStream::connect(BACKENDS[backend]).await?;
                upstream.set_nodelay(true)?;
                upstream
            }
        };
        let sent = match forwarded {
            None => &request[..asked.len],
            Some(_) => &out[..],
        };
        upstream.write_all(sent).await?;
        let answered = read_message(
            &mut upstream,
            &mut response,
            Side::Response(forwarded.is_some()),
            &mut out,
        )
        .await?
        .ok_or(io::ErrorKind::UnexpectedEof)?;
        let sent = match forwarded {
            None => &response[..answered.len],
            Some(_) => &out[..],
        };
        client.write_all(sent).await?;
        // A stale pooled connection fails its next client instead of being tried again:
        // the harness's backends keep connections for 10,000,000 requests.
        if answered.keep_alive {
            IDLE.with(|idle| idle.borrow_mut()[backend].push(upstream));
        }
        if !asked.keep_alive {
            return Ok(());
        }
    }
}

/// Which message `read_message` reads, and whether it parses and rewrites it.
#[derive(Clone, Copy)]
enum Side<'a> {
    /// A request; with the `X-Forwarded-For` field to add, parsed and rewritten.
    Request(Option<&'a [u8]>),
    /// A response; parsed and rewritten if `true`.
    Response(bool),
}

/// A message read whole.
struct Message {
    /// Its length in the buffer it was read into.
    len: usize,
    /// Whether its connection stays open after it.
    keep_alive: bool,
}

/// A head found at the front of a buffer.
struct Head {
    len: usize,
    body: usize,
    keep_alive: bool,
}

/// Reads one message into `buf`: a head and its body (requests have none here). In parse
/// mode `out` holds the message rewritten. `None` when the peer closed before the first
/// byte; an error for anything this floor does not handle, bytes after the message
/// included (a pipelined request, a backend out of step).
async fn read_message(
    stream: &mut TcpStream,
    buf: &mut [u8],
    side: Side<'_>,
    out: &mut Vec<u8>,
) -> io::Result<Option<Message>> {
    let mut filled = 0;
    let head = loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return match filled {
                0 => Ok(None),
                _ => Err(io::ErrorKind::UnexpectedEof.into()),
            };
        }
        filled += n;
        let found = match side {
            Side::Request(None) => request_bytes(&buf[..filled])?,
            Side::Response(false) => response_bytes(&buf[..filled])?,
            Side::Request(Some(forwarded)) => parse_request(&buf[..filled], forwarded, out)?,
            Side::Response(true) => parse_response(&buf[..filled], out)?,
        };
        if let Some(head) = found {
            break head;
        }
        if filled == buf.len() {
            return Err(io::ErrorKind::InvalidData.into());
        }
    };
    let len = head
        .len
        .checked_add(head.body)
        .filter(|&len| len <= buf.len())
        .ok_or(io::ErrorKind::InvalidData)?;
    while filled < len {
        let n = stream.read(&mut buf[filled..len]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    if filled != len {
        return Err(io::ErrorKind::InvalidData.into());
    }
    if matches!(side, Side::Request(Some(_)) | Side::Response(true)) {
        out.extend_from_slice(&buf[head.len..len]);
    }
    Ok(Some(Message {
        len,
        keep_alive: head.keep_alive,
    }))
}

/// Bytes mode: a `GET` head, found by its end; a body, if one came, is refused as bytes
/// after the message.
fn request_bytes(buf: &[u8]) -> io::Result<Option<Head>> {
    if !buf.starts_with(&b"GET "[..buf.len().min(4)]) {
        return Err(io::ErrorKind::InvalidData.into());
    }
    Ok(HEAD_END.find(buf).map(|at| Head {
        len: at + 4,
        body: 0,
        keep_alive: true,
    }))
}

/// Bytes mode: a response head and the `Content-Length` in it.
fn response_bytes(buf: &[u8]) -> io::Result<Option<Head>> {
    let Some(at) = HEAD_END.find(buf) else {
        return Ok(None);
    };
    let head = &buf[..at];
    let field = CONTENT_LENGTH
        .find(head)
        .ok_or(io::ErrorKind::InvalidData)?;
    let value = &head[field + 16..];
    let end = memchr::memchr(b'\r', value).unwrap_or(value.len());
    let body = std::str::from_utf8(&value[..end])
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .ok_or(io::ErrorKind::InvalidData)?;
    Ok(Some(Head {
        len: at + 4,
        body,
        keep_alive: true,
    }))
}

/// Parse mode: a `GET` head without a body, written to `out` without its hop-by-hop
/// fields and with `forwarded`.
fn parse_request(buf: &[u8], forwarded: &[u8], out: &mut Vec<u8>) -> io::Result<Option<Head>> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Request::new(&mut fields);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) if head.method == Some("GET") => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        _ => return Err(io::ErrorKind::InvalidData.into()),
    };
    if MAPS.load(Ordering::Relaxed) {
        return request_through_map(&buf[..len], &head, forwarded, out).map(Some);
    }
    out.clear();
    out.extend_from_slice(first_line(buf));
    let mut keep_alive = head.version == Some(1);
    for field in head.headers.iter() {
        if field.name.eq_ignore_ascii_case("content-length")
            || field.name.eq_ignore_ascii_case("transfer-encoding")
        {
            return Err(io::ErrorKind::InvalidData.into());
        }
        if field.name.eq_ignore_ascii_case("connection") {
            keep_alive = keeps_alive(field.value, keep_alive)?;
        }
        copy_unless_hop_by_hop(field, out);
    }
    out.extend_from_slice(forwarded);
    out.extend_from_slice(b"\r\n");
    Ok(Some(Head {
        len,
        body: 0,
        keep_alive,
    }))
}

/// Parse mode: a response head with a `Content-Length`, written to `out` without its
/// hop-by-hop fields.
fn parse_response(buf: &[u8], out: &mut Vec<u8>) -> io::Result<Option<Head>> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Response::new(&mut fields);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) if head.code.is_some_and(|code| code >= 200) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        _ => return Err(io::ErrorKind::InvalidData.into()),
    };
    if MAPS.load(Ordering::Relaxed) {
        return response_through_map(&buf[..len], &head, out).map(Some);
    }
    out.clear();
    out.extend_from_slice(first_line(buf));
    let mut body = None;
    let mut keep_alive = head.version == Some(1);
    for field in head.headers.iter() {
        if field.name.eq_ignore_ascii_case("content-length") {
            body = std::str::from_utf8(field.value)
                .ok()
                .and_then(|value| value.parse().ok());
        } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(io::ErrorKind::InvalidData.into());
        } else if field.name.eq_ignore_ascii_case("connection") {
            keep_alive = keeps_alive(field.value, keep_alive)?;
        }
        copy_unless_hop_by_hop(field, out);
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(Head {
        len,
        body: body.ok_or(io::ErrorKind::InvalidData)?,
        keep_alive,
    }))
}

/// The request or status line, with its line end.
fn first_line(message: &[u8]) -> &[u8] {
    let end = memchr::memchr(b'\n', message).map_or(message.len(), |at| at + 1);
    &message[..end]
}

/// Whether a `Connection` value keeps the connection open. A value that names fields,
/// which a proxy would then leave out, is refused: the floor does not look for them.
fn keeps_alive(value: &[u8], default: bool) -> io::Result<bool> {
    let mut keep_alive = default;
    for token in value.split(|&b| b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            keep_alive = false;
        } else if token.eq_ignore_ascii_case(b"keep-alive") {
            keep_alive = true;
        } else {
            return Err(io::ErrorKind::InvalidData.into());
        }
    }
    Ok(keep_alive)
}

fn copy_unless_hop_by_hop(field: &httparse::Header<'_>, out: &mut Vec<u8>) {
    let name = field.name;
    let is = |hop: &str| name.eq_ignore_ascii_case(hop);
    let hop_by_hop = match name.len() {
        2 => is("te"),
        7 => is("upgrade"),
        10 => is("connection") || is("keep-alive"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        _ => false,
    };
    if !hop_by_hop {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(field.value);
        out.extend_from_slice(b"\r\n");
    }
}

/// `http` mode: the parsed request becomes an `http::Request` over a copy of its head, as
/// a proxy built on `http` types holds it, and is written to `out` from that.
fn request_through_map(
    head_bytes: &[u8],
    head: &httparse::Request<'_, '_>,
    forwarded: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<Head> {
    let shared = bytes::Bytes::copy_from_slice(head_bytes);
    let mut headers = http::HeaderMap::with_capacity(head.headers.len() + 1);
    for field in head.headers.iter() {
        headers.append(name(field.name)?, value(&shared, head_bytes, field.value)?);
    }
    let uri: http::Uri = head.path.unwrap_or("/").parse().map_err(invalid)?;
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::GET;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    if request.headers().contains_key(http::header::CONTENT_LENGTH)
        || request
            .headers()
            .contains_key(http::header::TRANSFER_ENCODING)
    {
        return Err(io::ErrorKind::InvalidData.into());
    }
    let mut keep_alive = head.version == Some(1);
    for connection in request.headers().get_all(http::header::CONNECTION) {
        keep_alive = keeps_alive(connection.as_bytes(), keep_alive)?;
    }
    out.clear();
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |target| target.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_map(request.headers(), out);
    out.extend_from_slice(forwarded);
    out.extend_from_slice(b"\r\n");
    Ok(Head {
        len: head_bytes.len(),
        body: 0,
        keep_alive,
    })
}

/// `http` mode: the parsed response becomes an `http::Response` and is written from it.
fn response_through_map(
    head_bytes: &[u8],
    head: &httparse::Response<'_, '_>,
    out: &mut Vec<u8>,
) -> io::Result<Head> {
    let shared = bytes::Bytes::copy_from_slice(head_bytes);
    let mut headers = http::HeaderMap::with_capacity(head.headers.len());
    for field in head.headers.iter() {
        headers.append(name(field.name)?, value(&shared, head_bytes, field.value)?);
    }
    let status = http::StatusCode::from_u16(head.code.unwrap_or(0)).map_err(invalid)?;
    let mut response = http::Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    if response
        .headers()
        .contains_key(http::header::TRANSFER_ENCODING)
    {
        return Err(io::ErrorKind::InvalidData.into());
    }
    let body = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse().ok())
        .ok_or(io::ErrorKind::InvalidData)?;
    let mut keep_alive = head.version == Some(1);
    for connection in response.headers().get_all(http::header::CONNECTION) {
        keep_alive = keeps_alive(connection.as_bytes(), keep_alive)?;
    }
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(response.status().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        response
            .status()
            .canonical_reason()
            .unwrap_or("")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    write_map(response.headers(), out);
    out.extend_from_slice(b"\r\n");
    Ok(Head {
        len: head_bytes.len(),
        body,
        keep_alive,
    })
}

fn name(name: &str) -> io::Result<http::HeaderName> {
    http::HeaderName::from_bytes(name.as_bytes()).map_err(invalid)
}

/// A field's value, found in `parsed`, as a slice of `shared` (its copy), not a copy of
/// its own.
fn value(shared: &bytes::Bytes, parsed: &[u8], value: &[u8]) -> io::Result<http::HeaderValue> {
    let start = (value.as_ptr() as usize)
        .checked_sub(parsed.as_ptr() as usize)
        .ok_or(io::ErrorKind::InvalidData)?;
    let slice = shared.slice(start..start + value.len());
    http::HeaderValue::from_maybe_shared(slice).map_err(invalid)
}

fn invalid(error: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// A map's fields, without the hop-by-hop ones.
fn write_map(headers: &http::HeaderMap, out: &mut Vec<u8>) {
    use http::header;
    for (name, value) in headers {
        if matches!(
            *name,
            header::TE | header::UPGRADE | header::CONNECTION | header::TRANSFER_ENCODING
        ) || name == "keep-alive"
            || name == "proxy-connection"
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}
