//! The per-node flow ring: the latest `capacity` flows, each with a sequence number so
//! followers can ask for what came after the last one they saw.

use std::collections::VecDeque;

use crate::filter::Filter;
use crate::record::Flow;

#[derive(Debug)]
pub struct FlowRing {
    capacity: usize,
    flows: VecDeque<(u64, Flow)>,
    next_seq: u64,
    /// Flows overwritten before anyone asked for them (the ring was full).
    overwritten: u64,
}

impl FlowRing {
    /// A ring holding at most `capacity` flows (at least 1).
    pub fn new(capacity: usize) -> FlowRing {
        let capacity = capacity.max(1);
        FlowRing {
            capacity,
            flows: VecDeque::with_capacity(capacity.min(1 << 16)),
            next_seq: 1,
            overwritten: 0,
        }
    }

    pub fn push(&mut self, flow: Flow) {
        if self.flows.len() == self.capacity {
            self.flows.pop_front();
            self.overwritten += 1;
        }
        self.flows.push_back((self.next_seq, flow));
        self.next_seq += 1;
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn overwritten(&self) -> u64 {
        self.overwritten
    }

    /// Sequence number the next flow will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The last `n` flows matching `filter`, oldest first.
    pub fn last(&self, n: usize, filter: &Filter) -> Vec<(u64, Flow)> {
        let mut out: Vec<(u64, Flow)> = self
            .flows
            .iter()
            .rev()
            .filter(|(_, f)| filter.matches(f))
            .take(n)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Flows with a sequence number >= `seq` matching `filter`, oldest first.
    pub fn since(&self, seq: u64, filter: &Filter) -> Vec<(u64, Flow)> {
        // Sequence numbers are dense, so the start index is arithmetic.
        let first = self.flows.front().map_or(self.next_seq, |(s, _)| *s);
        let skip = seq.saturating_sub(first) as usize;
        self.flows
            .iter()
            .skip(skip)
            .filter(|(_, f)| filter.matches(f))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Directory;
    use crate::record::build_flow;
    use crate::record::tests::event;

    fn flow(port: u16) -> Flow {
        let mut ev = event("TO_ENDPOINT", false);
        ev.dport = port;
        build_flow(&ev, &Directory::default(), "n")
    }

    #[test]
    fn keeps_the_latest_and_counts_what_it_overwrote() {
        let mut r = FlowRing::new(3);
        for p in 1..=5 {
            r.push(flow(p));
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.overwritten(), 2);
        let ports: Vec<u16> = r
            .last(10, &Filter::default())
            .iter()
            .map(|(_, f)| f.ports().1)
            .collect();
        assert_eq!(ports, vec![3, 4, 5]);
        assert_eq!(r.last(2, &Filter::default())[0].1.ports().1, 4);
        let since: Vec<u64> = r
            .since(5, &Filter::default())
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(since, vec![5]);
        assert_eq!(
            r.since(1, &Filter::default()).len(),
            3,
            "older than the ring: all"
        );
        assert!(r.since(6, &Filter::default()).is_empty());
    }

    #[test]
    fn last_applies_the_filter_before_counting() {
        let mut r = FlowRing::new(10);
        for p in [80, 81, 80, 82] {
            r.push(flow(p));
        }
        let f = Filter::parse_query("port=80").unwrap();
        let got = r.last(1, &f);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 3);
    }
}
