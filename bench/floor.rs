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
//! It is a measuring tool, not a proxy: it handles only `GET` requests without a body
//! and responses with a `Content-Length` (what `compare.sh` sends and its backends
//! answer), and closes a connection on anything else.
//!
//! ```text
//! cargo build --release --example floor
//! ../shared/bench/compare.sh --conns 64 --rounds 15 \
//!     --proxy-cmd target/release/examples/floor --proxy-port 8090
//! ```

use std::cell::{Cell, RefCell};
use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where it listens unless the first argument says otherwise.
const LISTEN: &str = "127.0.0.1:8090";
const BACKENDS: [&str; 3] = ["127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"];
const BUFFER: usize = 16 * 1024;

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
    builder.event_interval(1024).enable_all().build()?.block_on(async {
        let listen = std::env::args().nth(1).unwrap_or_else(|| LISTEN.to_owned());
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(async move {
                // A failed connection is closed; the load generator counts the error.
                let _ = serve(client).await;
            });
        }
    })
}

async fn serve(mut client: TcpStream) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut request = vec![0; BUFFER];
    let mut response = vec![0; BUFFER];
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
        upstream.write_all(&request[..len]).await?;
        let Some(len) = read_message(&mut upstream, &mut response, true).await? else {
            return Err(io::ErrorKind::UnexpectedEof.into());
        };
        client.write_all(&response[..len]).await?;
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
        let Some(head) = memchr::memmem::find(&buf[..filled], b"\r\n\r\n") else {
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
    let at = memchr::memmem::find(head, b"\nContent-Length:").ok_or_else(invalid)?;
    let value = &head[at + 16..];
    let end = memchr::memchr(b'\r', value).unwrap_or(value.len());
    std::str::from_utf8(&value[..end])
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(invalid)
}
