//! Reading a socket: through each thread's scratch buffer while a connection waits for a
//! head, straight into the body's buffer while a body is under way.
//!
//! A connection waiting for a head holds no read buffer of its own: what arrives is read
//! into a buffer its thread keeps, and only the bytes that came are copied out. Otherwise
//! each of thousands of waiting connections, client or upstream, would hold one. A body
//! being transferred reads into its own buffer instead, sparing a second copy of every
//! byte.

use std::cell::RefCell;
use std::io;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The size of each thread's scratch read buffer: a request or response head within it
/// arrives in one read, as most do.
const SCRATCH: usize = 16 * 1024;

/// The most read at once for a body under way.
pub(super) const BODY_READ: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Runs `f` with this thread's scratch buffer (`f` must not call it again).
fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH_BUF.with(|scratch| f(&mut scratch.borrow_mut()))
}

/// Reads what has arrived on `io` into `buf`; `Ok(0)` is the end of the stream.
///
/// A read that does not fill `buf` has drained the socket, and its readiness is cleared
/// then, as tokio's own `poll_read` does: the next read waits for the reactor instead of
/// making a system call that fails with `WouldBlock` (`try_read` alone keeps the socket
/// marked readable until one does). The readiness is the one seen before the read, so
/// bytes that arrived during it are not missed: they mark the socket readable again.
fn try_read(io: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let room = buf.len();
    read_clearing(io, room, || io.try_read(buf))
}

/// Runs `read` (of at most `room` bytes) and clears the readiness it started from when
/// it read less.
fn read_clearing(
    io: &TcpStream,
    room: usize,
    read: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut n = 0;
    let drained = io.try_io(Interest::READABLE, || {
        n = read()?;
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match drained {
        Ok(()) => Ok(n),
        Err(_) if n > 0 => Ok(n),
        Err(e) => Err(e),
    }
}

/// Waits for bytes on `io` and reads them into `buf`, with room for `want` more reserved
/// once they are there (`Ok(0)`: the end of the stream). For a body under way.
pub(super) fn poll_read_buf(
    io: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    want: usize,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(io.poll_read_ready(cx))?;
        // At least a byte of room: a read into none would look like the end of the stream.
        buf.reserve(want.max(1));
        let room = buf.capacity() - buf.len();
        match read_clearing(io, room, || io.try_read_buf(buf)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            read => return Poll::Ready(read),
        }
    }
}

/// Waits for bytes on `io`, reads them into the scratch buffer and hands them to `f`
/// (empty at the end of the stream).
pub(super) fn poll_read_with<R>(
    io: &TcpStream,
    cx: &mut Context<'_>,
    f: impl FnOnce(&[u8]) -> R,
) -> Poll<io::Result<R>> {
    with_scratch(|scratch| loop {
        ready!(io.poll_read_ready(cx))?;
        match try_read(io, scratch) {
            Ok(n) => return Poll::Ready(Ok(f(&scratch[..n]))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// After a short read the socket waits for the reactor: a second read is not tried
    /// (it would fail with `WouldBlock`), and bytes sent later still wake the reader.
    #[tokio::test]
    async fn a_short_read_waits_for_the_next_bytes() {
        let (mut client, server) = super::super::socket_pair().await;
        client.write_all(b"one").await.unwrap();
        let got = std::future::poll_fn(|cx| poll_read_with(&server, cx, <[u8]>::to_vec)).await;
        assert_eq!(got.unwrap(), b"one");
        let waker = std::task::Waker::noop();
        assert!(
            server
                .poll_read_ready(&mut Context::from_waker(waker))
                .is_pending(),
            "still marked readable after a short read"
        );
        client.write_all(b"two").await.unwrap();
        let got = std::future::poll_fn(|cx| poll_read_with(&server, cx, <[u8]>::to_vec)).await;
        assert_eq!(got.unwrap(), b"two");
        drop(client);
        let got = std::future::poll_fn(|cx| poll_read_with(&server, cx, <[u8]>::len)).await;
        assert_eq!(got.unwrap(), 0);
    }
}
