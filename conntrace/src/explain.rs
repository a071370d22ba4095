//! `conntrace explain [REASON]`: what a reason code means, how conntrace decides it, what to do
//! (all from the one table of reasons, `engine::verdict::REASONS`).

use std::io::Write;

use crate::engine::verdict::{REASONS, Reason, ReasonDoc};

/// Writes the explanation of one reason.
pub fn write_one(out: &mut impl Write, doc: &ReasonDoc) -> std::io::Result<()> {
    writeln!(out, "{} ({})", doc.code, doc.sides)?;
    writeln!(out, "  how conntrace decides: {}", doc.decided)?;
    writeln!(out, "  what to do: {}", doc.advice)?;
    writeln!(out, "  decided in: conntrace/src/engine/rules/{}", doc.home)
}

/// `conntrace explain [REASON]`. An unknown code is an error listing the known ones.
pub fn run(out: &mut impl Write, code: Option<&str>) -> Result<(), ExplainError> {
    match code {
        Some(code) => {
            let reason =
                Reason::from_code(code).ok_or_else(|| ExplainError::Unknown(code.to_owned()))?;
            write_one(out, reason.doc())?;
        }
        None => {
            for doc in REASONS {
                write_one(out, doc)?;
                writeln!(out)?;
            }
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("unknown reason `{0}`: `conntrace explain` lists them all")]
    Unknown(String),
    #[error("write the explanation: {0}")]
    Write(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed_and_parses_back() {
        let mut text = Vec::new();
        run(&mut text, None).expect("explain all");
        let text = String::from_utf8(text).expect("utf-8");
        for d in REASONS {
            assert!(
                text.contains(&format!("{} (", d.code)),
                "{} missing",
                d.code
            );
        }
        let mut one = Vec::new();
        run(&mut one, Some("syncookie_ack_lost")).expect("explain one");
        assert!(String::from_utf8_lossy(&one).starts_with("syncookie_ack_lost (server)\n"));
        assert!(matches!(
            run(&mut Vec::new(), Some("nope")),
            Err(ExplainError::Unknown(_))
        ));
    }
}
