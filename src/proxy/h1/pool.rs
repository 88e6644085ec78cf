//! Idle keep-alive connections to one backend, and the connection itself.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Waker};

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Idle connections to one backend, most recently used last.
#[derive(Debug)]
pub(crate) struct Pool {
    idle: std::sync::Mutex<Vec<Conn>>,
    max_idle: usize,
}

impl Pool {
    pub(crate) fn new(max_idle: usize) -> Self {
        Pool {
            idle: std::sync::Mutex::new(Vec::new()),
            max_idle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A usable idle connection, dropping the ones the backend has closed.
    pub(crate) fn checkout(&self) -> Option<Conn> {
        // Only a look at the connection's state: the exchange registers its own waker when
        // it reads.
        let mut cx = Context::from_waker(Waker::noop());
        let mut idle = self.lock();
        while let Some(conn) = idle.pop() {
            if conn.is_usable(&mut cx) {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for a later request, if it is fit to be kept and the pool has room.
    pub(crate) fn checkin(&self, mut conn: Conn) {
        if !conn.park() {
            return;
        }
        // Empty, but it may share an allocation with the last response's bytes.
        conn.rbuf = BytesMut::new();
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// An open connection to a backend.
///
/// An idle one (in the pool) holds its socket, its timer and nothing else: no waker of the
/// task that used it last (see [`Conn::park`]), and no read buffer: reads go through the
/// thread's scratch buffer, and take memory only for the bytes that came.
pub(crate) struct Conn {
    pub(super) io: TcpStream,
    /// Bytes read and not yet consumed; no allocation until the first read.
    pub(super) rbuf: BytesMut,
    /// Has carried a request before (a failure on it may be a stale keep-alive).
    pub(super) reused: bool,
    /// The response timeout, kept with the connection and moved forward for each request.
    /// A new `Sleep` per request is inserted into and removed from tokio's timer wheel
    /// every time; moving a registered deadline later is one atomic operation, and the
    /// wheel sees the timer again only when its first deadline passes. So it stays with
    /// an idle connection too: it is a small allocation beside the read buffer that an
    /// idle connection no longer holds.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    pub(crate) fn new(io: TcpStream) -> Self {
        Conn {
            io,
            rbuf: BytesMut::new(),
            reused: false,
            timer: None,
        }
    }

    /// Starts the response timer: it fires at `deadline` unless armed again before.
    pub(super) fn arm(&mut self, deadline: Instant) {
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    /// Whether the armed deadline has passed; registers `cx` to be woken when it does.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }

    /// Whether an idle connection can take a request: it must have nothing to read (data
    /// or EOF from an idle backend means it is closing or broken). Uses the reactor's
    /// cached readiness, without a system call.
    pub(crate) fn is_usable(&self, cx: &mut Context<'_>) -> bool {
        self.rbuf.is_empty() && self.io.poll_read_ready(cx).is_pending()
    }

    /// Readies the connection to wait in the pool, and says whether it is usable. The
    /// socket's readiness and the timer are polled with a no-op waker, which takes the
    /// place of the waker of the task that used the connection last: each holds a
    /// reference to that task, so an idle connection would keep a finished task's memory
    /// allocated, and wake the task for nothing when the backend closes the connection or
    /// the old deadline passes.
    fn park(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if let Some(timer) = &mut self.timer {
            // Done with: whether it has fired does not matter, the next exchange arms it.
            let _ = timer.as_mut().poll(&mut cx);
        }
        self.is_usable(&mut cx)
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.io.peer_addr().ok())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Poll, Wake};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderValue, Request};
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::proxy::h1::{encode_head, exchange};

    /// A backend that answers every request head with `hello`, on any number of
    /// connections; counts the connections it accepted and the requests it answered.
    async fn backend() -> (std::net::SocketAddr, Arc<[AtomicUsize; 2]>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let counted = counts.clone();
        tokio::spawn(async move {
            while let Ok((mut io, _)) = listener.accept().await {
                counted[0].fetch_add(1, Ordering::SeqCst);
                let counted = counted.clone();
                tokio::spawn(async move {
                    let (mut buf, mut chunk) = (Vec::new(), [0; 1024]);
                    while let Ok(n @ 1..) = io.read(&mut chunk).await {
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            counted[1].fetch_add(1, Ordering::SeqCst);
                            let response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
                            io.write_all(response).await.unwrap();
                        }
                    }
                });
            }
        });
        (addr, counts)
    }

    /// One GET on `conn`, its body read to the end with `waker` as the task's waker.
    async fn get(conn: Conn, pool: &Arc<Pool>, waker: &Waker) -> Bytes {
        let request = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
        let head = encode_head(&request, &HeaderValue::from_static("b"), None);
        let deadline = Instant::now() + Duration::from_secs(5);
        let sent = exchange(conn, &head, request.into_body(), pool.clone(), deadline);
        let response = with_waker(sent, waker)
            .await
            .unwrap_or_else(|(e, _)| panic!("{}", e.error));
        let body = with_waker(response.into_body().collect(), waker).await;
        body.unwrap().to_bytes()
    }

    /// Polls `future` with `waker` until it is ready, yielding to the runtime in between.
    async fn with_waker<F: Future>(future: F, waker: &Waker) -> F::Output {
        let mut future = pin!(future);
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut Context::from_waker(waker)) {
                return out;
            }
            tokio::task::yield_now().await;
        }
    }

    struct Counted;

    impl Wake for Counted {
        fn wake(self: Arc<Self>) {}
    }

    #[tokio::test]
    async fn idle_connections_hold_no_read_buffer_and_are_reused() {
        let (addr, counts) = backend().await;
        let pool = Arc::new(Pool::new(64));
        let n = 6;
        for _ in 0..n {
            let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
            assert_eq!(conn.rbuf.capacity(), 0);
            assert_eq!(get(conn, &pool, Waker::noop()).await, "hello");
        }
        {
            let idle = pool.lock();
            let capacities: Vec<usize> = idle.iter().map(|c| c.rbuf.capacity()).collect();
            assert_eq!(capacities.len(), n);
            assert!(capacities.iter().all(|&c| c == 0), "{capacities:?}");
        }
        // Every one takes a request again.
        let conns: Vec<Conn> = std::iter::from_fn(|| pool.lock().pop()).collect();
        assert_eq!(conns.len(), n);
        for conn in conns {
            assert_eq!(get(conn, &pool, Waker::noop()).await, "hello");
        }
        assert_eq!(counts[0].load(Ordering::SeqCst), n, "connections");
        assert_eq!(counts[1].load(Ordering::SeqCst), 2 * n, "requests");
    }

    #[tokio::test]
    async fn an_idle_connection_keeps_no_waker_of_the_task_that_used_it() {
        let (addr, counts) = backend().await;
        let pool = Arc::new(Pool::new(8));
        let task = Arc::new(Counted);
        let waker = Waker::from(task.clone());
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        assert_eq!(get(conn, &pool, &waker).await, "hello");
        drop(waker);
        assert_eq!(pool.len(), 1);
        assert_eq!(
            Arc::strong_count(&task),
            1,
            "the idle connection holds a waker"
        );
        // And it is still usable.
        let conn = pool.checkout().expect("the connection was not pooled");
        assert_eq!(get(conn, &pool, Waker::noop()).await, "hello");
        assert_eq!(counts[0].load(Ordering::SeqCst), 1, "connections");
        assert_eq!(counts[1].load(Ordering::SeqCst), 2, "requests");
    }
}
