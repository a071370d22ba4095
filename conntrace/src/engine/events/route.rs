//! `connect()` failures seen through their route lookups (quiet mode): each failed table answer
//! is held in its walk (`state::route`) until the grace period shows that the `connect()` did
//! not go on; then `rules::connect::route_failed` decides its errno and verdict.

use super::super::{
    Engine,
    facts::{FourTuple, Meta, TableAnswer},
    rules,
    verdict::Verdict,
};

impl Engine {
    pub(super) fn on_route_lookup_failed(
        &mut self,
        meta: Meta,
        tuple: FourTuple,
        table: u32,
        answer: TableAnswer,
    ) {
        let netns = meta.netns;
        let Some(walk) = self.table.route_walks_mut().add(meta, tuple, table, answer) else {
            self.summary.unmatched_errors += 1;
            return;
        };
        // The namespace's route now, as the kernel answered (see `Walk::route`).
        walk.route = self
            .lookups
            .namespaces
            .as_mut()
            .and_then(|ns| ns.route_to(netns, tuple.daddr));
    }

    /// The `connect()` of `meta`'s process to `tuple`'s destination went on (its socket moved
    /// to SYN_SENT) or reported its own result (the syscall): the route lookup it made last
    /// was not its end, whatever a table answered on the way.
    pub(super) fn settle_route_walk(&mut self, meta: &Meta, tuple: &FourTuple) {
        let walks = self.table.route_walks_mut();
        let key = (meta.netns, meta.proc.pid, tuple.daddr, tuple.dport);
        // The lookups' namespace is the task's, read apart from the socket's: either may be
        // unread.
        if !walks.settle(&key) && meta.netns.is_some() {
            walks.settle(&(None, meta.proc.pid, tuple.daddr, tuple.dport));
        }
    }

    /// Decides the walks that waited out the grace period (all of them when `all`).
    pub(in crate::engine) fn decide_route_walks(
        &mut self,
        now_ns: u64,
        all: bool,
        out: &mut Vec<Verdict>,
    ) {
        let grace = self.cfg.grace_ns;
        for walk in self.table.route_walks_mut().take_ready(now_ns, grace, all) {
            // Which table ended the walk is not traced when it answered with a route: the
            // namespace's own route, read when the kernel answered, says whether one exists
            // (read now only where it could not be read then).
            let route = walk.route.clone().or_else(|| {
                self.lookups
                    .namespaces
                    .as_mut()
                    .and_then(|ns| ns.route_to(walk.meta.netns, walk.tuple.daddr))
            });
            if let Some(v) = rules::connect::route_failed(&walk, route.as_ref()) {
                self.emit(out, v);
            }
        }
    }
}
