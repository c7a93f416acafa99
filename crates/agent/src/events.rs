//! Datapath events: counted in memory (exported as metrics later) and logged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Event counts by kind and reason since the agent started.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventCounters {
    pub drops_by_reason: BTreeMap<String, u64>,
    pub traces_by_point: BTreeMap<String, u64>,
    /// Records that were not drop or trace events (a newer datapath than this agent).
    pub unknown: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Drop,
    Trace,
    Unknown,
}

impl EventCounters {
    /// Counts one event; returns true if it is the first of its reason (worth an info log).
    pub fn record(&mut self, kind: Kind, reason: &str) -> bool {
        let table = match kind {
            Kind::Drop => &mut self.drops_by_reason,
            Kind::Trace => &mut self.traces_by_point,
            Kind::Unknown => {
                self.unknown += 1;
                return self.unknown == 1;
            }
        };
        let n = table.entry(reason.to_string()).or_insert(0);
        *n += 1;
        *n == 1
    }

    pub fn total_drops(&self) -> u64 {
        self.drops_by_reason.values().sum()
    }
}

pub type SharedCounters = Arc<Mutex<EventCounters>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_reason_and_flags_first_occurrence() {
        let mut c = EventCounters::default();
        assert!(c.record(Kind::Drop, "SPOOFED_IP"));
        assert!(!c.record(Kind::Drop, "SPOOFED_IP"));
        assert!(c.record(Kind::Drop, "NO_TUNNEL_ENDPOINT"));
        assert!(c.record(Kind::Trace, "TO_OVERLAY"));
        assert!(c.record(Kind::Unknown, "?"));
        assert_eq!(c.drops_by_reason["SPOOFED_IP"], 2);
        assert_eq!(c.total_drops(), 3);
        assert_eq!(c.traces_by_point["TO_OVERLAY"], 1);
        assert_eq!(c.unknown, 1);
    }
}
