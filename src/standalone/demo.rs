use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;

use crate::proxy::RequestBody;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{header, HeaderValue, Method, Request, Response};
use http_body_util::Full;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::proxy::Server;

/// A demo backend: answers `GET {health path}` with `200 ok` and any other request with
/// `200` and its own address as the body, so that `curl` through the proxy shows the policy
/// at work.
#[derive(Debug)]
pub struct DemoBackend {
    address: Authority,
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

impl DemoBackend {
    /// Binds `address` (`host:port`) and starts serving.
    pub async fn spawn(address: Authority, health_path: PathAndQuery) -> io::Result<DemoBackend> {
        // The proxy may open many connections to it at once: the same backlog as its own
        // listener.
        let addr = tokio::net::lookup_host(crate::proxy::socket_target(&address))
            .await?
            .next()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("{address} resolves to no address"),
                )
            })?;
        let listener = crate::proxy::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let body = Bytes::from(address.to_string());
        let service = tower::service_fn(move |request: Request<RequestBody>| {
            let text =
                if request.method() == Method::GET && request.uri().path() == health_path.path() {
                    Bytes::from_static(b"ok")
                } else {
                    body.clone()
                };
            async move {
                let mut response = Response::new(Full::new(text));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                Ok::<_, Infallible>(response)
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            Server::new()
                // Not the proxy: its connections and requests are not the proxy's.
                .observed(false)
                .serve(listener, service, async {
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(backend = %address, "demo backend started");
        Ok(DemoBackend {
            address,
            local_addr,
            stop: Some(stop),
            task,
        })
    }

    /// The address it serves.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting at once and returns when the requests in flight have finished.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        tracing::info!(backend = %self.address, "demo backend stopped");
    }
}
