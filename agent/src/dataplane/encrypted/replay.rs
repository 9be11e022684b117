//! Anti-replay window for one receive key (sans-IO).
//!
//! A sliding bitmap over the last [`WINDOW`] sequence numbers, kept as a
//! ring of 64-bit words (RFC 6479, "IPsec Anti-Replay Algorithm without Bit
//! Shifting"): sliding forward clears whole words, never shifts the map, so
//! each packet costs O(1) whatever the jump.
//!
//! Checking and recording are separate on purpose: the receiver asks
//! [`ReplayWindow::check`] before opening a packet and calls
//! [`ReplayWindow::record`] only after the tag verified, so forged packets
//! (which fail the tag) can never move the window or mark a number seen.

/// Sequence numbers tracked behind the highest one seen (DESIGN.md asks
/// for at least 2048; reordering across GSO batches and two workers stays
/// well inside 4096).
pub const WINDOW: u64 = 4096;
const WORDS: usize = (WINDOW / 64) as usize + 1;

/// Why a sequence number is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Replay {
    #[error("sequence number already received (replay)")]
    Seen,
    #[error("sequence number too far behind the window (replay or extreme reordering)")]
    TooOld,
}

#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// One past the highest sequence number recorded; 0 before any.
    top: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub const fn new() -> Self {
        Self {
            top: 0,
            bits: [0; WORDS],
        }
    }

    fn slot(seq: u64) -> (usize, u64) {
        (((seq / 64) as usize) % WORDS, 1u64 << (seq % 64))
    }

    /// Whether `seq` may be new: ahead of the window, or inside it and not
    /// yet seen. Changes nothing.
    pub fn check(&self, seq: u64) -> Result<(), Replay> {
        if seq >= self.top {
            return Ok(());
        }
        if self.top - seq > WINDOW {
            return Err(Replay::TooOld);
        }
        let (word, bit) = Self::slot(seq);
        if self.bits[word] & bit != 0 {
            Err(Replay::Seen)
        } else {
            Ok(())
        }
    }

    /// Marks `seq` received (after its tag verified). Returns the same
    /// verdict as [`check`](Self::check) would have; on `Err` nothing
    /// changes, so a caller that skipped `check` is still safe.
    pub fn record(&mut self, seq: u64) -> Result<(), Replay> {
        self.check(seq)?;
        if seq >= self.top {
            self.advance(seq);
        }
        let (word, bit) = Self::slot(seq);
        self.bits[word] |= bit;
        Ok(())
    }

    /// Slides the window so `seq` is the highest number, clearing the
    /// words that fall out of it.
    fn advance(&mut self, seq: u64) {
        let old_word = if self.top == 0 {
            None
        } else {
            Some((self.top - 1) / 64)
        };
        let new_word = seq / 64;
        match old_word {
            Some(old) if new_word - old < WORDS as u64 => {
                for w in old + 1..=new_word {
                    self.bits[(w as usize) % WORDS] = 0;
                }
            }
            // First packet, or a jump past the whole window.
            _ => self.bits = [0; WORDS],
        }
        self.top = seq + 1;
    }

    /// One past the highest sequence number recorded.
    pub fn top(&self) -> u64 {
        self.top
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_then_replays() {
        let mut w = ReplayWindow::new();
        for s in 0..10_000 {
            assert_eq!(w.record(s), Ok(()), "{s}");
        }
        for s in [9_999, 9_000, 10_000 - WINDOW] {
            assert_eq!(w.record(s), Err(Replay::Seen), "{s}");
        }
        assert_eq!(w.check(10_000 - WINDOW - 1), Err(Replay::TooOld));
        assert_eq!(w.check(0), Err(Replay::TooOld));
    }

    #[test]
    fn reordering_inside_the_window_is_accepted_once() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.record(5_000), Ok(()));
        // The window: the WINDOW numbers ending at the highest seen.
        for s in (5_000 - WINDOW + 1..5_000).rev() {
            assert_eq!(w.record(s), Ok(()), "{s}");
        }
        assert_eq!(w.check(5_000 - WINDOW), Err(Replay::TooOld));
        for s in 5_000 - WINDOW + 1..=5_000 {
            assert_eq!(w.check(s), Err(Replay::Seen), "{s}");
        }
    }

    #[test]
    fn check_changes_nothing_and_a_failed_record_changes_nothing() {
        let mut w = ReplayWindow::new();
        w.record(100).unwrap();
        let before = w.clone();
        assert_eq!(w.check(1_000_000), Ok(()));
        assert_eq!(w.record(100), Err(Replay::Seen));
        assert_eq!(w.top(), before.top());
        assert_eq!(w.bits, before.bits);
    }

    #[test]
    fn a_jump_past_the_window_forgets_everything_behind_it() {
        let mut w = ReplayWindow::new();
        for s in 0..100 {
            w.record(s).unwrap();
        }
        w.record(1_000_000).unwrap();
        // Numbers just behind the jump were never seen: accepted.
        assert_eq!(w.record(1_000_000 - 1), Ok(()));
        assert_eq!(w.record(1_000_000 - WINDOW + 1), Ok(()));
        assert_eq!(w.check(99), Err(Replay::TooOld));
    }

    /// Against a model (a set of everything recorded plus the window
    /// rule), over pseudo-random streams with jumps, reorders and replays.
    #[test]
    fn matches_a_set_model() {
        use std::collections::BTreeSet;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..50 {
            let mut w = ReplayWindow::new();
            let mut seen = BTreeSet::new();
            let mut top = 0u64;
            for _ in 0..5_000 {
                let r = next();
                let seq = match r % 10 {
                    0 => top + r % 10_000,                          // jump ahead
                    1..=3 => top.saturating_sub(r % (WINDOW + 50)), // reorder / replay
                    _ => top,                                       // in order
                };
                let want = if seq >= top {
                    Ok(())
                } else if top - seq > WINDOW {
                    Err(Replay::TooOld)
                } else if seen.contains(&seq) {
                    Err(Replay::Seen)
                } else {
                    Ok(())
                };
                assert_eq!(w.record(seq), want, "seq {seq} top {top}");
                if want.is_ok() {
                    seen.insert(seq);
                    top = top.max(seq + 1);
                }
            }
        }
    }
}
