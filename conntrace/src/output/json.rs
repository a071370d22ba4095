//! JSON Lines: one object per line, `event` first. The format is documented in
//! docs/events.md and docs/events.schema.json.

use serde_json::{Value, json};

use super::{Clock, Record};
use crate::engine::verdict::{Summary, Verdict};

fn verdict(v: &Verdict, clock: &Clock) -> Value {
    json!({
        "event": "verdict",
        "ts": clock.rfc3339(v.ts_ns),
        "side": v.side,
        "outcome": v.outcome,
        "reason": v.reason,
        "kernel_reason": v.kernel_reason,
        "errno": v.errno,
        "saddr": v.saddr.map(|a| a.to_string()),
        "sport": v.sport,
        "daddr": v.daddr.to_string(),
        "dport": v.dport,
        "netns": v.netns,
        "pid": v.pid,
        "comm": v.comm,
        "duration_ms": v.duration_ms,
        "syn_retransmits": v.syn_retransmits,
        "detail": v.detail,
    })
}

pub(super) fn line(record: &Record<'_>, clock: &Clock) -> String {
    let value = match record {
        Record::Ready(r) => {
            let mut v = json!({ "event": "ready", "ts": clock.rfc3339(Clock::mono_now_ns()) });
            if let (Value::Object(obj), Ok(Value::Object(rest))) = (&mut v, serde_json::to_value(r))
            {
                obj.extend(rest);
            }
            v
        }
        Record::Verdict(v) => verdict(v, clock),
        Record::Drop(d) => json!({
            "event": "drop",
            "ts": clock.rfc3339(d.ts_ns),
            "direction": d.direction,
            "kernel_reason": d.kernel_reason,
            "location": d.location,
            "tcp_flags": d.tcp_flags,
            "saddr": d.saddr.to_string(),
            "sport": d.sport,
            "daddr": d.daddr.to_string(),
            "dport": d.dport,
            "netns": d.netns,
            "pid": d.pid,
            "comm": d.comm,
        }),
        Record::Lost { total, new, ts_ns } => {
            json!({ "event": "lost", "ts": clock.rfc3339(*ts_ns), "count": total, "new": new })
        }
        Record::Summary(f) => {
            let by_outcome: serde_json::Map<String, Value> = f
                .summary
                .by_outcome
                .iter()
                .map(|(k, n)| (json!(k).as_str().unwrap_or_default().to_owned(), json!(n)))
                .collect();
            let by_reason: serde_json::Map<String, Value> = f
                .summary
                .by_reason
                .iter()
                .map(|(k, n)| (k.code().to_owned(), json!(n)))
                .collect();
            json!({
                "event": "summary",
                "ts": clock.rfc3339(Clock::mono_now_ns()),
                "duration_ms": f.duration_ms,
                "verdicts": f.summary.by_outcome.values().sum::<u64>(),
                "by_outcome": by_outcome,
                "by_reason": by_reason,
                "expired_unresolved": f.summary.expired_unresolved,
                "open_at_exit": f.tracked_at_exit,
                "lost_events": f.lost_events,
                "kernel_events": f.summary.events,
                "established": {
                    "client": f.summary.established.0,
                    "server": f.summary.established.1,
                },
                "decode_errors": f.decode_errors,
                "unmatched_errors": f.summary.unmatched_errors,
                "stray_resets": f.summary.stray_resets,
                "drops_by_reason": f.summary.drops_by_reason,
                "drop_records_suppressed": f.summary.drop_records_suppressed,
                "attempt_verdicts_suppressed": f.summary.attempt_verdicts_suppressed,
                "listeners": f.summary.listeners,
                "top_failing_peers": Summary::top(&f.summary.failing_peers, 10)
                    .into_iter()
                    .map(|(addr, count)| json!({"addr": addr.to_string(), "count": count}))
                    .collect::<Vec<_>>(),
                "top_failing_ports": Summary::top(&f.summary.failing_ports, 10)
                    .into_iter()
                    .map(|(port, count)| json!({"port": port, "count": count}))
                    .collect::<Vec<_>>(),
                "connect_latency_ms": f.summary.latency_percentiles().map(
                    |(count, p50, p90, p99, max)| {
                        json!({"count": count, "p50": p50, "p90": p90, "p99": p99, "max": max})
                    }
                ),
                "tcp_counters": f.tcp_counters,
            })
        }
    };
    value.to_string()
}
