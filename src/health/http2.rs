use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use http::uri::{Authority, PathAndQuery};
use http::{header, HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::Probe;
use crate::BoxError;

/// Probes a backend over HTTP/2 with prior knowledge (h2c), on a new connection per probe:
/// `GET {path}`, passing on a 2xx answer, or the standard gRPC health check,
/// `grpc.health.v1.Health/Check`, passing on `SERVING`.
///
/// The gRPC check is encoded by hand (its request is one string field, its answer one enum
/// field), so it needs neither tonic nor protobuf code: it fails on any other status
/// (`NOT_SERVING`, `UNKNOWN`, `SERVICE_UNKNOWN`), on a gRPC error (a server without the
/// health service answers `UNIMPLEMENTED`, an unknown service `NOT_FOUND`) and when it
/// cannot connect. [`GrpcHealthProbe`](super::GrpcHealthProbe) (feature `grpc`) does the
/// same check with tonic.
///
/// Clones share the check, which [`set_get`](Http2Probe::set_get) and
/// [`set_grpc`](Http2Probe::set_grpc) change for all.
///
/// ```
/// use tower_lb::health::{HealthCheck, Http2Probe, Settings};
/// use tower_lb::proxy::uri::Authority;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // The whole server's health, as gRPC servers report it.
/// let probe = Http2Probe::grpc("");
/// let (checks, handle) = HealthCheck::new(probe, Settings::default());
/// handle.insert("127.0.0.1:50051".parse::<Authority>().unwrap());
/// # drop(checks);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Http2Probe {
    check: Arc<ArcSwap<Check>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    Get(PathAndQuery),
    Grpc(String),
}

/// `/grpc.health.v1.Health/Check`.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;
/// Answers larger than this are no health answers.
const MAX_ANSWER: usize = 64 * 1024;

impl Http2Probe {
    /// Probes with `GET {path}`, e.g. `/health`.
    pub fn get(path: PathAndQuery) -> Self {
        Http2Probe {
            check: Arc::new(ArcSwap::from_pointee(Check::Get(path))),
        }
    }

    /// Probes with `grpc.health.v1.Health/Check` for `service` (a fully qualified name such
    /// as `helloworld.Greeter`, or `""` for the whole server).
    pub fn grpc(service: impl Into<String>) -> Self {
        Http2Probe {
            check: Arc::new(ArcSwap::from_pointee(Check::Grpc(service.into()))),
        }
    }

    /// Probes with `GET {path}` from the next probe on.
    pub fn set_get(&self, path: PathAndQuery) {
        self.check.store(Arc::new(Check::Get(path)));
    }

    /// Probes with the gRPC health check of `service` from the next probe on.
    pub fn set_grpc(&self, service: impl Into<String>) {
        self.check.store(Arc::new(Check::Grpc(service.into())));
    }
}

impl Probe<Authority> for Http2Probe {
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn probe(&self, target: &Authority) -> Self::Future {
        let target = target.clone();
        let check = Check::clone(&self.check.load());
        Box::pin(async move {
            let stream = TcpStream::connect(crate::proxy::socket_target(&target)).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(stream))
                .await?;
            let conn = tokio::spawn(conn);
            let result = async {
                let request = match &check {
                    Check::Get(path) => Request::get(format!("http://{target}{path}"))
                        .header(header::USER_AGENT, "tower-lb health check")
                        .body(Full::new(Bytes::new()))?,
                    Check::Grpc(service) => Request::builder()
                        .method(Method::POST)
                        .uri(format!("http://{target}{HEALTH_CHECK}"))
                        .header(header::CONTENT_TYPE, "application/grpc")
                        .header(header::TE, "trailers")
                        .header(header::USER_AGENT, "tower-lb health check")
                        .body(Full::new(encode_request(service)))?,
                };
                let response = sender.send_request(request).await?;
                if !response.status().is_success() {
                    return Err(format!("health check answered {}", response.status()).into());
                }
                if let Check::Get(_) = check {
                    return Ok(());
                }
                let (head, body) = response.into_parts();
                let collected = Limited::new(body, MAX_ANSWER).collect().await?;
                // A trailers-only answer carries the status in its head.
                let trailers = collected.trailers().cloned();
                grpc_ok(trailers.as_ref().unwrap_or(&head.headers))?;
                match decode_status(collected.to_bytes()) {
                    Some(SERVING) => Ok(()),
                    Some(status) => {
                        Err(format!("health check answered {}", status_name(status)).into())
                    }
                    None => Err("health check answered no valid HealthCheckResponse".into()),
                }
            }
            .await;
            conn.abort();
            result
        })
    }
}

/// The gRPC message `HealthCheckRequest { service }` with its 5-byte frame header.
fn encode_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 16);
    if !service.is_empty() {
        // Field 1, wire type 2 (length-delimited).
        message.push(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0); // not compressed
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn get_varint(buf: &mut Bytes) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return None;
        }
        let b = buf.get_u8();
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

/// `grpc-status` is `0` (OK).
fn grpc_ok(fields: &HeaderMap) -> Result<(), BoxError> {
    match fields.get("grpc-status").map(|v| v.as_bytes()) {
        Some(b"0") => Ok(()),
        Some(code) => {
            let message = fields
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or("");
            Err(format!(
                "health check failed: grpc-status {} {message}",
                String::from_utf8_lossy(code)
            )
            .into())
        }
        None => Err("health check answered without grpc-status".into()),
    }
}

/// The `status` field of the framed `HealthCheckResponse` in `body` (0, UNKNOWN, when the
/// message leaves it out); `None` if the body is not one such message.
fn decode_status(mut body: Bytes) -> Option<u64> {
    if body.remaining() < 5 || body.get_u8() != 0 {
        return None; // too short, or compressed
    }
    let len = body.get_u32() as usize;
    if body.remaining() < len {
        return None;
    }
    let mut message = body.split_to(len);
    let mut status = 0;
    while message.has_remaining() {
        let key = get_varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = get_varint(&mut message)?,
            (_, 0) => {
                get_varint(&mut message)?;
            }
            (_, 1) if message.remaining() >= 8 => message.advance(8),
            (_, 2) => {
                let n = usize::try_from(get_varint(&mut message)?).ok()?;
                if message.remaining() < n {
                    return None;
                }
                message.advance(n);
            }
            (_, 5) if message.remaining() >= 4 => message.advance(4),
            _ => return None,
        }
    }
    Some(status)
}

fn status_name(status: u64) -> &'static str {
    match status {
        0 => "UNKNOWN",
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "an unknown status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encoding() {
        assert_eq!(&encode_request("")[..], b"\0\0\0\0\0");
        assert_eq!(&encode_request("a.B")[..], b"\0\0\0\0\x05\x0a\x03a.B");
    }

    #[test]
    fn response_decoding() {
        let framed = |m: &[u8]| {
            let mut v = vec![0];
            v.extend_from_slice(&(m.len() as u32).to_be_bytes());
            v.extend_from_slice(m);
            Bytes::from(v)
        };
        assert_eq!(decode_status(framed(b"\x08\x01")), Some(SERVING));
        assert_eq!(decode_status(framed(b"\x08\x02")), Some(2));
        assert_eq!(decode_status(framed(b"")), Some(0));
        // An unknown field before it is skipped.
        assert_eq!(decode_status(framed(b"\x12\x02hi\x08\x01")), Some(SERVING));
        assert_eq!(decode_status(framed(b"\x08")), None);
        assert_eq!(decode_status(Bytes::from_static(b"\0\0\0")), None);
    }
}
