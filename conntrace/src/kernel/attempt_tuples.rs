//! Userspace's book of the handshake attempts it asks the kernel to follow by tuple
//! (`WATCH_TUPLES`): which tuples are in the map, which found it full, and when to try those
//! again. Pure bookkeeping; the map operations are the caller's closures, so that every rule
//! here is tested without a kernel.

use std::collections::HashMap;

use conntrace_common::Tuple;

/// Tuples that found the map full tried again per [`AttemptTuples::retry`].
pub const RETRIES: usize = 256;

/// The open attempts per tuple, in the map (`placed`) or waiting for room (`unplaced`).
#[derive(Debug, Default)]
pub struct AttemptTuples {
    placed: HashMap<Tuple, u32>,
    unplaced: HashMap<Tuple, u32>,
    /// A tuple left the map since the unplaced ones were last tried again.
    freed: bool,
    /// Attempts that found the map full, over the run.
    failures: u64,
}

impl AttemptTuples {
    /// An attempt with tuple `t` opened. `insert` puts a tuple in the map (false: no room); it
    /// is called only for a tuple no open attempt has. True when `t` is watched precisely
    /// (in the map), false when it waits for room.
    pub fn follow(&mut self, t: Tuple, insert: impl FnOnce(&Tuple) -> bool) -> bool {
        if let Some(n) = self.placed.get_mut(&t) {
            *n += 1;
            return true;
        }
        if let Some(n) = self.unplaced.get_mut(&t) {
            *n += 1;
            return false;
        }
        if insert(&t) {
            self.placed.insert(t, 1);
            return true;
        }
        self.failures += 1;
        self.unplaced.insert(t, 1);
        false
    }

    /// An attempt with tuple `t` closed. `remove` takes a tuple out of the map; it is called
    /// when the last open attempt of a placed tuple closes.
    pub fn unfollow(&mut self, t: Tuple, remove: impl FnOnce(&Tuple)) {
        for (book, placed) in [(&mut self.placed, true), (&mut self.unplaced, false)] {
            let Some(n) = book.get_mut(&t) else { continue };
            *n -= 1;
            if *n == 0 {
                book.remove(&t);
                if placed {
                    remove(&t);
                    self.freed = true;
                }
            }
            return;
        }
    }

    /// Once a tuple has left the map: tries at most [`RETRIES`] waiting tuples again with
    /// `insert`, stopping at the first that finds no room. True when any moved into the map.
    pub fn retry(&mut self, mut insert: impl FnMut(&Tuple) -> bool) -> bool {
        if !std::mem::take(&mut self.freed) || self.unplaced.is_empty() {
            return false;
        }
        let waiting: Vec<(Tuple, u32)> = self
            .unplaced
            .iter()
            .take(RETRIES)
            .map(|(t, n)| (*t, *n))
            .collect();
        let mut moved = false;
        for (t, n) in waiting {
            if !insert(&t) {
                break;
            }
            self.unplaced.remove(&t);
            self.placed.insert(t, n);
            moved = true;
        }
        moved
    }

    /// Tuples in the map.
    pub fn placed(&self) -> usize {
        self.placed.len()
    }

    /// Whether an open attempt's tuple is not in the map (the kernel must then stream every
    /// listener's child).
    pub fn short_of_room(&self) -> bool {
        !self.unplaced.is_empty()
    }

    /// Attempts that found the map full, over the run.
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    fn tuple(sport: u16) -> Tuple {
        Tuple {
            sport,
            dport: 3306,
            ..Tuple::default()
        }
    }

    /// A map of `room` tuples, recording inserts and removals.
    struct FakeMap {
        room: usize,
        held: RefCell<Vec<Tuple>>,
    }

    impl FakeMap {
        fn new(room: usize) -> Self {
            Self {
                room,
                held: RefCell::new(Vec::new()),
            }
        }
        fn insert(&self, t: &Tuple) -> bool {
            let mut held = self.held.borrow_mut();
            if held.len() >= self.room {
                return false;
            }
            held.push(*t);
            true
        }
        fn remove(&self, t: &Tuple) {
            self.held.borrow_mut().retain(|h| h != t);
        }
    }

    #[test]
    fn a_tuple_shared_by_two_attempts_is_inserted_once_and_removed_with_the_last() {
        let map = FakeMap::new(8);
        let mut book = AttemptTuples::default();
        assert!(book.follow(tuple(1), |t| map.insert(t)));
        assert!(book.follow(tuple(1), |_| panic!("inserted again")));
        assert_eq!(map.held.borrow().len(), 1);
        book.unfollow(tuple(1), |_| panic!("removed while an attempt is open"));
        book.unfollow(tuple(1), |t| map.remove(t));
        assert!(map.held.borrow().is_empty());
        assert_eq!(book.placed(), 0);
    }

    #[test]
    fn a_full_map_leaves_the_book_short_of_room_until_the_waiting_attempt_closes() {
        let map = FakeMap::new(1);
        let mut book = AttemptTuples::default();
        assert!(book.follow(tuple(1), |t| map.insert(t)));
        assert!(!book.follow(tuple(2), |t| map.insert(t)));
        assert!(book.short_of_room());
        assert_eq!(book.failures(), 1);
        // A second attempt of the waiting tuple waits too, without trying the map again.
        assert!(!book.follow(tuple(2), |_| panic!("tried while waiting")));
        book.unfollow(tuple(2), |_| panic!("a waiting tuple is not in the map"));
        assert!(book.short_of_room());
        book.unfollow(tuple(2), |_| panic!("a waiting tuple is not in the map"));
        assert!(!book.short_of_room());
        assert_eq!(book.placed(), 1);
    }

    #[test]
    fn waiting_tuples_go_into_the_map_once_a_tuple_left_it() {
        let map = FakeMap::new(1);
        let mut book = AttemptTuples::default();
        book.follow(tuple(1), |t| map.insert(t));
        book.follow(tuple(2), |t| map.insert(t));
        book.follow(tuple(3), |t| map.insert(t));
        // Nothing left the map: no retry.
        assert!(!book.retry(|_| panic!("retried with no room made")));
        book.unfollow(tuple(1), |t| map.remove(t));
        // One tuple's room: one moves, the other still waits.
        assert!(book.retry(|t| map.insert(t)));
        assert_eq!(book.placed(), 1);
        assert!(book.short_of_room());
        assert_eq!(map.held.borrow().len(), 1);
        // Its attempt closes like any placed one's.
        let moved = map.held.borrow()[0];
        book.unfollow(moved, |t| map.remove(t));
        assert!(book.retry(|t| map.insert(t)));
        assert!(!book.short_of_room());
        assert_eq!(book.failures(), 2);
    }

    #[test]
    fn closing_an_attempt_never_followed_does_nothing() {
        let mut book = AttemptTuples::default();
        book.unfollow(tuple(9), |_| panic!("removed a tuple never added"));
        assert_eq!(book.placed(), 0);
        assert!(!book.short_of_room());
    }
}
