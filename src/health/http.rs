use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Probe;
use crate::BoxError;

/// Probes a backend with `GET {path}` over a new connection; passes on a 2xx answer.
///
/// A fresh connection per probe checks what a new client connection would meet (the
/// backend accepts, parses and answers), independent of the proxy's pooled connections.
///
/// Clones share the path, which [`set_path`](HttpProbe::set_path) changes for all.
#[derive(Debug, Clone)]
pub struct HttpProbe {
    path: Arc<ArcSwap<PathAndQuery>>,
}

impl HttpProbe {
    /// Probes `path`, e.g. `/health`.
    pub fn new(path: PathAndQuery) -> Self {
        HttpProbe {
            path: Arc::new(ArcSwap::from_pointee(path)),
        }
    }

    /// Probes `path` from the next probe on.
    pub fn set_path(&self, path: PathAndQuery) {
        self.path.store(Arc::new(path));
    }
}

impl Probe<Authority> for HttpProbe {
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn probe(&self, target: &Authority) -> Self::Future {
        let target = target.clone();
        let path = PathAndQuery::clone(&self.path.load());
        Box::pin(async move {
            let stream = TcpStream::connect(crate::proxy::socket_target(&target)).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let conn = tokio::spawn(conn);
            let request = Request::get(path)
                .header(header::HOST, target.as_str())
                .header(header::CONNECTION, "close")
                .header(header::USER_AGENT, "tower-lb health check")
                .body(Empty::<Bytes>::new())?;
            let response = sender.send_request(request).await?;
            conn.abort();
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("health check answered {}", response.status()).into())
            }
        })
    }
}
