//! The HTTP/1.1 codec: the proxy's client to its backends and its server to clients, under
//! one set of rules.
//!
//! hyper's client gives every upstream connection its own task and hands each request and
//! response body across a channel. For a proxy that costs two task hand-offs per request
//! and about 12,000 instructions (measured with callgrind; see the README). Here the
//! request is written and the response read by the future of the request itself
//! ([`exchange`]), and the response body reads the upstream socket directly when the
//! server polls it, as pingora does.
//!
//! One file per concern, as in pingora's `protocols/http/v1`:
//!
//! - `framing`: the framing rules (`Content-Length` syntax, `Transfer-Encoding`,
//!   duplicates, chunk-size lines, trailers), the same for requests and responses;
//! - `request`: the rules of `Host`, the request target and `CONNECT`, and how a refused
//!   request is answered;
//! - `pool`: idle keep-alive connections ([`Pool`], [`Conn`]);
//! - `encode`: the request head for the backend ([`encode_head`]) and the request body,
//!   chunked with its trailers when its length is not known;
//! - `name`: field names, the common ones matched without `HeaderName::from_bytes`;
//! - `parse`: the response head, parsed with `httparse` (hyper's parser);
//! - `chunked`: the chunked decoder, trailers included;
//! - `body`: [`UpstreamBody`], the response body read from the connection;
//! - `exchange`: one request and response on a connection;
//! - `serve`: the server side, one client connection's requests and responses;
//! - `incoming`: [`RequestBody`], a request body read from the client's connection;
//! - `write`: the response to a client, its head and its body;
//! - `read`: reading a socket, client or upstream, through the thread's scratch buffer.
//!
//! A connection is pooled again only when the response ended cleanly, the request body
//! was sent in full, and neither side asked to close.

mod body;
mod chunked;
mod encode;
mod exchange;
mod framing;
#[doc(hidden)]
pub mod fuzz;
mod incoming;
mod name;
mod parse;
mod pool;
mod read;
mod recycle;
mod request;
mod serve;
mod write;

pub use self::body::UpstreamBody;
pub(crate) use self::encode::{encode_head, Head};
pub(crate) use self::exchange::{exchange, Elapsed};
pub use self::incoming::RequestBody;
pub(crate) use self::pool::{Conn, Pool};
pub(crate) use self::recycle::keep_request;
pub(crate) use self::request::{check_request, Refusal};
pub(crate) use self::serve::{
    serve_connection, FramingRefused, OnClientUpgrade, Settings, Upgraded,
};

/// Largest response head (and trailer section) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Fields per response head (and trailer section).
const MAX_HEADERS: usize = 100;

/// A connected pair of loopback sockets: the connecting side, then the accepted one.
#[cfg(test)]
async fn socket_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connecting = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
    let (connected, accepted) = tokio::join!(connecting, listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}
