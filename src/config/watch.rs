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
        let item = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(Err(_))) = &item {
            // An invalid edit: the running configuration stays (tower_lb_config_reloads_total).
            crate::stats::config_reload(false);
        }
        item
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a file event may have changed the file named `name`. Reads do not: the watch
/// reads the file itself, and taking the open, read and close events of its own reads as
/// changes would make it read the file again 50 ms later, and so on for ever. A close
/// after writing does count: it is when a writer has finished.
fn is_relevant(event: &notify::Result<notify::Event>, name: Option<&std::ffi::OsStr>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    let Ok(event) = event else {
        return true;
    };
    let changes = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    changes && (event.paths.is_empty() || event.paths.iter().any(|p| p.file_name() == name))
}

async fn run(path: PathBuf, poll_every: Duration, tx: mpsc::Sender<Result<Config, ConfigError>>) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let name = path.file_name().map(|n| n.to_owned());
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if is_relevant(&event, name.as_deref()) {
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
                // `None` (no watcher: file events unavailable) must not match, or the
                // file would be re-read every 50 ms instead of every `poll_every`.
                Some(()) = events.recv() => {
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

#[cfg(test)]
mod tests {
    use super::is_relevant;
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
    use notify::Event;
    use std::ffi::OsStr;

    fn relevant(kind: EventKind, path: &str) -> bool {
        let event = Ok(Event::new(kind).add_path(path.into()));
        is_relevant(&event, Some(OsStr::new("config.json")))
    }

    #[test]
    fn the_watchs_own_reads_are_not_changes() {
        for kind in [
            AccessKind::Open(AccessMode::Read),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
            AccessKind::Any,
        ] {
            assert!(
                !relevant(EventKind::Access(kind), "/etc/lb/config.json"),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn writes_and_replacements_of_the_file_are_changes() {
        let write_closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(relevant(write_closed, "/etc/lb/config.json"));
        assert!(relevant(
            EventKind::Modify(ModifyKind::Any),
            "/etc/lb/config.json"
        ));
        assert!(relevant(
            EventKind::Create(CreateKind::File),
            "/etc/lb/config.json"
        ));
        assert!(relevant(EventKind::Any, "/etc/lb/config.json"));
    }

    #[test]
    fn other_files_in_the_directory_are_not_changes() {
        assert!(!relevant(
            EventKind::Modify(ModifyKind::Any),
            "/etc/lb/other.json"
        ));
        let error = Err(notify::Error::generic("queue overflow"));
        assert!(is_relevant(&error, Some(OsStr::new("config.json"))));
    }
}
