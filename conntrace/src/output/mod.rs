//! What conntrace writes to stdout (or `-o FILE`): one record per line, as JSON or as text.

pub(crate) mod advice;
mod fact;
mod human;
#[cfg(test)]
mod human_tests;
mod json;
mod live;
pub mod metrics;
pub mod record;
#[cfg(test)]
pub(crate) mod tests;

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

#[cfg(test)]
pub(crate) use self::fact::key_fact;
pub use self::record::{Final, KernelFeatures, Lost, Ready, Record};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot create output file {path}: {source}")]
    Create {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The reader went away (e.g. `| head -1`): a normal end.
    #[error("output closed")]
    Closed,
    #[error("write output: {0}")]
    Write(#[source] io::Error),
}

/// Converts CLOCK_MONOTONIC nanoseconds to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    realtime_minus_mono_ns: i128,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the local timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    pub fn now() -> Self {
        Self {
            realtime_minus_mono_ns: clock_ns(libc::CLOCK_REALTIME)
                - clock_ns(libc::CLOCK_MONOTONIC),
        }
    }

    /// A clock whose wall time is `realtime_minus_mono_ns` ahead of the monotonic one (tests).
    #[cfg(test)]
    pub fn fixed(realtime_minus_mono_ns: i128) -> Self {
        Self {
            realtime_minus_mono_ns,
        }
    }

    pub fn mono_now_ns() -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC) as u64
    }

    /// RFC 3339, UTC, microseconds: `2026-11-21T17:48:07.123456Z`.
    pub fn rfc3339(&self, mono_ns: u64) -> String {
        let ns = mono_ns as i128 + self.realtime_minus_mono_ns;
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(ns)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        t.format(&fmt).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    /// Readable lines; `wide`: every fact on each verdict's line (`--wide`).
    Human {
        wide: bool,
    },
}

pub struct Output {
    out: BufWriter<Box<dyn Write + Send>>,
    /// The human format's state; `None` for JSON.
    human: Option<human::Human>,
    clock: Clock,
    /// `--node` (NODE_NAME): written on every JSON record.
    node: Option<String>,
    /// Also counts every record, for `--metrics-addr`.
    metrics: Option<std::sync::Arc<metrics::Metrics>>,
    /// Human records to a terminal: colour, and a status line redrawn under them.
    live: Option<live::Status>,
    /// Records go to stdout (not `-o FILE`).
    to_stdout: bool,
}

impl Output {
    /// Writes to `path` (created with mode 0600) or to stdout.
    pub fn open(path: Option<&Path>, format: Format, clock: Clock) -> Result<Self, OutputError> {
        let live = (matches!(format, Format::Human { .. })
            && path.is_none()
            && io::IsTerminal::is_terminal(&io::stdout()))
        .then(live::Status::default);
        let sink: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(p)
                    .map_err(|source| OutputError::Create {
                        path: p.display().to_string(),
                        source,
                    })?,
            ),
            None => Box::new(io::stdout()),
        };
        Ok(Self {
            out: BufWriter::new(sink),
            human: match format {
                Format::Json => None,
                Format::Human { wide } => Some(
                    human::Human::new(wide, live.is_some(), live.is_some())
                        .fit_to(live.is_some().then(live::columns).flatten()),
                ),
            },
            clock,
            node: None,
            metrics: None,
            live,
            to_stdout: path.is_none(),
        })
    }

    /// Writes `node` on every JSON record (`--node`, NODE_NAME).
    pub fn with_node(mut self, node: Option<&str>) -> Self {
        self.node = node.map(str::to_owned);
        self
    }

    /// Counts every record written into `metrics` too.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Whether stdout is a pipe or socket whose reader has gone (`conntrace | head -1`), seen
    /// without writing: `poll(2)` reports POLLERR on a pipe's write end once no reader is
    /// left. A quiet run may not write for hours; the caller then ends as after a
    /// `BrokenPipe`. False for `-o FILE`, a terminal or a file, and when `poll` fails.
    pub fn reader_gone(&self) -> bool {
        if !self.to_stdout {
            return false;
        }
        let mut fd = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd, without waiting.
        let n = unsafe { libc::poll(&raw mut fd, 1, 0) };
        n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
    }

    pub fn write(&mut self, record: &Record<'_>) -> Result<(), OutputError> {
        if let Some(m) = &self.metrics {
            m.observe(record);
        }
        let status = self.live.as_mut().and_then(|s| {
            s.count(record);
            // The summary is the last line: no status under it. One column short of the
            // terminal's width: a line that fills it (or more) wraps, and the next redraw
            // clears only its last row.
            let width = live::columns().map_or(human::WIDTH, |c| c.clamp(40, human::WIDTH + 1) - 1);
            (!matches!(record, Record::Summary(_))).then(|| human::fit(s.line(), width))
        });
        let result = (|| {
            match self.human.as_mut() {
                None => json::write(&mut self.out, record, &self.clock, self.node.as_deref())?,
                Some(h) => {
                    if self.live.is_some() {
                        self.out.write_all(live::CLEAR_LINE.as_bytes())?;
                    }
                    self.out.write_all(h.text(record, &self.clock).as_bytes())?;
                    self.out.write_all(b"\n")?;
                }
            }
            if let Some(status) = status {
                self.out.write_all(status.as_bytes())?;
            }
            self.out.flush()
        })();
        result.map_err(|e| {
            if e.kind() == io::ErrorKind::BrokenPipe {
                OutputError::Closed
            } else {
                OutputError::Write(e)
            }
        })
    }
}
