//! The test's own processes and files: one guard that kills a child process on drop, one
//! scratch directory removed on drop. Both clean up also when the test panics.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

/// A child process, killed (SIGKILL) and reaped on drop unless it has already exited. Its
/// stdout, when read with [`Proc::read_stdout`], is read concurrently so a chatty child never
/// blocks on a full pipe.
pub struct Proc {
    pub child: Child,
    output: Option<JoinHandle<String>>,
}

impl From<Child> for Proc {
    fn from(child: Child) -> Self {
        Self {
            child,
            output: None,
        }
    }
}

impl Proc {
    /// Spawns `command`, panicking with `what` (the program, and where it comes from) if it
    /// cannot start.
    pub fn spawn(command: &mut Command, what: &str) -> Self {
        command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"))
            .into()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`libc::SIGINT`, ...) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child, which is not reaped while `self` lives.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits for the process to exit, panicking with `what` after `timeout` (bounded: no test
    /// hangs).
    pub fn wait(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process now, as dropping it would, and reaps it.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }

    /// Reads the (piped) stdout in a thread from now on; [`Proc::json_lines`] returns it.
    pub fn read_stdout(mut self) -> Self {
        let mut stdout = self.child.stdout.take().expect("piped stdout");
        self.output = Some(std::thread::spawn(move || {
            let mut out = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut out).ok();
            out
        }));
        self
    }

    /// Waits for the process and returns its stdout lines parsed as JSON.
    pub fn json_lines(mut self, timeout: Duration) -> Vec<Value> {
        let what = format!("process {}", self.pid());
        self.wait(timeout, &what);
        let out = self
            .output
            .take()
            .map(|h| h.join().expect("stdout reader"))
            .unwrap_or_default();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("peer line {l:?}: {e}")))
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

static NEXT_DIR: AtomicU32 = AtomicU32::new(1);

/// A fresh directory under [`std::env::temp_dir`], removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<temp dir>/<prefix>-<pid>-<n>`, with an `n` no other directory has.
    pub fn new(prefix: &str) -> Self {
        loop {
            let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
            let name = format!("{prefix}-{}-{n}", std::process::id());
            let path = std::env::temp_dir().join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => return Self { path },
                // Left over from an earlier process with the same id: take the next one.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("create {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True while `pid` exists (a zombie counts: it is not reaped yet).
    fn exists(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn a_proc_is_killed_and_reaped_on_drop_also_when_the_test_panics() {
        let (tx, rx) = std::sync::mpsc::channel();
        let failed = std::thread::spawn(move || {
            let sleeper = Proc::spawn(Command::new("sleep").arg("60"), "sleep");
            tx.send(sleeper.pid()).expect("send");
            panic!("a failing test (expected)");
        })
        .join();
        assert!(failed.is_err());
        let pid = rx.recv().expect("pid");
        assert!(!exists(pid), "sleep {pid} outlived its guard");
    }

    #[test]
    fn wait_returns_the_exit_status() {
        let mut done = Proc::spawn(&mut Command::new("true"), "true");
        assert!(done.wait(Duration::from_secs(10), "true").success());
        let pid = done.pid();
        drop(done);
        assert!(!exists(pid));
    }

    #[test]
    fn temp_dirs_are_fresh_and_removed_on_drop_also_when_the_test_panics() {
        let (tx, rx) = std::sync::mpsc::channel();
        let failed = std::thread::spawn(move || {
            let (a, b) = (TempDir::new("ct-unit"), TempDir::new("ct-unit"));
            assert_ne!(a.path(), b.path());
            assert!(a.path().starts_with(std::env::temp_dir()));
            std::fs::write(a.join("file"), "x").expect("write");
            tx.send([a.path().to_owned(), b.path().to_owned()])
                .expect("send");
            panic!("a failing test (expected)");
        })
        .join();
        assert!(failed.is_err());
        for dir in rx.recv().expect("paths") {
            assert!(!dir.exists(), "{} outlived its guard", dir.display());
        }
    }
}
