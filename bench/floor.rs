//! The floor under `compare.sh`'s CPU per request, for any proxy built on tokio.
//!
//! It does what every HTTP/1 proxy must do per request and nothing more: read the
//! request from the client, write it unchanged to a kept-alive connection to the next
//! backend (round robin over `127.0.0.1:9101-9103`), read the response until its
//! `Content-Length` is complete, write it unchanged to the client. No header is parsed
//! into a map, nothing is checked, rewritten or logged, no timer is set, buffers are
//! per connection and never freed. It runs on the same runtime as
//! `examples/standalone.rs` (one CPU: current-thread, event interval 1,024), so
//! `tower-lb / floor` is what tower-lb's HTTP work costs, and `floor / nginx` is how
//! much of nginx's CPU per request any tokio proxy on this kernel path needs.
//!
//! With `parse` as its second argument it also does the least HTTP work a proxy must:
//! it parses both heads with httparse, finds the response's length among the parsed
//! fields, and writes each head anew without its hop-by-hop fields, adding
//! `X-Forwarded-For` to the request: what a proxy that forwards header bytes with edits
//! in place (nginx, HAProxy) needs at the least, with no header map, balancer, timer or
//! log.
//!
//! It is a measuring tool, not a proxy: it handles only `GET` requests without a body
//! and responses with a `Content-Length` (what `compare.sh` sends and its backends
//! answer), and closes a connection on anything else.
//!
//! ```text
//! cargo build --release --example floor
//! ../shared/bench/compare.sh --conns 64 --rounds 15 \
//!     --proxy-cmd target/release/examples/floor --proxy-port 8090
//! ../shared/bench/compare.sh --conns 64 --rounds 15 \
//!     --proxy-cmd "target/release/examples/floor 127.0.0.1:8090 parse" --proxy-port 8090
//! ```

use std::cell::{Cell, RefCell};
use std::io;
use std::net::IpAddr;
use std::sync::LazyLock;

use memchr::memmem::Finder;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where it listens unless the first argument says otherwise.
const LISTEN: &str = "127.0.0.1:8090";
const BACKENDS: [&str; 3] = ["127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"];
const BUFFER: usize = 16 * 1024;

/// Built once: `memmem::find` builds its searcher on every call.
static HEAD_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));
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
            let parse = args.next().is_some_and(|mode| mode == "parse");
            let listener = TcpListener::bind(listen).await?;
            loop {
                let (client, peer) = listener.accept().await?;
                tokio::spawn(async move {
                    // A failed connection is closed; the load generator counts the error.
                    let _ = serve(client, parse.then_some(peer.ip())).await;
                });
            }
        })
}

/// Proxies the requests of one client; with `parse`, the client's address, rewriting
/// the heads.
async fn serve(mut client: TcpStream, parse: Option<IpAddr>) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut request = vec![0; BUFFER];
    let mut response = vec![0; BUFFER];
    let mut out = Vec::with_capacity(BUFFER);
    // The client's address does not change while its connection lasts.
    let forwarded = parse.map(|ip| format!("x-forwarded-for: {ip}\r\n\r\n"));
    loop {
        let Some(len) = read_message(&mut client, &mut request, false).await? else {
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
        match &forwarded {
            None => upstream.write_all(&request[..len]).await?,
            Some(forwarded) => {
                rewrite_request(&request[..len], forwarded.as_bytes(), &mut out)?;
                upstream.write_all(&out).await?;
            }
        }
        let Some(len) = read_message(&mut upstream, &mut response, true).await? else {
            return Err(io::ErrorKind::UnexpectedEof.into());
        };
        match forwarded {
            None => client.write_all(&response[..len]).await?,
            Some(_) => {
                rewrite_response(&response[..len], &mut out)?;
                client.write_all(&out).await?;
            }
        }
        IDLE.with(|idle| idle.borrow_mut()[backend].push(upstream));
    }
}

/// Reads one message into `buf`: a head, and for a response the `Content-Length` bytes
/// after it. `None` when the peer closed before the first byte.
async fn read_message(
    stream: &mut TcpStream,
    buf: &mut [u8],
    response: bool,
) -> io::Result<Option<usize>> {
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return match filled {
                0 => Ok(None),
                _ => Err(io::ErrorKind::UnexpectedEof.into()),
            };
        }
        filled += n;
        let Some(head) = HEAD_END.find(&buf[..filled]) else {
            if filled == buf.len() {
                return Err(io::ErrorKind::InvalidData.into());
            }
            continue;
        };
        let total = match response {
            false => head + 4,
            true => head + 4 + content_length(&buf[..head])?,
        };
        if total > buf.len() {
            return Err(io::ErrorKind::InvalidData.into());
        }
        while filled < total {
            let n = stream.read(&mut buf[filled..total]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            filled += n;
        }
        return Ok(Some(total));
    }
}

fn content_length(head: &[u8]) -> io::Result<usize> {
    let invalid = || io::Error::from(io::ErrorKind::InvalidData);
    let at = CONTENT_LENGTH.find(head).ok_or_else(invalid)?;
    let value = &head[at + 16..];
    let end = memchr::memchr(b'\r', value).unwrap_or(value.len());
    std::str::from_utf8(&value[..end])
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(invalid)
}

/// The request head `message` without hop-by-hop fields, ending with `forwarded` (its
/// `X-Forwarded-For` field and the empty line).
fn rewrite_request(message: &[u8], forwarded: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(_)) = head.parse(message) else {
        return Err(io::ErrorKind::InvalidData.into());
    };
    out.clear();
    out.extend_from_slice(first_line(message));
    fields_without_hop_by_hop(head.headers, out);
    out.extend_from_slice(forwarded);
    Ok(())
}

/// The request or status line, with its line end.
fn first_line(message: &[u8]) -> &[u8] {
    let end = memchr::memchr(b'\n', message).map_or(message.len(), |at| at + 1);
    &message[..end]
}

/// The response `message` with its head rewritten without hop-by-hop fields.
fn rewrite_response(message: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Response::new(&mut fields);
    let Ok(httparse::Status::Complete(body)) = head.parse(message) else {
        return Err(io::ErrorKind::InvalidData.into());
    };
    // The length again, from the parsed fields, as a proxy that checks framing finds it.
    let length = head
        .headers
        .iter()
        .find(|field| field.name.eq_ignore_ascii_case("content-length"))
        .and_then(|field| std::str::from_utf8(field.value).ok()?.parse::<usize>().ok());
    if length != Some(message.len() - body) {
        return Err(io::ErrorKind::InvalidData.into());
    }
    out.clear();
    out.extend_from_slice(first_line(message));
    fields_without_hop_by_hop(head.headers, out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&message[body..]);
    Ok(())
}

fn fields_without_hop_by_hop(fields: &[httparse::Header<'_>], out: &mut Vec<u8>) {
    const HOP_BY_HOP: [&str; 6] = [
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
    ];
    for field in fields {
        if HOP_BY_HOP
            .iter()
            .any(|name| field.name.eq_ignore_ascii_case(name))
        {
            continue;
        }
        out.extend_from_slice(field.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(field.value);
        out.extend_from_slice(b"\r\n");
    }
}
