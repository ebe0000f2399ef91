//! Which sealed transfer gets the next send slot, and which running one gives its slot up.
//!
//! The sans-IO core of the background sender ([`super::send`]): [`Sched`] holds one FIFO of
//! waiting transfers per hospital and the transfers running in at most `transport.max_transfers`
//! slots. Every event (a transfer queued, a send ended, a send yielded its slot) returns the
//! [`Action`]s the caller must carry out; the scheduler itself starts, stops and awaits
//! nothing, and reads no clock.
//!
//! How the slots are shared:
//!
//! - A free slot goes to the hospital with waiting work that runs the fewest transfers; ties
//!   are broken round robin (the first such hospital after the one served last, by name).
//! - A hospital's fair share is `max / active hospitals` slots (at least one), where an
//!   active hospital has a transfer waiting or running. When no slot is free and a hospital
//!   with waiting work runs fewer than its share, the hospital running the most transfers
//!   (more than its share) yields one: its most recently started transfer is asked to stop
//!   ([`Action::Yield`]); once it did ([`Sched::yielded`]) it goes back to the head of its
//!   hospital's queue and the slot goes to the hospital that was short.
//! - A transfer that fails, retries or is slow holds its one slot and nothing else: the
//!   scheduler never waits on a send.
//!
//! What this file must not do: perform I/O, block, or start a transfer twice (an id is in
//! at most one queue or slot at a time).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

/// What the caller must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<T> {
    /// Start sending this transfer: it holds a slot now.
    Start(T),
    /// Ask this running transfer to stop and give its slot up; report it with
    /// [`Sched::yielded`] if it stopped, or [`Sched::done`] if it ended anyway.
    Yield(T),
}

#[derive(Debug)]
struct Running<T> {
    id: T,
    /// Start order: the highest is the most recently started.
    order: u64,
    /// Asked to yield; its slot is about to come free.
    yielding: bool,
}

#[derive(Debug)]
struct Hospital<T> {
    waiting: VecDeque<T>,
    running: Vec<Running<T>>,
}

impl<T> Default for Hospital<T> {
    fn default() -> Self {
        Hospital {
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }
}

impl<T> Hospital<T> {
    /// Running transfers not asked to yield.
    fn keeping(&self) -> usize {
        self.running.iter().filter(|r| !r.yielding).count()
    }
}

/// The per-hospital queues and the slots. See the module documentation for the rules.
#[derive(Debug)]
pub struct Sched<T> {
    max: usize,
    hospitals: BTreeMap<String, Hospital<T>>,
    /// The hospital given a slot last (round robin continues after it).
    last: Option<String>,
    started: u64,
}

impl<T: Clone + PartialEq> Sched<T> {
    /// A scheduler of `max` slots (at least one).
    pub fn new(max: usize) -> Sched<T> {
        Sched {
            max: max.max(1),
            hospitals: BTreeMap::new(),
            last: None,
            started: 0,
        }
    }

    /// Queues `id` of `hospital` at the tail of its hospital's queue.
    pub fn push(&mut self, hospital: &str, id: T) -> Vec<Action<T>> {
        self.hospitals
            .entry(hospital.to_owned())
            .or_default()
            .waiting
            .push_back(id);
        self.step()
    }

    /// The send of `id` ended (sent, failed, or stopped by the shutdown): its slot is free.
    pub fn done(&mut self, id: &T) -> Vec<Action<T>> {
        self.remove_running(id);
        self.step()
    }

    /// `id` stopped as asked by [`Action::Yield`]: its slot is free and it waits again, at
    /// the head of its hospital's queue.
    pub fn yielded(&mut self, id: &T) -> Vec<Action<T>> {
        if let Some(hospital) = self.remove_running(id) {
            self.hospitals
                .entry(hospital)
                .or_default()
                .waiting
                .push_front(id.clone());
        }
        self.step()
    }

    /// Transfers waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.hospitals.values().map(|h| h.waiting.len()).sum()
    }

    /// Transfers holding a slot.
    pub fn running(&self) -> usize {
        self.hospitals.values().map(|h| h.running.len()).sum()
    }

    /// Slots one active hospital may count on: `max / active hospitals`, at least one.
    pub fn fair_share(&self) -> usize {
        let active = self.hospitals.len().max(1);
        (self.max / active).max(1)
    }

    fn remove_running(&mut self, id: &T) -> Option<String> {
        let name = self
            .hospitals
            .iter()
            .find(|(_, h)| h.running.iter().any(|r| r.id == *id))
            .map(|(name, _)| name.clone())?;
        let h = self.hospitals.get_mut(&name)?;
        h.running.retain(|r| r.id != *id);
        if h.running.is_empty() && h.waiting.is_empty() {
            self.hospitals.remove(&name);
        }
        Some(name)
    }

    /// The hospital that gets the next free slot: waiting work, fewest running, round robin
    /// after the one served last among equals.
    fn next_hospital(&self) -> Option<String> {
        let after: Vec<&String> = match &self.last {
            Some(last) => self
                .hospitals
                .range::<str, _>((Bound::Excluded(last.as_str()), Bound::Unbounded))
                .chain(
                    self.hospitals
                        .range::<str, _>((Bound::Unbounded, Bound::Included(last.as_str()))),
                )
                .map(|(n, _)| n)
                .collect(),
            None => self.hospitals.keys().collect(),
        };
        let mut best: Option<(&String, usize)> = None;
        for name in after {
            let h = &self.hospitals[name];
            if h.waiting.is_empty() {
                continue;
            }
            if best.is_none_or(|(_, n)| h.running.len() < n) {
                best = Some((name, h.running.len()));
            }
        }
        best.map(|(n, _)| n.clone())
    }

    fn step(&mut self) -> Vec<Action<T>> {
        let mut out = Vec::new();
        while self.running() < self.max {
            let Some(name) = self.next_hospital() else {
                break;
            };
            let h = self.hospitals.get_mut(&name).expect("chosen from the map");
            let id = h.waiting.pop_front().expect("chosen for its waiting work");
            self.started += 1;
            h.running.push(Running {
                id: id.clone(),
                order: self.started,
                yielding: false,
            });
            self.last = Some(name);
            out.push(Action::Start(id));
        }
        if self.running() < self.max {
            return out;
        }
        // Every slot is held: does a hospital run fewer than its share while another runs
        // more? Slots already being yielded count as coming to the short ones.
        let share = self.fair_share();
        let short: usize = self
            .hospitals
            .values()
            .map(|h| share.saturating_sub(h.running.len()).min(h.waiting.len()))
            .sum();
        let coming = self
            .hospitals
            .values()
            .flat_map(|h| &h.running)
            .filter(|r| r.yielding)
            .count();
        for _ in coming..short {
            let victim = self
                .hospitals
                .values_mut()
                .filter(|h| h.keeping() > share)
                .max_by_key(|h| h.keeping());
            let Some(victim) = victim else {
                break;
            };
            let newest = victim
                .running
                .iter_mut()
                .filter(|r| !r.yielding)
                .max_by_key(|r| r.order)
                .expect("a hospital over its share runs one");
            newest.yielding = true;
            out.push(Action::Yield(newest.id.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{Action, Sched};

    fn starts(a: &[Action<u32>]) -> Vec<u32> {
        a.iter()
            .filter_map(|a| match a {
                Action::Start(id) => Some(*id),
                Action::Yield(_) => None,
            })
            .collect()
    }

    fn yields(a: &[Action<u32>]) -> Vec<u32> {
        a.iter()
            .filter_map(|a| match a {
                Action::Yield(id) => Some(*id),
                Action::Start(_) => None,
            })
            .collect()
    }

    #[test]
    fn never_runs_more_than_max_and_starts_in_fifo_order_per_hospital() {
        let mut s = Sched::new(2);
        assert_eq!(starts(&s.push("a", 1)), [1]);
        assert_eq!(starts(&s.push("a", 2)), [2]);
        assert!(s.push("a", 3).is_empty());
        assert!(s.push("a", 4).is_empty());
        assert_eq!((s.running(), s.waiting()), (2, 2));
        assert_eq!(s.done(&1), [Action::Start(3)]);
        assert_eq!(s.done(&2), [Action::Start(4)]);
        assert!(s.done(&3).is_empty());
        assert!(s.done(&4).is_empty());
        assert_eq!((s.running(), s.waiting()), (0, 0));
    }

    #[test]
    fn one_slot_is_one_transfer_at_a_time_and_never_preempts() {
        let mut s = Sched::new(1);
        assert_eq!(starts(&s.push("a", 1)), [1]);
        // Another hospital waits, but with one slot its share is that slot: no yield.
        assert!(s.push("b", 2).is_empty());
        assert_eq!(s.done(&1), [Action::Start(2)]);
    }

    #[test]
    fn free_slots_go_round_robin_between_hospitals() {
        let mut s = Sched::new(1);
        assert_eq!(starts(&s.push("a", 1)), [1]);
        for id in [2, 3, 4] {
            s.push("a", id);
        }
        for id in [11, 12] {
            s.push("b", id);
        }
        s.push("c", 21);
        let mut order = Vec::new();
        let mut last = 1;
        while let Some(Action::Start(next)) = s.done(&last).first().cloned() {
            order.push(next);
            last = next;
        }
        assert_eq!(order, [11, 21, 2, 12, 3, 4]);
    }

    #[test]
    fn a_free_slot_goes_to_the_hospital_running_fewest() {
        let mut s = Sched::new(2);
        s.push("a", 1);
        s.push("b", 11);
        s.push("a", 2);
        s.push("b", 12);
        // Round robin alone would serve a next (b was served last), but when b's 11 ends
        // b runs none and a runs one: b's 12 gets the slot.
        assert_eq!(s.done(&11), [Action::Start(12)]);
        assert_eq!(s.done(&12), [Action::Start(2)]);
    }

    #[test]
    fn a_hospital_holding_every_slot_yields_its_newest_to_one_that_waits() {
        let mut s = Sched::new(4);
        for id in 1..=6 {
            s.push("a", id);
        }
        assert_eq!(s.running(), 4);
        // b comes: share is 2 each; a yields its most recently started transfer (4).
        let a = s.push("b", 11);
        assert_eq!(yields(&a), [4]);
        assert!(starts(&a).is_empty());
        // A second study of b: a yields the next newest (3), not 4 again.
        assert_eq!(yields(&s.push("b", 12)), [3]);
        // A third: b would be over its share, nothing more yields.
        assert!(s.push("b", 13).is_empty());
        // 4 stopped: its slot goes to b, and 4 waits at the head of a's queue.
        assert_eq!(s.yielded(&4), [Action::Start(11)]);
        assert_eq!(s.yielded(&3), [Action::Start(12)]);
        // b's 11 ends: b still runs fewer than a? a runs 1, 2 (two), b runs 12 (one), b
        // has 13 waiting: 13 starts.
        assert_eq!(s.done(&11), [Action::Start(13)]);
        // b is done: a's yielded transfers resume first, in their order.
        assert_eq!(s.done(&12), [Action::Start(3)]);
        assert_eq!(s.done(&13), [Action::Start(4)]);
        assert_eq!(s.done(&1), [Action::Start(5)]);
    }

    #[test]
    fn a_transfer_that_ends_instead_of_yielding_frees_its_slot_all_the_same() {
        let mut s = Sched::new(2);
        s.push("a", 1);
        s.push("a", 2);
        assert_eq!(yields(&s.push("b", 11)), [2]);
        // 2 finished before it saw the request: the slot still goes to b, and 2 is gone.
        assert_eq!(s.done(&2), [Action::Start(11)]);
        assert!(s.done(&1).is_empty());
        assert!(s.done(&11).is_empty());
        assert_eq!((s.running(), s.waiting()), (0, 0));
    }

    #[test]
    fn more_hospitals_than_slots_take_turns_without_preempting() {
        let mut s = Sched::new(2);
        s.push("a", 1);
        s.push("b", 11);
        // Share is one each; c waits for a free slot rather than taking one.
        assert!(s.push("c", 21).is_empty());
        assert!(s.push("a", 2).is_empty());
        assert_eq!(s.done(&1), [Action::Start(21)]);
        assert_eq!(s.done(&11), [Action::Start(2)]);
    }

    #[test]
    fn a_failing_transfer_holds_only_its_own_slot() {
        // 1 never ends (it retries): every other transfer still goes through the rest.
        let mut s = Sched::new(2);
        s.push("a", 1);
        for id in 2..=5 {
            s.push("a", id);
        }
        for id in 2..=5 {
            assert_eq!(
                s.done(&id),
                if id < 5 {
                    vec![Action::Start(id + 1)]
                } else {
                    vec![]
                }
            );
        }
        assert_eq!((s.running(), s.waiting()), (1, 0));
    }
}
