//! Reading a socket through each thread's scratch buffer.
//!
//! A connection waiting for bytes holds no read buffer of its own: what arrives is read
//! into a buffer its thread keeps, and only the bytes that came are copied out. Otherwise
//! each of thousands of waiting connections, client or upstream, would hold one.

use std::cell::RefCell;
use std::io;
use std::task::{ready, Context, Poll};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// The size of each thread's scratch read buffer: a request or response head within it
/// arrives in one read, as most do.
pub(super) const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Runs `f` with this thread's scratch buffer (`f` must not call it again).
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH_BUF.with(|scratch| f(&mut scratch.borrow_mut()))
}

/// Reads what has arrived on `io` into `buf`; `Ok(0)` is the end of the stream.
///
/// A read that does not fill `buf` has drained the socket, and its readiness is cleared
/// then, as tokio's own `poll_read` does: the next read waits for the reactor instead of
/// making a system call that fails with `WouldBlock` (`try_read` alone keeps the socket
/// marked readable until one does). The readiness is the one seen before the read, so
/// bytes that arrived during it are not missed: they mark the socket readable again.
pub(super) fn try_read(io: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut read = 0;
    let drained = io.try_io(Interest::READABLE, || {
        read = io.try_read(buf)?;
        if read > 0 && read < buf.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match drained {
        Ok(()) => Ok(read),
        Err(_) if read > 0 => Ok(read),
        Err(e) => Err(e),
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b"one").await.unwrap();
        let got = std::future::poll_fn(|cx| poll_read_with(&server, cx, <[u8]>::to_vec)).await;
        assert_eq!(got.unwrap(), b"one");
        let waker = std::task::Waker::noop();
        assert!(
            server.poll_read_ready(&mut Context::from_waker(waker)).is_pending(),
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
