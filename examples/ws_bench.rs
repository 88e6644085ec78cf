//! WebSocket echo throughput: the echo backends and the load generator of `bench/ws.sh`.
//!
//! ```text
//! cargo run --release --example ws_bench -- echo 127.0.0.1:9111 127.0.0.1:9112
//! cargo run --release --example ws_bench -- load ws://127.0.0.1:8090/ [--conns 64] [--messages 2000] [--size 64]
//! ```
//!
//! `echo ADDR...` serves every address on one thread: `GET /health` (and any other plain
//! request) answers 200, a WebSocket upgrade becomes an echo of every text and binary
//! message. `load URL` opens `--conns` WebSockets to URL at once, then each sends
//! `--messages` binary messages of `--size` bytes one after the other, awaiting each echo;
//! it prints one line: `messages=… seconds=… messages_per_s=… errors=…`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const USAGE: &str = "usage: ws_bench echo ADDR...\n       ws_bench load URL [--conns N] [--messages M] [--size BYTES]";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("echo") if args.len() > 1 => runtime.block_on(echo(&args[1..])),
        Some("load") if args.len() > 1 => runtime.block_on(load(&args[1..])),
        _ => Err(USAGE.into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn echo(addrs: &[String]) -> Result<(), Error> {
    let mut servers = Vec::new();
    for addr in addrs {
        let addr: SocketAddr = addr.parse()?;
        let listener = TcpListener::bind(addr).await?;
        servers.push(tokio::spawn(serve(listener)));
    }
    eprintln!("echo backends on {}", addrs.join(" "));
    for server in servers {
        server.await?;
    }
    Ok(())
}

async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
            Ok::<_, Infallible>(answer(request))
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades(),
        );
    }
}

fn answer(mut request: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return Response::new(Full::new(Bytes::from_static(b"ok")));
    };
    let upgraded = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgraded.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_binary() || message.is_text()) && ws.send(message).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Full::default())
        .unwrap_or_default()
}

async fn load(args: &[String]) -> Result<(), Error> {
    let url = args[0].clone();
    let (mut conns, mut messages, mut size) = (64usize, 2000usize, 64usize);
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        let value: usize = rest.next().ok_or(USAGE)?.parse()?;
        match flag.as_str() {
            "--conns" => conns = value,
            "--messages" => messages = value,
            "--size" => size = value,
            _ => return Err(USAGE.into()),
        }
    }
    // Every connection open before the clock starts.
    let mut sockets = Vec::with_capacity(conns);
    for _ in 0..conns {
        // TCP_NODELAY: small messages one at a time would wait for ACKs under Nagle.
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(url.as_str(), None, true).await?;
        sockets.push(ws);
    }
    let payload = Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut done = 0usize;
                for _ in 0..messages {
                    if ws.send(Message::Binary(payload.clone())).await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                        Ok(Some(Ok(Message::Binary(echoed)))) if echoed.len() == size => done += 1,
                        _ => break,
                    }
                }
                let _ = ws.close(None).await;
                done
            })
        })
        .collect();
    let mut total = 0usize;
    for task in tasks {
        total += task.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let errors = conns * messages - total;
    println!(
        "messages={total} seconds={seconds:.3} messages_per_s={:.0} errors={errors}",
        total as f64 / seconds
    );
    Ok(())
}
