//! Idle keep-alive connections to one backend, and the connection itself.

use std::fmt;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The idle connections of one backend, most recently used last.
///
/// A sweep every `idle_timeout` closes those that were idle at the sweep before (so a
/// connection goes after one to two timeouts unused) and those the backend closed. Its
/// task runs only while connections are idle, and holds the pool weakly. A connection
/// records the sweep it was parked after rather than the time: parking reads no clock.
#[derive(Debug)]
pub(crate) struct Pool {
    idle: std::sync::Mutex<Idle>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Debug, Default)]
struct Idle {
    /// Oldest first: each is pushed with the current `sweeps`.
    conns: Vec<(u64, Conn)>,
    /// Sweeps done so far.
    sweeps: u64,
    /// Whether a sweeper task is running.
    sweeping: bool,
}

impl Pool {
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Pool {
            idle: std::sync::Mutex::new(Idle::default()),
            max_idle,
            idle_timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A usable idle connection, dropping the ones the backend has closed.
    pub(crate) fn checkout(&self) -> Option<Conn> {
        let mut closed = Vec::new();
        let mut idle = self.lock();
        let usable = loop {
            match idle.conns.pop() {
                Some((_, conn)) if conn.is_usable() => break Some(conn),
                Some((_, conn)) => closed.push(conn),
                None => break None,
            }
        };
        drop(idle);
        // Closed out of the lock.
        drop(closed);
        usable
    }

    /// Keeps `conn` for a later request, if it is fit to be kept and the pool has room
    /// (none with an idle timeout of zero), and starts the sweeper if none runs.
    pub(crate) fn checkin(self: &Arc<Self>, mut conn: Conn) {
        if self.idle_timeout.is_zero() || !conn.park() {
            return;
        }
        // Empty, but it may share an allocation with the last response's bytes.
        conn.rbuf = BytesMut::new();
        let mut idle = self.lock();
        if idle.conns.len() >= self.max_idle {
            return;
        }
        let sweeps = idle.sweeps;
        idle.conns.push((sweeps, conn));
        if !idle.sweeping {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                idle.sweeping = true;
                drop(idle);
                runtime.spawn(sweep(Arc::downgrade(self), self.idle_timeout));
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().conns.len()
    }
}

/// Closes what the pool behind `pool` no longer needs, every `every`, until it has no
/// idle connection or is gone.
async fn sweep(pool: Weak<Pool>, every: Duration) {
    let mut running = Running(pool.clone());
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let (closed, done) = {
            let mut idle = pool.lock();
            idle.sweeps += 1;
            // Parked before the last sweep: idle for a whole period at least.
            let stale = idle.sweeps - 1;
            let old = idle.conns.partition_point(|(parked, _)| *parked < stale);
            let mut closed: Vec<_> = idle.conns.drain(..old).collect();
            let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut idle.conns)
                .into_iter()
                .partition(|(_, conn)| conn.is_usable());
            idle.conns = kept;
            closed.extend(gone);
            let done = idle.conns.is_empty();
            if done {
                idle.sweeping = false;
            }
            (closed, done)
        };
        // Closed here, out of the lock.
        drop(closed);
        if done {
            // `sweeping` is already clear, and a newer sweeper may have set it since.
            running.0 = Weak::new();
            return;
        }
    }
}

/// Clears `sweeping` if the sweeper ends before the pool is empty (its runtime dropped it
/// mid-sleep, say), so that the next connection parked starts another.
struct Running(Weak<Pool>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pool) = self.0.upgrade() {
            pool.lock().sweeping = false;
        }
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
    /// every time. So it stays with an idle connection too: it is a small allocation
    /// beside the read buffer that an idle connection no longer holds.
    timer: Option<Pin<Box<Timer>>>,
}

pin_project_lite::pin_project! {
    /// The response timer. Moving it later is left until it fires: it fires at the
    /// deadline it was last set to, and is then set to `deadline` if that is still ahead.
    /// (Boxed with the `Sleep`: a connection is moved into each response's body.)
    struct Timer {
        #[pin]
        sleep: Sleep,
        deadline: Instant,
    }
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

    /// Starts the response timer: it expires at `deadline` unless armed again before.
    pub(super) fn arm(&mut self, deadline: Instant) {
        let Some(timer) = &mut self.timer else {
            let sleep = tokio::time::sleep_until(deadline);
            self.timer = Some(Box::pin(Timer { sleep, deadline }));
            return;
        };
        let timer = timer.as_mut().project();
        *timer.deadline = deadline;
        // Set to fire later: moved on when it fires.
        if timer.sleep.deadline() > deadline {
            timer.sleep.reset(deadline);
        }
    }

    /// Whether the armed deadline has passed; registers `cx` to be woken when it does.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timer) = &mut self.timer else {
            return false;
        };
        let mut timer = timer.as_mut().project();
        while timer.sleep.as_mut().poll(cx).is_ready() {
            if Instant::now() >= *timer.deadline {
                return true;
            }
            timer.sleep.as_mut().reset(*timer.deadline);
        }
        false
    }

    /// Whether an idle connection can take a request: it must have nothing to read (data
    /// or EOF from an idle backend means it is closing or broken).
    ///
    /// Only a look at the reactor's cached readiness, which registers no waker (the
    /// exchange registers its own when it reads): while the socket is not marked readable,
    /// as an idle one is not, there is no system call. One marked readable is peeked at:
    /// a readiness with nothing behind it is cleared, and the connection is kept.
    pub(crate) fn is_usable(&self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let peeked = self.io.try_io(Interest::READABLE, || {
            socket2::SockRef::from(&self.io).peek(&mut [MaybeUninit::uninit()])
        });
        matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Readies the connection to wait in the pool, and says whether it is usable. The
    /// timer is polled with a no-op waker, which takes the place of the waker of the task
    /// that used the connection last: it holds a reference to that task, so an idle
    /// connection would keep a finished task's memory allocated, and wake the task for
    /// nothing when the old deadline passes. (The socket holds none: the reactor lets go
    /// of a reader's waker when it wakes it, and the response was read to its end.)
    fn park(&mut self) -> bool {
        if let Some(timer) = &mut self.timer {
            // Done with: whether it has fired does not matter, the next exchange arms it.
            let sleep = timer.as_mut().project().sleep;
            let _ = sleep.poll(&mut Context::from_waker(Waker::noop()));
        }
        self.is_usable()
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
        let sent = exchange(
            conn,
            &head,
            request.into_body(),
            pool.clone(),
            Duration::from_secs(5),
        );
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
        let pool = Pool::new(64, Duration::from_secs(60));
        let n = 6;
        for _ in 0..n {
            let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
            assert_eq!(conn.rbuf.capacity(), 0);
            assert_eq!(get(conn, &pool, Waker::noop()).await, "hello");
        }
        {
            let idle = pool.lock();
            let capacities: Vec<usize> =
                idle.conns.iter().map(|(_, c)| c.rbuf.capacity()).collect();
            assert_eq!(capacities.len(), n);
            assert!(capacities.iter().all(|&c| c == 0), "{capacities:?}");
        }
        // Every one takes a request again.
        let conns: Vec<Conn> =
            std::iter::from_fn(|| pool.lock().conns.pop().map(|(_, c)| c)).collect();
        assert_eq!(conns.len(), n);
        for conn in conns {
            assert_eq!(get(conn, &pool, Waker::noop()).await, "hello");
        }
        assert_eq!(counts[0].load(Ordering::SeqCst), n, "connections");
        assert_eq!(counts[1].load(Ordering::SeqCst), 2 * n, "requests");
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_one_to_two_idle_timeouts() {
        let (addr, counts) = backend().await;
        let pool = Pool::new(8, Duration::from_secs(60));
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        assert_eq!(get(conn, &pool, Waker::noop()).await, "hello");
        // From here no socket is waited on: the paused clock moves to each timer in turn.
        tokio::time::pause();
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(
            pool.len(),
            1,
            "closed at the first sweep, idle for less than 60 s"
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(pool.len(), 0, "kept after two sweeps");
        assert!(
            !pool.lock().sweeping,
            "the sweeper runs on with nothing idle"
        );
        tokio::time::resume();
        // A connection parked after that starts a sweeper again, and is used again.
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        assert_eq!(get(conn, &pool, Waker::noop()).await, "hello");
        assert!(pool.lock().sweeping);
        let conn = pool.checkout().expect("pooled");
        assert_eq!(get(conn, &pool, Waker::noop()).await, "hello");
        assert_eq!(counts[0].load(Ordering::SeqCst), 2, "connections");
    }

    #[test]
    fn a_sweeper_dropped_with_its_runtime_lets_the_next_one_start() {
        let pool = Pool::new(8, Duration::from_secs(60));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        pool.lock().sweeping = true;
        runtime.spawn(sweep(Arc::downgrade(&pool), Duration::from_secs(60)));
        // The paused clock moves only once the sweeper sleeps.
        runtime.block_on(async { tokio::time::sleep(Duration::from_secs(1)).await });
        assert!(pool.lock().sweeping);
        drop(runtime);
        assert!(!pool.lock().sweeping, "no sweeper would start again");
    }

    /// The response timer moves later lazily: armed again before it fires, it fires at its
    /// first deadline, is seen not to have expired, and expires at the last one; armed
    /// earlier, it is set at once.
    #[tokio::test]
    async fn a_timer_armed_again_expires_at_its_last_deadline() {
        let (io, _peer) = super::super::socket_pair().await;
        let mut conn = Conn::new(io);
        let expiry = async |conn: &mut Conn| {
            std::future::poll_fn(|cx| match conn.poll_expired(cx) {
                true => Poll::Ready(Instant::now()),
                false => Poll::Pending,
            })
            .await
        };
        tokio::time::pause();
        let start = Instant::now();
        conn.arm(start + Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(900)).await;
        conn.arm(start + Duration::from_millis(1900));
        let expired = expiry(&mut conn).await - start;
        assert!(
            expired >= Duration::from_millis(1900) && expired < Duration::from_millis(1905),
            "expired after {expired:?}"
        );

        // Now set for 5 s ahead (a look moves it on from its past deadline), then armed
        // for 1 s.
        let start = Instant::now();
        conn.arm(start + Duration::from_secs(5));
        let looked = std::future::poll_fn(|cx| Poll::Ready(conn.poll_expired(cx))).await;
        assert!(!looked);
        conn.arm(start + Duration::from_secs(1));
        let expired = expiry(&mut conn).await - start;
        assert!(
            expired >= Duration::from_secs(1) && expired < Duration::from_millis(1005),
            "expired after {expired:?}"
        );
    }

    /// A socket marked readable with nothing behind it (a read took just what had come,
    /// so nothing cleared the mark) is still usable: the look at it peeks and clears the
    /// mark. Bytes or the end of the stream behind the mark make it unusable.
    #[tokio::test]
    async fn a_readable_mark_with_nothing_behind_it_keeps_the_connection() {
        let (io, mut backend) = super::super::socket_pair().await;
        backend.write_all(b"abc").await.unwrap();
        io.readable().await.unwrap();
        assert_eq!(io.try_read(&mut [0; 3]).unwrap(), 3);
        let conn = Conn::new(io);
        let noop = &mut Context::from_waker(Waker::noop());
        assert!(conn.io.poll_read_ready(noop).is_ready(), "still marked");
        assert!(conn.is_usable());
        assert!(conn.io.poll_read_ready(noop).is_pending(), "mark cleared");

        backend.write_all(b"x").await.unwrap();
        conn.io.readable().await.unwrap();
        assert!(!conn.is_usable(), "a byte came");
        let mut conn = conn;
        assert_eq!(conn.io.read(&mut [0; 1]).await.unwrap(), 1);
        drop(backend);
        conn.io.readable().await.unwrap();
        assert!(!conn.is_usable(), "closed");
    }

    #[tokio::test]
    async fn an_idle_connection_keeps_no_waker_of_the_task_that_used_it() {
        let (addr, counts) = backend().await;
        let pool = Pool::new(8, Duration::from_secs(60));
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
