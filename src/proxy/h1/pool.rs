//! Idle keep-alive connections to one backend, and the connection itself.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::Context;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::READ_SIZE;

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
    pub(crate) fn checkout(&self, cx: &mut Context<'_>) -> Option<Conn> {
        let mut idle = self.lock();
        while let Some(conn) = idle.pop() {
            if conn.is_usable(cx) {
                return Some(conn);
            }
        }
        None
    }

    pub(crate) fn checkin(&self, conn: Conn) {
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
pub(crate) struct Conn {
    pub(super) io: TcpStream,
    pub(super) rbuf: BytesMut,
    /// Has carried a request before (a failure on it may be a stale keep-alive).
    pub(super) reused: bool,
    /// The response timeout, kept with the connection and moved forward for each request.
    /// A new `Sleep` per request is inserted into and removed from tokio's timer wheel
    /// every time; moving a registered deadline later is one atomic operation, and the
    /// wheel sees the timer again only when its first deadline passes.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    pub(crate) fn new(io: TcpStream) -> Self {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_SIZE),
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
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.io.peer_addr().ok())
            .finish()
    }
}
