//! `examples/standalone.rs` as a process: built when stale, started on a config, its log
//! lines waited for, signalled, and stopped when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The example binary, which `cargo test` builds next to this test's binary. Running this
/// test target alone (`cargo test --test standalone`) does not build examples: then it is
/// built here, once, if it is missing or older than the sources (a stale binary would
/// test old code).
pub fn example() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir
        .join("examples")
        .join(format!("standalone{}", std::env::consts::EXE_SUFFIX));
    BUILD.call_once(|| {
        let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let sources = [
            root.join("src"),
            root.join("examples"),
            root.join("Cargo.toml"),
        ];
        if built.is_none_or(|built| sources.iter().any(|s| newer_than(s, built))) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--example", "standalone"])
                .status()
                .unwrap();
            assert!(status.success());
        }
    });
    assert!(path.exists(), "{} not built", path.display());
    path
}

/// Whether the file at `path`, or any file under it, was modified after `time`.
fn newer_than(path: &Path, time: std::time::SystemTime) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| newer_than(&entry.path(), time))
    } else {
        meta.modified().is_ok_and(|m| m > time)
    }
}

/// The proxy process, with its stderr lines.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines read so far, and whether a `wait_for` has taken each.
    log: Vec<(String, bool)>,
}

impl Running {
    pub fn start(config: &Path) -> Running {
        let mut command = Command::new(example());
        command.arg(config);
        Running::spawn(command)
    }

    /// Without a CONFIG argument, in `dir`.
    pub fn start_in(dir: &Path) -> Running {
        let mut command = Command::new(example());
        command.current_dir(dir);
        Running::spawn(command)
    }

    pub fn spawn(mut command: Command) -> Running {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Takes the first log line containing `text` that no earlier call took, waiting for
    /// it if need be; returns it.
    pub fn wait_for(&mut self, text: &str) -> String {
        if let Some((line, taken)) = self
            .log
            .iter_mut()
            .find(|(l, taken)| !*taken && l.contains(text))
        {
            *taken = true;
            return line.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(text);
                    self.log.push((line.clone(), hit));
                    if hit {
                        return line;
                    }
                }
                Err(_) => {
                    let log: Vec<&str> = self.log.iter().map(|(l, _)| l.as_str()).collect();
                    panic!("no log line with {text:?}; log:\n{}", log.join("\n"))
                }
            }
        }
    }

    pub fn listening(&mut self) -> SocketAddr {
        let line = self.wait_for("listening on http://");
        line.rsplit("http://")
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait()
    }

    /// Sends the signal named `name` (`TERM`, `INT`) to the proxy.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// CPU time (user and system) the proxy process has used so far, in clock ticks
    /// (1/100 s on Linux).
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields 14 and 15 (utime, stime), counted from after the command name.
        let fields: Vec<u64> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        fields[0] + fields[1]
    }

    /// CPU ticks the proxy uses over one second of wall time.
    pub async fn ticks_over_a_second(&self) -> u64 {
        let before = self.cpu_ticks();
        // The elapsed time is what is measured here.
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.cpu_ticks() - before
    }

    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the proxy did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
