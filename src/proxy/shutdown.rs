//! Shutting a server down within a time limit: connections and tunnels are asked to finish,
//! and whatever is still open when the time is up is closed.
//!
//! hyper-util's `GracefulShutdown` watches connections only until they upgrade: a WebSocket
//! tunnel has left hyper by then. Here one [`Shutdown`] is watched by every connection and
//! every tunnel ([`Watch`]), and it waits for all of them.

use std::future::Future;
#[cfg(feature = "http2")]
use std::pin::pin;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::{watch, OwnedSemaphorePermit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Finish what is in flight, take nothing new.
    Draining,
    /// Stop now: the time is up.
    Cut,
}

/// The shutdown of one server: see the [module docs](self).
#[derive(Debug)]
pub(crate) struct Shutdown {
    phase: watch::Sender<Phase>,
}

/// What a connection or tunnel follows: whether to finish or to stop now. While a `Watch`
/// exists, [`Shutdown::run`] waits for it.
#[derive(Debug, Clone)]
pub(crate) struct Watch {
    phase: watch::Receiver<Phase>,
    /// The connection's place under `max_connections`, held by every clone: by the
    /// connection, then by the tunnel it may become.
    place: Option<Arc<OwnedSemaphorePermit>>,
}

impl Shutdown {
    pub(crate) fn new() -> Self {
        Shutdown {
            phase: watch::Sender::new(Phase::Serving),
        }
    }

    /// A watch for one more connection or tunnel.
    pub(crate) fn watch(&self) -> Watch {
        Watch {
            phase: self.phase.subscribe(),
            place: None,
        }
    }

    /// Asks every connection and tunnel to finish, waits up to `timeout` for them to end,
    /// then closes those still open and waits for them to be gone.
    pub(crate) async fn run(self, timeout: Duration) {
        self.phase.send_replace(Phase::Draining);
        if tokio::time::timeout(timeout, self.phase.closed())
            .await
            .is_ok()
        {
            return;
        }
        tracing::info!(
            open = self.phase.receiver_count(),
            "shutdown timeout reached: closing the connections and tunnels still open"
        );
        self.phase.send_replace(Phase::Cut);
        self.phase.closed().await;
    }
}

impl Watch {
    /// Completes once the shutdown has reached `phase`; never if the server went away
    /// without one (as before: its connections then run on by themselves).
    ///
    /// It is polled only when the shutdown wakes it ([`WhenWoken`]), not on every wakeup of
    /// the connection's task.
    fn reached(&mut self, phase: Phase) -> WhenWoken<impl Future<Output = ()> + '_> {
        // `changed()` in a loop, not `wait_for`: every connection holds this future for its
        // life, and `wait_for` adds a layer of state around the same wait.
        WhenWoken::new(async move {
            while *self.phase.borrow_and_update() < phase {
                if self.phase.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
    }

    /// This watch and its clones hold `permit` (a connection's place) until the last drops.
    pub(crate) fn holding(mut self, permit: Option<OwnedSemaphorePermit>) -> Self {
        self.place = permit.map(Arc::new);
        self
    }

    /// Completes when the shutdown begins: a connection that has not sent a request yet
    /// closes then.
    pub(crate) fn draining(&mut self) -> impl Future<Output = ()> + '_ {
        self.reached(Phase::Draining)
    }

    /// Completes when the time to finish is up: a tunnel closes then.
    pub(crate) fn cut(&mut self) -> impl Future<Output = ()> + '_ {
        self.reached(Phase::Cut)
    }

    /// Serves a client connection (hyper's HTTP/2): `graceful` is called on it when the shutdown begins (no
    /// new requests; those in flight finish), and it is dropped, closing it, at the cut.
    #[cfg(feature = "http2")]
    pub(crate) async fn connection<C, E>(
        mut self,
        conn: C,
        graceful: impl FnOnce(Pin<&mut C>),
    ) -> Result<(), E>
    where
        C: Future<Output = Result<(), E>>,
    {
        let mut conn = pin!(conn);
        tokio::select! {
            biased;
            ended = conn.as_mut() => return ended,
            () = self.reached(Phase::Draining) => {}
        }
        graceful(conn.as_mut());
        tokio::select! {
            biased;
            ended = conn.as_mut() => ended,
            () = self.reached(Phase::Cut) => Ok(()),
        }
    }
}

pin_project! {
    /// Polls `inner` only once it has asked to be woken (and on the first poll), instead of
    /// on every wakeup of the task that polls it. A connection's task wakes for every read
    /// and write, and the shutdown it waits on besides would otherwise be polled each time
    /// (a lock and a waker comparison in tokio's `Notify`): here that is one comparison of
    /// wakers and one atomic swap.
    struct WhenWoken<F> {
        #[pin]
        inner: F,
        // Its waker, for `inner`.
        flag: Arc<Flag>,
        // The task's waker last given to `flag`, to see without a lock that it is the same.
        task: Option<Waker>,
    }
}

/// Whether the inner future of a [`WhenWoken`] was woken, and the task to wake then.
struct Flag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl<F> WhenWoken<F> {
    fn new(inner: F) -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        WhenWoken {
            inner,
            flag,
            task: None,
        }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let task = cx.waker().clone();
            *this.flag.task() = Some(task.clone());
            *this.task = Some(task);
        }
        // Set before the task is woken: a wakeup that comes after the check is not lost.
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        // Made here, not kept: `inner` is polled seldom, and the future is held for as long
        // as a connection lives.
        let waker = Waker::from(this.flag.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

impl Flag {
    fn task(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.task.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = &*self.task() {
            task.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_what_is_open_then_cuts_it() {
        // Nothing open: done at once.
        let started = tokio::time::Instant::now();
        Shutdown::new().run(Duration::from_secs(30)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);

        // A tunnel that ends by itself within the time.
        let shutdown = Shutdown::new();
        let watch = shutdown.watch();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(watch);
        });
        shutdown.run(Duration::from_secs(30)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(1));

        // A connection that finishes when asked, and a tunnel that only ends at the cut.
        let shutdown = Shutdown::new();
        let (asked, mut graceful) = tokio::sync::oneshot::channel::<()>();
        let conn = shutdown.watch().connection(
            async move {
                let _ = (&mut graceful).await;
                Ok::<(), ()>(())
            },
            move |_| drop(asked),
        );
        let conn = tokio::spawn(conn);
        let mut tunnel = shutdown.watch();
        let tunnel = tokio::spawn(async move { tunnel.cut().await });
        let started = tokio::time::Instant::now();
        shutdown.run(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(conn.await.unwrap().is_ok());
        tunnel.await.unwrap();
    }
}
