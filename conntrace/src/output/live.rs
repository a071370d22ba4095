//! The terminal: colour by outcome, and a status line of running counts kept under the last
//! record and redrawn in place. Only when the human format goes to a terminal.

use std::collections::BTreeMap;

use super::Record;
use crate::engine::verdict::Outcome;

const RESET: &str = "\x1b[0m";
/// Return to the line's start and clear it: the status line is replaced, never scrolled.
pub const CLEAR_LINE: &str = "\r\x1b[K";

/// Standard output's terminal width in columns, when it is a terminal (`TIOCGWINSZ`).
pub fn columns() -> Option<usize> {
    // SAFETY: a zeroed winsize is valid; TIOCGWINSZ only writes into it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ on stdout with a pointer to a winsize.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

/// The colour of an outcome.
pub fn colour(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Failed => "\x1b[31m",
        Outcome::Stalled => "\x1b[33m",
        Outcome::Established | Outcome::Resolved => "\x1b[32m",
    }
}

/// `text` in the outcome's colour.
pub fn paint(text: &str, outcome: Outcome) -> String {
    format!("{}{text}{RESET}", colour(outcome))
}

/// Running counts for the status line.
#[derive(Debug, Default)]
pub struct Status {
    by_outcome: BTreeMap<&'static str, u64>,
    by_reason: BTreeMap<&'static str, u64>,
    drops: u64,
    lost: u64,
}

impl Status {
    pub fn count(&mut self, record: &Record<'_>) {
        match record {
            Record::Verdict(v) => {
                *self.by_outcome.entry(v.outcome.name()).or_default() += 1;
                *self.by_reason.entry(v.reason.code()).or_default() += 1;
            }
            Record::Drop(_) => self.drops += 1,
            Record::Lost(l) => self.lost = l.count,
            Record::Ready(_) | Record::Summary(_) => {}
        }
    }

    /// `[conntrace] 12 verdicts: failed 10, stalled 2 | syn_timeout 5, ... | 3 drops | 0 lost`
    pub fn line(&self) -> String {
        let join = |m: &BTreeMap<&str, u64>| {
            let mut v: Vec<(&str, u64)> = m.iter().map(|(k, n)| (*k, *n)).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            v.iter()
                .take(4)
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let total: u64 = self.by_outcome.values().sum();
        let noun = if total == 1 { "verdict" } else { "verdicts" };
        let mut line = format!("[conntrace] {total} {noun}");
        if total > 0 {
            line.push_str(&format!(
                ": {} | {}",
                join(&self.by_outcome),
                join(&self.by_reason)
            ));
        }
        line.push_str(&format!(" | {} drops | {} lost", self.drops, self.lost));
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_counts_lost_events_and_drops() {
        let mut s = Status::default();
        s.count(&Record::Lost(crate::output::Lost {
            count: 7,
            new: 7,
            ts_ns: 0,
        }));
        assert_eq!(s.line(), "[conntrace] 0 verdicts | 0 drops | 7 lost");
        assert!(paint("x", Outcome::Failed).starts_with("\x1b[31m"));
    }
}
