use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use notify::Watcher;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Config, ConfigError};

/// Watches the configuration file at `path` and yields its content each time it changes:
/// `Ok` for a valid configuration, `Err` (once per distinct content) for an invalid or
/// unreadable one, which the caller reports while keeping its running configuration.
///
/// The first item is the file as it is when watching starts. Changes are noticed through
/// the operating system's file events on the file's directory (so that editors that replace
/// the file are seen too), and by reading the file every `poll_every` in case events are
/// unavailable (network file systems, containers). Bursts of events are coalesced for 50 ms
/// so that a file being written is read once it is complete; a half-written file that does
/// not parse is reported and then superseded by the complete one.
///
/// The watch stops when the stream is dropped.
pub fn watch(path: impl Into<PathBuf>, poll_every: Duration) -> Watch {
    let path = path.into();
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::spawn(run(path, poll_every, tx));
    Watch { rx, task }
}

/// The stream of [`watch`].
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<Result<Config, ConfigError>>,
    task: JoinHandle<()>,
}

impl Stream for Watch {
    type Item = Result<Config, ConfigError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(path: PathBuf, poll_every: Duration, tx: mpsc::Sender<Result<Config, ConfigError>>) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let name = path.file_name().map(|n| n.to_owned());
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(e) => e.paths.is_empty() || e.paths.iter().any(|p| p.file_name() == name.as_deref()),
            Err(_) => true,
        };
        if relevant {
            let _ = events_tx.send(());
        }
    });
    // Keep the watcher alive for the life of the task; without one, polling alone serves.
    let _watcher = match watcher {
        Ok(mut w) => {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            match w.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(error) => {
                    tracing::debug!(%error, "file events unavailable; polling the configuration");
                    None
                }
            }
        }
        Err(error) => {
            tracing::debug!(%error, "file events unavailable; polling the configuration");
            None
        }
    };

    let mut last: Option<Vec<u8>> = None;
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = events.recv() => {
                    // Let the writer finish, then take every event of the burst at once.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while events.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(poll_every) => {}
            }
        }
        first = false;
        let item = match tokio::fs::read(&path).await {
            Ok(bytes) => {
                if last.as_ref() == Some(&bytes) {
                    continue;
                }
                let item = match std::str::from_utf8(&bytes) {
                    Ok(text) => Config::from_json(text).map_err(|e| e.in_file(&path)),
                    Err(e) => Err(ConfigError {
                        file: Some(path.clone()),
                        field: None,
                        message: format!("not UTF-8: {e}"),
                    }),
                };
                last = Some(bytes);
                item
            }
            Err(e) => {
                // Being replaced, or deleted: report once, keep watching.
                if last.is_none() && !first {
                    continue;
                }
                last = None;
                Err(ConfigError {
                    file: Some(path.clone()),
                    field: None,
                    message: format!("cannot read: {e}"),
                })
            }
        };
        if tx.send(item).await.is_err() {
            return;
        }
    }
}
