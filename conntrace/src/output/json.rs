//! JSON Lines: one object per line, `event` first, each record a typed struct (`record.rs`)
//! serialized straight to the writer. The format is documented in docs/events.md and
//! docs/events.schema.json (generated from the same types).

use std::io::{self, Write};

use super::{Clock, Record, record::JsonRecord};

/// Writes `record` as one line, with `node` when given.
pub(super) fn write(
    out: &mut impl Write,
    record: &Record<'_>,
    clock: &Clock,
    node: Option<&str>,
) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &JsonRecord::new(record, clock, node))?;
    out.write_all(b"\n")
}
